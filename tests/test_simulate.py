"""`simulate` against independent references: scipy's DOP853, closed forms (matrix
exponential, logistic loss curves), and the conservation laws of Głuch & Urbanke sec. 6.1."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import dynamics as dyn

TIGHT = diffrax.PIDController(rtol=1e-10, atol=1e-10)
W_ND = jnp.array([0.5, 0.5, 0.5])
V_ND = jnp.array([-2.0, 1.0, 1.0])


def toy(w):
    """Głuch & Urbanke sec. 6.1: L(w) = (‖w‖² − 1)²."""
    return (jnp.sum(w**2) - 1.0) ** 2


_toy_grad = jax.jit(jax.grad(toy))


def dop853_second_order(damping, w0, v0, t0, t1, ts):
    """Reference: ẅ = −damping(t) ẇ − ∇L(w) by scipy's DOP853 at rtol = atol = 1e-12."""

    def rhs(t, y):
        w, v = y[:3], y[3:]
        return np.concatenate([v, -damping(t) * v - np.asarray(_toy_grad(jnp.asarray(w)))])

    sol = scipy.integrate.solve_ivp(rhs, (t0, t1), np.concatenate([w0, v0]), method="DOP853",
                                    t_eval=ts, rtol=1e-12, atol=1e-12)
    return sol.y[:3].T, sol.y[3:].T


def angular_momentum(t, w, v):
    return jnp.cross(w, v)


L_MON = dyn.monitors.Function(angular_momentum, "angular_momentum")


def test_newtonian_rotational_toy_conserves_energy_and_angular_momentum():
    ts = jnp.linspace(0.0, 20.0, 201)
    traj = dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, t1=20.0, v0=V_ND, ts=ts,
                        stepsize_controller=TIGHT, max_steps=100_000,
                        monitors=(dyn.monitors.Energy(), L_MON, dyn.monitors.Loss()))
    energy, mom = traj.monitors["energy"], traj.monitors["angular_momentum"]
    # The bound at rtol = atol = 1e-10: drift below 1e-8.
    assert np.max(np.abs(energy - energy[0])) < 1e-8
    assert np.max(np.abs(mom - mom[0])) < 1e-8
    # The paper's numbers: H(0) = ½‖(−2,1,1)‖² + (0.75 − 1)² = 3.0625, and w × ẇ =
    # (0, −3/2, 3/2) (the paper prints (0, 3/2, −3/2): the opposite orientation).
    np.testing.assert_allclose(energy[0], 3.0625, rtol=1e-14)
    np.testing.assert_allclose(mom[0], [0.0, -1.5, 1.5], atol=1e-14)
    # The loss oscillates (Fig. 6, left): it is not monotone.
    assert np.any(np.diff(traj.monitors["loss"]) > 0) and np.any(np.diff(traj.monitors["loss"]) < 0)
    w_ref, v_ref = dop853_second_order(lambda t: 0.0, W_ND, V_ND, 0.0, 20.0, ts)
    # Two 1e-10..1e-12 solvers on a bounded orbit over 20 time units: ~1e-8 apart.
    np.testing.assert_allclose(traj.params, w_ref, atol=1e-7)
    np.testing.assert_allclose(traj.velocities, v_ref, atol=1e-7)
    # The orbit lies in the plane normal to L = (0, −3/2, 3/2), i.e. y = z.
    np.testing.assert_allclose(traj.params[:, 1], traj.params[:, 2], atol=1e-9)


def test_newtonian_generic_initial_condition_stays_in_plane():
    key1, key2 = jax.random.split(jax.random.key(3))
    w0, v0 = jax.random.normal(key1, (3,)), jax.random.normal(key2, (3,))
    traj = dyn.simulate(dyn.NewtonianFlow(), w0, toy, t1=10.0, v0=v0,
                        ts=jnp.linspace(0.0, 10.0, 101), stepsize_controller=TIGHT,
                        max_steps=100_000)
    normal = np.cross(w0, v0)
    normal /= np.linalg.norm(normal)
    # ⟨w(t), n⟩ = 0 where n ∝ w0 × ẇ0; 1e-8 is the integration error at 1e-10.
    np.testing.assert_allclose(traj.params @ normal, 0.0, atol=1e-8)
    assert np.ptp(traj.params @ np.cross(normal, w0)) > 0.1  # genuinely moves in the plane


