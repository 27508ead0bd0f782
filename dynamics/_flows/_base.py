"""Abstract bases of the catalogue and the helpers its entries share.

The Lagrangian catalogue: one final `eqx.Module` per flow.

Every flow acts on parameters w (any pytree of arrays) under a loss L(w). First-order
flows give ẇ = f(t, w); second-order flows give ẅ = a(t, w, ẇ) and carry the velocity
v = ẇ in the state, which diffrax integrates as (w, v).

The closed forms follow Głuch & Urbanke, *Noether: The More Things Change, the More Stay
the Same*, Table 1 (eqs. 22–27); each second-order entry also states its Lagrangian, and
`LagrangianFlow` of that Lagrangian reproduces it (the catalogue's self-test, see
tests/test_flows.py). Every formula here was checked that way rather than trusted.

Throughout, `loss` is a function of w alone (the driver closes over data and any static
parts of the model), so flows are pure functions of (t, w, v).
"""

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._tree import sqnorm
from .._validate import float_array

Loss = Callable[[PyTree], Scalar]


class AbstractFlow(eqx.Module):
    """Base of the catalogue. See `AbstractFirstOrderFlow`, `AbstractSecondOrderFlow`."""

    @abc.abstractmethod
    def energy(self, t: ArrayLike, w: PyTree, v: PyTree | None, loss: Loss) -> Scalar:
        """The flow's energy-like quantity (the catalogue table's last column)."""

    @abc.abstractmethod
    def energy_rate(self, t: ArrayLike, w: PyTree, v: PyTree | None, loss: Loss) -> Scalar:
        """dE/dt along a solution, in closed form: the flow's dissipation identity."""


class AbstractFirstOrderFlow(AbstractFlow):
    """ẇ = f(t, w).

    `affine_in_loss`: True when the field is affine in the loss, f = A(t, w)∇L +
    b(t, w) with A and b independent of L (gradient flow); the Filippov
    mode then evaluates its sliding system on the sliding examples alone
    (`dynamics/_filippov/_system.py`). False by default: a flow that does not declare
    it is evaluated on every example, which is right for any flow.
    """

    affine_in_loss: ClassVar[bool] = False

    @abc.abstractmethod
    def vector_field(self, t: ArrayLike, w: PyTree, loss: Loss) -> PyTree:
        """The right-hand side f(t, w)."""

    def vector_field_and_loss(self, t: ArrayLike, w: PyTree, loss: Loss) -> tuple[PyTree, Scalar]:
        """(f(t, w), L(w)). Flows that take ∇L override this to get L from the same
        `jax.value_and_grad`, which lets fixed-step Euler carry the loss for free."""
        return self.vector_field(t, w, loss), loss(w)


class AbstractSecondOrderFlow(AbstractFlow):
    """ẅ = a(t, w, ẇ), derived from a Lagrangian ℒ(t, w, ẇ)."""

    @abc.abstractmethod
    def acceleration(self, t: ArrayLike, w: PyTree, v: PyTree, loss: Loss) -> PyTree:
        """ẅ as a function of time, position and velocity."""

    @abc.abstractmethod
    def lagrangian(self, t: ArrayLike, w: PyTree, v: PyTree, loss: Loss) -> Scalar:
        """ℒ(t, w, v) whose Euler–Lagrange equations are this flow."""


class AbstractKappaFlow(AbstractFlow):
    """Marker: the flow is κ2(t) ẅ + κ1(t) ẇ + ∇L(w) = 0 (Głuch & Urbanke eq. 22),
    gradient flow included (κ2 = 0, κ1 = 1).

    Symmetry residuals ⟨κ2 ẅ + κ1 ẇ, ξ(w)⟩ (their eq. 17), charge laws and the
    conformal-symplectic splitting need the two coefficients; `kappas` gives them.
    """

    @abc.abstractmethod
    def kappas(self, t: ArrayLike) -> tuple[Scalar, Scalar]:
        """(κ1(t), κ2(t))."""


class AbstractSeparableFlow(AbstractSecondOrderFlow):
    """Marker: the acceleration depends on w only (ẅ = −∇L(w)), so the flow splits into
    ẇ = v, v̇ = F(w) and symplectic partitioned solvers (`diffrax.SemiImplicitEuler`,
    velocity Verlet) apply."""


def _kinetic_plus_loss(w, v, loss, mass=1.0):
    # H = ½ m ‖v‖² + L(w), the energy of every second-order entry of the table.
    return 0.5 * mass * sqnorm(v) + loss(w)


class _Constant(eqx.Module):
    """A constant coefficient t ↦ c."""

    value: Array = eqx.field(converter=float_array)

    def __call__(self, t):
        return self.value + 0.0 * t


def _as_schedule(name: str, k: Any) -> Callable:
    if callable(k):
        return k
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a number or a function of time t, got {type(k).__name__}."
        ) from None
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return _Constant(value)


# Gauss–Legendre nodes for ∫ κ1/κ2 in `GeneralFlow.lagrangian`. The value only fixes a
# constant factor of ℒ; the Euler–Lagrange equations see its exact derivative (custom_jvp).
_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)


def gauss_integral(f: Callable, a: ArrayLike, b: ArrayLike) -> Array:
    """∫_a^b f, with d/db exactly f(b) under autodiff."""

    @jax.custom_jvp
    def integral(b):
        mid, half = 0.5 * (b + a), 0.5 * (b - a)
        nodes = mid + half * jnp.asarray(_GL_X)
        return half * jnp.sum(jnp.asarray(_GL_W) * jax.vmap(f)(nodes))

    @integral.defjvp
    def _(primals, tangents):
        (b,), (db,) = primals, tangents
        return integral(b), f(b) * db

    return integral(jnp.asarray(b, dtype=jnp.result_type(float)))


