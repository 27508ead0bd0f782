"""A projection inside the solve: the action that applies it, and the solver and
controller that apply it on its schedule (`dyn.Every`, `dyn.OnEvent`)."""

import diffrax
import jax
import jax.numpy as jnp

from .._problem import Problem
from .._projection import AbstractProjection, AbstractSchedule, OnEvent
from .._tree import partition
from ._actions import AbstractAction, ActingSolver
from ._controllers import LandOnEvent, LandOnGrid
from ._hooks import AbstractSwitchedField
from ._layout import StateLayout
from ._triggers import CrossingTrigger, EverySteps, EveryTime, OnCondition


class ProjectAction(AbstractAction):
    """A projection as an action on the solver state: it sees the full model (static
    parts combined back) and the velocity, and leaves the rest of y alone, except a
    nonsmooth mode, which `field.reset` derives again for the projected state."""

    projection: AbstractProjection
    problem: Problem
    layout: StateLayout
    field: AbstractSwitchedField | None = None

    def _full(self, u):
        v = None if u.v is None else self.problem.params(u.v)
        return self.problem.params(u.w), v

    def init(self, t0, y0):
        return self.projection.init(*self._full(self.layout.unpack(y0)))

    def __call__(self, t, y, aux):
        u = self.layout.unpack(y)
        params, velocity = self.projection(*self._full(u), aux)

        def dynamic(new, old):
            new, _ = partition(new)
            return jax.tree.map(lambda a, b: jnp.asarray(a, dtype=b.dtype), new, old)

        w = dynamic(params, u.w)
        v = None if u.v is None else dynamic(velocity, u.v)
        mode = u.mode
        if self.field is not None:
            mode = self.field.reset(t, w, v, u.mode)
        return self.layout.pack(w, v, carried=u.carried, integrals=u.integrals,
                                mode=mode), aux


def acting(schedule: AbstractSchedule, solver, controller, problem: Problem,
           layout: StateLayout, y0, t0, n_record: int, root_finder,
           field: AbstractSwitchedField | None = None, saves=None):
    """The solver (and controller) that apply `schedule` inside the solve; at most
    `n_record` action times are kept; `saves`, the save times (`ActingSolver`)."""
    if isinstance(schedule, OnEvent):
        event = schedule.event

        def condition(t, y):
            u = layout.unpack(y)
            return event.condition(t, u.w, u.v, problem)

        real = jnp.issubdtype(jax.eval_shape(condition, t0, y0).dtype, jnp.floating)
        if real and isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
            # Acted on at the root-found crossing: the step ends there (cut or retried).
            trigger = CrossingTrigger(condition, event.direction)
            controller = LandOnEvent(controller, saves=saves)
        else:  # a boolean condition, or constant steps: at the end of the step
            trigger = OnCondition(condition, event.direction, bool(real))
    elif schedule.steps is not None:
        trigger = EverySteps(schedule.steps)
    else:
        exact = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        period = jnp.asarray(schedule.time, t0.dtype)
        trigger = EveryTime(t0, period, exact)
        if exact:
            controller = LandOnGrid(controller, t0, period)
    action = ProjectAction(schedule.projection, problem, layout, field)
    return ActingSolver(solver, trigger, action, n_record, root_finder, saves), controller


def record_limit(schedule: AbstractSchedule, max_steps: int | None, cap: int) -> int:
    """How many action times to keep: one per possible action, at most `cap`."""
    k = schedule.steps if (not isinstance(schedule, OnEvent)
                           and schedule.steps is not None) else 1
    return min(cap, max(1, (max_steps or 10**9) // k))

