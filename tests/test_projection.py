"""Projections and actions inside `simulate`, and integral monitors.

The projection used throughout rescales the state onto the unit sphere ‖w‖ = 1 (and
the velocity by the same factor): its result is known in closed form, and a loop of
separate `simulate` calls, one per segment, with the projection applied in between, is
an independent reference for the driver's single compiled solve.
"""

from typing import ClassVar

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics._driver._actions import AbstractAction, ActingSolver
from dynamics._driver._triggers import EveryTime
from dynamics._tree import sqnorm

C = jnp.array([2.0, -1.0, 0.5])
W0 = jnp.array([1.0, 0.0, 0.0])
CONST = diffrax.ConstantStepSize()


def loss(w):
    return 0.5 * jnp.sum((w - C) ** 2)


class Sphere(dyn.AbstractProjection):
    """w -> w/‖w‖, v -> v/‖w‖ (the push-forward of the rescaling)."""

    def __call__(self, params, velocity, state=None):
        norm = jnp.linalg.norm(params)
        return params / norm, None if velocity is None else velocity / norm


def _segments(flow, solver, dt0, t_cuts, w, v=None, **kw):
    """The reference: one `simulate` per segment [a, b], each a fresh solve (so a fresh
    FSAL derivative), projected at its end: `Every(time=b − a)` fires only at t1 = b,
    and with `kw` as in the run under test it reuses that run's compiled solve."""
    for a, b in zip(t_cuts[:-1], t_cuts[1:], strict=True):
        projection = dyn.Every(Sphere(), time=b - a)
        traj = dyn.simulate(flow, w, loss, t0=a, t1=b, v0=v, solver=solver, dt0=dt0,
                            stepsize_controller=CONST, projection=projection,
                            ts=np.linspace(a, b, 4), **kw)
        assert traj.stats["num_actions"] == 1
        w, v = traj.final_params, traj.final_velocity
    return np.asarray(w), None if v is None else np.asarray(v)


def _projected_gf(ts, period):
    """The closed form at `ts`: GF of ½|w − c|² is w(t) = c + (w(a) − c) e^{−(t−a)} from
    W0, normalised at every multiple of `period` (a save there comes after it)."""
    ref, w, a = [], np.asarray(W0), 0.0
    for t in ts:
        x = np.asarray(C) + (w - np.asarray(C)) * np.exp(-(t - a))
        if t > 0 and np.isclose(t % period, 0.0):
            x, w, a = x / np.linalg.norm(x), x / np.linalg.norm(x), t
        ref.append(x)
    return np.array(ref)


def test_every_time_gf_matches_closed_form_and_compiles_once():
    traces = []

    def counted(w):
        traces.append(1)  # runs only while tracing
        return loss(w)

    ts = np.linspace(0.0, 1.0, 9)
    kw = dict(t1=1.0, ts=ts, solver=diffrax.Tsit5(),
              stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-13))
    traj = dyn.simulate(dyn.GradientFlow(), W0, counted,
                        projection=dyn.Every(Sphere(), time=0.25), **kw)
    # rtol 1e-11 per step over ~20 steps: 1e-9 leaves a factor ~10 of margin.
    np.testing.assert_allclose(traj.params, _projected_gf(ts, 0.25), rtol=0, atol=1e-9)
    # Adaptive steps land exactly on the grid (LandOnGrid), so the times are exact.
    np.testing.assert_array_equal(traj.actions, [0.25, 0.5, 0.75, 1.0])
    assert traj.stats["num_actions"] == 4
    # After each projection the constraint holds to rounding.
    np.testing.assert_allclose(np.linalg.norm(traj.params[2::2], axis=1), 1.0, atol=1e-12)

    n = len(traces)
    other = dyn.simulate(dyn.GradientFlow(), 2.0 * W0, counted,
                         projection=dyn.Every(Sphere(), time=0.5), **kw)
    assert len(traces) == n  # new params and a new period: the same compiled solve
    np.testing.assert_array_equal(other.actions, [0.5, 1.0])


def test_implicit_solver_under_a_projection_takes_the_controllers_tolerances():
    # Kvaerno5 leaves its root finder's rtol/atol to the controller; diffeqsolve fills
    # them in only for a solver it sees unwrapped, so under a projection the solve
    # failed to trace. Now it runs and meets the same closed form as Tsit5 above.
    ts = np.linspace(0.0, 1.0, 5)
    traj = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, ts=ts,
                        solver=diffrax.Kvaerno5(),
                        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
                        projection=dyn.Every(Sphere(), time=0.5))
    # rtol 1e-10 per step (fifth order) over ~30 steps: 1e-8 leaves a margin of ~10.
    np.testing.assert_allclose(traj.params, _projected_gf(ts, 0.5), rtol=0, atol=1e-8)
    np.testing.assert_array_equal(traj.actions, [0.5, 1.0])
    # With constant steps there is no controller tolerance to take: refused up front.
    with pytest.raises(ValueError, match="`solver` Kvaerno5 is implicit.*rtol, atol"):
        dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, dt0=0.1, stepsize_controller=CONST,
                     solver=diffrax.Kvaerno5())


