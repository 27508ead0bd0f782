"""Reading the users' data files safely, and caching what the loaders build from them.

Both real formats are pickles (CIFAR-10's batches are Python pickles; Keras's imdb.npz
stores its ragged sequences as pickled object arrays, which is why Keras calls
`np.load(allow_pickle=True)`). Unpickling an untrusted file can run arbitrary code, so no
loader calls `pickle.load` or `allow_pickle=True`: `safe_unpickle` resolves only the few
globals these files need (numpy's array and scalar reconstruction, `numpy.ndarray`,
`numpy.dtype`, `_codecs.encode`) and raises a ValueError naming any other global.

Preprocessed arrays are cached as .npz files in `cache_dir` (default
`$DYNAMICS_CACHE_DIR`, else `$XDG_CACHE_HOME/dynamics/datasets`, else
`~/.cache/dynamics/datasets`), named by a hash of the options and of every source file's
resolved path, size and modification time (ns): touching or replacing a source gives a
new key, so a stale cache is never served; older cache files of the same source and
options are deleted when a new one is written. Writes are atomic (temporary file +
`os.replace`), an unreadable cache file is rebuilt, and a read-only cache directory only
loses the speed-up.
"""

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["safe_unpickle", "default_cache_dir", "cache_paths", "load_cache", "save_cache",
           "check_split", "check_path"]

VERSION = "1"  # bump when the preprocessing changes: it is part of every cache key


def _numpy_core():
    return getattr(np, "_core", None) or np.core  # numpy ≥ 2 / numpy 1.x


def _numpy_reconstruct():
    return _numpy_core().multiarray._reconstruct


def _numpy_frombuffer():
    return _numpy_core().numeric._frombuffer


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    # pickle protocol 5 (Python ≥ 3.8's default) rebuilds contiguous arrays this way
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    # numpy scalars (e.g. labels written as np.int64 instead of int)
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_core().multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_core().multiarray.scalar,
    # protocol-2 pickles written by Python 3 spell a bytes object as _codecs.encode(s, "latin1")
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's array reconstruction; any other global is refused (a pickle
    that names os.system, builtins.eval, … fails before anything runs)."""

    def find_class(self, module, name):
        make = _ALLOWED.get((module, name))
        if make is None:
            raise _Refused(
                f"refusing to unpickle the global {module}.{name} (only numpy arrays, "
                "lists, dicts, bytes, str and numbers are allowed in these data files)")
        return make()


def safe_unpickle(stream, what: str, argname: str):
    try:
        return _RestrictedUnpickler(stream, encoding="bytes").load()
    except _Refused as e:
        raise ValueError(f"`{argname}`: {what} is not a valid data pickle: {e}") from None
    except Exception as e:  # truncated or corrupt file
        raise ValueError(f"`{argname}`: {what} could not be read as a pickle "
                         f"({type(e).__name__}: {e}).") from None


# --- caching -----------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where the loaders cache their arrays (module docstring)."""
    env = os.environ.get("DYNAMICS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dynamics" / "datasets"


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_paths(name: str, source: Path, options: str, files: list[Path],
                 cache_dir) -> tuple[Path, str]:
    """(cache file, prefix shared by every version of it: same source and options)."""
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prefix = hashlib.sha256(f"{VERSION}|{source.resolve()}|{options}".encode()).hexdigest()[:12]
    prefix = f"{name}-{prefix}-"
    key = _fingerprint(files)[:16]
    return cdir / f"{prefix}{key}.npz", prefix


def load_cache(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # a truncated or corrupt cache file: rebuild it
        return None


def save_cache(file: Path, prefix: str, arrays: dict) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
        for old in file.parent.glob(prefix + "*.npz"):
            if old != file:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache dir only costs the speed-up


def check_split(split, allowed, owner):
    if split not in allowed:
        raise ValueError(f"{owner}: `split` must be one of {allowed}, got {split!r}.")
    return split


def check_path(path, owner) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{owner}: `path` must be a str or os.PathLike, got "
                         f"{type(path).__name__}.")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{owner}: `path` {str(p)!r} does not exist.")
    return p
