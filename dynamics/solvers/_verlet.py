"""Störmer–Verlet (velocity Verlet) for separable second-order flows ẅ = F(w)."""

import abc
from typing import ClassVar

import diffrax
import jax
from equinox.internal import ω

from ._base import hermite_info


def _kick(v, a, h):
    return (v**ω + h * a**ω).ω


def verlet_substep(terms, t0, h, w0, v0, a0, args):
    """One velocity-Verlet step of length h from (w0, v0) with a0 = F(w0):

        v½ = v0 + (h/2) F(w0),  w1 = w0 + h v½,  v1 = v½ + (h/2) F(w1)

    (Hairer, Lubich & Wanner, *Geometric Numerical Integration*, eq. I.1.17). Returns
    (w1, v1, F(w1)), so the next step starts from the force it needs: one gradient per
    step (first same as last).
    """
    drift, force = terms
    v_half = _kick(v0, a0, 0.5 * h)
    w1 = (w0**ω + h * drift.vf(t0 + 0.5 * h, v_half, args) ** ω).ω
    a1 = force.vf(t0 + h, w1, args)
    return w1, _kick(v_half, a1, 0.5 * h), a1


class _AbstractPartitioned(diffrax.AbstractSolver):
    """ẇ = v, v̇ = F(w) as diffrax's `SemiImplicitEuler` takes it: terms (ẇ-term, v̇-term)
    with y = (w, v), the first term's vector field a function of v, the second's of w.
    The solver state is F(w) at the step's start."""

    term_structure: ClassVar = (diffrax.AbstractTerm, diffrax.AbstractTerm)
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation

    def init(self, terms, t0, t1, y0, args):
        return terms[1].vf(t0, y0[0], args)

    @abc.abstractmethod
    def _substeps(self) -> tuple[float, ...]:
        """The Verlet steps' lengths as fractions of h (a symmetric composition)."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        w, v = y0
        if made_jump is False:
            a = solver_state
        else:  # after a jump in the vector field the stored force is stale
            a = jax.lax.cond(made_jump, lambda: terms[1].vf(t0, w, args), lambda: solver_state)
        a0 = a
        h = t1 - t0
        t = t0
        for d in self._substeps():
            w, v, a = verlet_substep(terms, t, d * h, w, v, a, args)
            t = t + d * h
        y1 = (w, v)
        dense = hermite_info(t0, t1, y0, y1, (y0[1], a0), (v, a))
        return y1, None, dense, a, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        w, v = y0
        return terms[0].vf(t0, v, args), terms[1].vf(t0, w, args)


class VelocityVerlet(_AbstractPartitioned):
    """Störmer–Verlet (velocity Verlet) for ẅ = F(w), e.g. `dyn.NewtonianFlow()`:

        v½ = v_n + (h/2) F(w_n),  w_{n+1} = w_n + h v½,  v_{n+1} = v½ + (h/2) F(w_{n+1})

    (Hairer, Lubich & Wanner, *Geometric Numerical Integration*, eq. I.1.17).
    Second order, symplectic and symmetric: the energy error stays bounded, O(h²),
    over exponentially long times instead of drifting. One gradient per step.
    Fixed steps only (`diffrax.ConstantStepSize()` and a `dt0`). Cubic Hermite dense
    output.
    """

    def order(self, terms):
        return 2

    def _substeps(self):
        return (1.0,)


# Yoshida (1990), eq. (4.14) with k = 1: the symmetric triple jump
# x1 = 1/(2 − 2^{1/3}), x0 = −2^{1/3}/(2 − 2^{1/3}), x1 + x0 + x1 = 1.
_CBRT2 = 2.0 ** (1.0 / 3.0)
_Y1 = 1.0 / (2.0 - _CBRT2)
_Y0 = -_CBRT2 / (2.0 - _CBRT2)


class Yoshida4(_AbstractPartitioned):
    """Yoshida's fourth-order symplectic method for ẅ = F(w): three velocity-Verlet steps
    of lengths x1 h, x0 h, x1 h with x1 = 1/(2 − 2^{1/3}), x0 = 1 − 2 x1 (Yoshida 1990,
    *Construction of higher order symplectic integrators*, eq. 4.14; Hairer, Lubich &
    Wanner II.4, the "triple jump"). Symplectic and symmetric, fourth order, three
    gradients per step. Fixed steps only.
    """

    def order(self, terms):
        return 4

    def _substeps(self):
        return (_Y1, _Y0, _Y1)

