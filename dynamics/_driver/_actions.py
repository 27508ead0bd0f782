"""Actions inside a solve: map the state at the end of an accepted step, then go on.

Diffrax has no post-step hook (its issues #277, #699) and its events only stop a
solve. `_ActingSolver` wraps any diffrax solver: after each step it asks a trigger
whether an action is due (every k accepted steps, on a time grid, when a condition
crosses zero); if so it maps y1 to the acted state and *re-initialises* the wrapped
solver there, so an FSAL solver (Tsit5, Dopri5, `LossCarryingEuler`) starts the next
step from the derivative of the acted state, never the one of the state before it.

Everything else stays diffrax's: one `diffeqsolve`, its saving, its events, its
statistics. The dense interpolant of a step is the wrapped solver's, except at the end
of a step that acted, where it gives the acted state: a save at an action time records
the state *after* the action (the path is right-continuous, as a jump process is), so
with a projection every step, every save at a step end satisfies the constraint.
A rejected step never acts: diffrax drops the solver state of a rejected step, and
the trigger's counters live in that state.

An *exact* trigger (`AbstractExactTrigger`: `OnEvent` with a real condition, the
Filippov mode's switching functions) is located inside the step instead: its first
zero t_c is root-found on the dense output, and the step ends just past it, at t_hit.
Where no save time lies in (t_hit, t1] and no acting solver outside judges crossings
of its own (`saves` given; an `Every` projection's outside it reads the cut step's end
from its error output), the step is *cut*: the state at t_hit is read from the step's dense
output, the action fires there, and the controller (`LandOnEvent`) accepts the step as
ending at t_hit, if its error estimate is small enough for the dense output to be
trusted (else it retries it). The field of the step is smooth on [t0, t1] (a Filippov
piece is one side's field, extended past its kink), so its interpolant is that of an
accepted step of a smooth ODE, the state every event-locating integrator (scipy's
`solve_ivp`, MATLAB's `ode45`, diffrax's events) takes at an event. Otherwise the
step is retried to end at t_hit (`LandOnEvent` reads the request from the solver's
error output): one more step per crossing, which the cut saves.

An action maps (t, y, aux) -> (y, aux), where `aux` is whatever discrete state the
action carries (a projection's reference state; an activation pattern for a
piecewise-smooth flow); `init(t0, y0)` gives its first value, once per solve. The
wrapped solver's terms receive `aux` as diffrax's `args`, so a vector field that
depends on a mode (a Filippov flow on one side of a kink) reads the current one.
"""

import abc
import functools
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ..events._events import IllinoisRootFinder
from ..solvers._loss_carrying import LossCarryingEuler
from ._triggers import _END_MARGIN, AbstractExactTrigger, AbstractTrigger
from ._wrapped import WrappedSolver

# The exact triggers' crossings are root-found to ~1e-13 in t, well below any solver
# tolerance a study uses, never below 4 ulps of t in the solve's dtype (float32: ~5e-7
# relative), which is as fine as a bracket in that dtype can get; by Illinois steps,
# since a solve may locate thousands of crossings.
ACTION_ROOT_FINDER = IllinoisRootFinder(rtol=1e-13, atol=1e-13, ulps=4.0)


class AbstractAction(eqx.Module):
    """y -> y' applied by `_ActingSolver` at the end of a step, with carried `aux`.

    Under an exact trigger the action is applied at the located time t_c on the
    step's dense output and the result carried to the step's end; an action that
    `corrects_itself` is instead given the state at the end and t_c (`at_event`).
    """

    corrects_itself: ClassVar[bool] = False

    def init(self, t0, y0: PyTree) -> PyTree:
        return None

    @abc.abstractmethod
    def __call__(self, t, y: PyTree, aux: PyTree) -> tuple[PyTree, PyTree]:
        """The acted state and the new `aux`."""

    def at_event(self, t, y: PyTree, aux: PyTree, t_event, info: PyTree, args=None):
        """The action at the end `t` of a step in which an exact trigger located its
        crossing at `t_event` (<= t, within `_END_MARGIN` of the step); `info` is the
        trigger's state before the step, `args` the step's `step_args`. Used when
        `corrects_itself` (or the trigger is not exact: then `t_event` = `t`)."""
        return self(t, y, aux)


