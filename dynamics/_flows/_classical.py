"""The classical entries of the catalogue: gradient, mirror, Newtonian, Nesterov,
heavy-ball, general κ1/κ2 and Lagrangian flows (Głuch & Urbanke Table 1, eqs. 22–27)."""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree, Scalar

from .._tree import axpy, scale, sqnorm, vdot
from .._validate import finite_nonnegative, float_array, traced_scalar
from ._base import (
    AbstractFirstOrderFlow,
    AbstractKappaFlow,
    AbstractSecondOrderFlow,
    AbstractSeparableFlow,
    _as_schedule,
    _Constant,
    _kinetic_plus_loss,
    gauss_integral,
)


class GradientFlow(AbstractFirstOrderFlow, AbstractKappaFlow):
    """Gradient flow (GF), ẇ = −∇L(w).

    The massless limit κ2 → 0 of the general dynamics (Głuch & Urbanke Table 1, eq. 27);
    it has no Lagrangian of its own. Energy E = L, with dL/dt = −‖∇L‖².
    """

    affine_in_loss: ClassVar[bool] = True

    def vector_field(self, t, w, loss):
        return scale(-1.0, jax.grad(loss)(w))

    def vector_field_and_loss(self, t, w, loss):
        value, grad = jax.value_and_grad(loss)(w)
        return scale(-1.0, grad), value

    def kappas(self, t):
        return jnp.ones(()), jnp.zeros(())

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        return -sqnorm(jax.grad(loss)(w))


