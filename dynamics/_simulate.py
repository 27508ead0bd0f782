"""`simulate`: the one entry point that drives diffrax.

It joins the rooms: a flow from the catalogue, a model and a loss, a diffrax solver and
step-size controller, monitors evaluated inside the solve, and events. Validation
happens here, in Python, before anything is traced; the solve itself is one
`eqx.filter_jit`-compiled function, so a second call with the same flow, loss, solver
and shapes reuses the compiled code (studies and sweeps depend on it).
"""

from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PyTree, Scalar

from ._actions import (
    AbstractAction,
    ActingSolver,
    EverySteps,
    EveryTime,
    LandOnGrid,
    OnCondition,
)
from ._events import AbstractDivergenceEvent, AbstractEvent, EventRootFinder, NonFinite
from ._flows import (
    AbstractFirstOrderFlow,
    AbstractFlow,
    AbstractSeparableFlow,
    NesterovFlow,
)
from ._monitors import AbstractIntegralMonitor, AbstractMonitor, Loss
from ._problem import Problem
from ._projection import AbstractProjection, AbstractSchedule, Every, OnEvent
from ._solvers import LossCarryingEuler
from ._trajectory import Trajectory, provenance
from ._tree import is_concrete, partition

# Event times are root-found on the dense interpolant to ~1e-13 in t, well below any
# solver tolerance a study uses, so the interpolant, not the root find, limits them.
_EVENT_ROOT_FINDER = EventRootFinder(rtol=1e-13, atol=1e-13)

# Action times kept on the Trajectory (the solver state holds them; an adaptive
# controller copies that buffer on every step). `stats["num_actions"]` counts all.
_MAX_RECORDED_ACTIONS = 10_000


def _float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from None
    if not np.isfinite(out):
        raise ValueError(f"`{name}` must be finite, got {out}.")
    return out


def _check_finite(name: str, tree: PyTree) -> None:
    if not is_concrete(tree):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if eqx.is_inexact_array(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            where = jax.tree_util.keystr(path) or "the array"
            raise ValueError(
                f"`{name}` contains NaN or Inf (at {where}); initialise it with finite values."
            )


def _strong(tree: PyTree) -> PyTree:
    # `jnp.full(3, 2.0)` is weakly typed and `jnp.zeros(3)` is not: without this the
    # two would compile separately although they are the same problem.
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def _validate_params(params: PyTree) -> tuple[PyTree, PyTree]:
    w, static = partition(params)
    w = _strong(w)
    if not jax.tree.leaves(w):
        raise ValueError(
            "`params` holds no floating-point arrays to evolve; pass a model (e.g. "
            "dyn.MLP) or a pytree of float arrays."
        )
    _check_finite("params", w)
    return w, static


def _validate_velocity(flow: AbstractFlow, w: PyTree, v0: PyTree | None, t0: float):
    if isinstance(flow, AbstractFirstOrderFlow):
        if v0 is not None:
            raise ValueError(
                f"`v0` was given but {type(flow).__name__} is a first-order flow with no "
                "velocity; drop `v0` or use a second-order flow (e.g. dyn.NewtonianFlow())."
            )
        return None
    if v0 is None:
        v = jax.tree.map(jnp.zeros_like, w)
    else:
        v, _ = partition(v0)
        w_struct = jax.tree.structure(w)
        if jax.tree.structure(v) != w_struct:
            raise ValueError(
                "`v0` must have the same structure as the parameters (e.g. a model of "
                "the same shape, or a pytree of arrays matching `params`)."
            )
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(v), strict=True):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"`v0` has a leaf of shape {jnp.shape(b)} where the parameters have "
                    f"shape {jnp.shape(a)}; give one velocity per parameter."
                )
        v = jax.tree.map(lambda a, b: jnp.asarray(b, dtype=a.dtype), w, v)
        _check_finite("v0", v)
    if isinstance(flow, NesterovFlow):
        nonzero = is_concrete(v) and any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(v))
        if t0 < 0:
            raise ValueError(
                f"`t0` = {t0} < 0 for NesterovFlow: its damping r/t is singular at t = 0; "
                "start at t0 >= 0."
            )
        if t0 == 0 and nonzero:
            raise ValueError(
                "NesterovFlow started at t0 = 0 with a non-zero `v0`: the damping 3/t is "
                "singular there (Głuch & Urbanke footnote 2). Start at t0 > 0, or pass "
                "v0=None (zero velocity)."
            )
    return v