def test_nesterov_from_positive_t0_ends_on_unit_sphere():
    t0, t1 = 1e-2, 60.0
    ts = jnp.linspace(t0, t1, 61)
    traj = dyn.simulate(dyn.NesterovFlow(), W_ND, toy, t0=t0, t1=t1, v0=V_ND, ts=ts,
                        stepsize_controller=TIGHT, max_steps=100_000,
                        monitors=(L_MON,))
    w_ref, _ = dop853_second_order(lambda t: 3.0 / t, W_ND, V_ND, t0, t1, ts)
    np.testing.assert_allclose(traj.params, w_ref, atol=1e-7)  # solver tolerances, as above
    # Damping 3/t: |‖w‖ − 1| decays like t^{-3/2}, ~1e-3 at t = 60 (the paper's Fig. 4).
    assert abs(np.linalg.norm(traj.final_params) - 1.0) < 5e-3
    # G&U eq. 46: the angular momentum ℓ obeys ℓ̇ + (3/t)ℓ = 0, so t³ℓ(t) is constant.
    scaled = traj.monitors["angular_momentum"] * np.asarray(traj.ts)[:, None] ** 3
    # Damping 3/t = 300 at t0 makes the start stiff: 1e-10 local errors leave ~1e-6.
    np.testing.assert_allclose(scaled, np.broadcast_to(scaled[0], scaled.shape),
                               rtol=0, atol=1e-5 * np.abs(scaled[0]).max())
    np.testing.assert_allclose(traj.params[:, 1], traj.params[:, 2], atol=1e-9)  # plane y = z


def test_nesterov_from_zero_with_zero_velocity():
    """From t0 = 0, ẇ = 0, against SciPy started at t = ε on the series w(ε) = w0 + a ε²/2,
    ẇ(ε) = a ε with a = ẅ(0) = −∇L/(1 + r) (error O(ε³)). A wrong acceleration at t = 0
    alone is not seen here (the adaptive solver absorbs one bad stage); the limit
    itself is asserted in test_flows.py::test_nesterov_limit_at_zero."""
    w0 = np.array([0.5, 0.2, -0.1])  # not radial: all three components differ
    ts = np.linspace(0.0, 3.0, 7)
    for r in (1.0, 3.0):
        traj = dyn.simulate(dyn.NesterovFlow(r=r), jnp.asarray(w0), toy, t1=3.0,
                            stepsize_controller=TIGHT, ts=jnp.asarray(ts))

        def grad(w):
            return 4.0 * (np.sum(w**2) - 1.0) * w  # ∇ of the toy, by hand

        eps = 1e-5
        acc = -grad(w0) / (1.0 + r)
        sol = scipy.integrate.solve_ivp(
            lambda t, y, r=r: np.concatenate([y[3:], -r / t * y[3:] - grad(y[:3])]),
            (eps, 3.0), np.concatenate([w0 + 0.5 * acc * eps**2, acc * eps]),
            t_eval=ts[1:], method="DOP853", rtol=1e-12, atol=1e-12)
        # Both solves at ~1e-10; the series start adds O(ε³) = 1e-15.
        np.testing.assert_allclose(traj.params[1:], sol.y[:3].T, rtol=0, atol=1e-7)


