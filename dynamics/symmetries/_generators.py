"""Symmetry generators of MLPs (Głuch & Urbanke, Tables 2–5) as Equinox modules.

A generator is a map w ↦ ξ(w) (a pytree shaped like the model, zero on the parameters it
does not move) with ⟨∇L(w), ξ(w)⟩ = 0 for every w when it is a symmetry of L. All the
generators here are linear, ξ(w) = A w, which is what the charge laws need (`ChargeLaw`).
For A symmetric the gradient-flow charge is ⟨w, A w⟩ (twice the Noether charge
Q = ½⟨w, A w⟩, to match `dyn.charges.rescaling`).
"""

import abc
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from .._flows import AbstractFlow
from .._models import MLP, Identity
from .._random import normal
from .._tree import is_concrete, leaves, partition, vdot
from .._units import unit_families, unit_generator, zeros_like
from ._charges import check_mlp


def _optional_degree(degree) -> float | None:
    """A rescaling generator's `degree`: a real number (as float) or None."""
    if degree is None:
        return None
    if isinstance(degree, bool) or not isinstance(degree, numbers.Real):
        raise ValueError(f"`degree` must be a number or None, got {degree!r}.")
    return float(degree)


def _index(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _family(model, layer: int, owner: str):
    """The `layer`-th (from 1) family of `model`'s rescaling units."""
    families = unit_families(model, owner, "params")
    if layer > len(families):
        shape = f" (widths {model.widths})" if isinstance(model, MLP) else ""
        raise ValueError(
            f"{owner}: `layer` = {layer} but the model has hidden layers 1..{len(families)}"
            f"{shape}, i.e. its unit families "
            f"{', '.join(repr(u.name) for u in families)}; hidden layer h of an MLP sits "
            "between W_h and W_(h+1)."
        )
    return families[layer - 1]


class AbstractGenerator(eqx.Module):
    """An infinitesimal symmetry ξ(w) of an MLP's loss (Głuch & Urbanke eq. 17)."""

    @abc.abstractmethod
    def __call__(self, params: PyTree) -> PyTree:
        """ξ(params): a pytree shaped like `params`."""

    def charge(self, params: PyTree) -> Array:
        """The gradient-flow charge, when the generator has one."""
        raise ValueError(
            f"{type(self).__name__} has no gradient-flow charge (its generator is not "
            "symmetric); use dyn.monitors.ChargeLaw for its law along second-order flows."
        )


class AbstractLinearGenerator(AbstractGenerator):
    """Marker: ξ is linear in w, ξ(w) = A w, so it applies to velocities as well and the
    charge law κ2 Q̈ + κ1 Q̇ = κ2 ⟨ẇ, A ẇ⟩ of Q = ½⟨w, A w⟩ holds (see `ChargeLaw`)."""


class Rescaling(AbstractLinearGenerator):
    """Rescaling of unit `neuron` of the `layer`-th family of the model's rescaling units
    (`model.rescaling_units()`, counted from 1; for an MLP hidden layer h = 1..K−1):

        W_h[i, :], b_h[i] ↦ ×(1+ε),  W_{h+1}[:, i] ↦ ×(1+ε)^{−p},  β_h[i] ↦ ×(1+ε)^{−1}

    so ξ = (W_h[i,:], b_h[i], −p W_{h+1}[:,i], −β_h[i]) on those entries, zero elsewhere
    (Głuch & Urbanke Table 2 for p = 1, Table 3 for p-homogeneous units, Table 4 for Swish
    with trainable β, where p = 1); in general ξ = e_S w_S on each slice S of the unit
    (`dyn.symmetries.Units`: a conv channel, a recurrent unit). Charge ⟨w, ξ(w)⟩ =
    Σ_S e_S ‖w_S‖², for an MLP b_i² + ‖W_h[i,:]‖² − p‖W_{h+1}[:,i]‖² − β_i².

    `degree` = None takes p from the units (the activation) and raises on a
    non-homogeneous one; a number forces p (e.g. to test a false symmetry with `check`).
    """

    layer: int = eqx.field(static=True)
    neuron: int = eqx.field(static=True)
    degree: float | None = eqx.field(static=True, default=None)

    def __init__(self, layer: int, neuron: int, degree: float | None = None):
        self.layer = _index("layer", layer, 1)
        self.neuron = _index("neuron", neuron, 0)
        self.degree = _optional_degree(degree)

    def __call__(self, params):
        units = _family(params, self.layer, "Rescaling")
        if self.neuron >= units.size:
            raise ValueError(
                f"Rescaling: `neuron` = {self.neuron} but hidden layer {self.layer} "
                f"({units.name}) has {units.size} units (numbered from 0)."
            )
        return unit_generator(params, units, self.neuron, self.degree, "Rescaling")

    def charge(self, params):
        return vdot(params, self(params))


class LayerRescaling(AbstractLinearGenerator):
    """All units of the `layer`-th family rescaled together (the sum of
    `Rescaling(layer, i)` over i): for an MLP ξ = (W_h, b_h, −p W_{h+1}, −β_h) on those
    blocks.

    Its residual is Głuch & Urbanke's per-layer identity (eq. 30),
    ⟨W_h, κ2 Ẅ_h + κ1 Ẇ_h⟩ − p⟨W_{h+1}, κ2 Ẅ_{h+1} + κ1 Ẇ_{h+1}⟩ = 0 (with biases,
    Table 3), and its gradient-flow charge ⟨w, ξ(w)⟩ = ‖W_h‖² + ‖b_h‖² − p‖W_{h+1}‖² − ‖β_h‖²
    is eq. 31 (Du et al. 2018). `degree` as for `Rescaling`.
    """

    layer: int = eqx.field(static=True)
    degree: float | None = eqx.field(static=True, default=None)

    def __init__(self, layer: int, degree: float | None = None):
        self.layer = _index("layer", layer, 1)
        self.degree = _optional_degree(degree)

    def __call__(self, params):
        units = _family(params, self.layer, "LayerRescaling")
        return unit_generator(params, units, None, self.degree, "LayerRescaling")

    def charge(self, params):
        return vdot(params, self(params))


def _square(name: str, a) -> np.ndarray | Array:
    arr = jnp.asarray(a) if not is_concrete(a) else np.asarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"`{name}` must be a square matrix, got shape {arr.shape}.")
    if is_concrete(a) and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite.")
    return arr


