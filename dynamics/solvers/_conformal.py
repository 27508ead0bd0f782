"""Conformal-symplectic splitting for damped flows κ2(t) ẅ + κ1(t) ẇ + ∇L(w) = 0."""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox.internal import ω

from .._flows import AbstractFlow, AbstractKappaFlow, AbstractSecondOrderFlow, Loss
from .._tree import scale
from ._base import AbstractFlowSolver, hermite_info

# Three-point Gauss–Legendre rule (exact to degree 5) for ∫ κ1/κ2 over half a step: far
# more accurate than the second-order splitting needs, and exact for constant damping.
_GL3_X, _GL3_W = np.polynomial.legendre.leggauss(3)


class KappaSplit(eqx.Module):
    """What the term of `ConformalSymplectic` returns at (t, y = (w, v)): the force
    −∇L(w) and the coefficients κ1(t), κ2(t). With y = None the force is left out (only
    the κ's are wanted, e.g. for the damping integral), so no gradient is taken."""

    force: object
    kappa1: jax.Array
    kappa2: jax.Array


class KappaTerm(diffrax.AbstractTerm):
    """The term `ConformalSymplectic` integrates: `vf(t, y, args)` is a `KappaSplit`,
    not a velocity (so not an `ODETerm`, whose vector field must look like y)."""

    flow: AbstractKappaFlow
    loss: Loss

    def vf(self, t, y, args):
        kappa1, kappa2 = self.flow.kappas(t)
        force = None if y is None else scale(-1.0, jax.grad(self.loss)(y[0]))
        return KappaSplit(force, jnp.asarray(kappa1), jnp.asarray(kappa2))

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return jax.tree.map(lambda x: control * x, vf)


class ConformalSymplectic(AbstractFlowSolver):
    """Strang splitting of κ2(t) ẅ + κ1(t) ẇ + ∇L(w) = 0 (Głuch & Urbanke eq. 22), i.e.
    ẇ = v, v̇ = −(κ1/κ2) v − ∇L(w)/κ2, into the damping flow v̇ = −(κ1/κ2) v, solved
    exactly, v ← v exp(−∫ κ1/κ2), and a velocity-Verlet kick–drift–kick with the force
    −∇L/κ2 taken at the step's midpoint time t½ = t_n + h/2:

        D(t_n → t½) ∘ K(h/2) ∘ F(h) ∘ K(h/2) ∘ D(t½ → t_{n+1})

    (McLachlan & Perlmutter, *Conformal Hamiltonian systems*, 2001; França, Sulam,
    Robinson & Vidal, *Conformal symplectic and relativistic optimization*, 2020, for
    constant damping). Each map is exact, so for constant κ the scheme contracts the
    symplectic form by exactly e^{−(κ1/κ2) h} per step, as the flow does: the
    dissipation dH/dt = −(κ1/κ2)‖ẇ‖² is reproduced to second order with no spurious
    energy drift. Heavy ball, Nesterov's r/t (start at t0 > 0, or t0 = 0 with zero
    velocity), `GeneralFlow` and, with κ1 = 0, Newtonian flow (where it is velocity
    Verlet). Second order, one gradient per step; fixed steps only.
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation

    def make_terms(self, flow: AbstractFlow, loss: Loss) -> KappaTerm:
        if not (isinstance(flow, AbstractKappaFlow) and isinstance(flow, AbstractSecondOrderFlow)):
            raise ValueError(
                f"`solver` ConformalSymplectic integrates second-order flows "
                f"κ2 ẅ + κ1 ẇ + ∇L = 0 (dyn.HeavyBallFlow, NesterovFlow, GeneralFlow, "
                f"NewtonianFlow); {type(flow).__name__} is not one. For a first-order flow "
                "use dyn.solvers.GaussLegendre(s) or a Runge–Kutta solver."
            )
        return KappaTerm(flow, loss)

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args).force

    def _damping(self, terms, a, b, args):
        mid, half = 0.5 * (a + b), 0.5 * (b - a)
        nodes = mid + half * jnp.asarray(_GL3_X, dtype=jnp.result_type(a))
        split = jax.vmap(lambda s: terms.vf(s, None, args))(nodes)
        return jnp.exp(-half * jnp.sum(jnp.asarray(_GL3_W) * split.kappa1 / split.kappa2))

    def _acceleration(self, terms, t, v, force, args):
        k = terms.vf(t, None, args)
        return jax.tree.map(lambda f, u: (f - k.kappa1 * u) / k.kappa2, force, v)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        w0, v0 = y0
        if made_jump is False:
            f0 = solver_state
        else:  # after a jump in the vector field the stored force is stale
            f0 = jax.lax.cond(made_jump, lambda: terms.vf(t0, y0, args).force,
                              lambda: solver_state)
        h = t1 - t0
        t_half = t0 + 0.5 * h
        inv_mass = 1.0 / terms.vf(t_half, None, args).kappa2
        v = (self._damping(terms, t0, t_half, args) * v0**ω).ω
        v = (v**ω + (0.5 * h * inv_mass) * f0**ω).ω
        w1 = (w0**ω + h * v**ω).ω
        f1 = terms.vf(t1, (w1, v), args).force
        v = (v**ω + (0.5 * h * inv_mass) * f1**ω).ω
        v1 = (self._damping(terms, t_half, t1, args) * v**ω).ω
        y1 = (w1, v1)
        dense = hermite_info(
            t0, t1, y0, y1,
            (v0, self._acceleration(terms, t0, v0, f0, args)),
            (v1, self._acceleration(terms, t1, v1, f1, args)),
        )
        return y1, None, dense, f1, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        v = y0[1]
        return v, self._acceleration(terms, t0, v, terms.vf(t0, y0, args).force, args)