def test_gradient_flow_rotational_toy_closed_form():
    """From (0.1, 0.1, 0.1), u = ‖w‖² obeys u̇ = 8u(1 − u): logistic, to (1,1,1)/√3."""
    ts = jnp.linspace(0.0, 3.0, 31)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=3.0, ts=ts,
                        stepsize_controller=TIGHT)
    u0 = 0.03
    u = 1.0 / (1.0 + (1.0 / u0 - 1.0) * np.exp(-8.0 * np.asarray(ts)))
    expected = np.sqrt(u / 3.0)[:, None] * np.ones(3)
    np.testing.assert_allclose(traj.params, expected, rtol=1e-8)  # solver tolerance 1e-10
    np.testing.assert_allclose(traj.final_params, np.ones(3) / np.sqrt(3.0), atol=1e-9)
    sol = scipy.integrate.solve_ivp(lambda t, w: -np.asarray(_toy_grad(jnp.asarray(w))),
                                    (0.0, 3.0), np.full(3, 0.1), method="DOP853",
                                    t_eval=ts, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(traj.params, sol.y.T, rtol=1e-8)


def test_gradient_flow_least_squares_matrix_exponential():
    """L = ½‖Xw − y‖²: w(t) = w* + exp(−XᵀX t)(w0 − w*)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (20, 4))
    y = jax.random.normal(k2, (20,))
    w0 = jax.random.normal(k3, (4,))
    loss = lambda w: 0.5 * jnp.sum((x @ w - y) ** 2)
    ts = np.linspace(0.0, 0.5, 11)
    traj = dyn.simulate(dyn.GradientFlow(), w0, loss, t1=0.5, ts=ts, stepsize_controller=TIGHT,
                        max_steps=100_000)
    a = np.asarray(x.T @ x)
    w_star = np.linalg.solve(a, np.asarray(x.T @ y))
    expected = np.stack([w_star + scipy.linalg.expm(-a * t) @ (np.asarray(w0) - w_star)
                         for t in ts])
    np.testing.assert_allclose(traj.params, expected, rtol=0, atol=1e-8)  # tolerance 1e-10


def test_gradient_flow_on_pytree_params():
    """A dict of arrays is a model too; each block evolves by its own closed form."""
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    loss = lambda p: 0.5 * jnp.sum(p["a"] ** 2) + 2.0 * p["b"] ** 2
    traj = dyn.simulate(dyn.GradientFlow(), params, loss, t1=1.0, stepsize_controller=TIGHT)
    np.testing.assert_allclose(traj.final_params["a"], np.array([1.0, 2.0]) * np.exp(-1.0),
                               rtol=1e-9)
    np.testing.assert_allclose(traj.final_params["b"], 3.0 * np.exp(-4.0), rtol=1e-9)


def test_loss_below_fires_at_closed_form_time():
    """GF from (0.1,0.1,0.1): L(t) = (u(t) − 1)² with u logistic; L = ½ at
    t* = ln((1/u0 − 1)/(1/u* − 1))/8, u* = 1 − 1/√2."""
    u0, u_star = 0.03, 1.0 - 1.0 / np.sqrt(2.0)
    t_star = np.log((1.0 / u0 - 1.0) / (1.0 / u_star - 1.0)) / 8.0
    traj = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=3.0,
                        ts=jnp.linspace(0.0, 3.0, 31), stepsize_controller=TIGHT,
                        events=(dyn.events.LossBelow(0.5),), monitors=(dyn.monitors.Loss(),))
    assert traj.event == "loss_below" and traj.success and not traj.diverged
    # Root-found on the interpolant of a 1e-10 solve: far better than the step (~1e-2).
    assert abs(traj.event_time - t_star) < 1e-8
    assert traj.ts[-1] == traj.event_time and np.all(traj.ts[:-1] < t_star)
    np.testing.assert_allclose(traj.monitors["loss"][-1], 0.5, rtol=1e-8)
    assert len(traj.ts) == int(np.floor(t_star / 0.1)) + 2  # saves before, plus the event


def test_norm_above_fires_at_blow_up_time():
    """ẇ = w² (L = −w³/3) from 1 blows up at t = 1; ‖w‖ = c at t = 1 − 1/c."""
    loss = lambda w: -jnp.sum(w**3) / 3.0
    for c in (10.0, 1e6):
        traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), loss, t1=2.0,
                            events=(dyn.events.NormAbove(c),), stepsize_controller=TIGHT)
        assert traj.event == "norm_above" and traj.diverged and traj.success
        # Near the pole the local error grows like w²; 1e-8 holds even at c = 1e6.
        assert abs(traj.event_time - (1.0 - 1.0 / c)) < 1e-8


def test_user_condition_event():
    """Stop when the first coordinate of GF on ½‖w‖² (w = w0 e^{−t}) reaches 0.25."""
    event = dyn.events.Condition(lambda t, p, v: p[0] - 0.25, name="quarter", direction=False)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0, 2.0]), lambda w: 0.5 * w @ w,
                        t1=5.0, events=(event,), stepsize_controller=TIGHT)
    assert traj.event == "quarter"
    assert abs(traj.event_time - np.log(4.0)) < 1e-9  # interpolant error at 1e-10


def test_non_finite_state_stops_and_flags():
    """Euler on ẇ = w² with dt = 0.5 overflows to inf after ~12 steps."""
    loss = lambda w: -jnp.sum(w**3) / 3.0
    traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), loss, t1=50.0, dt0=0.5,
                        solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(),
                        ts=jnp.arange(0.0, 50.0, 0.5), monitors=(dyn.monitors.Loss(),))
    assert traj.event == "non_finite" and traj.diverged
    assert traj.t_final < 10.0
    # Everything saved before the last state is finite, and matches the Euler recursion.
    w, expected = traj.params[:-1, 0], [1.0]
    for _ in range(len(w) - 1):
        expected.append(expected[-1] + 0.5 * expected[-1] ** 2)
    np.testing.assert_allclose(w, expected, rtol=1e-12)  # exact recursion, roundoff only
    assert not np.all(np.isfinite(traj.params[-1]))


def test_non_finite_stop_beside_user_events_and_step_to():
    """The stop at a non-finite state is the controller's (`_driver/_guard.py`), not a
    diffrax event: it is reported as `non_finite` beside a user event that never fires,
    with `dyn.events.NonFinite()` passed explicitly, and with `StepTo` steps."""
    loss = lambda w: -jnp.sum(w**3) / 3.0  # ẇ = w²: Euler overflows after ~12 steps
    kw = dict(t1=50.0, solver=diffrax.Euler(), monitors=(dyn.monitors.Loss(),))
    runs = [
        dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), loss, dt0=0.5,
                     stepsize_controller=diffrax.ConstantStepSize(),
                     events=(dyn.events.Condition(lambda t, p, v: t - 100.0, name="late"),
                             dyn.events.NonFinite()), **kw),
        dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), loss,
                     stepsize_controller=diffrax.StepTo(jnp.arange(0.0, 50.5, 0.5)), **kw),
    ]
    for traj in runs:
        assert traj.event == "non_finite" and traj.diverged and traj.success
        # the same step as the plain run above: w_{k+1} = w_k + w_k²/2 overflows at k = 12
        assert traj.t_final == pytest.approx(6.0, abs=1.0)
        assert not np.all(np.isfinite(np.asarray(traj.final_params)))


def test_max_steps_raises_or_reports():
    kw = dict(t1=10.0, stepsize_controller=TIGHT, max_steps=5)
    with pytest.raises(RuntimeError, match="maximum number of solver steps"):
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, **kw)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, throw=False, **kw)
    assert not traj.success and traj.stats["num_steps"] == 5
    assert "maximum number" in traj.result and 0.0 < traj.t_final < 10.0


def test_semi_implicit_euler_newtonian():
    """Symplectic Euler on ND: first order in dt, energy error bounded (no drift)."""
    t1 = 5.0
    ref_w, _ = dop853_second_order(lambda t: 0.0, W_ND, V_ND, 0.0, t1, [t1])
    errors = []
    dts = [4e-3, 2e-3, 1e-3]
    for dt in dts:
        traj = dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, t1=t1, v0=V_ND, dt0=dt,
                            solver=diffrax.SemiImplicitEuler(),
                            stepsize_controller=diffrax.ConstantStepSize(), max_steps=10_000,
                            ts=jnp.linspace(0.0, t1, 501), monitors=(dyn.monitors.Energy(),))
        errors.append(np.linalg.norm(traj.final_params - ref_w[-1]))
    order = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    assert 0.9 < order < 1.2, (errors, order)  # first-order method
    energy = traj.monitors["energy"]
    # Symplectic: |H − H0| stays O(dt) = ~1e-2 without secular growth.
    assert np.max(np.abs(energy - energy[0])) < 0.05
    with pytest.raises(ValueError, match="separable"):
        dyn.simulate(dyn.HeavyBallFlow(0.5), W_ND, toy, t1=1.0, dt0=0.1,
                     solver=diffrax.SemiImplicitEuler(),
                     stepsize_controller=diffrax.ConstantStepSize())


def test_second_call_does_not_retrace():
    traces = []

    def loss(w):
        traces.append(1)  # a Python side effect runs only while tracing
        return jnp.sum((w - 1.0) ** 2)

    kw = dict(t1=1.0, ts=jnp.linspace(0.0, 1.0, 5), monitors=(dyn.monitors.Loss(),),
              events=(dyn.events.LossBelow(1e-3),))
    first = dyn.simulate(dyn.GradientFlow(), jnp.zeros(3), loss, **kw)
    n = len(traces)
    assert n > 0
    second = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 2.0), loss, **kw)
    third = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 3.0), loss, t1=2.0,
                         ts=jnp.linspace(0.0, 2.0, 5), monitors=kw["monitors"],
                         events=kw["events"])
    assert len(traces) == n  # new values of params, t1 and ts: no new trace
    np.testing.assert_allclose(first.final_params, 1.0 - np.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(second.final_params, 1.0 + np.exp(-2.0), rtol=1e-6)
    np.testing.assert_allclose(third.final_params, 1.0 + 2.0 * np.exp(-4.0), rtol=1e-6)


def test_nearby_save_counts_share_one_compiled_solve():
    """Changing only the number of save times compiled the solve again (37 s on a small
    Filippov net): counts are padded to a bucket (11 and 12 share one, 12 slots), and the
    Trajectory has exactly the save times asked for."""
    traces = []

    def loss(w):
        traces.append(1)  # runs at trace time only
        return toy(w)

    w0 = jnp.full(3, 0.1)
    runs = {}
    for n in (12, 11, 9):
        before = len(traces)
        runs[n] = dyn.simulate(dyn.GradientFlow(), w0, loss, t1=1.0, ts=jnp.linspace(0, 1, n),
                               monitors=dyn.monitors.Loss(), stepsize_controller=TIGHT)
        if n == 11:
            assert len(traces) == before  # the n = 12 solve, reused
        traj = runs[n]
        np.testing.assert_array_equal(traj.ts, np.linspace(0, 1, n))
        assert traj.monitors["loss"].shape == (n,) and traj.params.shape == (n, 3)
        assert np.all(np.isfinite(traj.monitors["loss"])) and traj.success
    # the same numbers at the shared times (0 and 1), whatever the padding
    np.testing.assert_allclose(runs[11].monitors["loss"][[0, -1]],
                               runs[12].monitors["loss"][[0, -1]], rtol=1e-12)
    np.testing.assert_allclose(runs[11].final_params, runs[9].final_params, rtol=1e-12)


def test_heavy_ball_sweep_compiles_once():
    traces = []

    def loss(w):
        traces.append(1)
        return 0.5 * jnp.sum(w**2)

    for gamma in (0.5, 1.0, 3.0):
        traj = dyn.simulate(dyn.HeavyBallFlow(gamma), jnp.array([1.0]), loss, t1=1.0,
                            stepsize_controller=TIGHT)
        # Underdamped/critical/overdamped: compare with the closed form of ẅ + γẇ + w = 0.
        roots = np.roots([1.0, gamma, 1.0])
        if np.isclose(roots[0], roots[1]):
            expected = (1.0 + 1.0 * 0.5 * gamma) * np.exp(-0.5 * gamma)
        else:
            c = np.linalg.solve(np.array([[1, 1], roots]), np.array([1.0, 0.0]))
            expected = np.real(c @ np.exp(roots))
        np.testing.assert_allclose(traj.final_params[0], expected, rtol=1e-8)
    n_first = len(traces)
    traj = dyn.simulate(dyn.HeavyBallFlow(2.0), jnp.array([1.0]), loss, t1=1.0,
                        stepsize_controller=TIGHT)
    assert len(traces) == n_first


def test_tolerance_sweep_compiles_once():
    """rtol and atol are traced: a work-precision sweep compiles one solve, and each
    tolerance still gives its own accuracy (GF on L = ½w²: w(1) = e^{-1})."""
    traces = []

    def loss(w):
        traces.append(1)
        return 0.5 * jnp.sum(w**2)

    errors, steps = [], []
    for k, tol in enumerate((1e-4, 1e-6, 1e-8, 1e-10)):
        controller = diffrax.PIDController(rtol=tol, atol=tol)
        if k == 3:  # wrapped, as diffrax does for step_ts / jump_ts
            controller = diffrax.ClipStepSizeController(controller)
        traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), loss, t1=1.0,
                            stepsize_controller=controller)
        errors.append(abs(traj.final_params[0] - np.exp(-1.0)))
        steps.append(traj.stats["num_steps"])
        assert traj.meta["rtol"] == tol or k == 3
        if k == 0:
            n_first = len(traces)
        if k == 2:
            assert len(traces) == n_first  # new tolerances, no new trace
    assert steps == sorted(steps) and steps[0] < steps[-2]  # tighter: more steps
    for tol, err in zip((1e-4, 1e-6, 1e-8, 1e-10), errors, strict=True):
        assert err < 100 * tol, (tol, err)  # global error within a few rtol


def test_progress_writes_a_few_lines_off_a_terminal(capsys):
    """Off a terminal (pytest's capture is a pipe) progress is a few lines, not a tqdm
    redraw per refresh (main wrote ~5,000 "0.00%" lines for a stuck solve), and a run
    that stops short of t1 does not end on 100%."""
    traj = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=1.0, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert traj.success and 2 <= len(lines) <= 5, lines
    assert lines[0] == "simulate: started" and lines[-1].startswith("simulate: done")
    traj = dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=10.0, max_steps=40,
                        stepsize_controller=TIGHT, throw=False, progress=True)
    err = capsys.readouterr().err
    assert not traj.success and len(err.splitlines()) <= 5, err
    assert "stopped at" in err and "done" not in err and "100" not in err, err


class _NeverAccepts(diffrax.AbstractAdaptiveStepSizeController):
    """A (broken) user controller that rejects every step."""

    rtol: float = 1e-6
    atol: float = 1e-6
    norm: object = staticmethod(lambda x: 0.0)

    def wrap(self, direction):
        return self

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return t0 + 0.01, None

    def adapt_step_size(self, t0, t1, y0, y1, args, y_error, error_order, state):
        return False, t0, t0 + 0.5 * (t1 - t0), False, state, diffrax.RESULTS.successful


def test_adaptive_solves_do_not_reject_without_end():
    """Main rejected 100,000 steps (0 accepted) in three cases; each now ends early."""
    gf, w = dyn.GradientFlow(), jnp.array([-1.0, 2.0])
    # A field that is NaN (sqrt of a negative output): the non_finite event, diverged.
    traj = dyn.simulate(gf, w, lambda w: jnp.sum(jnp.sqrt(w)), t1=1.0)
    assert traj.event == "non_finite" and traj.diverged and traj.success
    assert traj.stats["num_steps"] <= 30 and not np.all(np.isfinite(traj.final_params))
    # A first step whose candidate overflows (inf, so diffrax's next step size was NaN):
    # the step shrinks until it fits, and the run is right.
    traj = dyn.simulate(gf, jnp.array([1.8]), lambda w: jnp.sum(w**40), t1=1.0)
    assert traj.success and traj.stats["num_accepted_steps"] > 0
    np.testing.assert_allclose(traj.final_params, (1.8**-38 + 1520) ** (-1 / 38), rtol=1e-6)
    # A controller that never accepts: stopped after 100 rejections in a row, with advice.
    with pytest.raises(RuntimeError, match="Not one step was accepted.*`dt0`"):
        dyn.simulate(gf, w**2, toy, t1=1.0, stepsize_controller=_NeverAccepts())
    traj = dyn.simulate(gf, w**2, toy, t1=1.0, stepsize_controller=_NeverAccepts(),
                        throw=False)
    assert not traj.success and traj.stats["num_rejected_steps"] == 100
    assert "rejected a long run of steps in a row" in traj.result


def test_provenance_in_xarray():
    traj = dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, t1=1.0, v0=V_ND, stepsize_controller=TIGHT,
                        ts=jnp.linspace(0.0, 1.0, 3), monitors=(dyn.monitors.Energy(),))
    ds = traj.to_xarray()
    assert ds.attrs["flow"] == "NewtonianFlow" and ds.attrs["solver"] == "Tsit5"
    assert ds.attrs["rtol"] == 1e-10 and ds.attrs["jax_version"] == jax.__version__
    np.testing.assert_array_equal(ds["time"], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(ds["param"], traj.params)
    np.testing.assert_array_equal(ds["velocity"], traj.velocities)


# -- bad input -------------------------------------------------------------------------

BASE = dict(t1=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t1=0.0), "t1"),
        (dict(t1=1.0, t0=2.0), "t1"),
        (dict(t1=1.0, ts=jnp.array([0.0, 2.0])), "ts"),
        (dict(t1=1.0, ts=jnp.array([0.5, 0.2])), "ts"),
        (dict(t1=1.0, ts=jnp.array([[0.5]])), "ts"),
        (dict(t1=1.0, v0=jnp.ones(3)), "v0"),
        (dict(t1=1.0, solver=diffrax.Euler()), "ConstantStepSize"),
        (dict(t1=1.0, solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize()),
         "dt0"),
        (dict(t1=1.0, dt0=-0.1), "dt0"),
        (dict(t1=1.0, max_steps=0), "max_steps"),
        (dict(t1=1.0, monitors=(dyn.monitors.Loss(), dyn.monitors.Loss())), "monitors"),
        (dict(t1=1.0, monitors=("loss",)), "monitors"),
        (dict(t1=1.0, events=(lambda t: t,)), "events"),
        (dict(t1=float("nan")), "t1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, **kwargs)


@pytest.mark.parametrize("rtol, atol, which", [(1e-3, -1.0, "atol"), (float("inf"), 1e-6, "rtol"),
                                               (-1e-6, 1e-9, "rtol"), (0.0, 0.0, "both 0")])
def test_bad_tolerances_are_refused_by_simulate_and_simulation(rtol, atol, which):
    """A negative or infinite tolerance passes every error estimate: main returned a
    wrong answer in 3 steps (and rtol=-1e-6 only warned to turn on float64)."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    import warnings

    for call in (lambda: dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=1.0,
                                      stepsize_controller=controller),
                 lambda: dyn.Simulation(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=1.0,
                                        stepsize_controller=controller).prepare()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused, not warned about
            with pytest.raises(ValueError, match=f"stepsize_controller.*{which}"):
                call()
    # rtol = 0 with atol > 0 is absolute control: accepted, without the float64 warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, t1=1.0,
                     stepsize_controller=diffrax.PIDController(rtol=0.0, atol=1e-8))


def test_bad_params_and_loss():
    with pytest.raises(ValueError, match="params.*NaN"):
        dyn.simulate(dyn.GradientFlow(), jnp.array([0.1, jnp.nan, 0.1]), toy, **BASE)
    with pytest.raises(ValueError, match="params.*NaN"):
        dyn.simulate(dyn.GradientFlow(), {"w": jnp.array([jnp.inf])}, toy, **BASE)
    with pytest.raises(ValueError, match="params"):
        dyn.simulate(dyn.GradientFlow(), {"n": 3}, toy, **BASE)
    with pytest.raises(ValueError, match="loss.*scalar"):
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), lambda w: w**2, **BASE)
    with pytest.raises(ValueError, match="loss"):
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), "mse", **BASE)
    with pytest.raises(ValueError, match="flow"):
        dyn.simulate("gf", jnp.full(3, 0.1), toy, **BASE)
    with pytest.raises(ValueError, match="projection"):
        dyn.simulate(dyn.GradientFlow(), jnp.full(3, 0.1), toy, projection=object(), **BASE)


def test_bad_velocity():
    with pytest.raises(ValueError, match="v0.*shape"):
        dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, v0=jnp.ones(2), **BASE)
    with pytest.raises(ValueError, match="v0.*structure"):
        dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, v0={"a": jnp.ones(3)}, **BASE)
    with pytest.raises(ValueError, match="v0.*NaN"):
        dyn.simulate(dyn.NewtonianFlow(), W_ND, toy, v0=jnp.array([0.0, jnp.nan, 0.0]), **BASE)
    with pytest.raises(ValueError, match="NesterovFlow.*t0 = 0"):
        dyn.simulate(dyn.NesterovFlow(), W_ND, toy, v0=V_ND, **BASE)
    with pytest.raises(ValueError, match="t0"):
        dyn.simulate(dyn.NesterovFlow(), W_ND, toy, t0=-1.0, **BASE)


def test_bad_events():
    with pytest.raises(ValueError, match="value"):
        dyn.events.LossBelow(float("nan"))
    with pytest.raises(ValueError, match="value"):
        dyn.events.NormAbove(-1.0)
    with pytest.raises(ValueError, match="direction"):
        dyn.events.Condition(lambda t, p, v: t, direction="up")
