"""The step-size guards every solve's controller is wrapped in: a run that goes
non-finite stops there, and an adaptive controller does not reject forever.

**A non-finite state ends the run** (`finite_stop`, the outermost controller, so that
it sees the whole state and every other controller's decision). When a step keeps a
state (w, v) holding a NaN or an Inf, it ends the solve with diffrax's `event_occurred`
and no diffrax event marked: `Trajectory.from_solve` reports that as the `NonFinite`
event (`Trajectory.event == "non_finite"`, `diverged`), the state where it went
non-finite kept. A controller does this, not a diffrax `Event` on every run, because an
event adds a traced step (for the dense output) and its logic to the loop body: about a
sixth of a small solve's tracing and lowering, for a few comparisons here.

**Rejections without end** (`RejectionGuard`, around an adaptive controller). Diffrax
turns a NaN error estimate into inf and rejects the step, shrinking it by `factormin`;
where the vector field itself is not finite (a `sqrt` of a negative network output) no
step size helps, and the solve rejected 100,000 steps (93 s) before reporting
`max_steps`, advising to raise it. A step that no finite h makes acceptable (the
initial step of a badly scaled problem whose error estimate overflows) did the same.
The guard stops both:

- when a step whose candidate or error estimate is not finite is rejected at a step
  size below `floor` (100 eps of the time span: no smaller step can be resolved, and
  one this small would take 1e13 steps to cross the span), or after `max_nonfinite`
  such rejections in a row, it accepts that candidate: if the state is then non-finite
  the run ends as above, flagged `diverged`, as the README promises;
- after `max_rejected` rejections in a row of any kind, it ends the solve with
  `RESULTS.max_steps_rejected`, which `Trajectory.from_solve` explains (a first step too
  large for the problem's scale, with what to pass).
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._controllers import WrappedController

# A PID controller shrinks a rejected step by at least `safety` (0.9) and usually by far
# more (the error falls like h^order); an accepted step follows within a few rejections.
# A hundred in a row means the controller cannot find a step at all.
MAX_REJECTED_IN_A_ROW = 100
# Rejections in a row with a non-finite candidate before the field is judged non-finite
# whatever the step size (a user's factormin near 1 shrinks slowly).
MAX_NONFINITE_IN_A_ROW = 60
# A non-finite candidate at a step below this many eps of the span ends the run.
FLOOR_EPS = 100


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if eqx.is_inexact_array(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class RejectionGuard(WrappedController):
    """`controller`, stopped from rejecting steps without end (module docstring)."""

    controller: diffrax.AbstractAdaptiveStepSizeController
    span: Array  # t1 - t0 of the solve
    max_rejected: int = eqx.field(static=True, default=MAX_REJECTED_IN_A_ROW)
    max_nonfinite: int = eqx.field(static=True, default=MAX_NONFINITE_IN_A_ROW)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        zero = jnp.asarray(0, jnp.int32)
        return t_next, (inner, zero, zero)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        inner, rejected, nonfinite = controller_state
        keep, t_prev, t_next, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        keep = jnp.asarray(keep, dtype=bool)  # (a Python bool from some controllers)
        bad = ~(_finite(y1_candidate) & _finite(y_error))
        # An infinite candidate makes diffrax's PID scale the error by inf/inf = NaN,
        # and every later step size is NaN: shrink by its factormin (0.2) as it does
        # for a NaN error estimate, so that the step can still become small enough.
        shrunk = t0 + getattr(self.controller, "factormin", 0.2) * (t1 - t0)
        t_next = jnp.where(~keep & ~jnp.isfinite(t_next), shrunk, t_next)
        nonfinite = jnp.where(keep | ~bad, 0, nonfinite + 1)
        floor = FLOOR_EPS * jnp.finfo(jnp.result_type(t0)).eps * jnp.abs(self.span)
        tiny = jnp.abs(t1 - t0) <= floor
        diverge = ~keep & bad & (tiny | (nonfinite >= self.max_nonfinite))
        # Accept the non-finite candidate: the run ends at its end (at t0 itself when
        # the step size is no longer a number: a field non-finite from the start makes
        # diffrax's first step NaN).
        end = jnp.where(jnp.isfinite(t1), t1, t0)
        keep = keep | diverge
        t_prev = jnp.where(diverge, end, t_prev)
        t_next = jnp.where(diverge, end, t_next)
        rejected = jnp.where(keep, 0, rejected + 1)
        stuck = rejected >= self.max_rejected
        result = diffrax.RESULTS.where(stuck, diffrax.RESULTS.max_steps_rejected, result)
        return keep, t_prev, t_next, made_jump, (inner, rejected, nonfinite), result


class _AbstractFiniteStop(eqx.Module):
    """`controller`, whose run ends where a kept step's state is not finite (module
    docstring). `finite`: the solver state y -> whether its (w, v) is finite."""

    controller: eqx.AbstractVar[diffrax.AbstractStepSizeController]
    finite: eqx.AbstractVar[Callable[[PyTree], Array]]

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        keep, t_prev, t_next, made_jump, state, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )
        keep = jnp.asarray(keep, dtype=bool)  # (a Python bool from ConstantStepSize)
        stop = keep & ~self.finite(y1_candidate) & (result == diffrax.RESULTS.successful)
        result = diffrax.RESULTS.where(stop, diffrax.RESULTS.event_occurred, result)
        return keep, t_prev, t_next, made_jump, state, result


class FiniteStop(_AbstractFiniteStop, diffrax.AbstractStepSizeController):
    """`_AbstractFiniteStop` around a fixed-step controller (`ConstantStepSize`,
    `StepTo`)."""

    controller: diffrax.AbstractStepSizeController
    finite: Callable[[PyTree], Array]


class AdaptiveFiniteStop(_AbstractFiniteStop, WrappedController):
    """`_AbstractFiniteStop` around an adaptive controller, whose tolerances and norm it
    reports (diffrax gives them to an implicit solver's root finder)."""

    controller: diffrax.AbstractAdaptiveStepSizeController
    finite: Callable[[PyTree], Array]


def finite_stop(controller: diffrax.AbstractStepSizeController,
                finite: Callable[[PyTree], Array]) -> diffrax.AbstractStepSizeController:
    """`controller` inside the finite stop of its kind (module docstring)."""
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        return AdaptiveFiniteStop(controller, finite)
    return FiniteStop(controller, finite)
