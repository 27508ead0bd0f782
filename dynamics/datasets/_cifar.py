"""CIFAR-10 from the "python version" on the user's disk (Krizhevsky 2009)."""

import io
import tarfile
from pathlib import Path

import numpy as np

from ._datasets import Dataset
from ._files import cache_paths, check_path, check_split, load_cache, safe_unpickle, save_cache

__all__ = ["CIFAR10_CLASSES", "cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


class _CifarSource:
    """Where the batches are: a directory or a tar(.gz) archive."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.dir = path / _CIFAR_DIR if (path / _CIFAR_DIR).is_dir() else path
            self.archive = None
        elif tarfile.is_tarfile(path):
            self.dir, self.archive = None, path
        else:
            raise ValueError(
                f"cifar10: `path` {str(path)!r} is neither a directory nor a tar archive; "
                f"give the {_CIFAR_DIR}/ directory (or one containing it) or "
                "cifar-10-python.tar.gz.")

    def files(self, names) -> list[Path]:
        if self.archive is not None:
            return [self.archive]
        missing = [n for n in names if not (self.dir / n).is_file()]
        if missing:
            raise ValueError(f"cifar10: `path` {str(self.path)!r} lacks {missing} (expected "
                             f"the {_CIFAR_DIR}/ files data_batch_1..5 and test_batch).")
        return [self.dir / n for n in names]

    def read(self, names) -> dict[str, object]:
        out = {}
        if self.archive is None:
            for n in names:
                with open(self.dir / n, "rb") as f:
                    out[n] = safe_unpickle(f, f"the file {n}", "path")
            return out
        with tarfile.open(self.archive) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise ValueError(f"cifar10: the archive `path` {str(self.archive)!r} lacks "
                                 f"{missing}.")
            for n in names:
                data = tar.extractfile(members[n]).read()
                out[n] = safe_unpickle(io.BytesIO(data), f"the archive member {n}", "path")
        return out


def _read_cifar_batch(obj, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one unpickled batch dict -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    if not isinstance(obj, dict):
        raise ValueError(f"cifar10: `path`: batch {name} is a {type(obj).__name__}, not the "
                         "dict of the CIFAR-10 python version.")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for k in ("data", "labels"):
        if k not in keys:
            raise ValueError(f"cifar10: `path`: batch {name} has no key b'{k}' (keys: "
                             f"{sorted(keys)}).")
    data = keys["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"cifar10: `path`: batch {name}: b'data' must be a uint8 array of "
                         f"shape (n, 3072), got {desc}.")
    labels = np.asarray(keys["labels"])
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"cifar10: `path`: batch {name}: b'labels' must be {data.shape[0]} "
                         f"integers, got shape {labels.shape} dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"cifar10: `path`: batch {name}: labels must lie in 0..9, got "
                         f"range [{labels.min()}, {labels.max()}].")
    # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32×32 image
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_build(src: _CifarSource, split: str, standardize: bool, dtype) -> dict:
    # train statistics are needed for both splits, so every batch is read
    names = _CIFAR_TRAIN + _CIFAR_TEST
    raw = src.read(names)
    if src.dir is not None and (src.dir / "batches.meta").is_file():
        with open(src.dir / "batches.meta", "rb") as f:
            meta = safe_unpickle(f, "the file batches.meta", "path")
        if isinstance(meta, dict):
            nv = meta.get(b"num_vis", meta.get("num_vis", 3072))
            if nv != 3072:
                raise ValueError(f"cifar10: `path`: batches.meta says num_vis={nv}, not 3072.")
    parts = {n: _read_cifar_batch(raw[n], n) for n in names}
    del raw
    use = _CIFAR_TRAIN if split == "train" else _CIFAR_TEST
    y = np.concatenate([parts[n][1] for n in use])
    if standardize:
        # exact integer moments per channel over all training pixels (no float64 copy of
        # the 50,000 images): mean_c and the population std_c of the [0, 1] pixels
        s1 = np.zeros(3, np.int64)
        s2 = np.zeros(3, np.int64)
        count = 0
        for n in _CIFAR_TRAIN:
            u = parts[n][0].astype(np.int64)
            s1 += u.sum(axis=(0, 2, 3))
            s2 += (u * u).sum(axis=(0, 2, 3))
            count += u.shape[0] * 32 * 32
        mean = s1 / count / 255.0
        std = np.sqrt(np.maximum(s2 / count - (s1 / count) ** 2, 0.0)) / 255.0
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(3), np.ones(3)
    x = np.empty((len(y), 3, 32, 32), dtype=dtype)
    offset = 0
    for n in use:  # batch by batch, in the output dtype
        u = parts[n][0]
        x[offset:offset + len(u)] = ((u.astype(dtype) / dtype.type(255.0))
                                     - mean.astype(dtype)[None, :, None, None]) \
            / std.astype(dtype)[None, :, None, None]
        offset += len(u)
    return {"x": x, "y": y, "mean": mean, "std": std}


def cifar10(path, *, split: str = "train", standardize: bool = True, cache: bool = True,
            cache_dir=None, dtype=np.float32) -> Dataset:
    """CIFAR-10 from the "python version" the user has on disk.

    **Arguments:**

    - `path`: the `cifar-10-batches-py/` directory (with `data_batch_1`..`data_batch_5`,
      `test_batch`, `batches.meta`), a directory containing it, or the
      `cifar-10-python.tar.gz` archive (read in place, not extracted).
    - `split`: "train" (the 50,000 images of data_batch_1..5, in file order) or "test"
      (the 10,000 of test_batch).
    - `standardize`: the convention: pixels scaled to [0, 1], then per channel c
      x ← (x − mean_c)/std_c with mean_c and the population std_c over all pixels of all
      50,000 *training* images (computed from the files, ≈ mean (0.4914, 0.4822, 0.4465),
      std (0.2470, 0.2435, 0.2616) on the real set); the test split uses the training
      statistics. False returns the [0, 1] pixels.
    - `cache`, `cache_dir`: cache the preprocessed arrays, by default in
      `dyn.datasets.default_cache_dir()` (never in the data directory).
    - `dtype`: of x (float32 by default: 50,000 images are 600 MB in float32).

    **Returns:** a `Dataset` with x of shape (N, 3, 32, 32) (channels R, G, B; rows top
    to bottom) and integer labels y of shape (N,) in 0..9 (`CIFAR10_CLASSES`),
    `num_classes=10`: the input of `dyn.ConvNet(3, ..., 10, image_size=32, ...)`.

    Raises ValueError naming the argument for a missing path, missing batch files,
    a malformed pickle (not a dict, missing b"data"/b"labels", wrong dtype or shape,
    labels outside 0..9) or a pickle that names a global other than numpy's arrays.
    """
    owner = "cifar10"
    split = check_split(split, ("train", "test"), owner)
    p = check_path(path, owner)
    src = _CifarSource(p)
    names = _CIFAR_TRAIN + _CIFAR_TEST
    files = src.files(names)
    meta = [] if src.dir is None or not (src.dir / "batches.meta").is_file() else \
        [src.dir / "batches.meta"]
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"{owner}: `dtype` must be a float dtype, got {dtype}.")
    if cache:
        file, prefix = cache_paths("cifar10", p, f"{split}|{standardize}|{dtype}",
                                    files + meta, cache_dir)
        hit = load_cache(file)
        if hit is not None:
            return Dataset(hit["x"], hit["y"], 10)
    arrays = _cifar_build(src, split, standardize, dtype)
    if cache:
        save_cache(file, prefix, arrays)
    return Dataset(arrays["x"], arrays["y"], 10)
