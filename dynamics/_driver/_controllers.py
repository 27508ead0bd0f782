"""Step-size controllers around an adaptive one, for solves whose actions must fall on
step ends: `LandOnEvent` (retry a step to end at a located crossing) and `LandOnGrid`
(end steps on the times of `dyn.Every(..., time=)`)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


class WrappedController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive controller around `controller`, whose tolerances and norm it reports
    (diffrax gives them to an implicit solver's root finder)."""

    controller: eqx.AbstractVar[diffrax.AbstractAdaptiveStepSizeController]

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):  # pyright: ignore
        return self.controller.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))


class LandOnEvent(WrappedController):
    """The adaptive controller of a solve with an exact trigger: when the step found a
    crossing inside it (the solver's error output carries the time `t_hit` just past
    it), the step is retried to end there; otherwise `controller` decides as usual.

    The wrapped controller does not see the retry (its error history is that of the
    steps it judged), and after the short step that ends at the crossing the next step
    is at least as long as the remainder of the step that found it: without this a PID
    controller, which grows steps by at most 10x, would need several small steps to
    recover from every crossing.

    `split`: the state is (y, mode) with a discrete `mode` that has no error (the
    Filippov mode): only y is shown to `controller`, so that the mode's entries do not
    dilute its RMS error norm; the steps are then those of the same solve without it.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController
    split: bool = eqx.field(static=True, default=False)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        if self.split:
            mode = y0[1]
            inner_func = func
            y0 = y0[0]

            def func(terms, t, y, args):
                return inner_func(terms, t, (y, mode), args)[0]

        t_next, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return t_next, (inner, jnp.asarray(-jnp.inf, jnp.result_type(t_next)))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        inner, resume = controller_state
        y_error, t_hit = y_error
        if self.split:
            y0, y1_candidate, y_error = y0[0], y1_candidate[0], y_error[0]
        keep, t_prev, t_next, made_jump, new_inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        # A crossing is trusted only in a step the error control accepts.
        retry = keep & (t_hit < t1)
        keep = keep & ~retry
        t_prev = jnp.where(retry, t0, t_prev)
        t_next = jnp.where(retry, t_hit, jnp.where(keep, jnp.maximum(t_next, resume), t_next))
        new_inner = jax.tree.map(lambda a, b: jnp.where(retry, a, b), inner, new_inner)
        resume = jnp.where(retry, t1, jnp.where(keep, -jnp.inf, resume))
        return keep, t_prev, t_next, made_jump, (new_inner, resume), result


class LandOnGrid(WrappedController):
    """An adaptive controller whose steps also end exactly on start + j·period, so
    that an `EveryTime(exact=True)` action fires at its scheduled time. `start` and
    `period` are arrays: a new period does not compile the solve again (diffrax's
    `ClipStepSizeController` takes the grid as an array whose length is static)."""

    controller: diffrax.AbstractAdaptiveStepSizeController
    start: Array
    period: Array

    def _clip(self, t_prev, t_next, j):
        due = self.start + j * self.period
        # Past the grid time already (t_prev == due): aim at the next one.
        j = jnp.where(t_prev >= due, j + 1, j)
        due = self.start + j * self.period
        return jnp.minimum(t_next, due), j

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        t_next, j = self._clip(t0, t_next, jnp.array(1))
        return t_next, (inner, j)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        inner, j = controller_state
        keep, t_prev, t_next, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        t_next, j = self._clip(t_prev, t_next, j)
        return keep, t_prev, t_next, made_jump, (inner, j), result
