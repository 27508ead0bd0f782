"""`simulate`: the one entry point that drives diffrax.

It joins the rooms: a flow from the catalogue, a model and a loss, a diffrax solver and
step-size controller, monitors evaluated inside the solve, and events. Validation
happens in `_prepare`, in Python, before anything is traced; the solve itself is one
`eqx.filter_jit`-compiled function, so a second call with the same flow, loss, solver
and shapes reuses the compiled code (studies and sweeps depend on it).
"""

from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PyTree, Scalar

from ._actions import (
    AbstractAction,
    ActingSolver,
    CrossingTrigger,
    EverySteps,
    EveryTime,
    LandOnEvent,
    LandOnGrid,
    OnCondition,
)
from ._driver._prepare import _MODE_MONITORS, _check_scalar_loss, _prepare, warn_if_chattering
from ._filippov import (
    Filippov,
    FilippovAction,
    FilippovStall,
    FilippovState,
    FilippovTrigger,
    Linearisation,
    Surfaces,
    Switching,
)
from ._flows import (
    AbstractFirstOrderFlow,
    AbstractFlow,
)
from ._problem import Problem
from ._projection import AbstractProjection, AbstractSchedule, OnEvent
from ._trajectory import Trajectory
from ._tree import partition
from .events._events import (
    AbstractDivergenceEvent,
    AbstractEvent,
    EventRootFinder,
    IllinoisRootFinder,
)
from .monitors._monitors import AbstractIntegralMonitor, AbstractMonitor, Loss
from .solvers._base import AbstractFlowSolver
from .solvers._loss_carrying import LossCarryingEuler

# Event times are root-found on the dense interpolant to ~1e-13 in t, well below any
# solver tolerance a study uses, so the interpolant, not the root find, limits them;
# never below 4 ulps of t in the solve's dtype (float32: ~5e-7 relative), which is as
# fine as a bracket in that dtype can get.
_EVENT_ROOT_FINDER = EventRootFinder(rtol=1e-13, atol=1e-13, ulps=4.0)
# The same accuracy for the exact triggers of actions (and the Filippov mode), found by
# Illinois steps: a solve may locate thousands of crossings.
_ACTION_ROOT_FINDER = IllinoisRootFinder(rtol=1e-13, atol=1e-13, ulps=4.0)

# Action times kept on the Trajectory (the solver state holds them; an adaptive
# controller copies that buffer on every step). `stats["num_actions"]` counts all.
_MAX_RECORDED_ACTIONS = 10_000


class _Layout(eqx.Module):
    """How the solver's state y is laid out around the flow's (w, v):
    w or (w, v); (w, (L(w), ẇ or None)) when Euler carries its step-end evaluation;
    (that, integrals) when integral monitors carry their running integrals in the
    state."""

    first_order: bool = eqx.field(static=True)
    carry: bool = eqx.field(static=True)
    integrals: bool = eqx.field(static=True)
    mode: bool = eqx.field(static=True, default=False)  # (that, Filippov mode)

    def unpack(self, y):
        """(w, v, carried (L(w), ẇ or None) or None, integrals or None)."""
        if self.mode:
            y = y[0]
        integrals = None
        if self.integrals:
            y, integrals = y
        if self.carry:
            (w, carried) = y
            return w, None, carried, integrals
        if self.first_order:
            return y, None, None, integrals
        return (*y, None, integrals)

    def pack(self, y, w, v):
        """`y` with its (w, v) replaced (the carried values are left to the caller)."""
        if self.mode:
            return _Layout(self.first_order, self.carry, self.integrals).pack(y[0], w, v), y[1]
        if self.integrals:
            inner = _Layout(self.first_order, self.carry, False)
            return inner.pack(y[0], w, v), y[1]
        if self.carry:
            return w, y[1]
        return w if self.first_order else (w, v)