class _ActedInterpolation(diffrax.AbstractLocalInterpolation):
    """The wrapped solver's interpolant on [t0, t1], and the acted state at t1 (to a
    few ulps, so that save times k·dt hit step ends accumulated as t0 + dt + dt ...)."""

    t0: Array
    t1: Array
    inner: diffrax.AbstractLocalInterpolation
    y_acted: PyTree
    fired: Array
    t_end: Array  # where the step ended: t1, or t_hit if it was cut

    def evaluate(self, t0, t1=None, left=True):
        if t1 is not None:  # an increment: the wrapped solver's
            return self.inner.evaluate(t0, t1, left)
        y = self.inner.evaluate(t0, left=left)
        eps = jnp.finfo(jnp.result_type(self.t0, self.t1)).eps
        tol = 8 * eps * jnp.maximum(jnp.abs(self.t0), jnp.abs(self.t1))
        tol = jnp.minimum(tol, 0.25 * jnp.abs(self.t_end - self.t0))
        # Past the end of a cut step (no save lies there; a diffrax event's root find
        # may look), the acted state at its end.
        at_end = self.fired & (t0 >= self.t_end - tol)
        return jax.tree.map(lambda a, b: jnp.where(at_end, a, b), self.y_acted, y)


def _acted_interpolation(inner_cls, *, t0, t1, inner, y_acted, fired, t_end):
    return _ActedInterpolation(t0, t1, inner_cls(t0=t0, t1=t1, **inner), y_acted, fired,
                               t_end)


class _ActingState(eqx.Module):
    inner: PyTree
    trigger: PyTree
    aux: PyTree
    args: PyTree  # an exact trigger's `step_args` of the last step (None otherwise)
    count: Array
    times: Array