def _validate_ts(ts: ArrayLike | None, t0: float, t1: float):
    if ts is None:
        return jnp.asarray([t0, t1])
    arr = np.asarray(ts, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"`ts` must be a non-empty 1-D array of save times, got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("`ts` contains NaN or Inf.")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("`ts` must be strictly increasing; sort it (and drop repeats).")
    if arr[0] < t0 or arr[-1] > t1:
        raise ValueError(
            f"`ts` must lie in [t0, t1] = [{t0}, {t1}], got [{arr[0]}, {arr[-1]}]."
        )
    return jnp.asarray(arr)


def _validate_projection(projection, controller, dt0):
    if projection is None:
        return None
    if isinstance(projection, AbstractProjection):
        return Every(projection, steps=1)  # a bare projection: after every step
    if not isinstance(projection, AbstractSchedule):
        raise ValueError(
            "`projection` must be a projection (dyn.AbstractProjection, applied every "
            "step) or a schedule dyn.Every(proj, steps=k | time=dt) / "
            f"dyn.OnEvent(proj, event), got {projection!r}."
        )
    if isinstance(projection, Every) and projection.time is not None:
        adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        if not adaptive and dt0 is not None and float(dt0) > projection.time:
            raise ValueError(
                f"`projection` Every(time={projection.time}) is shorter than the constant "
                f"step dt0={dt0}: it would be late; use dt0 <= time (ideally time a "
                "multiple of dt0) or Every(steps=k)."
            )
    return projection


def _traced_tolerances(controller: diffrax.AbstractStepSizeController, dtype):
    # PIDController keeps rtol and atol as given; Python floats would be static under
    # jit, so every new tolerance would compile the solve again. As arrays they are
    # traced: a tolerance sweep (a work-precision diagram) compiles once. They enter
    # the controller only through arithmetic, never through Python control flow.
    def convert(c):
        if not isinstance(c, diffrax.PIDController):
            return c
        return eqx.tree_at(lambda c: (c.rtol, c.atol), c,
                           (jnp.asarray(c.rtol, dtype), jnp.asarray(c.atol, dtype)))

    return jax.tree.map(convert, controller,
                        is_leaf=lambda x: isinstance(x, diffrax.PIDController))


def _check_scalar_loss(problem: Problem, w: PyTree) -> None:
    try:
        out = jax.eval_shape(problem.loss, w)
    except ValueError:  # already says what is wrong (e.g. an MLP given the wrong input)
        raise
    except Exception as exc:  # the user's loss failed on these params: say where
        raise ValueError(f"`loss` could not be evaluated on `params`: {exc}") from exc
    shape = getattr(out, "shape", None)
    if shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`loss` must return a real scalar, got shape {shape} and dtype "
            f"{getattr(out, 'dtype', type(out).__name__)}; reduce it, e.g. with jnp.mean."
        )


class _Layout(eqx.Module):
    """How the solver's state y is laid out around the flow's (w, v):
    w or (w, v); (w, L(w)) when Euler carries the loss; (that, integrals) when
    integral monitors carry their running integrals in the state."""

    first_order: bool = eqx.field(static=True)
    carry: bool = eqx.field(static=True)
    integrals: bool = eqx.field(static=True)

    def unpack(self, y):
        """(w, v, carried loss or None, integrals or None)."""
        integrals = None
        if self.integrals:
            y, integrals = y
        if self.carry:
            (w, loss) = y
            return w, None, loss, integrals
        if self.first_order:
            return y, None, None, integrals
        return (*y, None, integrals)

    def pack(self, y, w, v):
        """`y` with its (w, v) replaced (the carried loss is left to the caller)."""
        if self.integrals:
            return self.pack(y[0], w, v), y[1]
        if self.carry:
            return w, y[1]
        return w if self.first_order else (w, v)


def _terms(flow: AbstractFlow, problem: Problem, solver: diffrax.AbstractSolver,
           layout: _Layout, integrals: tuple):
    if isinstance(solver, LossCarryingEuler):
        return diffrax.ODETerm(
            lambda t, y, _: flow.vector_field_and_loss(t, y[0], problem.loss)
        )
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


