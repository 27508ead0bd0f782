"""Losses: pure functions params ↦ scalar, as Equinox modules.

A data loss keeps its data as array fields, so jit traces it as dynamic input: two
losses of the same kind on same-shaped data share one compiled function. Continuous
hyperparameters (λ, a radius) are arrays for the same reason, so a sweep over λ does
not recompile; structural ones (p, include_bias) are static.
"""

import abc
import math
import numbers
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Scalar

from .._models import MLP
from .._tree import is_concrete
from .._validate import real
from ..datasets._datasets import Dataset

__all__ = [
    "AbstractLoss",
    "AbstractDataLoss",
    "MeanSquaredError",
    "CrossEntropy",
    "ExponentialLoss",
    "LogisticLoss",
    "L2Penalty",
    "LpPenalty",
    "Sum",
    "RotationalToy",
    "mse",
    "cross_entropy",
    "exponential",
    "logistic",
    "l2",
    "lp",
    "total",
    "rotational_toy",
]


def _float_dtype():
    return jnp.result_type(float)


def check_dataset(data, owner: str) -> Dataset:
    if not isinstance(data, Dataset):
        raise ValueError(
            f"{owner}: `data` must be a dyn.datasets.Dataset, got {type(data).__name__}; "
            f"wrap arrays with Dataset(x, y)."
        )
    return data


def _hyper(value, name: str, owner: str, *, positive: bool = False) -> Float[Array, ""]:
    """A scalar hyperparameter as a float array, checked when it is concrete."""
    if is_concrete(value) and np.ndim(value) == 0:
        # A bool, a string, None: the shared validator names the argument.
        value = real(value, name, owner)
    arr = jnp.asarray(value, dtype=_float_dtype())
    if arr.shape != ():
        raise ValueError(f"{owner}: `{name}` must be a scalar, got shape {arr.shape}.")
    if is_concrete(arr):
        v = float(arr)
        ok = math.isfinite(v) and (v > 0 if positive else v >= 0)
        if not ok:
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{owner}: `{name}` must be finite and {bound}, got {value!r}.")
    return arr


def _outputs(model, x: Float[Array, "n d"], owner: str) -> Array:
    if not callable(model):
        raise ValueError(
            f"{owner}: the params must be a callable model such as dyn.MLP (one input -> "
            f"one output), got {type(model).__name__}."
        )
    return jax.vmap(model)(x)


def _scalar_outputs(model, x: Float[Array, "n d"], owner: str) -> Float[Array, " n"]:
    out = _outputs(model, x, owner)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1:
        raise ValueError(
            f"{owner}: needs one scalar output per example (an MLP with widths[-1] == 1), "
            f"got outputs of shape {out.shape[1:]}."
        )
    return out


class AbstractLoss(eqx.Module):
    """A loss L: params ↦ scalar. `loss_a + loss_b` gives their `Sum`."""

    @abc.abstractmethod
    def __call__(self, params: PyTree) -> Scalar:
        """Evaluate the loss at `params`."""

    def __add__(self, other: "AbstractLoss") -> "Sum":
        if not isinstance(other, AbstractLoss):
            return NotImplemented
        return total(self, other)

    def __radd__(self, other) -> "AbstractLoss":
        # `sum([l2(1.0), l2(2.0)])` starts from 0 + loss.
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented


class AbstractDataLoss(AbstractLoss):
    """A loss that is the mean of per-example losses, L(w) = (1/n) Σ_i ℓ_i(w).

    What minibatch SGD (`dyn.discrete.SGD`) and its stochastic modified equations
    (`dyn.SME`) need of a loss: `example_losses(params)`, the vector (ℓ_1, …, ℓ_n), and
    `subset(index)`, the same loss on the examples `index` (a traced integer array is
    fine: a minibatch drawn inside a compiled loop). `__call__` is the mean of
    `example_losses`.

    The default `num_examples` and `subset` read and index every array leaf along its
    first axis, which is right when the leaves are the data (the four data losses here,
    `PerExample`); a subclass with other arrays overrides both.
    """

    @abc.abstractmethod
    def example_losses(self, params: PyTree) -> Float[Array, " n"]:
        """(ℓ_1(w), …, ℓ_n(w)), one loss per example."""

    @property
    def num_examples(self) -> int:
        """n, the number of examples."""
        return jax.tree.leaves(self)[0].shape[0]

    def subset(self, index: Int[ArrayLike, " b"]) -> "AbstractDataLoss":
        """The same loss on the examples `index` (with repeats, if any)."""
        return jax.tree.map(lambda a: a[index], self)

    def __call__(self, params: PyTree) -> Scalar:
        return jnp.mean(self.example_losses(params))