@pytest.mark.parametrize("solver", [diffrax.Tsit5(), diffrax.Euler()],
                         ids=["tsit5", "loss-carrying-euler"])
def test_fsal_restarts_from_the_projected_state(solver):
    # Every 0.25 = every 5 steps of 0.05. An FSAL solver (Tsit5, and LossCarryingEuler,
    # which Euler + Loss becomes) reusing the derivative of the unprojected state would
    # be O(dt) = 1e-2 away from the segment loop, where each segment starts afresh.
    kw = dict(monitors=(dyn.monitors.Loss(),))
    traj = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, solver=solver, dt0=0.05,
                        stepsize_controller=CONST, ts=[0.25, 0.5, 0.75, 1.0],
                        projection=dyn.Every(Sphere(), time=0.25), **kw)
    cuts = [0.0, 0.25, 0.5, 0.75, 1.0]
    ref, _ = _segments(dyn.GradientFlow(), solver, 0.05, cuts, W0, **kw)
    # Same operations in another order of compilation: rounding only.
    np.testing.assert_allclose(traj.final_params, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.params[-1], ref, rtol=0, atol=1e-12)
    # The loss saved at an action time is the projected state's (LossCarryingEuler
    # refreshes its carried loss there): rounding only.
    expected = [float(loss(w)) for w in traj.params]
    np.testing.assert_allclose(traj.monitors["loss"], expected, rtol=1e-14)
    np.testing.assert_allclose(traj.actions, [0.25, 0.5, 0.75, 1.0], atol=1e-14)


@pytest.mark.parametrize(
    ("flow", "solver", "schedule"),
    [
        (dyn.HeavyBallFlow(0.5), diffrax.Tsit5(), dyn.Every(Sphere(), steps=5)),
        pytest.param(dyn.NewtonianFlow(), diffrax.SemiImplicitEuler(),
                     dyn.Every(Sphere(), time=0.25), marks=pytest.mark.slow),
    ],
    ids=["heavy-ball-tsit5-steps", "newtonian-symplectic-time"],
)
def test_second_order_flows_project_the_velocity_too(flow, solver, schedule):
    v0 = jnp.array([0.0, 0.5, 0.0])
    traj = dyn.simulate(flow, W0, loss, t1=1.0, v0=v0, solver=solver, dt0=0.05,
                        stepsize_controller=CONST, projection=schedule)
    ref_w, ref_v = _segments(flow, solver, 0.05, [0.0, 0.25, 0.5, 0.75, 1.0], W0, v0)
    # Rounding only (the segment loop does the same steps).
    np.testing.assert_allclose(traj.final_params, ref_w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(traj.final_velocity, ref_v, rtol=0, atol=1e-12)
    # The last action is at t1 = 1.0: the end point is on the sphere, to rounding.
    assert abs(np.linalg.norm(traj.final_params) - 1.0) < 1e-12


class Elapsed(dyn.monitors.AbstractIntegralMonitor):
    """∫_0^t 1 ds = t."""

    name: ClassVar[str] = "elapsed"

    def integrand(self, t, w, v, problem):
        return jnp.ones(())

    def value(self, t, w, v, problem, integral):
        return integral


def test_projection_every_step_and_records():
    dt0 = 0.01
    traj = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=0.5, solver=diffrax.Euler(),
                        dt0=dt0, stepsize_controller=CONST, ts=np.linspace(0.0, 0.5, 51),
                        projection=Sphere(), monitors=(Elapsed(),))
    # A numpy Euler loop that normalises after each step.
    w, ref = np.asarray(W0), [np.asarray(W0)]
    for _ in range(50):
        w = w - dt0 * (w - np.asarray(C))
        w = w / np.linalg.norm(w)
        ref.append(w)
    # Rounding over 50 steps.
    np.testing.assert_allclose(traj.params, np.array(ref), rtol=0, atol=1e-13)
    # Every saved state (all step ends) is on the sphere, to rounding.
    np.testing.assert_allclose(np.linalg.norm(traj.params, axis=1), 1.0, atol=1e-12)
    assert traj.stats["num_actions"] == traj.stats["num_accepted_steps"] == 50
    np.testing.assert_allclose(traj.actions, dt0 * np.arange(1, 51), atol=1e-12)
    # An integral in the state goes through the projections untouched: ∫1 dt = t.
    np.testing.assert_allclose(traj.monitors["elapsed"], traj.ts, atol=1e-13)  # rounding
    ds = traj.to_xarray()
    assert ds["action_time"].dims == ("action",)
    np.testing.assert_array_equal(ds["action_time"].values, traj.actions)