def _carries_loss(flow: AbstractFlow, solver: diffrax.AbstractSolver, monitors) -> bool:
    # Exactly diffrax.Euler (a subclass may step differently), a flow that evaluates the
    # loss with its gradient, and a Loss monitor to use it: then `LossCarryingEuler`.
    # Integral monitors need their own state components, so they turn this off.
    return (
        type(solver) is diffrax.Euler
        and isinstance(flow, AbstractFirstOrderFlow)
        and any(isinstance(m, Loss) for m in monitors)
        and not any(isinstance(m, AbstractIntegralMonitor) for m in monitors)
    )


def _monitor(m: AbstractMonitor, t, w, v, carried, integrals, problem: Problem):
    if isinstance(m, AbstractIntegralMonitor):
        return m.value(t, w, v, problem, integrals[m.name])
    if carried is not None and isinstance(m, Loss):
        # The value the step computed with its gradient; NaN between step ends (see
        # `_LossCarryingInterpolation`), where L(w) is evaluated after all.
        return jax.lax.cond(jnp.isnan(carried), lambda: problem.loss(w), lambda: carried)
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
    return ActingSolver(solver, trigger, action, n_record), controller


@eqx.filter_jit
def _solve(problem, y0, solver, controller, t0, t1, dt0, ts, monitors, events, schedule,
           save_params, max_steps, progress_meter):
    flow = problem.flow
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    w0 = y0 if first_order else y0[0]
    # Raised at trace time, so a second call with the same shapes never reaches it.
    _check_scalar_loss(problem, w0)
    integrals = tuple(m for m in monitors if isinstance(m, AbstractIntegralMonitor))
    carry = _carries_loss(flow, solver, monitors)
    layout = _Layout(first_order, carry, bool(integrals))
    if carry:
        solver = LossCarryingEuler()
        y0 = (y0, problem.loss(y0))
    if integrals:
        v0 = None if first_order else y0[1]
        shapes = {m.name: eqx.filter_eval_shape(m.integrand, t0, w0, v0, problem)
                  for m in integrals}
        y0 = (y0, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    terms = _terms(flow, problem, solver, layout, integrals)
    if schedule is not None:
        solver, controller = _acting(schedule, solver, controller, problem, layout, y0,
                                     t0, max_steps)

    def save(with_params):
        def fn(t, y, _):
            w, v, carried, ints = layout.unpack(y)
            out = {"monitors": {m.name: _monitor(m, t, w, v, carried, ints, problem)
                                for m in monitors}}
            if with_params:
                out["w"], out["v"] = w, v
            return out

        return fn

    def cond(event):
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
        solver_state=schedule is not None,
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
    )
    actions = None
    if schedule is not None:
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
    monitors: Sequence[AbstractMonitor] = (),
    events: Sequence[AbstractEvent] = (),
    projection: AbstractProjection | AbstractSchedule | None = None,
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
      `diffrax.Euler()` on a first-order flow with the `Loss` monitor runs as
      `LossCarryingEuler`: the same steps, with L(w) taken from each step's
      `value_and_grad` instead of a second forward pass.
    - `dt0`, `stepsize_controller`: as in `diffrax.diffeqsolve` (default an adaptive
      `PIDController(rtol=1e-7, atol=1e-9)`; fixed steps need
      `diffrax.ConstantStepSize()` and `dt0`). A `PIDController`'s rtol and atol are
      passed as arrays, so runs that differ only in tolerance share one compiled solve.
    - `ts`: save times in [t0, t1], strictly increasing (default [t0, t1]).
    - `monitors`: quantities recorded at `ts`, computed inside the solve.
    - `events`: stopping conditions (`dyn.events.*`); a non-finite state always stops.
    - `projection`: an action applied inside the solve, after which the solve goes on
      from the new state: `dyn.Every(proj, steps=k)` (after every k-th accepted step),
      `dyn.Every(proj, time=Δt)` (at t0 + jΔt; an adaptive controller is made to step
      there exactly, a constant step size acts at the step end nearest to it), or
      `dyn.OnEvent(proj, event)` (at the end of the step in which the event's
      condition crosses zero, or turns True). A bare `AbstractProjection` means every
      step. The solver restarts from the projected state (an FSAL solver re-evaluates
      its derivative there); a save at an action time records the state after the
      action. `Trajectory.actions` holds the action times.
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
    if not isinstance(flow, AbstractFlow):
        raise ValueError(
            f"`flow` must be a catalogue entry such as dyn.GradientFlow(), got {flow!r}."
        )
    if not callable(loss):
        raise ValueError("`loss` must be a function params -> scalar.")
    t0, t1 = _float("t0", t0), _float("t1", t1)
    if t1 <= t0:
        raise ValueError(f"`t1` = {t1} must be greater than `t0` = {t0}.")
    w0, static = _validate_params(params)
    v0 = _validate_velocity(flow, w0, v0, t0)
    ts = _validate_ts(ts, t0, t1)
    solver = diffrax.Tsit5() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"`solver` must be a diffrax solver, got {solver!r}.")
    partitioned = isinstance(solver.term_structure, tuple) and len(solver.term_structure) == 2
    if partitioned and not isinstance(flow, AbstractSeparableFlow):
        raise ValueError(
            f"`solver` {type(solver).__name__} integrates ẇ = v, v̇ = F(w) and needs a "
            f"force independent of the velocity; {type(flow).__name__} is not separable. "
            "Use dyn.NewtonianFlow() or a Runge–Kutta solver such as diffrax.Tsit5()."
        )
    if stepsize_controller is None:
        stepsize_controller = diffrax.PIDController(rtol=1e-7, atol=1e-9)
    if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
        raise ValueError(
            f"`stepsize_controller` must be a diffrax step-size controller, got "
            f"{stepsize_controller!r}."
        )
    adaptive = isinstance(stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)
    if adaptive and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        raise ValueError(
            f"`solver` {type(solver).__name__} has no error estimate for the adaptive "
            "`stepsize_controller`; pass stepsize_controller=diffrax.ConstantStepSize() "
            "and a `dt0`, or an adaptive solver such as diffrax.Tsit5()."
        )
    if dt0 is None and not adaptive:
        raise ValueError("`dt0` is required with a constant step size; pass e.g. dt0=1e-2.")
    if dt0 is not None and _float("dt0", dt0) <= 0:
        raise ValueError(f"`dt0` must be > 0, got {dt0}.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps <= 0):
        raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}.")
    monitors, events = tuple(monitors), tuple(events)
    for m in monitors:
        if not isinstance(m, AbstractMonitor):
            raise ValueError(f"`monitors` must hold dyn.monitors objects, got {m!r}.")
    names = [m.name for m in monitors]
    if len(set(names)) != len(names):
        raise ValueError(f"`monitors` have repeated names {names}; give each a unique name.")
    for e in events:
        if not isinstance(e, AbstractEvent):
            raise ValueError(f"`events` must hold dyn.events objects, got {e!r}.")
    if not any(isinstance(e, NonFinite) for e in events):
        events = events + (NonFinite(),)
    schedule = _validate_projection(projection, stepsize_controller, dt0)
    if partitioned and any(isinstance(m, AbstractIntegralMonitor) for m in monitors):
        raise ValueError(
            f"integral monitors carry their integral in the state, which the partitioned "
            f"`solver` {type(solver).__name__} cannot; use a Runge–Kutta solver such as "
            "diffrax.Tsit5(), or drop the integral monitor."
        )

    problem = Problem(flow, loss, static)
    y0 = w0 if v0 is None else (w0, v0)
    dtype = jnp.result_type(float)
    progress_meter = diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter()
    out = _solve(
        problem,
        y0,
        solver,
        _traced_tolerances(stepsize_controller, dtype),
        jnp.asarray(t0, dtype),
        jnp.asarray(t1, dtype),
        None if dt0 is None else jnp.asarray(dt0, dtype),
        ts.astype(dtype),
        monitors,
        events,
        schedule,
        save_params,
        max_steps,
        progress_meter,
    )
    meta = provenance(flow, solver, stepsize_controller, t0=t0, t1=t1, dt0=dt0,
                      max_steps=max_steps,
                      projection=None if schedule is None else eqx.tree_pformat(schedule))
    return Trajectory.from_solve(problem, events, out, throw=throw, meta=meta,
                                 divergence=AbstractDivergenceEvent)