def _terms(flow: AbstractFlow, problem: Problem, solver: diffrax.AbstractSolver,
           layout: _Layout, integrals: tuple, switching: Switching | None = None):
    if switching is not None:  # y = (w or (w, v), mode): the mode has no derivative
        def piecewise(t, y, args):
            rest, mode = y
            w, v = (rest, None) if layout.first_order else rest
            # inside a step, args is the step's Linearisation (FilippovTrigger.step_args)
            guess = args if isinstance(args, Linearisation) else None
            return (switching.rate(t, w, v, mode, guess=guess),
                    jax.tree.map(jnp.zeros_like, mode))

        return diffrax.ODETerm(piecewise)
    if isinstance(solver, AbstractFlowSolver):  # it needs more of the flow (e.g. κ1, κ2)
        # (its own state layout: integral monitors are refused for it in `_prepare`)
        return solver.make_terms(flow, problem.loss)
    if isinstance(solver, LossCarryingEuler):
        def field_and_carried(t, y, _):  # shaped like y = (w, (L(w), ẇ or None))
            f, loss = flow.vector_field_and_loss(t, y[0], problem.loss)
            return f, (loss, f if solver.field else None)

        return diffrax.ODETerm(field_and_carried)
    if isinstance(flow, AbstractFirstOrderFlow):
        def base(t, w):
            return flow.vector_field(t, w, problem.loss)
    elif isinstance(solver.term_structure, tuple) and len(solver.term_structure) == 2:
        # Partitioned (symplectic) solvers take ẇ = v and v̇ = F(w) as two terms.
        return (
            diffrax.ODETerm(lambda t, v, _: v),
            diffrax.ODETerm(lambda t, w, _: flow.acceleration(t, w, None, problem.loss)),
        )
    else:
        def base(t, y):
            w, v = y
            return v, flow.acceleration(t, w, v, problem.loss)

    if not integrals:
        return diffrax.ODETerm(lambda t, y, _: base(t, y))

    def with_integrals(t, y, _):
        # dI/dt = g(t, w, ẇ): the running integrals ride along as state components.
        w, v, _, _ = layout.unpack(y)
        return base(t, y[0]), {m.name: m.integrand(t, w, v, problem) for m in integrals}

    return diffrax.ODETerm(with_integrals)


def _mode_record(mode: FilippovState) -> dict:
    # The mode rides in the state, so every save sees it: cumulative event counts and
    # which pairs slide (their flat indices, -1 for a free slot). Floats here (diffrax
    # fills unreached saves with inf), integers on the Trajectory.
    c = mode.counts
    return {"crossings": c[0], "sliding_entries": c[1], "sliding_exits": c[2],
            "sliding_overflow": c[3], "sliding_pairs": mode.slots}


def _carries(flow: AbstractFlow, solver: diffrax.AbstractSolver, monitors) -> bool | None:
    """None, or whether `LossCarryingEuler` should carry ẇ besides L(w): exactly
    diffrax.Euler (a subclass may step differently), a flow that evaluates the loss with
    its gradient, and a monitor to use what the step computed (`Loss`, or one that
    `reads_velocity`). Integral monitors need their own state components: none then."""
    loss = any(isinstance(m, Loss) for m in monitors)
    field = any(m.reads_velocity for m in monitors)
    if (
        type(solver) is diffrax.Euler
        and isinstance(flow, AbstractFirstOrderFlow)
        and (loss or field)
        and not any(isinstance(m, AbstractIntegralMonitor) for m in monitors)
    ):
        return field
    return None


def _monitor(m: AbstractMonitor, t, w, v, carried, integrals, problem: Problem):
    if isinstance(m, AbstractIntegralMonitor):
        return m.value(t, w, v, problem, integrals[m.name])
    if carried is None:
        return m(t, w, v, problem)
    # What the step computed with its gradient; NaN between step ends (see
    # `_LossCarryingInterpolation`), where the monitor evaluates it after all.
    loss, field = carried
    between = jnp.isnan(loss)
    if isinstance(m, Loss):
        return jax.lax.cond(between, lambda: problem.loss(w), lambda: loss)
    if field is not None and m.reads_velocity:
        return jax.lax.cond(between, lambda: m(t, w, None, problem),
                            lambda: m(t, w, field, problem))
    return m(t, w, v, problem)


class _Project(AbstractAction):
    """A projection as an action on the solver state: it sees the full model (static
    parts combined back) and the velocity, and leaves everything else in y alone."""

    projection: AbstractProjection
    problem: Problem
    layout: _Layout

    def _full(self, y):
        w, v, _, _ = self.layout.unpack(y)
        return self.problem.params(w), None if v is None else self.problem.params(v)

    def init(self, t0, y0):
        return self.projection.init(*self._full(y0))

    def __call__(self, t, y, aux):
        w, v, _, _ = self.layout.unpack(y)
        params, velocity = self.projection(*self._full(y), aux)

        def dynamic(new, old):
            new, _ = partition(new)
            return jax.tree.map(lambda a, b: jnp.asarray(a, dtype=b.dtype), new, old)

        w = dynamic(params, w)
        v = None if v is None else dynamic(velocity, v)
        return self.layout.pack(y, w, v), aux