class LinearLayer(AbstractLinearGenerator):
    """The GL(d_h) action on linear hidden layer h = `layer` for any matrix `A`:

        W_h ↦ (I+εA) W_h,  b_h ↦ (I+εA) b_h,  W_{h+1} ↦ W_{h+1}(I+εA)^{−1}

    so ξ = (A W_h, A b_h, −W_{h+1} A) (Głuch & Urbanke Table 4; Arora et al. 2018). A
    symmetry when the activation is the identity. Charge ⟨w, ξ(w)⟩ =
    ⟨A, W_h W_hᵀ + b_h b_hᵀ − W_{h+1}ᵀ W_{h+1}⟩: only the symmetric part of A contributes.
    """

    layer: int = eqx.field(static=True)
    A: Array

    def __init__(self, layer: int, A: ArrayLike):
        self.layer = _index("layer", layer, 1)
        self.A = _square("A", A)

    def __call__(self, params):
        model = check_mlp(params, "params")
        _family(model, self.layer, "LinearLayer")
        if not isinstance(model.activation, Identity):
            raise ValueError(
                "LinearLayer: the GL action is a symmetry of linear layers only; the model's "
                f"activation is {type(model.activation).__name__}, use dyn.Identity()."
            )
        n = model.widths[self.layer]
        if self.A.shape != (n, n):
            raise ValueError(
                f"LinearLayer: `A` must be {n}x{n} for hidden layer {self.layer}, got "
                f"{self.A.shape}."
            )
        h, a = self.layer - 1, jnp.asarray(self.A)
        xi = zeros_like(model)
        xi = eqx.tree_at(lambda m: m.weights[h], xi, a @ model.weights[h])
        xi = eqx.tree_at(lambda m: m.weights[h + 1], xi, -model.weights[h + 1] @ a)
        if model.biases is not None:
            xi = eqx.tree_at(lambda m: m.biases[h], xi, model.biases[h] @ a.T)
        return xi

    def charge(self, params):
        return vdot(params, self(params))