def test_on_event_projects_when_the_norm_crosses_a_threshold():
    dt0, limit = 0.01, 1.2
    event = dyn.events.Condition(lambda t, p, v: jnp.linalg.norm(p) - limit,
                                 name="too_long", direction=True)
    traj = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, solver=diffrax.Euler(),
                        dt0=dt0, stepsize_controller=CONST,
                        projection=dyn.OnEvent(Sphere(), event))
    # numpy: Euler; at the end of a step on which ‖w‖ rose through the limit, normalise.
    w, times = np.asarray(W0), []
    for n in range(1, 101):
        before = np.linalg.norm(w) - limit
        w = w - dt0 * (w - np.asarray(C))
        if before < 0 <= np.linalg.norm(w) - limit:
            w, _ = w / np.linalg.norm(w), times.append(n * dt0)
    assert len(times) >= 2  # the test exercises repeated firing
    # Rounding only.
    np.testing.assert_allclose(traj.actions, times, atol=1e-12)
    np.testing.assert_allclose(traj.final_params, w, rtol=0, atol=1e-12)
    assert traj.event is None and traj.success  # acting does not stop the run


def test_on_event_acts_at_the_root_found_crossing_with_an_adaptive_solver():
    # GF on ½‖w − c‖²: w(t) = c + (w_a − c)e^{−(t − t_a)} from the last action (t_a, w_a),
    # so each crossing of ‖w‖ = 1.2 is a scalar root (scipy's brentq on the closed
    # form); there w is normalised. The action must fire at the crossing itself, not
    # at the end of the step that contains it.
    from scipy.optimize import brentq

    limit, t1 = 1.2, 3.0
    event = dyn.events.Condition(lambda t, p, v: jnp.linalg.norm(p) - limit,
                                 name="too_long", direction=True)
    traj = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=t1, solver=diffrax.Tsit5(),
                        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
                        projection=dyn.OnEvent(Sphere(), event))
    c, t_a, w_a, times = np.asarray(C), 0.0, np.asarray(W0), []
    while True:
        def norm(t, t_a=t_a, w_a=w_a):
            return np.linalg.norm(c + (w_a - c) * np.exp(-(t - t_a))) - limit

        if norm(t1) < 0:
            break
        t_c = brentq(norm, t_a + 1e-9, t1, xtol=1e-15, rtol=1e-15)
        w = c + (w_a - c) * np.exp(-(t_c - t_a))
        t_a, w_a, _ = t_c, w / np.linalg.norm(w), times.append(t_c)
    w_end = c + (w_a - c) * np.exp(-(t1 - t_a))
    assert len(times) >= 2  # repeated firing
    # The crossing is root-found to ~1e-13 in t on a step accurate to ~1e-12.
    np.testing.assert_allclose(traj.actions, times, rtol=0, atol=1e-10)
    np.testing.assert_allclose(traj.final_params, w_end, rtol=0, atol=1e-10)


class _Truncating(dyn.AbstractProjection):
    def __call__(self, params, velocity, state=None):
        return params[:1], velocity


class _Wrap(dyn.AbstractProjection):
    """w -> w − 1: with ẇ = a, a sawtooth."""

    def __call__(self, params, velocity, state=None):
        return params - 1.0, velocity


