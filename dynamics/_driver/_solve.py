"""The compiled solve: one `diffrax.diffeqsolve` of a validated `SolveSpec`.

`solve` is `eqx.filter_jit`-compiled, so a second run with the same flow, loss,
solver and shapes reuses the compiled code (studies and sweeps depend on it); a sweep
vmaps it over cells. It lays out the state (`StateLayout`), builds the terms, lets a
nonsmooth mode (`AbstractSwitchedField`) and a projection (`acting`) wrap the solver,
saves the monitors and evaluates the events, all inside the solve. Carrying monitors
(`AbstractCarryingMonitor`) are evaluated after diffrax returns, by one scan over the
states at the save times in time order, in the same compiled function
(`monitors._carrying`).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._flows import AbstractFirstOrderFlow, AbstractStochasticFlow
from .._problem import Problem
from .._projection import OnEvent
from ..events._events import EventRootFinder, NonFinite
from ..monitors._carrying import (
    AbstractCarryingMonitor,
    carrying,
    init_carries,
    record_names,
    scan_carries,
)
from ..monitors._monitors import AbstractIntegralMonitor, AbstractMonitor, Loss
from ..solvers._loss_carrying import LossCarryingEuler
from ._actions import ACTION_ROOT_FINDER
from ._cacheable import no_redundant_ts_checks
from ._clip_floor import fast_clip_floor
from ._guard import RejectionGuard, finite_stop
from ._layout import StateLayout, Unpacked
from ._prepare import check_scalar_loss
from ._projecting import acting, record_limit
from ._solver_checks import unset_root_tolerances
from ._spec import RawSolution, SolveSpec
from ._terms import make_terms
from ._wrapped import TracedOnce

# Event times are root-found on the dense interpolant to ~1e-13 in t, well below any
# solver tolerance a study uses, so the interpolant, not the root find, limits them;
# never below 4 ulps of t in the solve's dtype (float32: ~5e-7 relative), which is as
# fine as a bracket in that dtype can get.
EVENT_ROOT_FINDER = EventRootFinder(rtol=1e-13, atol=1e-13, ulps=4.0)

# Action times kept on the Trajectory (the solver state holds them; an adaptive
# controller copies that buffer on every step). `stats["num_actions"]` counts all.
MAX_RECORDED_ACTIONS = 10_000


def carries(flow, solver: diffrax.AbstractSolver, monitors) -> bool | None:
    """None, or whether `LossCarryingEuler` should carry ẇ besides L(w): exactly
    diffrax.Euler (a subclass may step differently), a flow that evaluates the loss with
    its gradient, and a monitor to use what the step computed (`Loss`, or one that
    `reads_velocity`). Integral monitors need their own state components: none then."""
    loss = any(isinstance(m, Loss) for m in monitors)
    field = any(m.reads_velocity for m in monitors)
    if (
        type(solver) is diffrax.Euler
        and isinstance(flow, AbstractFirstOrderFlow)
        and not isinstance(flow, AbstractStochasticFlow)  # its step is not the field's
        and (loss or field)
        and not any(isinstance(m, AbstractIntegralMonitor) for m in monitors)
    ):
        return field
    return None


def _monitor(m: AbstractMonitor, t, u: Unpacked, problem: Problem):
    if isinstance(m, AbstractIntegralMonitor):
        return m.value(t, u.w, u.v, problem, u.integrals[m.name])
    if u.carried is None:
        return m(t, u.w, u.v, problem)
    # What the step computed with its gradient; NaN between step ends (see
    # `_LossCarryingInterpolation`), where the monitor evaluates it after all.
    loss, field = u.carried
    between = jnp.isnan(loss)
    if isinstance(m, Loss):
        return jax.lax.cond(between, lambda: problem.loss(u.w), lambda: loss)
    if field is not None and m.reads_velocity:
        return jax.lax.cond(between, lambda: m(t, u.w, None, problem),
                            lambda: m(t, u.w, field, problem))
    return m(t, u.w, u.v, problem)


def _lax_stages(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """`solver` with its Runge–Kutta stages in a plain `lax` loop, as
    `diffrax.ForwardMode` sets them inside the solve. Diffrax traces one step before it
    reaches the adjoint (the dense-output structure, which an event needs), with the
    solver as given: left at `scan_kind=None`, that step traces the stages as a
    checkpointed loop, ~0.15 s of tracing per solve for a program that is never
    differentiated."""
    if (isinstance(solver, (diffrax.AbstractRungeKutta, diffrax.AbstractSRK))
            and solver.scan_kind is None):
        return eqx.tree_at(lambda s: s.scan_kind, solver, "lax",
                           is_leaf=lambda x: x is None)
    return solver


def _root_tolerances(solver, controller):
    """An implicit `solver` with the tolerances it leaves unset taken from the adaptive
    `controller`, as `diffrax.diffeqsolve` does. Done here, before a projection or the
    nonsmooth mode wraps the solver: diffeqsolve does it only for an implicit solver it
    sees unwrapped, and a wrapped one failed to trace ("Type of `other` not understood"
    in the root finder). `prepare` refuses unset tolerances with constant steps."""
    names = unset_root_tolerances(solver)
    if not names or not isinstance(controller,
                                    diffrax.AbstractAdaptiveStepSizeController):
        return solver
    return eqx.tree_at(lambda s: tuple(getattr(s.root_finder, a) for a in names), solver,
                       tuple(getattr(controller, a) for a in names))


def _carried(monitors, carried_monitors, problem, w0, ts, saved, t_end, final,
             save_params: bool):
    """The carrying monitors' records, scanned over the saves in time order and then
    the final state, merged into `saved` and `final` in the order of `monitors` (the
    nonsmooth mode's records last, as `save` puts them); the saved states dropped again
    unless the user keeps them."""
    carries = init_carries(carried_monitors, w0, problem)
    carries, at_saves = scan_carries(carried_monitors, carries, ts, saved["w"],
                                     saved["v"], problem)
    _, at_end = scan_carries(carried_monitors, carries, t_end, final["w"], final["v"],
                             problem)

    def merged(plain, extra):
        out = {name: (extra if name in extra else plain)[name]
               for m in monitors for name in record_names(m)}
        out.update({name: value for name, value in plain.items() if name not in out})
        return out

    saved = {**saved, "monitors": merged(saved["monitors"], at_saves)}
    final = {**final, "monitors": merged(final["monitors"], at_end)}
    if not save_params:
        saved = {"monitors": saved["monitors"]}
    return saved, final


@eqx.filter_jit
def solve(spec: SolveSpec, progress_meter=diffrax.NoProgressMeter()) -> RawSolution:
    """Run `spec` to its end (or its first event) and return what diffrax saved."""
    problem, solver, controller = spec.problem, spec.solver, spec.controller
    solver = _root_tolerances(_lax_stages(solver), controller)
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        # innermost: it sees the user's controller's own decisions (`_guard`)
        controller = RejectionGuard(controller, spec.t1 - spec.t0)
    t0, y0 = spec.t0, spec.y0
    first_order = isinstance(problem.flow, AbstractFirstOrderFlow)
    w0, v0 = (y0, None) if first_order else y0
    # Raised at trace time, so a second call with the same shapes never reaches it.
    check_scalar_loss(problem, w0)
    monitors = spec.monitors
    integrals = tuple(m for m in monitors if isinstance(m, AbstractIntegralMonitor))
    carry_field = carries(problem.flow, solver, monitors)
    field = None
    if spec.nonsmooth is not None:
        field = spec.nonsmooth.build(problem, first_order, w0)
    layout = StateLayout(first_order, carry_field is not None, bool(integrals),
                         mode=field is not None)

    carried = None
    if layout.carry:
        solver = LossCarryingEuler(field=carry_field)
        if carry_field:
            field0, loss0 = problem.flow.vector_field_and_loss(t0, w0, problem.loss)
            carried = (loss0, field0)
        else:  # a forward pass is enough for the loss alone
            carried = (problem.loss(w0), None)
    ints0 = None
    if integrals:
        shapes = {m.name: eqx.filter_eval_shape(m.integrand, t0, w0, v0, problem)
                  for m in integrals}
        ints0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    mode0 = None if field is None else field.init(t0, w0, v0)
    y0 = layout.pack(w0, v0, carried=carried, integrals=ints0, mode=mode0)

    n_record = min(MAX_RECORDED_ACTIONS, spec.max_steps or MAX_RECORDED_ACTIONS)
    if field is not None:
        def unpack(y):
            u = layout.unpack(y)
            return u.w, u.v, u.mode

        def pack(y, w, v, mode):  # y with (w, v) and the mode replaced, the rest kept
            u = layout.unpack(y)
            return layout.pack(w, v, carried=u.carried, integrals=u.integrals, mode=mode)

        # Its steps are cut at crossings unless an `OnEvent` projection's solver sits
        # outside it (that one locates its own crossings on the uncut step); an
        # `Every` projection's judges its schedule where the cut step ended.
        saves = None if isinstance(spec.schedule, OnEvent) else spec.ts
        solver, controller = field.wrap(solver, controller, unpack, pack, n_record, saves)
    terms = make_terms(problem, solver, layout, integrals, field, y0=y0, key=spec.key)
    schedule = spec.schedule
    if schedule is not None:
        solver, controller = acting(
            schedule, solver, controller, problem, layout, y0, t0,
            record_limit(schedule, spec.max_steps, MAX_RECORDED_ACTIONS),
            ACTION_ROOT_FINDER, field,
            # (not over a nonsmooth mode's solver: a switch it made at the uncut
            # step's end would be counted, then dropped with the rest of the step)
            saves=spec.ts if field is None else None)

    if not isinstance(problem.flow, AbstractStochasticFlow):  # diffrax reads SDE solvers
        solver = TracedOnce(solver)  # outermost: its step traced once (`_wrapped`)

    def finite(y):  # the NonFinite event's own test, on the step's state
        u = layout.unpack(y)
        return ~NonFinite().condition(None, u.w, u.v, problem)

    # Outermost: a kept step with a non-finite (w, v) ends the run, reported as the
    # NonFinite event (`_guard`).
    controller = finite_stop(controller, finite)

    # Carrying monitors need the state at every save (scanned after the solve), so the
    # states are saved for them even when the user does not keep the parameters.
    carried_monitors = carrying(monitors)
    plain = tuple(m for m in monitors if not isinstance(m, AbstractCarryingMonitor))

    def save(with_params):
        def fn(t, y, _):
            u = layout.unpack(y)
            out = {"monitors": {m.name: _monitor(m, t, u, problem) for m in plain}}
            if field is not None:
                out["monitors"].update(field.record(u.mode))
            if with_params:
                out["w"], out["v"] = u.w, u.v
            return out

        return fn

    def cond(event):
        def fn(t, y, args, **kwargs):
            u = layout.unpack(y)
            own = None if field is None else field.stops(event, u.mode)
            return own if own is not None else event.condition(t, u.w, u.v, problem)

        return fn

    conds = tuple(cond(e) for e in spec.events)
    # Boolean conditions stop at the end of a step; only real ones need a root find,
    # and leaving the root finder out when none is real saves a good part of compile.
    real = [
        jnp.issubdtype(jax.eval_shape(lambda c=c: c(t0, y0, None)).dtype, jnp.floating)
        for c in conds
    ]
    event = None if not conds else diffrax.Event(
        cond_fn=conds,
        root_finder=EVENT_ROOT_FINDER if any(real) else None,
        direction=tuple(e.direction for e in spec.events),
    )
    # The save times (params only if asked: memory then grows with the monitors alone),
    # and the final state, always, at t1 or wherever the run stopped.
    saveat = diffrax.SaveAt(
        subs=(diffrax.SubSaveAt(ts=spec.ts,
                                fn=save(spec.save_params or bool(carried_monitors))),
              diffrax.SubSaveAt(t1=True, fn=save(True))),
        solver_state=schedule is not None or field is not None,
    )
    # `ts` was checked on the host (`_validate_ts`): diffrax's device-side checks of it
    # would put host callbacks in the program, which JAX's persistent cache refuses.
    # Diffrax's t1 − 100 ulps is a few operations instead of ~1,500 (`_clip_floor`).
    with no_redundant_ts_checks(), fast_clip_floor():
        sol = diffrax.diffeqsolve(
            terms, solver, t0, spec.t1, spec.dt0, y0,
            saveat=saveat,
            stepsize_controller=controller,
            event=event,
            max_steps=spec.max_steps,
            throw=False,  # failures are reported on the Trajectory (and raised if asked)
            progress_meter=progress_meter,
            # `simulate` is not differentiated (it reads the result in Python), so no
            # checkpointed loop: a plain while loop traces and compiles ~10-30% faster.
            adjoint=diffrax.ForwardMode(),
        )
    (ts, t_end), (saved, final) = sol.ts, sol.ys
    if carried_monitors:
        saved, final = _carried(monitors, carried_monitors, problem, w0, ts, saved, t_end,
                                final, spec.save_params)
    # The projection's acting solver is the outermost; the mode's sits inside it.
    state = sol.solver_state
    count = times = switches = switch_times = None
    if schedule is not None:
        count, times = state.count, state.times
        state = state.inner
    if field is not None:
        switches, switch_times = state.count, state.times
    return RawSolution(ts=ts, t_end=t_end, saved=saved, final=final, result=sol.result,
                       event_mask=sol.event_mask, stats=sol.stats, action_count=count,
                       action_times=times, switch_count=switches,
                       switch_times=switch_times)

