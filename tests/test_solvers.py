"""`LossCarryingEuler`: what `simulate` runs for Euler + a first-order flow + Loss.

The references are independent of the solver: the GD recursion written out by hand, and
the loss evaluated on the saved parameters afterwards.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import dynamics as dyn

ETA, STEPS = 0.1, 30
EULER = dict(t1=STEPS * ETA, dt0=ETA, solver=diffrax.Euler(),
             stepsize_controller=diffrax.ConstantStepSize())


class Counted(eqx.Module):
    """A loss that counts its forward evaluations at run time (not at trace time)."""

    calls: list = eqx.field(static=True)

    def __call__(self, w):
        jax.debug.callback(lambda: self.calls.append(1))
        return jnp.sum(jnp.log1p(jnp.exp(-w * jnp.arange(1.0, 4.0)))) + 0.1 * jnp.sum(w**4)


def gd(loss, w, steps):
    out = [w]
    for _ in range(steps):
        w = w - ETA * jax.grad(loss)(w)
        out.append(w)
    return np.stack(out)


@pytest.mark.parametrize("ts", [
    np.arange(STEPS + 1) * ETA,                         # every step end (k * dt, not t0 + T k/n)
    np.array([0.0, 0.05, 0.77, 1.5, 2.2999, STEPS * ETA]),  # mostly between steps
])
def test_matches_euler_and_the_loss_of_what_it_saves(ts):
    loss = Counted([])
    w0 = jnp.array([0.3, -0.2, 0.5])
    traj = dyn.simulate(dyn.GradientFlow(), w0, loss, ts=ts, monitors=(dyn.monitors.Loss(),),
                        **EULER)
    plain = dyn.simulate(dyn.GradientFlow(), w0, loss, ts=ts,
                         monitors=(dyn.monitors.GradNorm(),), **EULER)
    # Step times t0 + T k/n differ from k * dt by an ulp, hence not exactly 0.
    np.testing.assert_allclose(traj.params, plain.params, rtol=0, atol=1e-15)
    on_grid = np.isclose(ts / ETA, np.round(ts / ETA), rtol=0, atol=1e-9)
    expected = gd(loss, w0, STEPS)[np.round(ts / ETA).astype(int)[on_grid]]
    np.testing.assert_allclose(traj.params[on_grid], expected, rtol=1e-14)  # roundoff only
    direct = np.array([loss(w) for w in traj.params])
    np.testing.assert_allclose(traj.monitors["loss"], direct, rtol=1e-14)  # roundoff only


def test_one_evaluation_per_step():
    """n steps, the loss saved at each: n + 2 forward passes (L(w0), then one per
    value_and_grad at w0, ..., w_n), not n gradients plus n + 1 separate losses."""
    loss = Counted([])
    ts = np.arange(STEPS + 1) * ETA
    dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts,
                 monitors=(dyn.monitors.Loss(),), **EULER)  # compile, then count
    loss.calls.clear()
    traj = dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts,
                        monitors=(dyn.monitors.Loss(),), **EULER)
    assert traj.stats["num_steps"] == STEPS
    assert len(loss.calls) == STEPS + 2
    # Between step ends the loss is evaluated where it is asked: one more call each.
    loss.calls.clear()
    dyn.simulate(dyn.GradientFlow(), jnp.ones(3), loss, ts=ts[:-1] + ETA / 2,
                 monitors=(dyn.monitors.Loss(),), **EULER)
    assert len(loss.calls) == 2 * STEPS + 2


class CountedMLPLoss(eqx.Module):
    """Least squares of a model on fixed data, counting forward evaluations at run time."""

    calls: list = eqx.field(static=True)

    def __call__(self, model):
        jax.debug.callback(lambda: self.calls.append(1))
        x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
        return 0.5 * jnp.sum((jax.vmap(model)(x) - jnp.arange(8.0).reshape(4, 2) / 8) ** 2)


def test_residual_monitors_read_the_steps_field():
    """Symmetry residuals need ẇ at each save; at a step end it is the step's own gradient,
    which `LossCarryingEuler(field=True)` carries, so monitoring them costs no gradient:
    still n + 2 evaluations for n steps, with the values of an uncarried run (a subclass of
    Euler turns the carrying off: it evaluates ẇ at each save again)."""

    class PlainEuler(diffrax.Euler):
        pass

    model = dyn.MLP((3, 4, 2), activation=dyn.RePU(2), key=jax.random.key(0))
    monitors = (dyn.monitors.Loss(), dyn.monitors.RescalingResiduals(),
                dyn.monitors.SymmetryResidual(dyn.symmetries.Rescaling(1, 2)))
    ts = np.arange(STEPS + 1) * ETA
    loss = CountedMLPLoss([])
    runs = {}
    for name, solver in (("carried", diffrax.Euler()), ("plain", PlainEuler())):
        kw = dict(EULER, solver=solver)
        dyn.simulate(dyn.GradientFlow(), model, loss, ts=ts, monitors=monitors, **kw)
        loss.calls.clear()
        runs[name] = dyn.simulate(dyn.GradientFlow(), model, loss, ts=ts, monitors=monitors,
                                  **kw)
        runs[name + "_calls"] = len(loss.calls)
    assert runs["carried_calls"] == STEPS + 2
    # Euler: a gradient per step; at the 31 saves and the final state, a loss and two
    # gradients for ẇ (one per residual monitor)
    assert runs["plain_calls"] == STEPS + 3 * (STEPS + 2)
    for key in ("loss", "rescaling_residuals", "symmetry_residual"):
        # relative residuals of size ~1e-16: the same numbers up to the last bits
        np.testing.assert_allclose(runs["carried"].monitors[key], runs["plain"].monitors[key],
                                   rtol=1e-12, atol=1e-15)
    assert np.abs(runs["carried"].monitors["rescaling_residuals"]).max() < 1e-13


def test_mirror_flow_and_divergence():
    """A flow whose vector field is not −∇L, and a run that overflows."""
    loss = lambda w: jnp.sum((w - 2.0) ** 2)
    flow = dyn.MirrorFlow(lambda w: jnp.sum(w * jnp.log(w)))  # ẇ = −w ⊙ ∇L
    w0 = jnp.array([0.5, 1.0, 3.0])
    traj = dyn.simulate(flow, w0, loss, ts=np.arange(STEPS + 1) * ETA,
                        monitors=(dyn.monitors.Loss(),), **EULER)
    w, expected = np.asarray(w0), [np.asarray(w0)]
    for _ in range(STEPS):
        w = w - ETA * w * 2.0 * (w - 2.0)
        expected.append(w)
    np.testing.assert_allclose(traj.params, np.stack(expected), rtol=1e-13)  # roundoff only
    np.testing.assert_allclose(traj.monitors["loss"], [loss(w) for w in traj.params],
                               rtol=1e-13)
    # ẇ = w² overflows: stopped by the non-finite event with the loss saved until then.
    blow_up = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0]), lambda w: -jnp.sum(w**3) / 3,
                           ts=np.arange(0.0, 50.0, 0.5), t1=50.0, dt0=0.5,
                           solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(),
                           monitors=(dyn.monitors.Loss(),))
    assert blow_up.diverged and blow_up.event == "non_finite"
    w = blow_up.params[:, 0]
    small = np.abs(w) < 1e100  # the cube of the last finite w's overflows already
    assert small.sum() > 5
    np.testing.assert_allclose(blow_up.monitors["loss"][small], -w[small] ** 3 / 3, rtol=1e-14)


def test_event_between_step_ends():
    """LossBelow stops inside a step: the state there is Euler's straight line, and the
    loss saved at the stop is L of that state (not a carried value)."""
    loss = lambda w: 0.5 * jnp.sum(w**2)
    traj = dyn.simulate(dyn.GradientFlow(), jnp.array([1.0, 2.0]), loss,
                        ts=np.arange(STEPS + 1) * ETA, monitors=(dyn.monitors.Loss(),),
                        events=(dyn.events.LossBelow(0.3),), **EULER)
    assert traj.event == "loss_below"
    # Euler on ẇ = −w: w_k = 0.9^k w0 at t_k = k/10, linear in between.
    k = int(traj.t_final / ETA)
    frac = traj.t_final / ETA - k
    w = (0.9**k + frac * (0.9 ** (k + 1) - 0.9**k)) * np.array([1.0, 2.0])
    assert 0 < frac < 1
    np.testing.assert_allclose(0.5 * np.sum(w**2), 0.3, rtol=1e-10)  # root-find tolerance
    np.testing.assert_allclose(traj.final_params, w, rtol=1e-12)  # roundoff only
    np.testing.assert_allclose(traj.monitors["loss"][-1], 0.5 * np.sum(w**2), rtol=1e-12)
    assert np.all(np.diff(traj.ts) > 0) and traj.ts[-1] == traj.t_final


# ---------------------------------------------------------------------------------------
# Structure-preserving solvers (dyn.solvers).
# ---------------------------------------------------------------------------------------

FIXED = diffrax.ConstantStepSize()
TOY = dyn.losses.rotational_toy()
W0, V0 = jnp.array([1.3, 0.2, -0.1]), jnp.array([0.0, 0.8, 0.1])


def _observed_order(hs, errors):
    # Least-squares slope of log error against log h.
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


def test_gauss_legendre_tableaus_are_hairer_wanners():
    """Table IV.5.1 of Hairer & Wanner II (s = 2, 3), written out in closed form."""
    from dynamics.solvers._gauss_legendre import tableau

    r3, r15 = np.sqrt(3.0), np.sqrt(15.0)
    A, b, c, _ = tableau(2)
    np.testing.assert_allclose(c, [0.5 - r3 / 6, 0.5 + r3 / 6], rtol=1e-14)  # roundoff
    np.testing.assert_allclose(b, [0.5, 0.5], rtol=1e-14)
    np.testing.assert_allclose(A, [[0.25, 0.25 - r3 / 6], [0.25 + r3 / 6, 0.25]], atol=1e-14)
    A, b, c, _ = tableau(3)
    np.testing.assert_allclose(c, [0.5 - r15 / 10, 0.5, 0.5 + r15 / 10], rtol=1e-14)
    np.testing.assert_allclose(b, [5 / 18, 4 / 9, 5 / 18], rtol=1e-14)
    np.testing.assert_allclose(
        A,
        [[5 / 36, 2 / 9 - r15 / 15, 5 / 36 - r15 / 30],
         [5 / 36 + r15 / 24, 2 / 9, 5 / 36 - r15 / 24],
         [5 / 36 + r15 / 30, 2 / 9 + r15 / 15, 5 / 36]],
        atol=1e-14,
    )


@pytest.mark.parametrize("solver, order, hs", [
    (dyn.solvers.VelocityVerlet(), 2, (0.04, 0.02, 0.01)),
    (dyn.solvers.Yoshida4(), 4, (0.04, 0.02, 0.01)),
    (dyn.solvers.ConformalSymplectic(), 2, (0.04, 0.02, 0.01)),
    (dyn.solvers.GaussLegendre(1), 2, (0.04, 0.02, 0.01)),
    (dyn.solvers.GaussLegendre(2), 4, (0.08, 0.04, 0.02)),
    (dyn.solvers.GaussLegendre(3), 6, (0.1, 0.05, 0.025)),  # h = 0.01 reaches the float floor
])
def test_orders_on_newtonian_flow(solver, order, hs):
    """Final-state error on the rotational toy against Dopri8 at rtol 1e-13."""
    ref = dyn.simulate(dyn.NewtonianFlow(), W0, TOY, v0=V0, t1=2.0, solver=diffrax.Dopri8(),
                       stepsize_controller=diffrax.PIDController(rtol=1e-13, atol=1e-13))
    errors = []
    for h in hs:
        traj = dyn.simulate(dyn.NewtonianFlow(), W0, TOY, v0=V0, t1=2.0, dt0=h, solver=solver,
                            stepsize_controller=FIXED)
        errors.append(np.linalg.norm(np.concatenate([
            traj.final_params - ref.final_params, traj.final_velocity - ref.final_velocity])))
    assert abs(_observed_order(hs, errors) - order) < 0.1  # the issue's ±0.1


def _energy_halves(solver, t1, h=0.05):
    traj = dyn.simulate(dyn.NewtonianFlow(), W0, TOY, v0=V0, t1=t1, dt0=h, solver=solver,
                        stepsize_controller=FIXED, ts=np.arange(0.0, t1, 1.0),
                        monitors=(dyn.monitors.Energy(),), save_params=False, max_steps=None)
    e0 = 0.5 * float(V0 @ V0) + float(TOY(W0))
    drift = np.abs(traj.monitors["energy"] - e0)
    half = len(drift) // 2
    return drift[:half].max(), drift[half:].max()


@pytest.mark.parametrize("t1", [200.0, 2000.0])  # 2000: the run, ~2 s
def test_energy_bounded_for_verlet_secular_for_runge_kutta(t1):
    """h = 0.05 on the rotational toy: Verlet's energy error oscillates at O(h²) with no
    growth from the first half of the run to the second; Tsit5's (not symplectic) grows
    linearly in t, so its second half's maximum is twice the first's (measured 2.00 at
    T = 200 and 2000). Heun, tried first, is no good at T = 2000: its energy error grows
    until the state overflows near t = 700, so both halves are infinite."""
    first, second = _energy_halves(dyn.solvers.VelocityVerlet(), t1)
    assert second < 1.2 * first  # no growth: the second half's maximum within 20%
    assert first < 1e-2  # O(h²) with h = 0.05
    rk_first, rk_second = _energy_halves(diffrax.Tsit5(), t1)
    assert rk_second > 1.5 * rk_first  # secular drift: linear growth gives 2


def test_conformal_symplectic_matches_the_dissipation_law_to_second_order():
    """Heavy ball ẅ + γẇ + w = 0 (L = ½w²) has the closed form of a damped oscillator;
    the energy ½ẇ² + ½w² at T = 5 is matched to order 2, and with γ = 0 the scheme is
    velocity Verlet."""
    gamma, T = 0.3, 5.0
    a, om = -gamma / 2, np.sqrt(1 - gamma**2 / 4)
    w_t = np.exp(a * T) * (np.cos(om * T) - a / om * np.sin(om * T))
    v_t = np.exp(a * T) * (-(a**2 + om**2) / om * np.sin(om * T))
    exact = 0.5 * (w_t**2 + v_t**2)
    hs, errors = (0.1, 0.05, 0.025), []
    for h in hs:
        traj = dyn.simulate(dyn.HeavyBallFlow(gamma), jnp.array([1.0]),
                            lambda w: 0.5 * jnp.sum(w**2), t1=T, dt0=h,
                            solver=dyn.solvers.ConformalSymplectic(), stepsize_controller=FIXED,
                            monitors=(dyn.monitors.Energy(),))
        errors.append(abs(traj.monitors["energy"][-1] - exact))
    assert abs(_observed_order(hs, errors) - 2) < 0.1  # the issue's ±0.1


def _small_net(activation):
    """A 3-4-2 MLP and its mean squared error on 16 random points: the charge tests' net."""
    x = 0.7 * jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.sin(x[:, :2])
    model = dyn.MLP((3, 4, 2), activation, key=jax.random.key(1), init="lecun")
    return model, lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)


