"""Datasets: sklearn's digits and synthetic problems with known structure.

A `Dataset` is an Equinox module whose arrays are ordinary (dynamic) fields, so two
datasets of the same shapes and dtypes go through the same compiled function.
"""

import functools
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._models import MLP, AbstractActivation
from .._tree import is_concrete
from .._validate import positive_int, prng_key, real

__all__ = ["Dataset", "digits", "teacher_student", "rotational", "circles"]


def _as_array(value, name: str) -> Array:
    if isinstance(value, jax.Array):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" and arr.dtype.kind != "c":
        hint = (" Encode class labels as ints 0..k-1, e.g. with np.unique(y, "
                "return_inverse=True)[1]." if name == "y" else "")
        raise ValueError(
            f"Dataset: `{name}` must hold numbers, got dtype {arr.dtype}.{hint}"
        )
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int64 if name == "y" else np.float64)
    return jnp.asarray(arr)


class Dataset(eqx.Module):
    """Inputs `x` of shape (n, d), or (n, ...) for images (n, C, H, W) and sequences
    (n, T, F), and targets `y`.

    `y` is either integer class labels of shape (n,) with `num_classes` set, or float
    regression targets of shape (n, k) with `num_classes=None`. Integer inputs are
    cast to the default float dtype.
    """

    x: Float[Array, "n d"]
    y: Int[Array, " n"] | Float[Array, "n k"]
    num_classes: int | None = eqx.field(static=True)

    def __init__(
        self,
        x: Float[ArrayLike, "n d"],
        y: Int[ArrayLike, " n"] | Float[ArrayLike, "n k"],
        num_classes: int | None = None,
    ):
        x = _as_array(x, "x")
        y = _as_array(y, "y")
        if x.ndim < 2:
            raise ValueError(
                f"Dataset: `x` must have shape (n, d) (or (n, ...): images, sequences), got "
                f"shape {x.shape}."
            )
        if x.shape[0] == 0:
            # A loss averaged over no examples is NaN: a run on it "diverged" at once and
            # still reported success.
            raise ValueError(
                f"Dataset: `x` has no examples (shape {x.shape}); give at least one."
            )
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.result_type(float))
        if jnp.iscomplexobj(x) or jnp.iscomplexobj(y):
            raise ValueError("Dataset: `x` and `y` must be real, got a complex array.")
        for name, arr in (("x", x), ("y", y)):
            if (jnp.issubdtype(arr.dtype, jnp.inexact) and is_concrete(arr)
                    and not np.all(np.isfinite(np.asarray(arr)))):
                bad = int(np.sum(~np.isfinite(np.asarray(arr))))
                raise ValueError(
                    f"Dataset: `{name}` contains NaN or Inf ({bad} entries); drop or "
                    "impute those examples first."
                )
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"Dataset: `x` and `y` must have the same number of examples, got "
                f"{x.shape[0]} inputs and targets of shape {y.shape}."
            )
        if jnp.issubdtype(y.dtype, jnp.integer):
            if y.ndim != 1:
                raise ValueError(
                    f"Dataset: integer labels `y` must have shape (n,), got {y.shape}; "
                    f"use float targets of shape (n, k) for regression."
                )
            # Value checks need concrete labels; NumPy does them without compiling anything.
            y_np = np.asarray(y) if is_concrete(y) else None
            if num_classes is None:
                if y_np is None:
                    raise ValueError(
                        "Dataset: pass `num_classes` when building from traced labels."
                    )
                num_classes = int(y_np.max()) + 1 if y_np.size else 0
            num_classes = positive_int(num_classes, "num_classes", "Dataset")
            if y_np is not None and y_np.size and (y_np.min() < 0 or y_np.max() >= num_classes):
                raise ValueError(
                    f"Dataset: labels `y` must lie in [0, {num_classes}) for "
                    f"num_classes={num_classes}, got range [{y_np.min()}, {y_np.max()}]."
                )
        elif jnp.issubdtype(y.dtype, jnp.inexact):
            if y.ndim != 2:
                raise ValueError(
                    f"Dataset: float targets `y` must have shape (n, k), got {y.shape}; "
                    f"reshape a scalar target with y[:, None], or, for class labels "
                    f"stored as floats, pass y.astype(int)."
                )
            if num_classes is not None:
                raise ValueError(
                    "Dataset: `num_classes` is only for integer labels; float targets are "
                    "regression targets, so leave num_classes=None."
                )
        else:
            raise ValueError(
                f"Dataset: `y` must be integer labels or float targets, got dtype {y.dtype}."
            )
        self.x = x
        self.y = y
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.x.shape[0]


