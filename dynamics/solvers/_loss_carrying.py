"""`LossCarryingEuler` is what `simulate` runs in place of `diffrax.Euler()` when a
first-order flow is integrated with the loss (or a monitor that reads ẇ) monitored: the
same Euler steps, but the loss value that the gradient evaluation computes anyway, and
the field ẇ itself when asked, are kept in the state instead of being recomputed by the
monitors. With the loss saved at every step this removes one forward pass per step (a
quarter to a third of a GD step on an MLP); with ẇ, a whole gradient per step for the
symmetry residuals.
"""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from equinox.internal import ω


class _LossCarryingInterpolation(diffrax.LocalLinearInterpolation):
    """Linear interpolation of y = (w, (ℓ, f)), where ℓ = L(w) and f = ẇ (or None)
    exactly at the step ends only.

    Between the ends ℓ and f would be straight lines, not L(w) and ẇ(w), so they are NaN
    there: the monitors then evaluate them themselves. At (within a few ulps of) an end the state is
    that end's, exactly, so the carried ℓ is L of the w that is saved. Save times given
    as `k * dt` differ from the step ends `t0 + (t1 - t0) * k / n` by an ulp or so.
    """

    def evaluate(self, t0, t1=None, left=True):
        y = super().evaluate(t0, t1, left)
        if t1 is not None:  # an increment y(t1) - y(t0): diffrax's linear one
            return y
        (w_a, c_a), (w_b, c_b) = self.y0, self.y1
        w, _ = y
        eps = jnp.finfo(jnp.result_type(self.t0, self.t1)).eps
        tol = 8 * eps * jnp.maximum(jnp.abs(self.t0), jnp.abs(self.t1))
        # Steps of a few ulps of t (t far from 0): never snap from mid-step.
        tol = jnp.minimum(tol, 0.25 * jnp.abs(self.t1 - self.t0))
        at_a = jnp.abs(t0 - self.t0) <= tol
        at_b = jnp.abs(t0 - self.t1) <= tol

        def pick(a, b, between):
            return jnp.where(at_b, b, jnp.where(at_a, a, between))

        w = jax.tree.map(pick, w_a, w_b, w)
        carried = jax.tree.map(lambda a, b: pick(a, b, jnp.full_like(b, np.nan)), c_a, c_b)
        return w, carried


class LossCarryingEuler(diffrax.AbstractSolver):
    """Euler's method w_{n+1} = w_n + h f(t_n, w_n) on the state y = (w, (L(w), f)),
    f = f(t, w) when `field` is true (None otherwise).

    The term's vector field returns (f(t, w), (L(w), f(t, w) or None)), shaped like y,
    which a first-order flow computes with one `jax.value_and_grad`
    (`vector_field_and_loss`). Like diffrax's
    FSAL Runge–Kutta solvers, the evaluation at the end of a step is kept in the solver
    state and starts the next step, so each step evaluates once, at w_{n+1}, and y_{n+1}
    carries L(w_{n+1}) with it. The steps are bit-for-bit those of `diffrax.Euler()`
    (a value saved at a step end is that step's state, where diffrax's interpolant can
    be an ulp off); n steps cost n + 1 evaluations. Carrying f doubles the state, not the
    work: it is the evaluation that starts the next step.

    Fixed steps only: it has no error estimate.
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = _LossCarryingInterpolation
    field: bool = eqx.field(static=True, default=False)

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        if made_jump is False:
            field_and_loss = solver_state
        else:  # after a jump in the vector field the stored evaluation is stale
            field_and_loss = jax.lax.cond(
                made_jump, lambda: terms.vf(t0, y0, args), lambda: solver_state
            )
        w0, carried0 = y0
        control = terms.contr(t0, t1)
        increment, _ = terms.prod(field_and_loss, control)
        # The same sum as diffrax.Euler, so the parameters agree to the last bit.
        w1 = (w0**ω + increment**ω).ω
        field_and_loss = terms.vf(t1, (w1, carried0), args)
        y1 = (w1, field_and_loss[1])
        return y1, None, dict(y0=y0, y1=y1), field_and_loss, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
