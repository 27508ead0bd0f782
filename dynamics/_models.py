"""Equinox models: the multilayer perceptron and its activations.

Every activation records its homogeneity degree, because that degree decides which
rescaling of the weights is a symmetry of the network and hence which charge is
conserved (Głuch & Urbanke, Table 1; Saul, sec. 2; Baldi et al., BiPU units).
"""

import abc
import math
import numbers
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._random import from_numpy, normal
from ._units import Slice, Units
from ._validate import prng_key, real

__all__ = [
    "AbstractActivation",
    "ReLU",
    "LeakyReLU",
    "RePU",
    "Polynomial",
    "Swish",
    "Identity",
    "Tanh",
    "activation_from_name",
    "check_activation",
    "draw_weights",
    "init_gain",
    "MLP",
]


def _exponent(value: float) -> int | float:
    # An integral exponent goes to `lax.integer_pow`, which is exact and has a
    # well-defined derivative at 0; a fractional one needs the general `pow`.
    return int(value) if float(value).is_integer() else float(value)


class AbstractActivation(eqx.Module):
    """An elementwise activation σ.

    `degree` is the homogeneity degree p, with σ(λx) = λ^p σ(x) for every λ > 0, or
    `None` when σ is not positively homogeneous. A hidden unit with a p-homogeneous
    activation admits the rescaling "in-weights and bias ×a, out-weights ×a^(-p)",
    which leaves the network function unchanged (Głuch & Urbanke, Table 1).

    Hyperparameters are static fields, so a model's pytree leaves are exactly its
    trainable arrays: flows, gradients and `eqx.partition` never touch a slope or an
    exponent.
    """

    degree: AbstractVar[int | float | None]

    @abc.abstractmethod
    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        """Apply σ elementwise."""


class ReLU(AbstractActivation):
    """σ(x) = max(0, x). Positively homogeneous of degree 1."""

    degree: ClassVar[int] = 1

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jax.nn.relu(x)


class LeakyReLU(AbstractActivation):
    """σ(x) = x for x ≥ 0 and αx for x < 0. Positively homogeneous of degree 1."""

    alpha: float = eqx.field(static=True)
    degree: ClassVar[int] = 1

    def __init__(self, alpha: float = 0.01):
        self.alpha = real(alpha, "alpha", "LeakyReLU")

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        return jnp.where(x >= 0, x, self.alpha * x)


class RePU(AbstractActivation):
    """Rectified power unit σ(x) = max(0, x)^p, p ≥ 1. Homogeneous of degree p.

    RePU(1) is ReLU; the p-homogeneous charge b_i² + ‖W_h[i,:]‖² − p‖W_{h+1}[:,i]‖² of
    Głuch & Urbanke (Table 1) belongs to this family.
    """

    p: int | float = eqx.field(static=True)

    def __init__(self, p: float):
        p = real(p, "p", "RePU")
        if p < 1:
            raise ValueError(
                f"RePU: `p` must be >= 1 (a rectified power with p < 1 is not "
                f"differentiable at 0), got {p!r}. Use ReLU() for p = 1."
            )
        self.p = _exponent(p)

    @property
    def degree(self) -> int | float:
        return self.p

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.maximum(jnp.asarray(x), 0) ** self.p


class Polynomial(AbstractActivation):
    """σ(x) = x^p for a positive integer p. Positively homogeneous of degree p."""

    p: int = eqx.field(static=True)

    def __init__(self, p: int):
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
            raise ValueError(f"Polynomial: `p` must be a positive integer, got {p!r}.")
        self.p = int(p)

    @property
    def degree(self) -> int:
        return self.p

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.asarray(x) ** self.p


class Swish(AbstractActivation):
    """σ(x; β) = x · sigmoid(βx) (Ramachandran, Zoph & Le 2017). Not homogeneous.

    With `trainable=True` an `MLP` carries one β_i per hidden neuron (its `betas`) and
    the rescaling "in-weights ×a, β_i ×1/a, out-weights ×1/a" is a symmetry, since
    σ(ax; β/a) = a σ(x; β); its charge is b_i² + ‖W_h[i,:]‖² − ‖W_{h+1}[:,i]‖² − β_i²
    (Głuch & Urbanke, Table 1). `beta` is then only the initial value of every β_i.
    """

    beta: float = eqx.field(static=True)
    trainable: bool = eqx.field(static=True)
    degree: ClassVar[None] = None

    def __init__(self, beta: float = 1.0, trainable: bool = True):
        self.beta = real(beta, "beta", "Swish")
        if not isinstance(trainable, bool):
            raise ValueError(f"Swish: `trainable` must be True or False, got {trainable!r}.")
        self.trainable = trainable

    def __call__(
        self, x: Float[ArrayLike, "*shape"], beta: Float[ArrayLike, "*shape"] | None = None
    ) -> Float[Array, "*shape"]:
        """Apply σ; `beta` (e.g. an MLP's per-neuron β_i) overrides `self.beta`."""
        x = jnp.asarray(x)
        beta = self.beta if beta is None else beta
        return x * jax.nn.sigmoid(beta * x)