_DIGITS_SIZE = 1797


@functools.cache
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily: scikit-learn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    # Pixels that are constant over the whole set (the image corners) carry no signal;
    # dividing by 1 instead of 0 leaves them at exactly 0 rather than NaN.
    x = (x - mean) / np.where(std > 0, std, 1.0)
    x.setflags(write=False)
    y = np.asarray(bunch.target, dtype=np.int64)
    y.setflags(write=False)
    return x, y


def digits(n: int | None = None, *, key: PRNGKeyArray | None = None) -> Dataset:
    """sklearn's 8×8 handwritten digits (1797 images, 64 pixels, 10 classes).

    Each pixel is standardized over all 1797 images, x_j ← (x_j − mean_j)/std_j (the
    population std); constant pixels are set to 0. Labels are ints 0..9.

    With `n`, return n of the images: a uniformly random subset (in random order) when
    `key` is given, otherwise the first n; `key` without `n` shuffles all of them.
    Standardization always uses the statistics of the full set, so an image has the
    same features whatever `n` is. `key` may be an int seed.
    """
    if n is not None:
        if (
            isinstance(n, bool)
            or not isinstance(n, numbers.Integral)
            or not (1 <= n <= _DIGITS_SIZE)
        ):
            raise ValueError(
                f"digits: `n` must be an int in [1, {_DIGITS_SIZE}] or None for all images, "
                f"got {n!r}."
            )
        n = int(n)
    x, y = _digits_numpy()
    if n is None and key is not None:
        n = _DIGITS_SIZE  # a key asks for a random order; it is never silently ignored
    if n is not None and key is None:
        x, y = x[:n], y[:n]
    x = jnp.asarray(x, dtype=jnp.result_type(float))
    y = jnp.asarray(y, dtype=jnp.result_type(int))
    if n is not None and key is not None:
        x, y = _random_rows(prng_key(key, "digits"), x, y, n)
    return Dataset(x, y, num_classes=10)


@functools.partial(jax.jit, static_argnames="n")
def _random_rows(key, x, y, n):
    # Jitted as a whole: one compilation per n instead of one per eager operation.
    idx = jax.random.permutation(key, x.shape[0])[:n]
    return x[idx], y[idx]


def teacher_student(
    n: int,
    widths: tuple[int, ...] | None = None,
    activation: AbstractActivation | str = "relu",
    *,
    key: PRNGKeyArray | None = None,
    noise: float = 0.0,
    teacher: MLP | None = None,
) -> Dataset:
    """Regression on the outputs of a random teacher network.

    x_i ~ N(0, I_d) and y_i = f_teacher(x_i) + noise · ε_i with ε_i ~ N(0, I_k), where
    d = widths[0] and k = widths[-1]; the targets have shape (n, k).

    Give either `widths` (and `activation`), and the teacher is
    `MLP(widths, activation, key=...)` drawn from `key` with He init and zero biases, or
    a `teacher` MLP of your own, and its widths are used. To keep the teacher (e.g. to
    measure the distance of a student to it), build it yourself and pass `teacher=`.
    """
    owner = "teacher_student"
    n = positive_int(n, "n", owner)
    noise = real(noise, "noise", owner, low=0.0)
    key = prng_key(key, owner)
    if (widths is None) == (teacher is None):
        raise ValueError(
            f"{owner}: give exactly one of `widths` (to draw a random teacher) and "
            f"`teacher` (an MLP of your own)."
        )
    teacher_key, data_key = jax.random.split(key)
    if teacher is None:
        teacher = MLP(widths, activation, key=teacher_key)
    elif not isinstance(teacher, MLP):
        raise ValueError(f"{owner}: `teacher` must be an MLP, got {type(teacher).__name__}.")
    x, y = _teacher_data(teacher, data_key, jnp.asarray(noise), n)
    return Dataset(x, y)


