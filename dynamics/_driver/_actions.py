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
zero is root-found on the dense output, the step is retried to end just past it
(`LandOnEvent`, a controller wrapper, reads the request from the solver's error
output), and the action fires there.

An action maps (t, y, aux) -> (y, aux), where `aux` is whatever discrete state the
action carries (a projection's reference state; an activation pattern for a
piecewise-smooth flow); `init(t0, y0)` gives its first value, once per solve. The
wrapped solver's terms receive `aux` as diffrax's `args`, so a vector field that
depends on a mode (a Filippov flow on one side of a kink) reads the current one.
"""

import abc
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PyTree

from ..events._events import IllinoisRootFinder
from ..solvers._loss_carrying import LossCarryingEuler

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


class AbstractTrigger(eqx.Module):
    """When an action is due, judged at the end of each step."""

    def init(self, t0, y0: PyTree) -> PyTree:
        return None

    @abc.abstractmethod
    def fires(self, t0, t1, y0, y1, state) -> tuple[Any, PyTree]:
        """(fire now?, new trigger state) for the step [t0, t1] from y0 to y1."""

    def reset(self, t1, y1, state) -> PyTree:
        """The trigger state after an action moved the state to y1."""
        return state


class EverySteps(AbstractTrigger):
    """Every `k` accepted steps (k = 1: every step, decided at trace time)."""

    k: int = eqx.field(static=True)

    def init(self, t0, y0):
        return jnp.array(0)

    def fires(self, t0, t1, y0, y1, state):
        if self.k == 1:
            return True, state
        count = state + 1
        fire = count >= self.k
        return fire, jnp.where(fire, 0, count)


class EveryTime(AbstractTrigger):
    """At the grid times start + j·period, j = 1, 2, ...

    `exact`: the controller lands on the grid (`LandOnGrid`), and the action fires on the
    step that ends there. Otherwise (constant steps) it fires on the step end nearest to
    the grid time, within half a step.
    """

    start: Array
    period: Array
    exact: bool = eqx.field(static=True)

    def init(self, t0, y0):
        return jnp.array(1)

    def fires(self, t0, t1, y0, y1, state):
        due = self.start + state * self.period
        slack = 0.0 if self.exact else 0.5 * (t1 - t0)
        fire = t1 >= due - slack
        return fire, state + jnp.where(fire, 1, 0)


class OnCondition(AbstractTrigger):
    """When a condition c(t, y) crosses zero during a step (real c, in `direction`:
    True upwards, False downwards, None either way), or is True at its end (boolean c).
    The crossing is judged at the step ends: the action fires at the end of the step in
    which c changed sign."""

    condition: Callable
    direction: bool | None = eqx.field(static=True)
    real: bool = eqx.field(static=True)

    def init(self, t0, y0):
        return self.condition(t0, y0)

    def fires(self, t0, t1, y0, y1, state):
        c0, c1 = state, self.condition(t1, y1)
        if not self.real:
            return c1, c1
        up = (c0 < 0) & (c1 >= 0)
        down = (c0 > 0) & (c1 <= 0)
        fire = {True: up, False: down, None: up | down}[self.direction]
        return fire, c1

    def reset(self, t1, y1, state):
        return self.condition(t1, y1)


# An exact trigger's crossing is acted on at the end of a step only if it lies within
# this fraction of the step from the end; earlier, the step is retried to end just past
# it. The action may use the gap t1 − t_event ≤ margin·h for a first-order correction
# (the Filippov action does), whose error is O((margin·h)²): below 1e-12·h².
_END_MARGIN = 1e-6


class AbstractExactTrigger(AbstractTrigger):
    """A trigger whose switching functions φ(t, y) are root-found inside the step.

    A component fires when it goes from φ ≥ 0 to φ < 0. The step's dense output is
    sampled at `samples` points, the first sample interval where an eligible component
    went negative is root-found to ~1e-13 in t (the solver's `root_finder`, Illinois
    in `simulate`), and the step is then
    either retried to end just past the crossing (`LandOnEvent` reads the request) or,
    when the crossing lies within `_END_MARGIN` of its end, acted on there. Components
    negative at the start of a step (just switched, a few ulps on the wrong side) are
    not eligible in it: the state carries the eligibility mask.
    """

    samples: eqx.AbstractVar[int]

    @abc.abstractmethod
    def values(self, t, y, state, args=None) -> Array:
        """φ(t, y), a vector (or scalar) of switching values; `args` those of the step
        (`step_args`), or None outside a step."""

    def step_args(self, t0, y0, aux, previous=None):
        """The `args` the wrapped solver's step (its field evaluations) and this
        trigger's values see: data computed once per step at its start (the Filippov
        mode's linearised multiplier system); by default the action's `aux`.
        `previous`: what it returned for the last accepted step (or after the last
        action), to start from; None at t0."""
        return aux

    def init(self, t0, y0):
        return jnp.atleast_1d(self.values(t0, y0, None)) >= 0

    def fires(self, t0, t1, y0, y1, state):
        raise NotImplementedError("an exact trigger is located, not polled")

    def reset(self, t1, y1, state, args=None):
        return jnp.atleast_1d(self.values(t1, y1, state, args)) >= 0

    def locate(self, t0, t1, interp, state, root_finder, args=None):
        """(t_c, next state): the earliest crossing in (t0, t1] (inf if none) and the
        eligibility for the next step if the step is accepted without an action."""
        frac = jnp.arange(1, self.samples + 1, dtype=jnp.result_type(t0)) / self.samples
        ts = t0 + (t1 - t0) * frac
        # lax.map, not vmap: a switching function may branch (the Filippov multipliers
        # are solved only while pairs slide), and under vmap both branches would run.
        phi = jax.lax.map(
            lambda t: jnp.atleast_1d(self.values(t, interp.evaluate(t), state, args)), ts)
        crossed = (phi < 0) & state
        any_j = crossed.any(axis=1)
        j = jnp.argmax(any_j)
        lo = jnp.where(j == 0, t0, ts[jnp.maximum(j - 1, 0)])
        hi = ts[j]
        which = crossed[j]

        def psi(t, _):
            vals = jnp.atleast_1d(self.values(t, interp.evaluate(t), state, args))
            return jnp.min(jnp.where(which, vals, jnp.inf)), None

        def find():
            sol = optx.root_find(psi, root_finder, hi, has_aux=True,
                                 options=dict(lower=lo, upper=hi), throw=False,
                                 max_steps=256)
            return sol.value

        found = any_j.any()
        t_c = jax.lax.cond(found, find, lambda: jnp.asarray(jnp.inf, hi.dtype))
        return t_c, phi[-1] >= 0


class CrossingTrigger(AbstractExactTrigger):
    """When a real condition c(t, y) crosses zero, at the root-found time: upwards
    (`direction` True), downwards (False) or either way (None)."""

    condition: Callable
    direction: bool | None = eqx.field(static=True)
    samples: int = eqx.field(static=True, default=4)

    def values(self, t, y, state, args=None):
        c = jnp.asarray(self.condition(t, y))
        # -c fires when c goes up through 0, c when it goes down.
        return {True: -c[None], False: c[None], None: jnp.stack([c, -c])}[self.direction]


class _ActedInterpolation(diffrax.AbstractLocalInterpolation):
    """The wrapped solver's interpolant on [t0, t1], and the acted state at t1 (to a
    few ulps, so that save times k·dt hit step ends accumulated as t0 + dt + dt ...)."""

    t0: Array
    t1: Array
    inner: diffrax.AbstractLocalInterpolation
    y_acted: PyTree
    fired: Array

    def evaluate(self, t0, t1=None, left=True):
        if t1 is not None:  # an increment: the wrapped solver's
            return self.inner.evaluate(t0, t1, left)
        y = self.inner.evaluate(t0, left=left)
        eps = jnp.finfo(jnp.result_type(self.t0, self.t1)).eps
        tol = 8 * eps * jnp.maximum(jnp.abs(self.t0), jnp.abs(self.t1))
        tol = jnp.minimum(tol, 0.25 * jnp.abs(self.t1 - self.t0))
        at_end = self.fired & (t0 >= self.t1 - tol)
        return jax.tree.map(lambda a, b: jnp.where(at_end, a, b), self.y_acted, y)


def _acted_interpolation(inner_cls, *, t0, t1, inner, y_acted, fired):
    return _ActedInterpolation(t0, t1, inner_cls(t0=t0, t1=t1, **inner), y_acted, fired)


class _ActingState(eqx.Module):
    inner: PyTree
    trigger: PyTree
    aux: PyTree
    args: PyTree  # an exact trigger's `step_args` of the last step (None otherwise)
    count: Array
    times: Array


class ActingSolver(diffrax.AbstractAdaptiveSolver):
    """`solver`, with `action` applied at the end of each step on which `trigger` fires.
    The first `n_record` action times are kept in the solver state; `count` counts all.
    """

    solver: diffrax.AbstractSolver
    trigger: AbstractTrigger
    action: AbstractAction
    n_record: int = eqx.field(static=True)
    root_finder: Any = None  # an optimistix bracketing root finder, for exact triggers

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return functools.partial(_acted_interpolation, self.solver.interpolation_cls)

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)  # only for dt0 selection at t0

    def init(self, terms, t0, t1, y0, args):
        dtype = jnp.result_type(t0)
        aux = self.action.init(t0, y0)
        args = self._step_args(t0, y0, aux, None)
        return _ActingState(
            inner=self.solver.init(terms, t0, t1, y0, aux if args is None else args),
            trigger=self.trigger.init(t0, y0),
            aux=aux,
            args=args,
            count=jnp.array(0),
            times=jnp.full(self.n_record, jnp.inf, dtype=dtype),
        )

    def _fresh(self, terms, t0, t1, y, aux):
        inner = self.solver.init(terms, t1, t1 + (t1 - t0), y, aux)
        if isinstance(self.solver, LossCarryingEuler):
            # Its state is (f, L) at y; the carried values must be the acted state's.
            y = (y[0], inner[1])
        return y, inner

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
            t_c, trigger = self.trigger.locate(t0, t1, interp, solver_state.trigger,
                                               self.root_finder, step_args)
            margin = _END_MARGIN * (t1 - t0)
            retry = t_c < t1 - margin
            fire = (t_c <= t1) & ~retry
            # Retried steps end just past the crossing, so that the retry (a shorter,
            # more accurate step) finds it within the margin of its end.
            t_hit = jnp.where(retry, jnp.minimum(t_c + 0.5 * margin, t1), jnp.inf)
            y_error = (y_error, t_hit)
        else:
            t_c = t1
            fire, trigger = self.trigger.fires(t0, t1, y0, y1, solver_state.trigger)
            fire = jnp.asarray(fire)

        def act():
            if exact and not self.action.corrects_itself:
                # Act where the crossing is, on the step's dense output, then carry the
                # acted state over the remaining t1 − t_c (≤ 1e-6 of the step) by one
                # Euler step of the field there: exact to O((t1 − t_c)²).
                interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense_info)
                y, aux = self.action(t_c, interp.evaluate(t_c), solver_state.aux)
                f = self.solver.func(terms, t_c, y, aux)
                y = jax.tree.map(lambda a, b: a + (t1 - t_c) * b, y, f)
            else:
                y, aux = self.action.at_event(t1, y1, solver_state.aux, t_c,
                                              solver_state.trigger, step_args)
            if not exact:
                y, fresh = self._fresh(terms, t0, t1, y, aux)
                return y, aux, fresh, self.trigger.reset(t1, y, trigger), None
            # The acted state's step args, started from this step's: the restart's
            # first derivative, the eligibility and the next step all use them.
            new_args = self._step_args(t1, y, aux, step_args)
            y, fresh = self._fresh(terms, t0, t1, y, new_args)
            return y, aux, fresh, self.trigger.reset(t1, y, trigger, new_args), new_args

        def keep():
            return y1, solver_state.aux, inner, trigger, step_args if exact else None

        y_out, aux, inner, trigger, kept = jax.lax.cond(fire, act, keep)
        # Out-of-range indices are dropped: past `n_record` only `count` goes on.
        index = jnp.where(fire, solver_state.count, self.n_record)
        times = solver_state.times.at[index].set(t_c, mode="drop")
        state = _ActingState(inner, trigger, aux, kept, solver_state.count + fire, times)
        dense_info = dict(inner=dense_info, y_acted=y_out, fired=fire)
        return y_out, y_error, dense_info, state, result


class _WrappedController(diffrax.AbstractAdaptiveStepSizeController):
    """A controller around `controller`, whose tolerances and norm it reports."""

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


class LandOnEvent(_WrappedController):
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


class LandOnGrid(_WrappedController):
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
