"""IMDB reviews from Keras's integer-sequence `imdb.npz` (Maas et al. 2011), and the
`Sequences` container of padded sequences."""

import io
import zipfile
from pathlib import Path

import equinox as eqx
import numpy as np

from ._datasets import Dataset
from ._files import cache_paths, check_path, check_split, load_cache, safe_unpickle, save_cache

__all__ = ["Sequences", "imdb"]


class Sequences(eqx.Module):
    """Padded sequences, padding at the end.

    - `x`: (N, L) int tokens (IMDB) or (N, L, F) float features (digits row by row);
    - `lengths`: (N,) the number of valid steps;
    - `y`: (N,) integer labels;
    - `vocab_size`: the embedding size the tokens need (None for float features).

    NumPy arrays (a loader's output, on the host); `dataset()` puts float features into
    a `Dataset` for the losses.
    """

    x: np.ndarray
    lengths: np.ndarray
    y: np.ndarray
    vocab_size: int | None = eqx.field(static=True)

    @property
    def mask(self) -> np.ndarray:
        """(N, L) bool, True on valid steps."""
        return np.arange(self.x.shape[1])[None, :] < self.lengths[:, None]

    def dataset(self, num_classes: int | None = None) -> Dataset:
        """A `Dataset` of the float features with the mask appended as one more, last,
        feature, x of shape (N, L, F + 1): the input of `dyn.RNN(F, ..., masked=True)`,
        which keeps its state on padded steps."""
        if self.x.ndim != 3:
            raise ValueError(
                "Sequences.dataset: needs float features of shape (N, L, F), got tokens of "
                f"shape {self.x.shape}; embed the tokens first (x = table[tokens])."
            )
        mask = self.mask.astype(self.x.dtype)[:, :, None]
        return Dataset(np.concatenate([self.x, mask], axis=2), self.y, num_classes)


def _read_npz_member(zf: zipfile.ZipFile, key: str, argname: str):
    name = key + ".npy"
    if name not in zf.namelist():
        raise ValueError(f"imdb: `{argname}` has no array {key!r} (found "
                         f"{sorted(n[:-4] for n in zf.namelist())}); expected Keras's "
                         "imdb.npz with x_train, y_train, x_test, y_test.")
    with zf.open(name) as f:
        buf = io.BytesIO(f.read())
    fmt = np.lib.format
    try:
        version = fmt.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(buf)
        else:
            shape, fortran, dtype = fmt._read_array_header(buf, version)
    except Exception as e:
        raise ValueError(f"imdb: `{argname}`: {key} is not a .npy array ({e}).") from None
    if dtype.hasobject:
        # a pickled object array (ragged lists): restricted unpickling, never allow_pickle
        arr = safe_unpickle(buf, f"the array {key}", argname)
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr, dtype=object)
        return arr
    buf.seek(0)
    return fmt.read_array(buf, allow_pickle=False)


def _as_sequences(arr, key: str, argname: str) -> list[np.ndarray]:
    if not isinstance(arr, np.ndarray) or arr.ndim not in (1, 2):
        raise ValueError(f"imdb: `{argname}`: {key} must be a 1-D object array of integer "
                         f"lists (or a 2-D int array), got {type(arr).__name__} "
                         f"{getattr(arr, 'shape', '')}.")
    seqs = []
    for i, s in enumerate(arr):
        a = np.asarray(s)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"imdb: `{argname}`: {key}[{i}] is not a list of integers "
                             f"(dtype {a.dtype}, shape {a.shape}).")
        if a.size and a.min() < 0:
            raise ValueError(f"imdb: `{argname}`: {key}[{i}] holds a negative word index.")
        seqs.append(a.astype(np.int64))
    return seqs


def _imdb_build(p: Path, split, num_words, maxlen, truncating, start_char, oov_char,
                index_from, skip_top, seed) -> dict:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"imdb: `path` {str(p)!r} is not an .npz (zip) file ({e}).") from None
    with zf:
        raw = {k: _read_npz_member(zf, k, "path")
               for k in ("x_train", "y_train", "x_test", "y_test")}
    parts = {}
    rng = np.random.RandomState(seed) if seed is not None else None
    for s in ("train", "test"):
        xs = _as_sequences(raw[f"x_{s}"], f"x_{s}", "path")
        y = np.asarray(raw[f"y_{s}"])
        if y.shape != (len(xs),) or y.dtype.kind not in "iub":
            raise ValueError(f"imdb: `path`: y_{s} must be {len(xs)} integer labels, got "
                             f"shape {y.shape} dtype {y.dtype}.")
        order = np.arange(len(xs))
        if rng is not None:  # Keras: one RandomState(seed), train shuffled, then test
            rng.shuffle(order)
        parts[s] = ([xs[i] for i in order], y[order].astype(np.int64))
    # Keras's conventions: word of frequency rank r (1 = most frequent) -> r + index_from;
    # start_char first; 0 is padding; ids ≥ num_words or < skip_top -> oov_char.
    seqs_all = [q for s in ("train", "test") for q in parts[s][0]]
    top = max((int(q.max()) for q in seqs_all if q.size), default=0) + index_from
    vocab = int(num_words) if num_words is not None else top + 1
    xs, y = parts[split]
    out = []
    for q in xs:
        q = q + index_from
        if start_char is not None:
            q = np.concatenate([[start_char], q])
        bad = (q >= vocab) | (q < skip_top)
        if start_char is not None:
            bad[0] = False
        q = np.where(bad, oov_char, q)
        out.append(q)
    lengths = np.array([len(q) for q in out], dtype=np.int32)
    L = int(maxlen) if maxlen is not None else int(lengths.max(initial=1))
    tokens = np.zeros((len(out), L), dtype=np.int32)
    for i, q in enumerate(out):
        q = q[:L] if truncating == "post" else q[max(len(q) - L, 0):]
        tokens[i, :len(q)] = q
    lengths = np.minimum(lengths, L).astype(np.int32)
    return {"x": tokens, "lengths": lengths, "y": y, "vocab_size": np.array(vocab)}