class InputRotation(AbstractLinearGenerator):
    """Rotation of the input data by P ∈ so(d_x), acting on the first layer:

        W_1 ↦ W_1 (I + εP),  ξ = (W_1 P, 0, …)

    (Głuch & Urbanke Table 5). A symmetry when the data distribution is rotation
    invariant (e.g. rotation-augmented data). ξ is antisymmetric, so there is no
    gradient-flow charge; along second-order flows the Noether charge is the angular
    momentum ⟨ẇ, ξ(w)⟩ = ⟨P, W_1ᵀẆ_1⟩, conserved by ND (μ⟨ẇ, ξ(w)⟩ in general, see
    `dyn.monitors.ChargeLaw`).
    """

    P: Array

    def __init__(self, P: ArrayLike):
        P = _square("P", P)
        if is_concrete(P) and not np.allclose(P, -P.T, rtol=0, atol=1e-12 * (1 + np.abs(P).max())):
            raise ValueError("InputRotation: `P` must be antisymmetric (P = −Pᵀ, in so(d_x)).")
        self.P = P

    def __call__(self, params):
        model = check_mlp(params, "params")
        if self.P.shape[0] != model.widths[0]:
            raise ValueError(
                f"InputRotation: `P` must be {model.widths[0]}x{model.widths[0]} (the input "
                f"width), got {self.P.shape}."
            )
        xi = zeros_like(model)
        return eqx.tree_at(lambda m: m.weights[0], xi, model.weights[0] @ jnp.asarray(self.P))


class TimeTranslation(eqx.Module):
    """Time translation t ↦ t + ε: not a map of w, so it has no ξ(w); for a flow whose
    Lagrangian does not depend on t (ND) its Noether charge is the energy
    H = ½‖ẇ‖² + L (Głuch & Urbanke sec. 7; for other flows see their energy laws)."""

    def charge(self, flow: AbstractFlow, t, params, velocity, loss) -> Array:
        """The flow's energy (its `energy`) at (t, params, velocity)."""
        if not isinstance(flow, AbstractFlow):
            raise ValueError(f"`flow` must be a catalogue entry, got {flow!r}.")
        w, static = partition(params)
        v = None if velocity is None else partition(velocity)[0]
        return flow.energy(t, w, v, lambda u: loss(eqx.combine(u, static)))


def check(generator: AbstractGenerator, loss, params: PyTree, *, key: PRNGKeyArray,
          num_points: int = 8, scale: float = 0.5) -> float:
    """Worst relative violation max |⟨∇L(w), ξ(w)⟩| / (‖∇L(w)‖ ‖ξ(w)‖) over `num_points`
    random points w = params + scale·rms(leaf)·N(0, 1) (Głuch & Urbanke eq. 17 with the
    loss: a symmetry gives 0, i.e. ~1e-16 in float64; a broken one gives O(0.1–1)).
    """
    if not isinstance(generator, AbstractGenerator):
        raise ValueError(
            f"`generator` must be a dyn.symmetries generator such as Rescaling(layer=1, "
            f"neuron=0), got {generator!r}."
        )
    if not callable(loss):
        raise ValueError(f"`loss` must be a function params -> scalar, got {loss!r}.")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"`num_points` must be a positive int, got {num_points!r}.")
    if not leaves(params):
        raise ValueError("`params` has no floating-point arrays to move.")
    generator(params)  # validate the generator against the model before tracing
    w, static = partition(params)
    theta, unravel = ravel_pytree(w)
    sigma = ravel_pytree(jax.tree.map(
        lambda x: jnp.full_like(x, scale * jnp.sqrt(jnp.mean(x**2) + 1e-30)), w))[0]
    # One draw for all points and leaves, outside the vmapped program: a threefry draw
    # per leaf inside it cost ~0.7 s of XLA compile each (4.5 s for a 3-layer MLP).
    noise = normal(key, (num_points, theta.size), theta.dtype)

    def violation(z):
        point = eqx.combine(unravel(theta + sigma * z), static)
        grad = eqx.filter_grad(loss)(point)
        xi = generator(point)
        denom = jnp.sqrt(vdot(grad, grad) * vdot(xi, xi))
        return jnp.abs(vdot(grad, xi)) / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny)

    values = jax.jit(jax.vmap(violation))(noise)
    return float(jnp.max(values))