class MirrorFlow(AbstractFirstOrderFlow):
    """Bregman (mirror) gradient flow, d/dt ∇φ(w) = −∇L(w).

    Integrated in primal coordinates: ẇ = −(∇²φ(w))⁻¹ ∇L(w), with the linear solve done
    by lineax on the Hessian of the strictly convex potential φ (tagged symmetric positive
    definite, so the default solver is a Cholesky factorisation). φ(w) = ½‖w‖² gives GF;
    the negative entropy Σ w log w gives the multiplicative flow ẇ = −w ⊙ ∇L.
    Energy E = L, with dL/dt = −∇Lᵀ(∇²φ)⁻¹∇L ≤ 0.

    **Arguments:** `phi`: the mirror potential, a scalar function of the parameters;
    `linear_solver`: any lineax solver (e.g. `lx.CG(rtol, atol)` for large models).
    """

    phi: Callable[[PyTree], Scalar]
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=True)

    def __check_init__(self):
        if not callable(self.phi):
            raise ValueError("`phi` must be a function w -> scalar (the mirror potential).")

    def vector_field(self, t, w, loss):
        return self.vector_field_and_loss(t, w, loss)[0]

    def vector_field_and_loss(self, t, w, loss):
        value, grad = jax.value_and_grad(loss)(w)
        hessian = lx.JacobianLinearOperator(
            lambda x, _: jax.grad(self.phi)(x),
            w,
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
        return scale(-1.0, lx.linear_solve(hessian, grad, self.linear_solver).value), value

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        return vdot(jax.grad(loss)(w), self.vector_field(t, w, loss))


class NewtonianFlow(AbstractSeparableFlow, AbstractKappaFlow):
    """Newtonian dynamics (ND), ẅ + ∇L(w) = 0 (Głuch & Urbanke eq. 25, κ1 = 0, κ2 = 1).

    ℒ = ½‖ẇ‖² − L(w); the energy H = ½‖ẇ‖² + L is conserved (time-translation symmetry).
    """

    def acceleration(self, t, w, v, loss):
        return scale(-1.0, jax.grad(loss)(w))

    def lagrangian(self, t, w, v, loss):
        return 0.5 * sqnorm(v) - loss(w)

    def kappas(self, t):
        return jnp.zeros(()), jnp.ones(())

    def energy(self, t, w, v, loss):
        return _kinetic_plus_loss(w, v, loss)

    def energy_rate(self, t, w, v, loss):
        return jnp.zeros(())


class NesterovFlow(AbstractSecondOrderFlow, AbstractKappaFlow):
    """Nesterov's accelerated gradient flow (NAGF), ẅ + (r/t) ẇ + ∇L(w) = 0.

    Su, Boyd & Candès (2014) with r = 3 by default; ℒ = t^r (½‖ẇ‖² − L(w))
    (Głuch & Urbanke eq. 26). H = ½‖ẇ‖² + L dissipates as dH/dt = −(r/t)‖ẇ‖².

    Singular at t = 0: start at t0 > 0, or at t0 = 0 with ẇ(0) = 0 (Głuch & Urbanke
    footnote 2), where the limit ẅ(0) = −∇L/(1 + r) is used.
    """

    r: float | Array = eqx.field(default=3.0, converter=float_array)

    def __check_init__(self):
        finite_nonnegative(self.r, "r")

    def _damping(self, t):
        positive = t > 0
        return jnp.where(positive, self.r / jnp.where(positive, t, 1.0), 0.0)

    def acceleration(self, t, w, v, loss):
        grad = jax.grad(loss)(w)
        # At t = 0 with ẇ = 0, ẇ ≈ a t, so (r/t)ẇ → r a and a = −∇L/(1 + r).
        at_zero = scale(-1.0 / (1.0 + self.r), grad)
        regular = axpy(-self._damping(t), v, scale(-1.0, grad))
        return jax.tree.map(lambda a, b: jnp.where(t > 0, a, b), regular, at_zero)

    def lagrangian(self, t, w, v, loss):
        return t**self.r * (0.5 * sqnorm(v) - loss(w))

    def kappas(self, t):
        return self._damping(t), jnp.ones(())

    def energy(self, t, w, v, loss):
        return _kinetic_plus_loss(w, v, loss)

    def energy_rate(self, t, w, v, loss):
        return -self._damping(t) * sqnorm(v)


class HeavyBallFlow(AbstractSecondOrderFlow, AbstractKappaFlow):
    """Heavy-ball (Polyak) flow, ẅ + γ ẇ + ∇L(w) = 0.

    ℒ = e^{γt}(½‖ẇ‖² − L(w)) (eq. 24 of Głuch & Urbanke with κ1 = γ, κ2 = 1);
    H = ½‖ẇ‖² + L dissipates as dH/dt = −γ‖ẇ‖².
    """

    gamma: float | Array = eqx.field(converter=float_array)

    def __check_init__(self):
        finite_nonnegative(self.gamma, "gamma")

    def acceleration(self, t, w, v, loss):
        return axpy(-self.gamma, v, scale(-1.0, jax.grad(loss)(w)))

    def lagrangian(self, t, w, v, loss):
        return jnp.exp(self.gamma * t) * (0.5 * sqnorm(v) - loss(w))

    def kappas(self, t):
        return jnp.asarray(self.gamma, jnp.result_type(float)), jnp.ones(())

    def energy(self, t, w, v, loss):
        return _kinetic_plus_loss(w, v, loss)

    def energy_rate(self, t, w, v, loss):
        return -self.gamma * sqnorm(v)


class GeneralFlow(AbstractSecondOrderFlow, AbstractKappaFlow):
    """General κ1/κ2 dynamics, κ2(t) ẅ + κ1(t) ẇ + ∇L(w) = 0 (Głuch & Urbanke eq. 22).

    ℒ = exp(∫_{t_ref}^t κ1/κ2)(½‖ẇ‖² − L(w)/κ2(t)) (eq. 24; the paper integrates from 0,
    which diverges for Nesterov's κ1 = 3/t; a different lower limit only rescales ℒ by a
    constant). E = ½κ2‖ẇ‖² + L obeys dE/dt = (κ2'/2 − κ1)‖ẇ‖².

    **Arguments:** `kappa1`, `kappa2`: numbers or functions of t; `kappa2` must not
    vanish along the solve (κ2 → 0 is gradient flow, use `GradientFlow`).
    """

    kappa1: Callable
    kappa2: Callable
    t_ref: Array

    def __init__(self, kappa1: Any = 0.0, kappa2: Any = 1.0, *, t_ref: float = 1.0):
        self.kappa1 = _as_schedule("kappa1", kappa1)
        self.kappa2 = _as_schedule("kappa2", kappa2)
        if isinstance(self.kappa2, _Constant) and not np.any(np.asarray(self.kappa2.value)):
            raise ValueError(
                "`kappa2` = 0 makes the flow first order; use dyn.GradientFlow() "
                "(kappa1 = 1) or a small positive kappa2."
            )
        # An array, like the coefficients: a new t_ref does not compile the solve again.
        self.t_ref = traced_scalar(t_ref, "t_ref", "GeneralFlow")

    def acceleration(self, t, w, v, loss):
        force = axpy(self.kappa1(t), v, jax.grad(loss)(w))
        return scale(-1.0 / self.kappa2(t), force)

    def lagrangian(self, t, w, v, loss):
        log_weight = gauss_integral(lambda s: self.kappa1(s) / self.kappa2(s), self.t_ref, t)
        return jnp.exp(log_weight) * (0.5 * sqnorm(v) - loss(w) / self.kappa2(t))

    def kappas(self, t):
        return self.kappa1(t), self.kappa2(t)

    def energy(self, t, w, v, loss):
        return _kinetic_plus_loss(w, v, loss, mass=self.kappa2(t))

    def energy_rate(self, t, w, v, loss):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        dkappa2 = jax.jvp(self.kappa2, (t,), (jnp.ones_like(t),))[1]
        return (0.5 * dkappa2 - self.kappa1(t)) * sqnorm(v)


class LagrangianFlow(AbstractSecondOrderFlow):
    """The flow of any Lagrangian ℒ(t, w, v, loss), by the Euler–Lagrange equations.

    (∂²ℒ/∂v∂v) ẅ = ∂ℒ/∂w − ∂²ℒ/∂v∂t − (∂²ℒ/∂v∂w) v, with all derivatives by JAX autodiff
    and the mass matrix ∂²ℒ/∂v∂v solved by lineax (dense LU by default: O(n³) in the
    number of parameters; pass e.g. `linear_solver=lx.CG(...)` with
    `positive_definite=True` for large models).

    Energy is the Jacobi integral E = ⟨v, ∂ℒ/∂v⟩ − ℒ, with dE/dt = −∂ℒ/∂t: conserved
    when ℒ does not depend on time.
    """

    lagrangian_fn: Callable[..., Scalar]
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=True)
    positive_definite: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        if not callable(self.lagrangian_fn):
            raise ValueError(
                "`lagrangian` must be a function (t, w, v, loss) -> scalar, "
                f"got {type(self.lagrangian_fn).__name__}."
            )

    def lagrangian(self, t, w, v, loss):
        return self.lagrangian_fn(t, w, v, loss)

    def acceleration(self, t, w, v, loss):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        w_flat, unravel = ravel_pytree(w)
        v_flat, _ = ravel_pytree(v)

        def ell(s, wf, vf):
            return self.lagrangian_fn(s, unravel(wf), unravel(vf), loss)

        def momentum(s, wf, vf):
            return jax.grad(ell, argnums=2)(s, wf, vf)

        dl_dw = jax.grad(ell, argnums=1)(t, w_flat, v_flat)
        # d/ds p(t + s, w + s v, v) = ∂²ℒ/∂v∂t + (∂²ℒ/∂v∂w) v in one forward-mode pass.
        _, mixed = jax.jvp(
            lambda s, wf: momentum(s, wf, v_flat),
            (t, w_flat),
            (jnp.ones_like(t), v_flat),
        )
        tags = (lx.symmetric_tag,)
        if self.positive_definite:
            tags = tags + (lx.positive_semidefinite_tag,)
        mass = lx.JacobianLinearOperator(
            lambda vf, _: momentum(t, w_flat, vf), v_flat, tags=tags
        )
        accel = lx.linear_solve(mass, dl_dw - mixed, self.linear_solver).value
        return unravel(accel)

    def energy(self, t, w, v, loss):
        momentum = jax.grad(self.lagrangian_fn, argnums=2)(t, w, v, loss)
        return vdot(v, momentum) - self.lagrangian_fn(t, w, v, loss)

    def energy_rate(self, t, w, v, loss):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        return -jax.grad(self.lagrangian_fn, argnums=0)(t, w, v, loss)