class Identity(AbstractActivation):
    """σ(x) = x: a linear network. Homogeneous of degree 1 (and GL-symmetric per layer)."""

    degree: ClassVar[int] = 1

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.asarray(x)


class Tanh(AbstractActivation):
    """σ(x) = tanh(x). Not homogeneous."""

    degree: ClassVar[None] = None

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        return jnp.tanh(x)


_ACTIVATIONS: dict[str, type[AbstractActivation]] = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "repu": RePU,
    "polynomial": Polynomial,
    "swish": Swish,
    "identity": Identity,
    "linear": Identity,
    "tanh": Tanh,
}


def activation_from_name(name: str, **kwargs) -> AbstractActivation:
    """Build an activation from its name, e.g. `activation_from_name("repu", p=2)`.

    Names: "relu", "leaky_relu", "repu", "polynomial", "swish", "identity" (alias
    "linear"), "tanh"; case and "-" versus "_" do not matter. Keyword arguments go to
    the activation's constructor.
    """
    valid = ", ".join(repr(n) for n in _ACTIVATIONS)
    if not isinstance(name, str):
        raise ValueError(f"activation name must be a string, one of {valid}; got {name!r}.")
    cls = _ACTIVATIONS.get(name.strip().lower().replace("-", "_"))
    if cls is None:
        raise ValueError(f"unknown activation {name!r}; valid names are {valid}.")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(
            f"activation {name!r} does not accept the keyword arguments {kwargs!r} ({e}); "
            f"build it directly instead, e.g. dyn.RePU(p=2)."
        ) from e


def check_activation(activation, owner: str) -> AbstractActivation:
    """An `AbstractActivation`, built from its name if a string; else a ValueError."""
    if isinstance(activation, str):
        return activation_from_name(activation)
    if not isinstance(activation, AbstractActivation):
        hint = (f" (did you mean {activation.__name__}()?)"
                if isinstance(activation, type) and issubclass(activation, AbstractActivation)
                else "")
        raise ValueError(
            f"{owner}: `activation` must be an AbstractActivation such as dyn.ReLU() or a "
            f"name such as 'relu', got {activation!r}{hint}."
        )
    return activation


def _check_widths(widths) -> tuple[int, ...]:
    fix = "pass a sequence such as (64, 32, 10): input width, hidden widths, output width"
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence):
        raise ValueError(f"MLP: `widths` must be a sequence of positive ints; {fix}.")
    if len(widths) < 2:
        raise ValueError(
            f"MLP: `widths` needs at least 2 entries (input and output), got {tuple(widths)!r}; "
            f"{fix}."
        )
    out = []
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
            raise ValueError(
                f"MLP: every entry of `widths` must be a positive int, got {tuple(widths)!r}."
            )
        out.append(int(w))
    return tuple(out)


_INITS = {"he": 2.0, "lecun": 1.0}


def _array(a):
    # NumPy (a concrete key) to the device without a compile; a traced draw stays traced
    return from_numpy(a) if isinstance(a, np.ndarray) else a


def init_gain(init, owner: str) -> float:
    """The variance gain of an `init` name: "he" 2 (He et al. 2015), "lecun" 1."""
    if init not in _INITS:
        raise ValueError(f"{owner}: `init` must be one of {sorted(_INITS)}, got {init!r}.")
    return _INITS[init]


def draw_weights(key, shapes, fan_ins, gain: float) -> tuple[Array, ...]:
    """Arrays of the given shapes with entries N(0, gain/fan_in), from one draw."""
    sizes = [math.prod(shape) for shape in shapes]
    # One draw for all layers, then cut: the sampler compiles once per size bucket
    # (`_random.normal`), and the cutting runs in NumPy where the key is concrete
    # (eager jax slices would compile once per layer shape).
    z = normal(key, (sum(sizes),))
    if not isinstance(z, jax.core.Tracer):  # (a traced key: under vmap, say)
        z = np.asarray(z)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    return tuple(
        _array(math.sqrt(gain / fan_in) * z[o : o + size].reshape(shape))
        for shape, size, o, fan_in in zip(shapes, sizes, offsets, fan_ins)
    )