def _charges_drift(solver, activation):
    model, loss = _small_net(activation)
    traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=10.0, dt0=0.05, solver=solver,
                        stepsize_controller=FIXED, ts=np.linspace(0.0, 10.0, 5),
                        monitors=(dyn.monitors.RescalingCharges(),), save_params=False)
    q = traj.monitors["rescaling_charges"]
    return np.abs(q - q[0]).max()


@pytest.mark.parametrize("activation", [
    dyn.RePU(2), pytest.param(dyn.Polynomial(2), marks=pytest.mark.slow)])  # same claim
def test_gauss_legendre_conserves_gf_charges_where_tsit5_drifts(activation):
    """The rescaling charges are quadratic invariants of GF: under GaussLegendre they hold
    to the stage solve's tolerance at h = 0.05; Tsit5 at the same fixed step drifts."""
    assert _charges_drift(dyn.solvers.GaussLegendre(2), activation) < 1e-12  # the bound
    assert _charges_drift(diffrax.Tsit5(), activation) > 1e-11  # 10× above it


def test_gauss_legendre_adaptive_meets_tolerance():
    """With a PIDController the embedded estimate controls the error: tighter tolerance,
    smaller final error (against Dopri8 at rtol 1e-13), and below the tolerance."""
    ref = dyn.simulate(dyn.NewtonianFlow(), W0, TOY, v0=V0, t1=2.0, solver=diffrax.Dopri8(),
                       stepsize_controller=diffrax.PIDController(rtol=1e-13, atol=1e-13))
    errors = []
    for tol in (1e-5, 1e-8):
        traj = dyn.simulate(dyn.NewtonianFlow(), W0, TOY, v0=V0, t1=2.0,
                            solver=dyn.solvers.GaussLegendre(2),
                            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol))
        errors.append(np.abs(traj.final_params - ref.final_params).max())
        assert errors[-1] < 10 * tol  # the estimate is conservative (order s+1 for 2s)
    assert errors[1] < 1e-2 * errors[0]