@eqx.filter_jit
def _teacher_data(teacher, key, noise, n):
    d, k = teacher.widths[0], teacher.widths[-1]
    # Inputs and noise from one draw: each sampler shape costs a compilation.
    z = jax.random.normal(key, (n, d + k))
    x, eps = z[:, :d], z[:, d:]
    return x, jax.vmap(teacher)(x) + noise * eps


def rotational(n: int, d: int = 3, *, key: PRNGKeyArray | None = None) -> Dataset:
    """Rotationally symmetric regression: x_i ~ N(0, I_d), y_i = ‖x_i‖² − d, shape (n, 1).

    The input distribution is invariant under x ↦ Qx for Q ∈ SO(d) and the target
    depends only on ‖x‖, so the expected loss is invariant under W_1 ↦ W_1 Q
    (Głuch & Urbanke, sec. 6); a finite sample is symmetric only in distribution.
    The target is centred (E‖x‖² = d).
    """
    owner = "rotational"
    n = positive_int(n, "n", owner)
    d = positive_int(d, "d", owner)
    key = prng_key(key, owner)
    return Dataset(*_rotational_data(key, n, d))


@functools.partial(jax.jit, static_argnames=("n", "d"))
def _rotational_data(key, n, d):
    x = jax.random.normal(key, (n, d))
    return x, jnp.sum(x**2, axis=1, keepdims=True) - d


def circles(
    n: int,
    *,
    key: PRNGKeyArray | None = None,
    noise: float = 0.05,
    factor: float = 0.5,
) -> Dataset:
    """Two concentric circles in the plane, a binary problem no linear model solves.

    Like `sklearn.datasets.make_circles`: ⌊n/2⌋ points at evenly spaced angles on the
    unit circle (label 0) and the other ⌈n/2⌉ on the circle of radius `factor` (label 1),
    plus N(0, noise²) jitter on each coordinate, in an order shuffled by `key`.
    """
    owner = "circles"
    n = positive_int(n, "n", owner, low=2)
    noise = real(noise, "noise", owner, low=0.0)
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (0 < factor < 1):
        raise ValueError(f"{owner}: `factor` (inner radius) must lie in (0, 1), got {factor!r}.")
    key = prng_key(key, owner)
    x, y = _circles_data(key, jnp.asarray(noise), jnp.asarray(float(factor)), n)
    return Dataset(x, y, num_classes=2)


@functools.partial(jax.jit, static_argnames="n")
def _circles_data(key, noise, factor, n):
    n_out = n // 2
    n_in = n - n_out
    # One draw: two columns of jitter, and a third whose argsort is the shuffle (the
    # ranks of i.i.d. continuous variables are a uniformly random permutation).
    z = jax.random.normal(key, (n, 3))
    t_out = jnp.linspace(0.0, 2 * jnp.pi, n_out, endpoint=False)
    t_in = jnp.linspace(0.0, 2 * jnp.pi, n_in, endpoint=False)
    x = jnp.concatenate(
        [
            jnp.stack([jnp.cos(t_out), jnp.sin(t_out)], axis=1),
            factor * jnp.stack([jnp.cos(t_in), jnp.sin(t_in)], axis=1),
        ]
    )
    x = x + noise * z[:, :2]
    y = jnp.concatenate([jnp.zeros(n_out, int), jnp.ones(n_in, int)])
    perm = jnp.argsort(z[:, 2])
    return x[perm], y[perm]
