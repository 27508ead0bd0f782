"""Bregman Lagrangian flows (Wibisono, Wilson & Jordan 2016, *A variational perspective
on accelerated methods in optimization*, PNAS; their eqs. 1–5)."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, PyTree, Scalar

from .._tree import axpy, scale, vdot
from .._validate import float_array
from ._base import AbstractSecondOrderFlow, _as_schedule


class _LogAffine(eqx.Module):
    """t ↦ c + k log t + s t: every schedule of Wibisono et al. (polynomial and
    exponential) is of this form, and its coefficients are arrays (one compile per sweep)."""

    c: Array = eqx.field(converter=float_array)
    k: Array = eqx.field(converter=float_array)
    s: Array = eqx.field(converter=float_array)

    def __call__(self, t):
        # k = 0 schedules (exponential, mirror limit) are defined at t <= 0 too; the
        # double `where` keeps log's NaN out of both the value and its derivative.
        positive = t > 0
        log_t = jnp.where(positive, jnp.log(jnp.where(positive, t, 1.0)), -jnp.inf)
        return self.c + jnp.where(self.k == 0, 0.0, self.k * log_t) + self.s * t


def bregman_divergence(h: Callable, y: PyTree, x: PyTree) -> Scalar:
    """D_h(y, x) = h(y) − h(x) − ⟨∇h(x), y − x⟩."""
    hx, gx = jax.value_and_grad(h)(x)
    return h(y) - hx - vdot(gx, axpy(-1.0, x, y))


def _derivative(f: Callable, t):
    return jax.jvp(f, (t,), (jnp.ones_like(t),))[1]


class BregmanLagrangianFlow(AbstractSecondOrderFlow):
    """The Euler–Lagrange flow of the Bregman Lagrangian (Wibisono, Wilson & Jordan
    2016, eq. 1):

        ℒ(w, v, t) = e^{α+γ} (D_h(w + e^{−α} v, w) − e^{β} L(w)),

    h strictly convex, D_h its Bregman divergence, α, β, γ functions of t. With
    y = w + e^{−α} v the Euler–Lagrange equations are (derived by hand; the same
    equations come out of `LagrangianFlow(self.lagrangian)`, which the tests check)

        d/dt ∇h(y) = (e^α − γ̇)(∇h(y) − ∇h(w)) − e^{α+β} ∇L(w),

    i.e. ẏ = ∇²h(y)⁻¹ [ ... ] by one lineax solve, and v̇ = e^α (ẏ − v) + α̇ v. Under the
    ideal scaling γ̇ = e^α the first term vanishes (their eq. 3), and with β̇ ≤ e^α
    the Lyapunov function D_h(w*, y) + e^β (L − L*) is non-increasing, so
    L(w(t)) − L* = O(e^{−β(t)}) for convex L (their Theorem 1.1; `lyapunov`).

    Constructors: `BregmanLagrangianFlow.polynomial(h, p, C)`, α = log p − log t,
    β = log C + p log t, γ = p log t, rate O(1/(C t^p)) (their eq. 6); with
    h = ½‖·‖², p = 2, C = ¼ this is ẅ + (3/t) ẇ + ∇L = 0, `NesterovFlow(r=3)` (in
    general h = ½‖·‖² gives ẅ + (p+1)/t ẇ + C p² t^{p−2} ∇L = 0). And
    `BregmanLagrangianFlow.exponential(h, c)`, α = log c, β = γ = c t, rate O(e^{−ct}).

    The polynomial schedules are singular at t = 0: start at t0 > 0. Energy: the Jacobi
    integral ⟨v, ∂ℒ/∂v⟩ − ℒ with dE/dt = −∂ℒ/∂t, as for `LagrangianFlow`.

    **Arguments:** `h`: strictly convex function of the parameters (pytree -> scalar);
    `alpha`, `beta`, `gamma`: numbers or differentiable functions of t;
    `linear_solver`: for ∇²h(y) (a lineax solver; dense by default).
    """

    h: Callable[[PyTree], Scalar]
    alpha: Callable
    beta: Callable
    gamma: Callable
    linear_solver: lx.AbstractLinearSolver

    def __init__(self, h, alpha: Any, beta: Any, gamma: Any, *, linear_solver=None):
        if not callable(h):
            raise ValueError(
                "`h` must be a strictly convex function of the parameters (pytree -> "
                f"scalar), e.g. lambda w: 0.5 * jnp.sum(w**2); got {type(h).__name__}."
            )
        self.h = h
        self.alpha = _as_schedule("alpha", alpha)
        self.beta = _as_schedule("beta", beta)
        self.gamma = _as_schedule("gamma", gamma)
        self.linear_solver = (
            lx.AutoLinearSolver(well_posed=True) if linear_solver is None else linear_solver
        )

    @classmethod
    def polynomial(cls, h, p: float = 2.0, C: float = 0.25, **kwargs):
        """α = log p − log t, β = log C + p log t, γ = p log t (Wibisono et al. eq. 6)."""
        if not (float(p) > 0 and float(C) > 0):
            raise ValueError(f"`p` and `C` must be > 0, got p={p}, C={C}.")
        lp, lc = math.log(float(p)), math.log(float(C))
        return cls(h, _LogAffine(lp, -1.0, 0.0), _LogAffine(lc, float(p), 0.0),
                   _LogAffine(0.0, float(p), 0.0), **kwargs)

    @classmethod
    def exponential(cls, h, c: float = 1.0, **kwargs):
        """α = log c, β = γ = c t: ideal scaling with rate O(e^{−ct})."""
        if not float(c) > 0:
            raise ValueError(f"`c` must be > 0, got {c}.")
        lc = math.log(float(c))
        return cls(h, _LogAffine(lc, 0.0, 0.0), _LogAffine(0.0, 0.0, float(c)),
                   _LogAffine(0.0, 0.0, float(c)), **kwargs)

    @classmethod
    def mirror_limit(cls, h, eps: float, **kwargs):
        """α = −log ε, β = log ε, γ = t/ε (ideal scaling, e^{α+β} = 1): the flow
        d/dt ∇h(w + ε ẇ) = −∇L(w), whose massless limit ε → 0 is the mirror flow
        d/dt ∇h(w) = −∇L(w). With h = R(sign(W) e^ω) in ω = log|W| this limit is
        Saul's weight-balancing flow in the form of his eq. 22: the "top-down" route
        from a Bregman Lagrangian (Tanaka & Kunin 2021) to eq. 16."""
        if not float(eps) > 0:
            raise ValueError(f"`eps` must be > 0, got {eps}.")
        le = math.log(float(eps))
        return cls(h, _LogAffine(-le, 0.0, 0.0), _LogAffine(le, 0.0, 0.0),
                   _LogAffine(0.0, 0.0, 1.0 / float(eps)), **kwargs)

    def _y(self, t, w, v):
        return axpy(jnp.exp(-self.alpha(t)), v, w)

    def lagrangian(self, t, w, v, loss):
        a, b, g = self.alpha(t), self.beta(t), self.gamma(t)
        y = self._y(t, w, v)
        return jnp.exp(a + g) * (bregman_divergence(self.h, y, w) - jnp.exp(b) * loss(w))

    def acceleration(self, t, w, v, loss):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        a, b = self.alpha(t), self.beta(t)
        da, dg = _derivative(self.alpha, t), _derivative(self.gamma, t)
        y = self._y(t, w, v)
        grad_h = jax.grad(self.h)
        rhs = axpy((jnp.exp(a) - dg), axpy(-1.0, grad_h(w), grad_h(y)),
                   scale(-jnp.exp(a + b), jax.grad(loss)(w)))
        hessian = lx.JacobianLinearOperator(
            lambda x, _: grad_h(x), y, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
        )
        y_dot = lx.linear_solve(hessian, rhs, self.linear_solver).value
        return axpy(jnp.exp(a), axpy(-1.0, v, y_dot), scale(da, v))

    def lyapunov(self, t, w, v, loss, w_star, loss_star) -> Scalar:
        """D_h(w*, y) + e^{β}(L(w) − L*), non-increasing under the ideal scaling for
        convex L (Wibisono et al., proof of Theorem 1.1)."""
        return bregman_divergence(self.h, w_star, self._y(t, w, v)) + jnp.exp(
            self.beta(t)
        ) * (loss(w) - loss_star)

    def energy(self, t, w, v, loss):
        momentum = jax.grad(self.lagrangian, argnums=2)(t, w, v, loss)
        return vdot(v, momentum) - self.lagrangian(t, w, v, loss)

    def energy_rate(self, t, w, v, loss):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        return -jax.grad(self.lagrangian, argnums=0)(t, w, v, loss)
