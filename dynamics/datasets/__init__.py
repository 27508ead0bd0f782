"""Datasets: `dyn.datasets.digits()`, synthetic problems, the `Dataset` container, and
loaders of the real sets from a local path (`cifar10`, `imdb`; nothing is downloaded)
with bundled stand-ins (`digits_images`, `digits_sequences`)."""

from ._cifar import CIFAR10_CLASSES as CIFAR10_CLASSES, cifar10 as cifar10
from ._datasets import (
    Dataset as Dataset,
    circles as circles,
    digits as digits,
    rotational as rotational,
    teacher_student as teacher_student,
)
from ._files import default_cache_dir as default_cache_dir
from ._imdb import Sequences as Sequences, imdb as imdb
from ._stand_ins import digits_images as digits_images, digits_sequences as digits_sequences