class MLP(eqx.Module):
    """A fully connected network x ↦ W_K σ(… σ(W_1 x + b_1) …) + b_K.

    `weights[k]` has shape `(widths[k+1], widths[k])`; hidden layers apply the
    activation, the last layer is linear. With `Swish(trainable=True)` the model also
    carries `betas`, one array of per-neuron β_i for each hidden layer (an empty tuple
    when there is no hidden layer); otherwise `betas` is None.

    **Arguments:**

    - `widths`: layer widths (input, hidden..., output), at least two positive ints.
    - `activation`: an `AbstractActivation` or a name for `activation_from_name`.
    - `bias`: whether layers have biases (initialised to zero); False gives `biases=None`.
    - `key`: PRNG key for the weights (keyword-only, required).
    - `init`: "he", W_ij ~ N(0, 2/fan_in) (He et al. 2015), or "lecun", N(0, 1/fan_in).
    """

    weights: tuple[Float[Array, "out in"], ...]
    biases: tuple[Float[Array, " out"], ...] | None
    betas: tuple[Float[Array, " hidden"], ...] | None
    activation: AbstractActivation
    widths: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        widths: Sequence[int],
        activation: AbstractActivation | str = ReLU(),
        bias: bool = True,
        *,
        key: PRNGKeyArray | None = None,
        init: str = "he",
    ):
        widths = _check_widths(widths)
        activation = check_activation(activation, "MLP")
        if not isinstance(bias, bool):
            raise ValueError(f"MLP: `bias` must be True or False, got {bias!r}.")
        init_gain(init, "MLP")
        key = prng_key(key, "MLP")

        shapes = [(fan_out, fan_in) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
        self.weights = draw_weights(key, shapes, [s[1] for s in shapes], init_gain(init, "MLP"))
        dtype = self.weights[0].dtype
        self.biases = tuple(from_numpy(np.zeros(w, dtype)) for w in widths[1:]) if bias else None
        if isinstance(activation, Swish) and activation.trainable:
            # An explicit dtype: a Python-float fill would give a weakly typed leaf.
            self.betas = tuple(jnp.full(w, activation.beta, dtype) for w in widths[1:-1])
        else:
            self.betas = None
        self.activation = activation
        self.widths = widths

    @property
    def depth(self) -> int:
        """Number of weight matrices K."""
        return len(self.weights)

    @property
    def degree(self) -> int | float | None:
        """Homogeneity degree of the activation (None when not homogeneous)."""
        return self.activation.degree

    def rescaling_units(self) -> tuple[Units, ...]:
        """One family of units per hidden layer h = 1..K−1: neuron i scales W_h[i, :] and
        b_h[i] by λ, W_{h+1}[:, i] by λ^{−p} (and a trainable Swish β_h[i] by λ^{−1}, with
        p = 1; Głuch & Urbanke Tables 2–4). See `dyn.symmetries.Units`."""
        trainable_swish = self.betas is not None
        p = 1.0 if trainable_swish else self.activation.degree
        out = []
        for h in range(self.depth - 1):
            slices = [Slice(("weights", h), 0, 1.0, 2), Slice(("weights", h + 1), 1, "-p", 2)]
            if self.biases is not None:
                slices.append(Slice(("biases", h), 0, 1.0, 1))
            if trainable_swish:
                slices.append(Slice(("betas", h), 0, -1.0, 1))
            out.append(Units(f"layer {h + 1}", self.widths[h + 1], slices, p))
        return tuple(out)

    def __call__(self, x: Float[ArrayLike, " in"]) -> Float[Array, " out"]:
        """Map one input of shape `(widths[0],)` to one output of shape `(widths[-1],)`."""
        h = jnp.asarray(x)
        if h.shape != (self.widths[0],):
            raise ValueError(
                f"MLP: input `x` must have shape ({self.widths[0]},), got {h.shape}; "
                f"use jax.vmap(model)(X) for a batch."
            )
        for k, w in enumerate(self.weights):
            h = w @ h
            if self.biases is not None:
                h = h + self.biases[k]
            if k < self.depth - 1:
                if self.betas is None:
                    h = self.activation(h)
                else:
                    # Only Swish has per-neuron parameters; `betas` is set for nothing else.
                    h = self.activation(h, beta=self.betas[k])  # pyright: ignore[reportCallIssue]
        return h