class MeanSquaredError(AbstractDataLoss):
    """L = (1/(2n)) Σ_i ‖f(x_i) − y_i‖², the squared error halved and averaged over examples.

    The sum runs over output components (not averaged over them); integer labels are
    replaced by one-hot targets. Build with `mse(data)`.
    """

    x: Float[Array, "n d"]
    targets: Float[Array, "n k"]

    def example_losses(self, params: Callable) -> Float[Array, " n"]:
        out = _outputs(params, self.x, "mse")
        if out.ndim == 1 and self.targets.shape[1] == 1:
            out = out[:, None]
        if out.shape != self.targets.shape:
            raise ValueError(
                f"mse: model outputs have shape {out.shape[1:]} per example but the targets "
                f"have shape {self.targets.shape[1:]}; set the model's last width to match."
            )
        # ½ is a power of two: halving each term and then averaging is bitwise the old
        # 0.5 * mean(...).
        return 0.5 * jnp.sum((out - self.targets) ** 2, axis=1)


class CrossEntropy(AbstractDataLoss):
    """L = −(1/n) Σ_i log softmax(f(x_i))_{y_i}, the mean negative log-likelihood.

    The model's outputs are logits, one per class. Build with `cross_entropy(data)`.
    """

    x: Float[Array, "n d"]
    labels: Int[Array, " n"]
    num_classes: int = eqx.field(static=True)

    def example_losses(self, params: Callable) -> Float[Array, " n"]:
        logits = _outputs(params, self.x, "cross_entropy")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"cross_entropy: needs {self.num_classes} logits per example (one per class), "
                f"got outputs of shape {logits.shape[1:]}; set the model's last width to "
                f"{self.num_classes}."
            )
        logp = jax.nn.log_softmax(logits, axis=1)
        return -jnp.take_along_axis(logp, self.labels[:, None], axis=1)[:, 0]


class ExponentialLoss(AbstractDataLoss):
    """L = (1/n) Σ_i exp(−ỹ_i f(x_i)), ỹ_i ∈ {−1, +1}.

    The exponential loss of Banburski et al., *Theory III* (sec. 4, there a sum over
    examples; here a mean). Build with `exponential(data)`.
    """

    x: Float[Array, "n d"]
    signs: Float[Array, " n"]

    def example_losses(self, params: Callable) -> Float[Array, " n"]:
        out = _scalar_outputs(params, self.x, "exponential")
        return jnp.exp(-self.signs * out)


class LogisticLoss(AbstractDataLoss):
    """L = (1/n) Σ_i log(1 + exp(−ỹ_i f(x_i))), ỹ_i ∈ {−1, +1}.

    Evaluated as logaddexp(0, −ỹ f), which neither overflows for large margins of the
    wrong sign nor loses precision for large correct ones. Build with `logistic(data)`.
    """

    x: Float[Array, "n d"]
    signs: Float[Array, " n"]

    def example_losses(self, params: Callable) -> Float[Array, " n"]:
        out = _scalar_outputs(params, self.x, "logistic")
        return jnp.logaddexp(0.0, -self.signs * out)


def mse(data: Dataset) -> MeanSquaredError:
    """The halved mean squared error L = (1/(2n)) Σ_i ‖f(x_i) − y_i‖² on `data`.

    Regression targets are used as they are; integer labels become one-hot vectors of
    length `data.num_classes`.
    """
    data = check_dataset(data, "mse")
    if data.num_classes is not None:
        targets = jax.nn.one_hot(data.y, data.num_classes, dtype=data.x.dtype)
    else:
        targets = data.y
    return MeanSquaredError(data.x, targets)