def test_gauss_legendre_failed_stage_solve_says_what_to_change():
    """A stage solve that does not converge at a fixed step stops the run; the error
    names the remedies (smaller step, adaptive steps, Newton–GMRES), and with
    throw=False the partial run comes back flagged (its last step is the failed one, as
    diffrax keeps a fixed step whose solve failed). One fixed-point iteration cannot
    solve the stage equations to 2e-12 at h = 0.5 on the toy (contraction ~0.5)."""
    solver = dyn.solvers.GaussLegendre(2, fallback=None, max_iterations=1)
    run = dict(t1=1.0, dt0=0.5, solver=solver, stepsize_controller=FIXED)
    with pytest.raises(RuntimeError, match="smaller dt0.*GMRES"):
        dyn.simulate(dyn.GradientFlow(), W0, TOY, **run)
    traj = dyn.simulate(dyn.GradientFlow(), W0, TOY, throw=False, **run)
    assert not traj.success and "nonlinear solver" in traj.result


def test_gauss_legendre_falls_back_to_newton_where_fixed_point_stalls():
    """At h = 1 and 2 the fixed-point iteration does not contract on this RePU(2) net
    (without the fallback the run stops at its first step); the default retries those
    steps with Newton–GMRES. Checked against two independent facts: the rescaling
    charges, quadratic invariants that any solution of the stage equations keeps
    exactly (Hairer, Lubich & Wanner, Thm. IV.2.2), hold to rounding; and the states
    equal a run whose every step Newton solves with a dense LU (another linear solver,
    the same collocation map). Then a vmapped sweep over h = 0.5 (no fallback needed)
    and h = 1 gives the same as the single runs: the retry loop runs per cell there."""
    model, loss = _small_net(dyn.RePU(2))
    # save times at step ends: between steps the Hermite dense output does not keep Q
    run = dict(t1=8.0, stepsize_controller=FIXED, ts=np.array([0.0, 4.0, 8.0]),
               monitors=(dyn.monitors.RescalingCharges(),))

    def sim(h, **solver_kwargs):
        return dyn.simulate(dyn.GradientFlow(), model, loss, dt0=h, throw=False,
                            solver=dyn.solvers.GaussLegendre(2, **solver_kwargs), **run)

    plain = sim(1.0, fallback=None)
    assert not plain.success and plain.t_final == 1.0
    dense = optx.Newton(rtol=1e-13, atol=1e-13)
    for h in (1.0, 2.0):
        traj, ref = sim(h), sim(h, root_finder=dense)
        assert traj.success and traj.t_final == 8.0
        q = traj.monitors["rescaling_charges"]
        assert np.abs(q - q[0]).max() < 1e-13 * np.abs(q[0]).max()  # rounding: ~4e-16
        diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), traj.final_params,
                            ref.final_params)
        assert max(jax.tree.leaves(diff)) < 1e-10  # both solve to ~1e-12

    def cell(h):
        return dyn.Simulation(dyn.GradientFlow(), model, loss, dt0=h,
                              solver=dyn.solvers.GaussLegendre(2), **run)

    swept = dyn.sweep(cell, {"h": [0.5, 1.0]}, progress=False).dataset
    for h in (0.5, 1.0):
        np.testing.assert_allclose(swept["rescaling_charges"].sel(h=h).values,
                                   sim(h).monitors["rescaling_charges"], rtol=1e-12)


