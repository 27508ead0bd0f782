"""Tests of the real-data loaders (dyn.datasets.cifar10, imdb) on tiny files written in
the exact on-disk formats to tmp_path (nothing is downloaded), and of the bundled
stand-ins (digits_images, digits_sequences).
"""

import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from dynamics import datasets
from dynamics.datasets import _cifar, _imdb


def _xy(data):
    return np.asarray(data.x), np.asarray(data.y)


class loaders:  # the research module's names, over the package's loaders
    CIFAR10_CLASSES = datasets.CIFAR10_CLASSES

    @staticmethod
    def cifar10(*args, **kwargs):
        return _xy(datasets.cifar10(*args, **kwargs))

    @staticmethod
    def digits_images(*args, **kwargs):
        return _xy(datasets.digits_images(*args, **kwargs))

    imdb = staticmethod(datasets.imdb)
    digits_sequences = staticmethod(datasets.digits_sequences)

# --- writers of the real formats -----------------------------------------------------------


def _write_cifar_batch(file, data, labels, protocol=2):
    # the real files are Python-2 pickles of dicts with bytes keys (read with
    # encoding="bytes"); protocol 2 written from Python 3 is the closest equivalent
    obj = {b"batch_label": b"training batch", b"labels": list(labels), b"data": data,
           b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    with open(file, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar(root, n=5, seed=0, train_batches=5):
    """cifar-10-batches-py/ with `n` images per batch; returns (dir, images dict)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    images = {}
    names = [f"data_batch_{i}" for i in range(1, train_batches + 1)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = [(k + i) % 10 for i in range(n)]
        _write_cifar_batch(d / name, data, labels, protocol=2 if k % 2 == 0 else 5)
        images[name] = (data, np.array(labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in loaders.CIFAR10_CLASSES],
                     b"num_cases_per_batch": n, b"num_vis": 3072}, f, protocol=2)
    return d, images


def _obj_array(seqs):
    a = np.empty(len(seqs), dtype=object)
    for i, s in enumerate(seqs):
        a[i] = list(s)
    return a


def make_imdb(path, train=None, test=None, y_train=None, y_test=None):
    """Keras's imdb.npz layout: object arrays of Python int lists (raw frequency ranks)."""
    train = train if train is not None else [[5, 1, 7], [2, 2], [9, 3, 4, 1, 8], [6]]
    test = test if test is not None else [[1, 2, 3, 4], [10]]
    y_train = np.array(y_train if y_train is not None else [1, 0, 1, 0], dtype=np.int64)
    y_test = np.array(y_test if y_test is not None else [0, 1], dtype=np.int64)
    np.savez(path, x_train=_obj_array(train), y_train=y_train, x_test=_obj_array(test),
             y_test=y_test)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # never write into the user's home cache from the tests
    monkeypatch.setenv("DYNAMICS_CACHE_DIR", str(tmp_path / "default-cache"))


# --- CIFAR-10 --------------------------------------------------------------------------------


def test_cifar_shapes_values_and_standardization(tmp_path):
    d, images = make_cifar(tmp_path / "data", n=5)
    x, y = loaders.cifar10(d, split="train", cache=False)
    assert x.shape == (25, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (25,) and y.dtype == np.int64
    np.testing.assert_array_equal(y[:5], images["data_batch_1"][1])
    # per-channel standardization over the training set: mean 0, population std 1
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, atol=1e-5)
    # layout: row = 1024 R, 1024 G, 1024 B, each row-major 32×32
    raw, _ = loaders.cifar10(d, split="train", standardize=False, cache=False)
    first = images["data_batch_1"][0][0]
    np.testing.assert_allclose(raw[0, 1, 2, 5], first[1024 + 2 * 32 + 5] / 255, rtol=1e-6)
    np.testing.assert_allclose(raw[0, 2, 31, 0], first[2048 + 31 * 32] / 255, rtol=1e-6)

    xt, yt = loaders.cifar10(d, split="test", cache=False)
    assert xt.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(yt, images["test_batch"][1])
    # the test split uses the *training* statistics
    t = images["test_batch"][0].reshape(-1, 3, 32, 32) / 255.0
    tr = np.concatenate([images[f"data_batch_{i}"][0] for i in range(1, 6)])
    tr = tr.reshape(-1, 3, 32, 32) / 255.0
    expect = (t - tr.mean(axis=(0, 2, 3))[None, :, None, None]) / \
        tr.std(axis=(0, 2, 3))[None, :, None, None]
    np.testing.assert_allclose(xt, expect, rtol=1e-5, atol=1e-5)


def test_cifar_parent_dir_and_archive_give_the_same(tmp_path):
    d, _ = make_cifar(tmp_path / "data", n=3)
    x1, y1 = loaders.cifar10(d, cache=False)
    x2, y2 = loaders.cifar10(tmp_path / "data", cache=False)  # the directory containing it
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    x3, y3 = loaders.cifar10(str(archive), cache=False)
    for x, y in ((x2, y2), (x3, y3)):
        np.testing.assert_array_equal(x, x1)
        np.testing.assert_array_equal(y, y1)


def test_cifar_cache_hit_and_invalidation(tmp_path, monkeypatch):
    d, _ = make_cifar(tmp_path / "data", n=4)
    cache = tmp_path / "cache"
    calls = []
    real = _cifar._read_cifar_batch

    def counting(obj, name):
        calls.append(name)
        return real(obj, name)

    monkeypatch.setattr(_cifar, "_read_cifar_batch", counting)
    x1, y1 = loaders.cifar10(d, cache_dir=cache)
    assert len(calls) == 6 and len(list(cache.glob("cifar10-*.npz"))) == 1
    # second call: served from the cache, the batches are not read again
    x2, y2 = loaders.cifar10(d, cache_dir=cache)
    assert len(calls) == 6
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    # touching a source file (new mtime) invalidates the entry
    st = os.stat(d / "data_batch_3")
    os.utime(d / "data_batch_3", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    loaders.cifar10(d, cache_dir=cache)
    assert len(calls) == 12
    assert len(list(cache.glob("cifar10-*.npz"))) == 1  # the stale entry was removed
    # changed contents (same size, rewritten) are picked up, never served stale
    rng = np.random.RandomState(9)
    new = rng.randint(0, 256, size=(4, 3072)).astype(np.uint8)
    _write_cifar_batch(d / "test_batch", new, [3, 3, 3, 3])
    st = os.stat(d / "test_batch")
    os.utime(d / "test_batch", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    _, yt = loaders.cifar10(d, split="test", cache_dir=cache)
    np.testing.assert_array_equal(yt, [3, 3, 3, 3])
    # the splits and options have separate entries
    loaders.cifar10(d, split="train", standardize=False, cache_dir=cache)
    assert len(list(cache.glob("cifar10-*.npz"))) == 3


def test_cifar_corrupt_cache_is_rebuilt(tmp_path):
    d, _ = make_cifar(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    x1, _ = loaders.cifar10(d, cache_dir=cache)
    (f,) = cache.glob("cifar10-*.npz")
    f.write_bytes(b"not a zip")
    x2, _ = loaders.cifar10(d, cache_dir=cache)
    np.testing.assert_array_equal(x1, x2)


def test_cifar_default_cache_dir_from_env(tmp_path):
    d, _ = make_cifar(tmp_path / "data", n=2)
    loaders.cifar10(d)
    assert len(list((tmp_path / "default-cache").glob("cifar10-*.npz"))) == 1


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`path` .*does not exist"):
        loaders.cifar10(tmp_path / "nope")
    with pytest.raises(ValueError, match="`split`"):
        loaders.cifar10(tmp_path, split="val")
    with pytest.raises(ValueError, match="`path`"):
        loaders.cifar10(123)
    d, _ = make_cifar(tmp_path / "a", n=2)
    os.remove(d / "data_batch_4")
    with pytest.raises(ValueError, match=r"`path` .*lacks \['data_batch_4'\]"):
        loaders.cifar10(d, cache=False)
    # not a directory, not a tar archive
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="neither a directory nor a tar archive"):
        loaders.cifar10(junk)


@pytest.mark.parametrize("obj, msg", [
    ([1, 2, 3], "not the dict"),
    ({b"labels": [0, 1]}, r"no key b'data'"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"no key b'labels'"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "must be 2 integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "0..9"),
])
def test_cifar_malformed_pickle(tmp_path, obj, msg):
    d, _ = make_cifar(tmp_path / "data", n=2)
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(ValueError, match=msg) as e:
        loaders.cifar10(d, cache=False)
    assert "`path`" in str(e.value) and "data_batch_2" in str(e.value)


def test_cifar_truncated_and_hostile_pickles(tmp_path):
    d, _ = make_cifar(tmp_path / "data", n=2)
    (d / "data_batch_1").write_bytes((d / "data_batch_1").read_bytes()[:100])
    with pytest.raises(ValueError, match="could not be read as a pickle"):
        loaders.cifar10(d, cache=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle the global"):
        loaders.cifar10(d, cache=False)
    assert not (tmp_path / "pwned").exists()


# --- IMDB ---------------------------------------------------------------------------------


def test_imdb_keras_conventions_padding_and_mask(tmp_path):
    p = make_imdb(tmp_path / "imdb.npz")
    s = loaders.imdb(p, split="train", seed=None, cache=False)
    assert s.x.dtype == np.int32 and s.lengths.dtype == np.int32 and s.y.dtype == np.int64
    # start char 1, every rank shifted by index_from=3, padding 0 at the end
    np.testing.assert_array_equal(s.x, [[1, 8, 4, 10, 0, 0],
                                        [1, 5, 5, 0, 0, 0],
                                        [1, 12, 6, 7, 4, 11],
                                        [1, 9, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s.lengths, [4, 3, 6, 2])
    np.testing.assert_array_equal(s.y, [1, 0, 1, 0])
    np.testing.assert_array_equal(s.mask, s.x != 0)
    assert s.vocab_size == 14  # largest id: rank 10 (in the test split) + 3, plus one

    # num_words: ids ≥ num_words -> oov 2; maxlen truncates (post keeps the start)
    s = loaders.imdb(p, split="train", seed=None, num_words=8, maxlen=3, cache=False)
    np.testing.assert_array_equal(s.x, [[1, 2, 4], [1, 5, 5], [1, 2, 6], [1, 2, 0]])
    np.testing.assert_array_equal(s.lengths, [3, 3, 3, 2])
    assert s.vocab_size == 8
    s = loaders.imdb(p, split="train", seed=None, maxlen=3, truncating="pre", cache=False)
    np.testing.assert_array_equal(s.x[2], [7, 4, 11])
    np.testing.assert_array_equal(s.lengths, [3, 3, 3, 2])

    t = loaders.imdb(p, split="test", seed=None, cache=False)
    np.testing.assert_array_equal(t.x, [[1, 4, 5, 6, 7], [1, 13, 0, 0, 0]])
    np.testing.assert_array_equal(t.y, [0, 1])


def test_imdb_keras_shuffle(tmp_path):
    p = make_imdb(tmp_path / "imdb.npz")
    s = loaders.imdb(p, split="train", cache=False)  # seed 113, as Keras
    rng = np.random.RandomState(113)
    order = np.arange(4)
    rng.shuffle(order)
    np.testing.assert_array_equal(s.y, np.array([1, 0, 1, 0])[order])
    ref = loaders.imdb(p, split="train", seed=None, cache=False)
    np.testing.assert_array_equal(s.x, ref.x[order])
    t = loaders.imdb(p, split="test", cache=False)  # the same RandomState, second shuffle
    order_t = np.arange(2)
    rng.shuffle(order_t)
    np.testing.assert_array_equal(t.y, np.array([0, 1])[order_t])


def test_imdb_cache_hit_and_invalidation(tmp_path, monkeypatch):
    p = make_imdb(tmp_path / "imdb.npz")
    cache = tmp_path / "cache"
    calls = []
    real = _imdb._imdb_build

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(_imdb, "_imdb_build", counting)
    a = loaders.imdb(p, maxlen=4, cache_dir=cache)
    b = loaders.imdb(p, maxlen=4, cache_dir=cache)
    assert len(calls) == 1
    for u, v in zip((a.x, a.lengths, a.y), (b.x, b.lengths, b.y)):
        np.testing.assert_array_equal(u, v)
    assert a.vocab_size == b.vocab_size
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    loaders.imdb(p, maxlen=4, cache_dir=cache)
    assert len(calls) == 2
    loaders.imdb(p, maxlen=5, cache_dir=cache)  # other options: another entry
    assert len(calls) == 3
    assert len(list(cache.glob("imdb-*.npz"))) == 2


def test_imdb_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`path` .*does not exist"):
        loaders.imdb(tmp_path / "imdb.npz")
    with pytest.raises(ValueError, match="is not a file"):
        loaders.imdb(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"`path` .*not an \.npz"):
        loaders.imdb(bad, cache=False)
    p = make_imdb(tmp_path / "imdb.npz")
    with pytest.raises(ValueError, match="`split`"):
        loaders.imdb(p, split="validation")
    with pytest.raises(ValueError, match="`maxlen`"):
        loaders.imdb(p, maxlen=0)
    with pytest.raises(ValueError, match="`num_words`"):
        loaders.imdb(p, num_words=2.5)
    with pytest.raises(ValueError, match="`truncating`"):
        loaders.imdb(p, truncating="middle")
    with pytest.raises(ValueError, match="`oov_char`"):
        loaders.imdb(p, num_words=2)
    # wrong keys
    q = tmp_path / "keys.npz"
    np.savez(q, x_train=_obj_array([[1]]), y_train=np.array([0]))
    with pytest.raises(ValueError, match=r"no array 'x_test'"):
        loaders.imdb(q, cache=False)
    # labels of the wrong length
    r = make_imdb(tmp_path / "len.npz", y_train=[1, 0])
    with pytest.raises(ValueError, match="y_train must be 4 integer labels"):
        loaders.imdb(r, cache=False)
    # a sequence that is not a list of ints
    s = make_imdb(tmp_path / "strs.npz", train=[["a", "b"], [1], [2], [3]])
    with pytest.raises(ValueError, match=r"x_train\[0\] is not a list of integers"):
        loaders.imdb(s, cache=False)


def test_imdb_refuses_hostile_pickle(tmp_path):
    import fractions

    arr = np.empty(1, dtype=object)
    arr[0] = fractions.Fraction(1, 3)  # harmless, but a global the loader must refuse
    p = tmp_path / "imdb.npz"
    np.savez(p, x_train=arr, y_train=np.array([0]), x_test=_obj_array([[1]]),
             y_test=np.array([0]))
    with pytest.raises(ValueError, match="refusing to unpickle the global fractions.Fraction"):
        loaders.imdb(p, cache=False)
    with zipfile.ZipFile(p) as z:  # the file really is a plain Keras-style npz
        assert sorted(z.namelist()) == ["x_test.npy", "x_train.npy", "y_test.npy",
                                        "y_train.npy"]


# --- bundled stand-ins ------------------------------------------------------------------------


def test_digits_images():
    x, y = loaders.digits_images("train")
    xt, yt = loaders.digits_images("test")
    assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32
    assert x.shape[0] + xt.shape[0] == 1797 and abs(xt.shape[0] - 0.2 * 1797) < 10
    assert set(np.unique(y)) == set(range(10)) and set(np.unique(yt)) == set(range(10))
    np.testing.assert_allclose(x.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(), 1, atol=1e-5)
    # same image, same values, whatever the split (train statistics)
    xa, ya = loaders.digits_images("all")
    assert xa.shape == (1797, 1, 8, 8)
    with pytest.raises(ValueError, match="`split`"):
        loaders.digits_images("valid")
    with pytest.raises(ValueError, match="`test_fraction`"):
        loaders.digits_images(test_fraction=1.5)


def test_digits_sequences_and_mask():
    s = loaders.digits_sequences("train")
    x, _ = loaders.digits_images("train")
    assert s.x.shape == (x.shape[0], 8, 8) and s.vocab_size is None
    np.testing.assert_array_equal(s.x, x[:, 0])  # step t = image row t
    assert np.all(s.lengths == 8) and s.mask.all()
    v = loaders.digits_sequences("train", min_length=3)
    assert v.lengths.min() == 3 and v.lengths.max() == 8
    assert np.all(v.x[~v.mask] == 0)
    np.testing.assert_array_equal(v.x[v.mask], s.x[v.mask])
    np.testing.assert_array_equal(v.y, s.y)
    with pytest.raises(ValueError, match="`min_length`"):
        loaders.digits_sequences(min_length=0)


def test_sequences_dataset_feeds_a_masked_rnn():
    import jax

    import dynamics as dyn

    s = datasets.digits_sequences("test", min_length=3)
    data = s.dataset(10)
    assert data.x.shape == (len(s.y), 8, 9) and data.num_classes == 10
    rnn = dyn.RNN(8, (5,), 10, masked=True, key=jax.random.key(0))
    plain = dyn.RNN(8, (5,), 10, key=jax.random.key(0))
    i = int(np.argmin(s.lengths))  # a padded sequence: the masked net reads its last
    n = int(s.lengths[i])          # valid state, as the plain net on the cut sequence
    np.testing.assert_allclose(rnn(data.x[i]), plain(data.x[i, :n, :8]), rtol=1e-6)  # f32
    with pytest.raises(ValueError, match="embed"):
        datasets.Sequences(np.zeros((2, 3), np.int32), np.array([3, 2]), np.array([0, 1]),
                           5).dataset()