def cross_entropy(data: Dataset) -> CrossEntropy:
    """The mean softmax cross-entropy L = −(1/n) Σ_i log softmax(f(x_i))_{y_i}.

    `data` must hold integer class labels.
    """
    data = check_dataset(data, "cross_entropy")
    if data.num_classes is None:
        raise ValueError(
            f"cross_entropy: needs integer class labels, but `data.y` holds float "
            f"regression targets of shape {data.y.shape}; use mse(data) for regression."
        )
    return CrossEntropy(data.x, data.y, data.num_classes)


def binary_signs(data: Dataset, owner: str) -> Float[Array, " n"]:
    data = check_dataset(data, owner)
    y = data.y
    if y.ndim == 2:
        if y.shape[1] != 1:
            raise ValueError(
                f"{owner}: is a binary loss; float targets must have shape (n, 1), got {y.shape}."
            )
        y = y[:, 0]
    if data.num_classes is not None and data.num_classes > 2:
        raise ValueError(
            f"{owner}: is a binary loss, but the data has num_classes={data.num_classes}; "
            f"use cross_entropy(data) for more than two classes."
        )
    y = y.astype(data.x.dtype)
    if not is_concrete(y):
        # Under a trace the values cannot be inspected: assume labels {0, 1}.
        return 2 * y - 1
    values = set(np.unique(np.asarray(y)).tolist())
    if values <= {0.0, 1.0}:
        return 2 * y - 1
    if values <= {-1.0, 1.0}:
        return y
    raise ValueError(
        f"{owner}: labels must be {{0, 1}} or {{-1, +1}}, got the values {sorted(values)}."
    )


def exponential(data: Dataset) -> ExponentialLoss:
    """The exponential loss L = (1/n) Σ_i exp(−ỹ_i f(x_i)) (Banburski et al., *Theory III*).

    Labels {0, 1} map to ỹ = 2y − 1; labels already in {−1, +1} are used as they are.
    The model must have one scalar output.
    """
    x = check_dataset(data, "exponential").x
    return ExponentialLoss(x, binary_signs(data, "exponential"))


def logistic(data: Dataset) -> LogisticLoss:
    """The logistic loss L = (1/n) Σ_i log(1 + exp(−ỹ_i f(x_i))), computed stably.

    Labels as for `exponential`. The model must have one scalar output.
    """
    x = check_dataset(data, "logistic").x
    return LogisticLoss(x, binary_signs(data, "logistic"))


def _penalized_leaves(params: PyTree, include_bias: bool) -> list[Array]:
    if isinstance(params, MLP):
        leaves = list(params.weights)
        if include_bias and params.biases is not None:
            leaves += list(params.biases)
        return leaves
    # A generic pytree has no notion of "bias": every trainable array is penalized.
    return [leaf for leaf in jax.tree.leaves(params) if eqx.is_inexact_array(leaf)]


class L2Penalty(AbstractLoss):
    """R(w) = (λ/2) Σ_k ‖W_k‖_F², weight decay. Build with `l2(lam)`.

    On an MLP it acts on `weights` (and `biases` when `include_bias`); on any other
    pytree on every inexact-array leaf.
    """

    lam: Float[Array, ""]
    include_bias: bool = eqx.field(static=True)

    def __call__(self, params: PyTree) -> Scalar:
        leaves = _penalized_leaves(params, self.include_bias)
        return 0.5 * self.lam * sum((jnp.sum(w**2) for w in leaves), jnp.zeros(()))