def test_structure_preserving_solvers_bad_input():
    for s in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match="1 .*, 2 or 3"):
            dyn.solvers.GaussLegendre(s)
    with pytest.raises(ValueError, match="root_finder"):
        dyn.solvers.GaussLegendre(2, root_finder="newton")
    with pytest.raises(ValueError, match="fallback"):
        dyn.solvers.GaussLegendre(2, fallback=optx.FixedPointIteration(1e-8, 1e-8))
    gf = dict(t1=1.0, dt0=0.1, stepsize_controller=FIXED)
    for solver in (dyn.solvers.VelocityVerlet(), dyn.solvers.Yoshida4()):
        with pytest.raises(ValueError, match="NewtonianFlow"):  # a first-order flow
            dyn.simulate(dyn.GradientFlow(), W0, TOY, solver=solver, **gf)
        with pytest.raises(ValueError, match="NewtonianFlow"):  # velocity-dependent force
            dyn.simulate(dyn.HeavyBallFlow(0.5), W0, TOY, solver=solver, **gf)
    with pytest.raises(ValueError, match="HeavyBallFlow"):  # a first-order flow
        dyn.simulate(dyn.GradientFlow(), W0, TOY, solver=dyn.solvers.ConformalSymplectic(), **gf)
    with pytest.raises(ValueError, match="no error estimate"):
        dyn.simulate(dyn.NewtonianFlow(), W0, TOY, solver=dyn.solvers.VelocityVerlet(), t1=1.0)