class ActingSolver(WrappedSolver):
    """`solver`, with `action` applied at the end of each step on which `trigger` fires.
    The first `n_record` action times are kept in the solver state; `count` counts all.

    `saves`: the solve's save times, given where no acting solver outside this one
    locates crossings of its own; an exact trigger's steps are then cut at their
    crossings (module docstring) unless a save time lies between the cut and the step's
    end, and an acting solver over this one judges its trigger where the cut step
    ended. None: never cut.
    """

    solver: diffrax.AbstractSolver
    trigger: AbstractTrigger
    action: AbstractAction
    n_record: int = eqx.field(static=True)
    root_finder: Any = None  # an `IllinoisRootFinder`, for exact triggers (its `bracket`)
    saves: Array | None = None

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(_acted_interpolation, self.solver.interpolation_cls)

    # (`func`, the wrapped solver's, is only for dt0's selection at t0.)

    def init(self, terms, t0, t1, y0, args):
        dtype = jnp.result_type(t0)
        aux = self.action.init(t0, y0)
        args = self._step_args(t0, y0, aux, None)
        # What the wrapped solver's first derivative and the trigger see at t0: an exact
        # trigger's step args, solved right there (`here`); otherwise the action's aux.
        at_t0 = aux if args is None else self.trigger.here(args)
        return _ActingState(
            inner=self.solver.init(terms, t0, t1, y0, at_t0),
            trigger=self.trigger.init(t0, y0, at_t0),
            aux=aux,
            args=args,
            count=jnp.array(0),
            times=jnp.full(self.n_record, jnp.inf, dtype=dtype),
        )

    def _fresh(self, terms, t0, t1, y, aux, stepped=None):
        inner = self.solver.init(terms, t1, t1 + (t1 - t0), y, aux)
        if isinstance(stepped, _ActingState):
            # An acting solver inside (a nonsmooth mode's, under a projection's)
            # restarts too, but its record of what it did goes on.
            inner = eqx.tree_at(lambda s: (s.count, s.times), inner,
                                (stepped.count, stepped.times))
        if isinstance(self.solver, LossCarryingEuler):
            # Its state is (f, L) at y; the carried values must be the acted state's.
            y = (y[0], inner[1])
        return y, inner

    @property
    def _over_cuts(self) -> bool:
        # The wrapped solver is an acting one that cuts steps: its error output is
        # (error, t_hit, t_end), and its step ended at t_end.
        return isinstance(self.solver, ActingSolver) and self.solver.saves is not None

    def _step_args(self, t, y, aux, previous):
        if isinstance(self.trigger, AbstractExactTrigger):
            return self.trigger.step_args(t, y, aux, previous)
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        exact = isinstance(self.trigger, AbstractExactTrigger)
        step_args = (self._step_args(t0, y0, solver_state.aux, solver_state.args) if exact
                     else solver_state.aux)
        y1, y_error, dense_info, inner, result = self.solver.step(
            terms, t0, t1, y0, step_args, solver_state.inner, made_jump
        )
        if exact:
            interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense_info)
            t_c, trigger, tau = self.trigger.locate(t0, t1, interp, solver_state.trigger,
                                                    self.root_finder, step_args)
            # Never below 16 ulps of t: a crossing located to a few ulps (float32:
            # 1e-6 of a step is below one ulp of t) would otherwise be retried forever,
            # each retry ending on the same rounded t (a float32 run stalled so).
            ulps = 16 * jnp.finfo(jnp.result_type(t1)).eps * jnp.maximum(jnp.abs(t0),
                                                                          jnp.abs(t1))
            # ... nor below the time τ in which the crossing's sign is rounding
            # (`AbstractExactTrigger.noise`): a retry must see the sign turned.
            floor = jnp.maximum(ulps, tau)
            margin = jnp.maximum(_END_MARGIN * (t1 - t0), floor)
            retry = t_c < t1 - margin
            fire = (t_c <= t1) & ~retry
            # Retried steps end just past the crossing, within half the margin of the
            # retry itself (t_c − t0 long, not t1 − t0), so that the retry finds it
            # within its own margin: half this step's margin overshot a retry shorter
            # than half the step, and every such crossing was retried twice.
            retry_margin = jnp.maximum(_END_MARGIN * (t_c - t0), floor)
            t_hit = jnp.where(retry, jnp.minimum(t_c + 0.5 * retry_margin, t1), jnp.inf)
            cut = jnp.asarray(False)
            if self.saves is not None:
                # A save time in (t_hit, t1] would be read off this step's dense
                # output, past its end: retry instead.
                between = (self.saves > t_hit) & (self.saves <= t1)
                cut = retry & ~jnp.any(between)
                retry = retry & ~cut
                fire = fire | cut
            t_end = jnp.where(cut, t_hit, t1)
            # (y_error, retry to end here, the step ends here): `LandOnEvent` reads them.
            y_error = (y_error, jnp.where(retry, t_hit, jnp.inf), t_end)
        else:
            # Over an acting solver that cuts its steps (a nonsmooth mode's under an
            # `Every` projection), this step ends where that one's did.
            t_c = t_end = y_error[2] if self._over_cuts else t1
            fire, trigger = self.trigger.fires(t0, t_end, y0, y1, solver_state.trigger)
            fire = jnp.asarray(fire)

        def act():
            # (exact triggers: `interp` is the step's dense output, built for `locate`)
            if exact and not self.action.corrects_itself:
                # Act where the crossing is, on the step's dense output, then carry the
                # acted state over the remaining t_end − t_c (≤ 1e-6 of the step) by
                # one Euler step of the field there: exact to O((t_end − t_c)²).
                y, aux = self.action(t_c, interp.evaluate(t_c), solver_state.aux)
                f = self.solver.func(terms, t_c, y, aux)
                y = jax.tree.map(lambda a, b: a + (t_end - t_c) * b, y, f)
            elif not exact:  # y1 is the state at t_end already
                y, aux = self.action.at_event(t_end, y1, solver_state.aux, t_c,
                                              solver_state.trigger, step_args)
            else:
                y_end = jax.tree.map(lambda a, b: jnp.where(t_end < t1, a, b),
                                     interp.evaluate(t_end), y1)
                y, aux = self.action.at_event(t_end, y_end, solver_state.aux, t_c,
                                              solver_state.trigger, step_args)
            if not exact:
                y, fresh = self._fresh(terms, t0, t_end, y, aux, inner)
                return y, aux, fresh, self.trigger.reset(t_end, y, trigger), None
            # The acted state's step args, started from this step's: the restart's
            # first derivative, the eligibility and the next step all use them.
            new_args = self._step_args(t_end, y, aux, step_args)
            here = self.trigger.here(new_args)
            y, fresh = self._fresh(terms, t0, t_end, y, here, inner)
            return y, aux, fresh, self.trigger.reset(t_end, y, trigger, here), new_args

        def keep():
            return y1, solver_state.aux, inner, trigger, step_args if exact else None

        y_out, aux, inner, trigger, kept = jax.lax.cond(fire, act, keep)
        # Out-of-range indices are dropped: past `n_record` only `count` goes on.
        index = jnp.where(fire, solver_state.count, self.n_record)
        times = solver_state.times.at[index].set(t_c, mode="drop")
        state = _ActingState(inner, trigger, aux, kept, solver_state.count + fire, times)
        dense_info = dict(inner=dense_info, y_acted=y_out, fired=fire, t_end=t_end)
        return y_out, y_error, dense_info, state, result