class LpPenalty(AbstractLoss):
    """R(w) = (λ/p) Σ_ij |w_ij|^p over the weights, p ≥ 1. Build with `lp(p, lam)`.

    The additive regularizers of Baldi et al. and the entrywise p-norms of Saul
    (‖W‖_{p,p}^p). Acts on the same arrays as `L2Penalty`.
    """

    lam: Float[Array, ""]
    p: int | float = eqx.field(static=True)
    include_bias: bool = eqx.field(static=True)

    def __call__(self, params: PyTree) -> Scalar:
        leaves = _penalized_leaves(params, self.include_bias)
        # |w| written as w·sign(w): its derivative at w = 0 is sign(0) = 0, the minimum-norm
        # subgradient, so w = 0 is a fixed point of the L1 flow (jnp.abs' derivative is 1).
        total_ = sum((jnp.sum((w * jnp.sign(w)) ** self.p) for w in leaves), jnp.zeros(()))
        return self.lam / self.p * total_


def l2(lam: float | Float[ArrayLike, ""] = 1.0, *, include_bias: bool = False) -> L2Penalty:
    """Weight decay R(w) = (λ/2) Σ_k ‖W_k‖_F²; λ = `lam` ≥ 0."""
    lam = _hyper(lam, "lam", "l2")
    if not isinstance(include_bias, bool):
        raise ValueError(f"l2: `include_bias` must be True or False, got {include_bias!r}.")
    return L2Penalty(lam, include_bias)


def lp(
    p: float, lam: float | Float[ArrayLike, ""] = 1.0, *, include_bias: bool = False
) -> LpPenalty:
    """The entrywise penalty R(w) = (λ/p) Σ |w|^p; p ≥ 1, λ = `lam` ≥ 0."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and p >= 1):
        raise ValueError(
            f"lp: `p` must be a real number >= 1 (below 1 the penalty is not convex), got {p!r}."
        )
    lam = _hyper(lam, "lam", "lp")
    if not isinstance(include_bias, bool):
        raise ValueError(f"lp: `include_bias` must be True or False, got {include_bias!r}.")
    # An integral p goes to `lax.integer_pow`: exact, and no NaN gradient at w = 0.
    p = int(p) if float(p).is_integer() else float(p)
    return LpPenalty(lam, p, include_bias)


class Sum(AbstractLoss):
    """L(w) = Σ_j L_j(w). Build with `total(*terms)` or `loss_a + loss_b`."""

    terms: tuple[AbstractLoss, ...]

    def __call__(self, params: PyTree) -> Scalar:
        return sum((term(params) for term in self.terms), jnp.zeros(()))


def total(*terms: AbstractLoss) -> Sum:
    """The sum of losses, e.g. `total(mse(data), l2(1e-3))`. Nested sums are flattened."""
    if not terms:
        raise ValueError("total: give at least one loss, e.g. total(mse(data), l2(1e-3)).")
    flat: list[AbstractLoss] = []
    for term in terms:
        if not isinstance(term, AbstractLoss):
            raise ValueError(
                f"total: every term must be a loss from dyn.losses (an AbstractLoss), got "
                f"{type(term).__name__}."
            )
        flat.extend(term.terms if isinstance(term, Sum) else (term,))
    return Sum(tuple(flat))


class RotationalToy(AbstractLoss):
    """L(w) = (‖w‖² − r²)², a Mexican hat whose minima form the sphere ‖w‖ = r.

    The rotationally symmetric toy of Głuch & Urbanke (sec. 6.1, Figs. 3–6, r = 1);
    ∇L = 4(‖w‖² − r²) w. ‖w‖² sums over every inexact-array leaf when `w` is a pytree.
    Build with `rotational_toy(radius)`.
    """

    radius: Float[Array, ""]

    def __call__(self, params: PyTree) -> Scalar:
        leaves = [leaf for leaf in jax.tree.leaves(params) if eqx.is_inexact_array(leaf)]
        sq = sum((jnp.sum(w**2) for w in leaves), jnp.zeros(()))
        return (sq - self.radius**2) ** 2


def rotational_toy(radius: float | Float[ArrayLike, ""] = 1.0) -> RotationalToy:
    """The toy potential L(w) = (‖w‖² − r²)² with r = `radius` > 0 (Głuch & Urbanke 6.1)."""
    return RotationalToy(_hyper(radius, "radius", "rotational_toy", positive=True))