def test_steps_are_cut_at_crossings_and_saves_inside_them_are_right():
    # GF on L = −a·w: ẇ = a, which every Runge–Kutta step and interpolant integrates
    # exactly, so each step's error estimate is ~0 and its length grows tenfold until a
    # crossing of w = 1 cuts it (the projection wraps w to 0): w(t) = frac(a·t). Each
    # crossing must cost one step (the step that finds it ends there), not two (found,
    # then retried), and a save time inside a cut step, or just past one, must hold
    # frac(a·t) all the same. (A step that reaches a save time past a crossing is
    # retried: with saves sparser than crossings, about one per save.)
    a, t1 = 7.3, 3.0
    event = dyn.events.Condition(lambda t, p, v: p[0] - 1.0, name="one", direction=True)
    ts = jnp.linspace(0.0, t1, 4)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.zeros(1), lambda w: -a * jnp.sum(w),
                        t1=t1, ts=ts, solver=diffrax.Tsit5(),
                        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
                        projection=dyn.OnEvent(_Wrap(), event))
    n = int(a * t1)  # 21 crossings
    np.testing.assert_allclose(traj.actions, np.arange(1, n + 1) / a, rtol=0,
                               atol=1e-12)  # root-found to ~1e-13, rounding in frac
    np.testing.assert_allclose(traj.params[:, 0], np.mod(a * np.asarray(ts), 1.0),
                               rtol=0, atol=1e-11)
    # Retried, the 21 crossings alone would take 42 steps; cut, only a step that reaches
    # a save time past a crossing is retried, about one per save (measured 31 steps, 4
    # rejected, for 21 crossings and 3 saves).
    assert traj.stats["num_rejected_steps"] <= 6, traj.stats
    assert traj.stats["num_steps"] <= n + 12, traj.stats


def test_a_step_is_cut_only_where_its_error_is_far_below_the_tolerance():
    # The controller's side of a cut: the solver reports a crossing cut at t = 0.05 of
    # the step [0, 0.1]. Its state there comes off the step's dense output, whose error
    # is about the step's error estimate, so the cut is taken only where the scaled
    # estimate is <= 1e-3; above it the step is retried to end at 0.05, and a step the
    # tolerance rejects is shrunk as usual.
    from dynamics._driver._controllers import LandOnEvent

    c = LandOnEvent(diffrax.PIDController(rtol=1e-6, atol=1e-6))
    y = jnp.ones(2)
    _, state = c.init(None, 0.0, 1.0, y, 0.1, None, None, 5)

    def adapt(err):
        out = c.adapt_step_size(0.0, 0.1, y, y, None, (jnp.full(2, err), jnp.inf, 0.05),
                                5, state)
        return bool(out[0]), float(out[1]), float(out[2])

    keep, t_prev, t_next = adapt(1e-12)  # scaled error 5e-7: cut
    assert keep and t_prev == 0.05 and t_next > 0.1
    assert adapt(1e-7) == (False, 0.0, 0.05)  # 5e-2: retried to end at the cut
    keep, _, t_next = adapt(1e-5)  # 5: rejected by the tolerance, and shrunk
    assert not keep and t_next < 0.1


class _ParamsOnly(dyn.AbstractProjection):
    def __call__(self, params, velocity, state=None):
        return params


def test_projection_output_is_checked_before_the_solve():
    """A projection returning the wrong shape, or params alone, failed inside the solve
    with "cond branches must have equal output types"."""
    with pytest.raises(ValueError, match=r"_Truncating returned params with shape \(1,\)"):
        dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, projection=_Truncating())
    with pytest.raises(ValueError, match="_ParamsOnly must return the pair .params, velocity."):
        dyn.simulate(dyn.NewtonianFlow(), W0, loss, t1=1.0,
                     projection=dyn.Every(_ParamsOnly(), steps=3))


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="steps"):
        dyn.Every(Sphere(), steps=0)
    with pytest.raises(ValueError, match="time"):
        dyn.Every(Sphere(), time=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        dyn.Every(Sphere())
    with pytest.raises(ValueError, match="exactly one"):
        dyn.Every(Sphere(), steps=2, time=0.1)
    with pytest.raises(ValueError, match="AbstractProjection"):
        dyn.Every(lambda p, v: (p, v), steps=1)
    with pytest.raises(ValueError, match="event"):
        dyn.OnEvent(Sphere(), "norm")
    with pytest.raises(ValueError, match="projection"):
        dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, projection=object())
    with pytest.raises(ValueError, match="dt0"):
        dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, solver=diffrax.Euler(), dt0=0.1,
                     stepsize_controller=CONST, projection=dyn.Every(Sphere(), time=0.05))


class Dissipated(dyn.monitors.AbstractIntegralMonitor):
    """∫ −dE/dt dt: by the flow's dissipation identity it equals E(0) − E(t)."""

    name: ClassVar[str] = "dissipated"

    def integrand(self, t, w, v, problem):
        return -problem.flow.energy_rate(t, w, v, problem.loss)

    def value(self, t, w, v, problem, integral):
        return integral


A = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
B = jnp.array([1.0, -2.0, 0.5, 3.0])


def least_squares(w):
    return 0.5 * sqnorm(A @ w - B)


@pytest.mark.parametrize(
    "flow", [dyn.GradientFlow(), pytest.param(dyn.HeavyBallFlow(0.7), marks=pytest.mark.slow)],
    ids=["gf", "heavy-ball"])
