"""Datasets: `dyn.datasets.digits()`, synthetic problems, and the `Dataset` container."""

from ._datasets import (
    Dataset as Dataset,
    circles as circles,
    digits as digits,
    rotational as rotational,
    teacher_student as teacher_student,
)