def imdb(path, *, split: str = "train", num_words: int | None = None,
         maxlen: int | None = None, truncating: str = "post", start_char: int = 1,
         oov_char: int = 2, index_from: int = 3, skip_top: int = 0, seed: int | None = 113,
         cache: bool = True, cache_dir=None) -> Sequences:
    """The IMDB sentiment reviews from Keras's `imdb.npz` (25,000 train, 25,000 test).

    The file holds `x_train`, `x_test` (1-D object arrays of Python lists of ints: each
    word's frequency rank, 1 = most frequent) and `y_train`, `y_test` (0 = negative,
    1 = positive). Keras's conventions are applied (`keras.datasets.imdb.load_data`):

    - every index is shifted by `index_from` (3), so 0 = padding, 1 = `start_char`
      (prepended to each review), 2 = `oov_char`, 3 never occurs, and the word of rank r
      is r + 3;
    - with `num_words`, ids ≥ num_words (and < `skip_top`) become `oov_char`, so the
      vocabulary, and the embedding size, is `num_words`; without it, every word is kept
      and `vocab_size` = the largest id + 1 (Keras then sets num_words to the largest id,
      which, by its `w < num_words` test, turns that one word into OOV; we do not; nor
      do we, with `skip_top` > 1, turn the start token into OOV as Keras does);
    - both splits are shuffled as Keras does (one `np.random.RandomState(seed)`, train
      then test); `seed=None` keeps the file order.

    Different from Keras's `load_data(maxlen=…)`, which *drops* reviews of length
    ≥ maxlen: here `maxlen` truncates (`truncating="post"` keeps the first maxlen tokens,
    start token included; "pre" keeps the last maxlen, the default of Keras's
    `pad_sequences`), and padding is always at the end, with the true lengths returned:
    an RNN must carry its state through the padded steps (or read the state at step
    length − 1), with `Sequences.mask`. Without `maxlen`, L is the longest review of the
    split (≈ 2,500 tokens on the real set: pass maxlen for anything but exploration).

    Safety: the object arrays are pickles; instead of `np.load(allow_pickle=True)`
    (which would run any code a crafted file contains) they are read with a restricted
    unpickler that accepts only numpy arrays and plain lists/ints (`dynamics/datasets/_files.py`).

    Returns `Sequences(x int32 (N, L), lengths int32 (N,), y int64 (N,), vocab_size)`.
    """
    owner = "imdb"
    split = check_split(split, ("train", "test"), owner)
    p = check_path(path, owner)
    if not p.is_file():
        raise ValueError(f"{owner}: `path` {str(p)!r} is not a file (give imdb.npz itself).")
    if truncating not in ("pre", "post"):
        raise ValueError(f"{owner}: `truncating` must be 'pre' or 'post', got {truncating!r}.")
    for name, v, low in (("num_words", num_words, 1), ("maxlen", maxlen, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < low):
            raise ValueError(f"{owner}: `{name}` must be a positive int or None, got {v!r}.")
    for name, v in (("start_char", start_char), ("oov_char", oov_char),
                    ("index_from", index_from), ("skip_top", skip_top)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 0):
            raise ValueError(f"{owner}: `{name}` must be a non-negative int, got {v!r}.")
    if num_words is not None and oov_char is not None and oov_char >= num_words:
        raise ValueError(f"{owner}: `oov_char` ({oov_char}) must be < `num_words` "
                         f"({num_words}).")
    options = (f"{split}|{num_words}|{maxlen}|{truncating}|{start_char}|{oov_char}|"
               f"{index_from}|{skip_top}|{seed}")
    if cache:
        file, prefix = cache_paths("imdb", p, options, [p], cache_dir)
        hit = load_cache(file)
        if hit is not None:
            return Sequences(hit["x"], hit["lengths"], hit["y"], int(hit["vocab_size"]))
    arrays = _imdb_build(p, split, num_words, maxlen, truncating, start_char, oov_char,
                         index_from, skip_top, seed)
    if cache:
        save_cache(file, prefix, arrays)
    return Sequences(arrays["x"], arrays["lengths"], arrays["y"], int(arrays["vocab_size"]))