def test_integral_monitor_matches_energy_drop(flow):
    # GF: ∫‖ẇ‖² dt = L(0) − L(t); heavy ball: ∫γ‖v‖² dt = E(0) − E(t).
    ts = np.linspace(0.0, 2.0, 11)
    traj = dyn.simulate(flow, jnp.zeros(3), least_squares, t1=2.0, ts=ts,
                        monitors=(Dissipated(), dyn.monitors.Energy()),
                        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12))
    energy = traj.monitors["energy"]
    assert energy[0] - energy[-1] > 1.0  # a real drop, not a trivial identity
    # The integral is solved at the same tolerance as the flow: 1e-10 relative, with margin.
    np.testing.assert_allclose(traj.monitors["dissipated"], energy[0] - energy, rtol=0,
                               atol=1e-8)


class _Doubling(AbstractAction):
    """A generic action with discrete state: the rate `aux` doubles at every firing."""

    def init(self, t0, y0):
        return jnp.asarray(1.0)

    def __call__(self, t, y, aux):
        return y, 2.0 * aux


def test_action_state_reaches_the_vector_field():
    # ẏ = aux (diffrax `args`), aux doubled at t = 0.25, 0.5, 0.75: a mode switch as the
    # piecewise-smooth flows will use it. y(1) = 0.25 (1 + 2 + 4 + 8) = 3.75 exactly, and
    # the Tsit5 restart after each switch must use the new rate from the first stage.
    solver = ActingSolver(diffrax.Tsit5(), EveryTime(jnp.asarray(0.0), jnp.asarray(0.25),
                                                       exact=False), _Doubling(), 16)
    def rate(t, y, args):  # diffrax's own structure check calls it with args=None
        return jnp.zeros_like(y) + (0.0 if args is None else args)

    sol = diffrax.diffeqsolve(diffrax.ODETerm(rate), solver, 0.0, 1.0, 0.05,
                              jnp.asarray(0.0), saveat=diffrax.SaveAt(t1=True))
    np.testing.assert_allclose(sol.ys[-1], 3.75, rtol=1e-14)  # rounding only


def test_concatenate_joins_consecutive_runs():
    # Two runs with the projection every 0.25, the second continuing from the first's
    # end, joined: the same saves, monitors and actions as one run over [0, 1] (both
    # reuse one compiled solve; the closed form is that of the first test).
    kw = dict(solver=diffrax.Tsit5(), monitors=(dyn.monitors.Loss(),),
              stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-13),
              projection=dyn.Every(Sphere(), time=0.25))
    whole = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=1.0, ts=np.linspace(0, 1, 9), **kw)
    first = dyn.simulate(dyn.GradientFlow(), W0, loss, t1=0.5, ts=np.linspace(0, 0.5, 5),
                         **kw)
    second = dyn.simulate(dyn.GradientFlow(), first.final_params, loss, t0=0.5, t1=1.0,
                          ts=np.linspace(0.5, 1.0, 5), **kw)
    joined = dyn.concatenate([first, second])
    # the junction t = 0.5 is saved twice (the end of one run, the start of the next);
    # here both after the projection, so equal
    assert joined.ts.tolist() == np.linspace(0, 0.5, 5).tolist() + np.linspace(0.5, 1, 5).tolist()
    keep = np.r_[0:5, 6:10]
    # one solve vs two: the same steps up to 0.5, restarted after; rtol 1e-11 per step
    np.testing.assert_allclose(joined.params[keep], whole.params, rtol=0, atol=1e-9)
    np.testing.assert_allclose(joined.monitors["loss"][keep], whole.monitors["loss"],
                               rtol=0, atol=1e-9)
    np.testing.assert_array_equal(joined.actions, whole.actions)
    assert joined.stats["num_actions"] == 4 and joined.meta["runs"] == 2 and joined.success
    assert joined.t_final == 1.0
    ds = joined.to_xarray()
    assert ds.sizes["time"] == 10 and ds.sizes["action"] == 4

    with pytest.raises(ValueError, match="trajectories.*empty"):
        dyn.concatenate([])
    with pytest.raises(ValueError, match=r"`trajectories\[1\]` starts at t = 0"):
        dyn.concatenate([second, first])
    with pytest.raises(ValueError, match="list or tuple"):
        dyn.concatenate(first)
    bare = dyn.simulate(dyn.GradientFlow(), first.final_params, loss, t0=0.5, t1=1.0,
                        ts=np.linspace(0.5, 1.0, 5), solver=diffrax.Tsit5(),
                        stepsize_controller=kw["stepsize_controller"])
    with pytest.raises(ValueError, match=r"monitors"):
        dyn.concatenate([first, bare])
