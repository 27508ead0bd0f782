"""Bundled stand-ins for the real sets: sklearn's digits as images and as sequences."""

import numpy as np

from ._datasets import Dataset
from ._files import check_split
from ._imdb import Sequences

__all__ = ["digits_images", "digits_sequences"]


def _digits_split(split: str, test_fraction: float, seed: int):
    from sklearn.datasets import load_digits

    owner = "digits"
    split = check_split(split, ("train", "test", "all"), owner)
    if not 0 < test_fraction < 1:
        raise ValueError(f"{owner}: `test_fraction` must lie in (0, 1), got {test_fraction!r}.")
    bunch = load_digits()
    img = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    # stratified split, fixed by `seed`: per class, the first round(f·n_c) of a permutation
    rng = np.random.RandomState(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test[idx[: int(round(test_fraction * len(idx)))]] = True
    train_img = img if split == "all" else img[~test]
    sel = {"train": ~test, "test": test, "all": np.ones(len(y), bool)}[split]
    # one channel: a single mean and population std over all pixels of the training images
    mean, std = train_img.mean(), train_img.std()
    return (img[sel] - mean) / std, y[sel], img[sel]


def digits_images(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
                  dtype=np.float32) -> Dataset:
    """sklearn's 8×8 digits (1,797 images, 10 classes) as 1×8×8 images: the bundled
    stand-in for CIFAR-10 in the CNN study.

    Convention as for `cifar10`: per channel (here the only one) a single mean and
    population std over all pixels of the *training* images (x ← (x − mean)/std); note
    that `dynamics.datasets.digits` instead standardizes each pixel separately, which
    suits an MLP but breaks the translation structure a convolution relies on.

    `split`: "train", "test" (a stratified `test_fraction` of each class, fixed by `seed`)
    or "all" (then the statistics are those of all images).
    Returns a `Dataset` with x (N, 1, 8, 8) and labels y (N,), `num_classes=10`.
    """
    x, y, _ = _digits_split(split, test_fraction, seed)
    return Dataset(x[:, None].astype(dtype), y, 10)


def digits_sequences(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
                     min_length: int | None = None, dtype=np.float32) -> Sequences:
    """The digits read row by row: 8 steps of 8 features, 10 classes (the bundled
    stand-in for IMDB in the RNN study; standardization as `digits_images`).

    No digit image has a blank first or last row, so the sequences all have length 8.
    To exercise masks on bundled data, `min_length` (1..8) cuts each sequence to a
    random length in [min_length, 8] (fixed by `seed`; the later rows become zero
    padding): a harder task, since only the top rows are seen.
    Returns `Sequences(x (N, 8, 8), lengths (N,), y (N,), None)`.
    """
    x, y, _ = _digits_split(split, test_fraction, seed)
    lengths = np.full(len(y), 8, dtype=np.int32)
    if min_length is not None:
        if isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer)) \
                or not 1 <= min_length <= 8:
            raise ValueError(f"digits_sequences: `min_length` must be an int in 1..8 or None, "
                             f"got {min_length!r}.")
        rng = np.random.RandomState(seed + 1)
        lengths = rng.randint(min_length, 9, size=len(y)).astype(np.int32)
        x = np.where(np.arange(8)[None, :, None] < lengths[:, None, None], x, 0.0)
    return Sequences(x.astype(dtype), lengths, y, None)