def _acting(schedule, solver, controller, problem, layout, y0, t0, max_steps):
    """The solver (and controller) that apply `schedule` inside the solve."""
    if isinstance(schedule, OnEvent):
        event = schedule.event

        def condition(t, y):
            w, v, _, _ = layout.unpack(y)
            return event.condition(t, w, v, problem)

        real = jnp.issubdtype(jax.eval_shape(condition, t0, y0).dtype, jnp.floating)
        if real and isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
            # Acted on at the root-found crossing: the step is retried to end there.
            trigger = CrossingTrigger(condition, event.direction)
            controller = LandOnEvent(controller)
        else:  # a boolean condition, or constant steps: at the end of the step
            trigger = OnCondition(condition, event.direction, bool(real))
        k = 1
    elif schedule.steps is not None:
        trigger = EverySteps(schedule.steps)
        k = schedule.steps
    else:
        exact = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        period = jnp.asarray(schedule.time, t0.dtype)
        trigger = EveryTime(t0, period, exact)
        if exact:
            controller = LandOnGrid(controller, t0, period)
        k = 1
    n_record = min(_MAX_RECORDED_ACTIONS, max(1, (max_steps or 10**9) // k))
    action = _Project(schedule.projection, problem, layout)
    return ActingSolver(solver, trigger, action, n_record, _ACTION_ROOT_FINDER), controller


def _filippov(nonsmooth, solver, controller, problem, layout, w0, max_steps):
    """The solver and controller of a Filippov solve, and its mode's switching."""
    first_order = layout.first_order
    switching = Switching(problem, Surfaces(problem.user_loss, problem.params(w0)),
                          first_order, nonsmooth.max_sliding)

    def unpack(y):
        rest, mode = y
        return (rest, None, mode) if first_order else (*rest, mode)

    def pack(w, v, mode):
        return (w if first_order else (w, v)), mode

    trigger = FilippovTrigger(switching, unpack, nonsmooth.samples)
    action = FilippovAction(switching, unpack, pack)
    n_record = min(_MAX_RECORDED_ACTIONS, max_steps or _MAX_RECORDED_ACTIONS)
    solver = ActingSolver(solver, trigger, action, n_record, _ACTION_ROOT_FINDER)
    return switching, solver, LandOnEvent(controller, split=True)


@eqx.filter_jit
def _solve(problem, y0, solver, controller, t0, t1, dt0, ts, monitors, events, schedule,
           save_params, max_steps, nonsmooth, progress_meter):
    flow = problem.flow
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    w0 = y0 if first_order else y0[0]
    # Raised at trace time, so a second call with the same shapes never reaches it.
    _check_scalar_loss(problem, w0)
    integrals = tuple(m for m in monitors if isinstance(m, AbstractIntegralMonitor))
    carry_field = _carries(flow, solver, monitors)
    layout = _Layout(first_order, carry_field is not None, bool(integrals))
    if layout.carry:
        solver = LossCarryingEuler(field=carry_field)
        if carry_field:
            field0, loss0 = flow.vector_field_and_loss(t0, y0, problem.loss)
            y0 = (y0, (loss0, field0))
        else:  # a forward pass is enough for the loss alone
            y0 = (y0, (problem.loss(y0), None))
    if integrals:
        v0 = None if first_order else y0[1]
        shapes = {m.name: eqx.filter_eval_shape(m.integrand, t0, w0, v0, problem)
                  for m in integrals}
        y0 = (y0, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    switching = None
    if nonsmooth is not None:  # (`_prepare` refused carry, integrals and projections)
        layout = _Layout(first_order, False, False, mode=True)
        switching, solver, controller = _filippov(nonsmooth, solver, controller, problem,
                                                  layout, w0, max_steps)
        y0 = (y0, switching.init(w0))
    terms = _terms(flow, problem, solver, layout, integrals, switching)
    if schedule is not None:
        solver, controller = _acting(schedule, solver, controller, problem, layout, y0,
                                     t0, max_steps)

    def save(with_params):
        def fn(t, y, _):
            w, v, carried, ints = layout.unpack(y)
            out = {"monitors": {m.name: _monitor(m, t, w, v, carried, ints, problem)
                                for m in monitors}}
            if switching is not None:
                out["monitors"].update(_mode_record(y[1]))
            if with_params:
                out["w"], out["v"] = w, v
            return out

        return fn

    def cond(event):
        if isinstance(event, FilippovStall):  # reads the mode, not (w, v)
            return lambda t, y, args, **kwargs: event.stalled(y[1])

        def fn(t, y, args, **kwargs):
            w, v, _, _ = layout.unpack(y)
            return event.condition(t, w, v, problem)

        return fn

    conds = tuple(cond(e) for e in events)
    # Boolean conditions stop at the end of a step; only real ones need a root find,
    # and leaving the root finder out when none is real saves a good part of compile.
    real = [
        jnp.issubdtype(jax.eval_shape(lambda c=c: c(t0, y0, None)).dtype, jnp.floating)
        for c in conds
    ]
    event = diffrax.Event(
        cond_fn=conds,
        root_finder=_EVENT_ROOT_FINDER if any(real) else None,
        direction=tuple(e.direction for e in events),
    )
    # The save times (params only if asked: memory then grows with the monitors alone),
    # and the final state, always, at t1 or wherever the run stopped.
    saveat = diffrax.SaveAt(
        subs=(diffrax.SubSaveAt(ts=ts, fn=save(save_params)),
              diffrax.SubSaveAt(t1=True, fn=save(True))),
        solver_state=schedule is not None or nonsmooth is not None,
    )
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        t0,
        t1,
        dt0,
        y0,
        saveat=saveat,
        stepsize_controller=controller,
        event=event,
        max_steps=max_steps,
        throw=False,  # failures are reported on the Trajectory (and raised if asked)
        progress_meter=progress_meter,
        # `simulate` is not differentiated (it reads the result in Python), so no
        # checkpointed loop: a plain while loop traces and compiles ~10-30% faster.
        adjoint=diffrax.ForwardMode(),
    )
    actions = None
    if schedule is not None or nonsmooth is not None:
        actions = (sol.solver_state.count, sol.solver_state.times)
    return sol.ts, sol.ys, sol.result, sol.event_mask, sol.stats, actions


def simulate(
    flow: AbstractFlow,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    *,
    t1: float,
    t0: float = 0.0,
    v0: PyTree | None = None,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    ts: ArrayLike | None = None,
    monitors: AbstractMonitor | Sequence[AbstractMonitor] = (),
    events: AbstractEvent | Sequence[AbstractEvent] = (),
    projection: AbstractProjection | AbstractSchedule | None = None,
    nonsmooth: Filippov | None = None,
    progress: bool = False,
    max_steps: int | None = 100_000,
    throw: bool = True,
    save_params: bool = True,
) -> Trajectory:
    """Integrate `flow` from `params` under `loss` on [t0, t1] and record a Trajectory.

    **Arguments:**

    - `flow`: a catalogue entry, e.g. `dyn.GradientFlow()`, `dyn.NesterovFlow()`.
    - `params`: the initial parameters, any pytree (an Equinox model, a plain array).
      Its inexact arrays evolve; everything else is held fixed.
    - `loss`: a function params -> scalar.
    - `t0`, `t1`: the time interval, t1 > t0.
    - `v0`: the initial velocity for second-order flows (default zero), same structure
      as `params`.
    - `solver`: any diffrax solver (default `diffrax.Tsit5()`); partitioned solvers
      such as `diffrax.SemiImplicitEuler()` need a separable flow (`NewtonianFlow`).
      Tsit5 is the default because at equal final-state error it needs no more gradient
      evaluations than Dopri5 on a smooth network (GF on a Tanh digits MLP: 34, 49, 88
      against 38, 57, 92 for errors 1e-4, 1e-6, 1e-8; benchmarks/bench_equal_accuracy.py).
      On ReLU networks it takes ~2.5x Dopri5's steps at equal rtol (its larger error
      weights react to the kinks), so pass `diffrax.Dopri5()` there; measured against an
      exact reference (the Filippov mode; ReLU 64-16-10 on 256 digits, integrators study)
      every plain method falls to first order and none gets below ~1e-5 within 5,000
      steps, so for tighter accuracy pass `nonsmooth=dyn.Filippov()` (rounding level at
      every tolerance there).
      `diffrax.Euler()` on a first-order flow with the `Loss` monitor (or one that reads
      ẇ, such as the symmetry residuals) runs as `LossCarryingEuler`: the same steps,
      with L(w) and ẇ at a save on a step end taken from that step's `value_and_grad`
      instead of a second forward pass or gradient.
    - `dt0`, `stepsize_controller`: as in `diffrax.diffeqsolve` (default an adaptive
      `PIDController(rtol=1e-7, atol=1e-9)`, in float32 `rtol=1e-5, atol=1e-7`; fixed
      steps need `diffrax.ConstantStepSize()` and `dt0`, `diffrax.StepTo(ts)` steps to
      the given times, from t0 to t1, and takes no `dt0`). A `PIDController`'s rtol and
      atol are passed as arrays, so runs that differ only in tolerance share one
      compiled solve; an rtol below the dtype's resolution warns.
      Tight tolerances (conservation checks to ~1e-10) need float64
      (`jax.config.update("jax_enable_x64", True)`); everything runs in float32.
    - `ts`: save times in [t0, t1], strictly increasing (default [t0, t1]).
    - `monitors`: quantities recorded at `ts`, computed inside the solve: one monitor
      or a sequence; names must be unique, and not "time" or "param_…"/"velocity_…"
      (those name the parameters in `to_xarray`).
    - `events`: stopping conditions (`dyn.events.*`), one or a sequence; a non-finite
      state always stops.
    - `projection`: an action applied inside the solve, after which the solve goes on
      from the new state: `dyn.Every(proj, steps=k)` (after every k-th accepted step),
      `dyn.Every(proj, time=Δt)` (at t0 + jΔt; an adaptive controller is made to step
      there exactly, a constant step size acts at the step end nearest to it), or
      `dyn.OnEvent(proj, event)` (at the end of the step in which the event's
      condition crosses zero, or turns True). A bare `AbstractProjection` means every
      step. The solver restarts from the projected state (an FSAL solver re-evaluates
      its derivative there); a save at an action time records the state after the
      action. `Trajectory.actions` holds the action times. With an adaptive controller
      a real event condition is acted on where it crosses zero (root-found on the
      dense output; the step is retried to end there); a boolean one, or constant
      steps, act at the end of the step.
    - `nonsmooth`: `dyn.Filippov()` integrates a flow on a ReLU / LeakyReLU `dyn.MLP`
      exactly through its kinks: the activation pattern is frozen between crossings
      (so the solver keeps its order), crossings are root-found and the solve restarts
      there, and pairs whose two sides both push into the surface slide along it.
      It adds the monitors `crossings`, `sliding_entries`, `sliding_exits`,
      `sliding_overflow` and `sliding_pairs`. Without it, a run on such a network that
      rejects more than a third of its steps warns (the solver is chattering at kinks).
    - `progress`: show a tqdm progress bar.
    - `max_steps`, `throw`: as in diffrax, but `max_steps` defaults to 100 000: flows
      on ReLU networks cross kinks all the time and need more than diffrax's 4096, and
      only save times are stored, so the bound costs no memory. With `throw=True` a
      failed solve (other than an event) raises `RuntimeError`; with `throw=False` it is
      reported on the result.
    - `save_params`: also store params (and velocities) at every save time; set False
      to keep memory proportional to the monitors only.

    **Returns:** a `Trajectory`.
    """
    if not isinstance(throw, bool):
        raise ValueError(f"`throw` must be True or False, got {throw!r}.")
    problem, events, args, meta = _prepare(
        flow, params, loss, t1=t1, t0=t0, v0=v0, solver=solver, dt0=dt0,
        stepsize_controller=stepsize_controller, ts=ts, monitors=monitors, events=events,
        projection=projection, nonsmooth=nonsmooth, progress=progress,
        max_steps=max_steps, save_params=save_params,
    )
    traj = Trajectory.from_solve(problem, events, _solve(*args), throw=throw, meta=meta,
                                 divergence=AbstractDivergenceEvent)
    if nonsmooth is None:
        warn_if_chattering(traj, params)
        return traj
    for name in _MODE_MONITORS:
        traj.monitors[name] = np.asarray(traj.monitors[name]).astype(int)
    if traj.event == FilippovStall.name:
        overflow = int(traj.monitors["sliding_overflow"][-1])
        message = (
            f"simulate: the Filippov mode stalled at t = {traj.t_final:.6g}: "
            f"{FilippovStall.switches} switches within {FilippovStall.window:g} in t that "
            f"overflowed or did not advance time ({overflow} sliding overflows in all, "
            f"max_sliding = {nonsmooth.max_sliding}); pass dyn.Filippov(max_sliding=...) "
            "with more slots."
        )
        if throw:
            raise RuntimeError(message + " (throw=False returns the partial trajectory.)")
        traj = eqx.tree_at(lambda t: (t.success, t.result), traj, (False, message))
    return traj
