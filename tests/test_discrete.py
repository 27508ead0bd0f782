"""`dyn.discrete`: every algorithm against a plain numpy loop of the paper's update, the
time axis, the carried loss, projections every k steps, divergence, retracing, the exact
GD charge law, and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import discrete

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 3))
Y = RNG.normal(size=12)
W0 = np.array([0.7, -0.4, 0.9])
V0 = np.array([0.3, 0.1, -0.2])
STEPS = 30


def logcosh_loss(w):
    """A smooth nonlinear regression loss, L(w) = mean log cosh(Xw − y)."""
    r = jnp.asarray(X) @ w - jnp.asarray(Y)
    return jnp.mean(jnp.logaddexp(r, -r) - jnp.log(2.0))


def np_loss(w):
    r = X @ w - Y
    return np.mean(np.logaddexp(r, -r) - np.log(2.0))


def np_grad(w):
    return X.T @ np.tanh(X @ w - Y) / len(Y)


def numpy_reference(name, lr, beta=0.0, v0=None):
    """The paper's recurrences, literally, in numpy: iterates w_0..w_STEPS."""
    w = [W0.copy()]
    if name == "GD":
        for _ in range(STEPS):
            w.append(w[-1] - lr * np_grad(w[-1]))
    elif name == "Leapfrog":  # Głuch & Urbanke eq. 21, started by w_1 = w_0 + h v_0 − (η/2)∇L
        h = np.sqrt(lr)
        w.append(W0 + h * v0 - 0.5 * lr * np_grad(W0))
        for _ in range(STEPS - 1):
            w.append(2 * w[-1] - w[-2] - lr * np_grad(w[-1]))
    elif name == "NAGD":  # eq. 20: x_0 = y_0, x_k = y_{k−1} − s∇L(y_{k−1})
        y = W0.copy()
        for k in range(1, STEPS + 1):
            w.append(y - lr * np_grad(y))
            y = w[k] + (k - 1) / (k + 2) * (w[k] - w[k - 1])
    elif name == "HeavyBall":
        prev = W0 - lr * v0  # v_0 = (w_0 − w_{−1})/η
        for _ in range(STEPS):
            nxt = w[-1] - lr * np_grad(w[-1]) + beta * (w[-1] - prev)
            prev = w[-1]
            w.append(nxt)
    elif name == "NesterovMomentum":
        prev = W0 - lr * v0
        for _ in range(STEPS):
            y = w[-1] + beta * (w[-1] - prev)
            prev = w[-1]
            w.append(y - lr * np_grad(y))
    elif name == "ExponentiatedGD":
        for _ in range(STEPS):
            w.append(w[-1] * np.exp(-lr * np.sign(w[-1]) * np_grad(w[-1])))
    return np.stack(w)


CASES = [
    (discrete.GD(0.3), "GD", 0.3, 0.0, None, 0.3),
    (discrete.Leapfrog(0.04), "Leapfrog", 0.04, 0.0, V0, 0.2),
    (discrete.NAGD(0.04), "NAGD", 0.04, 0.0, None, 0.2),
    (discrete.HeavyBall(0.2, 0.6), "HeavyBall", 0.2, 0.6, V0, 0.2),
    (discrete.NesterovMomentum(0.2, 0.6), "NesterovMomentum", 0.2, 0.6, V0, 0.2),
    (discrete.ExponentiatedGD(0.3), "ExponentiatedGD", 0.3, 0.0, None, 0.3),
]


@pytest.mark.parametrize("alg, name, lr, beta, v0, dt", CASES, ids=[c[1] for c in CASES])
def test_against_numpy_loop(alg, name, lr, beta, v0, dt):
    traj = discrete.run(alg, jnp.asarray(W0), logcosh_loss, STEPS,
                        v0=None if v0 is None else jnp.asarray(v0),
                        monitors=(dyn.monitors.Loss(),))
    ref = numpy_reference(name, lr, beta, v0)
    # Same operations in a different order: rounding only, ~1e-15 per step over 30 steps.
    np.testing.assert_allclose(traj.params, ref, rtol=1e-12, atol=1e-12)
    # The flow's time axis: t_k = k Δt (Δt = η, or √η for Leapfrog and NAGD).
    np.testing.assert_allclose(traj.ts, dt * np.arange(STEPS + 1), rtol=1e-14)
    # The loss monitor (carried from value_and_grad or evaluated) is L of the iterate.
    np.testing.assert_allclose(traj.monitors["loss"], [np_loss(w) for w in ref], rtol=1e-12)
    assert not traj.diverged and traj.success and traj.t_final == pytest.approx(dt * STEPS)


def test_velocities_are_flow_time_differences():
    traj = discrete.run(discrete.HeavyBall(0.2, 0.6), jnp.asarray(W0), logcosh_loss, 10,
                        v0=jnp.asarray(V0))
    w, v = np.asarray(traj.params), np.asarray(traj.velocities)
    # v_k = (w_k − w_{k−1})/η by definition, and v_0 is the given one (exact up to rounding).
    np.testing.assert_allclose(v[1:], np.diff(w, axis=0) / 0.2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(v[0], V0, rtol=0, atol=0)


def test_save_every_and_mlp_params():
    model = dyn.MLP([3, 4, 1], dyn.Tanh(), key=jax.random.key(0))

    def loss(m):
        return jnp.mean((jax.vmap(m)(jnp.asarray(X))[:, 0] - jnp.asarray(Y)) ** 2)

    # The stability check compiles a Hessian Lanczos solve; test_edge_of_stability has it.
    traj = discrete.run(discrete.GD(0.1), model, loss, 12, save_every=4,
                        monitors=(dyn.monitors.Loss(),), check_stability=False)
    np.testing.assert_allclose(traj.ts, [0.0, 0.4, 0.8, 1.2], rtol=1e-14)
    assert traj.params.weights[0].shape == (4, 4, 3)
    # The saved model at index 2 is GD's 8th iterate: check it by 8 plain steps.
    m, grad = model, jax.jit(jax.grad(loss))
    for _ in range(8):
        m = jax.tree.map(lambda a, b: a - 0.1 * b, m, grad(m))
    np.testing.assert_allclose(traj.params.weights[1][2], m.weights[1], rtol=1e-13)
    np.testing.assert_allclose(traj.monitors["loss"][2], loss(m), rtol=1e-13)
    ds = traj.to_xarray()
    assert ds.attrs["algorithm"] == "GD" and ds.sizes["time"] == 4


def test_no_retrace_on_second_call():
    traces = []

    def loss(w):
        traces.append(1)  # runs at trace time only
        return logcosh_loss(w)

    kw = dict(monitors=(dyn.monitors.Loss(),), check_stability=False)
    discrete.run(discrete.GD(0.1), jnp.asarray(W0), loss, 10, **kw)
    n = len(traces)
    # Another step size and start of the same shapes: η is a traced array, no retrace.
    traj = discrete.run(discrete.GD(0.2), jnp.asarray(W0) + 1.0, loss, 10, **kw)
    assert len(traces) == n
    np.testing.assert_allclose(traj.params[1], W0 + 1.0 - 0.2 * np_grad(W0 + 1.0), rtol=1e-13)


class _UnitSphere(dyn.AbstractProjection):
    """Project w onto the unit sphere (a stand-in for a balancing fix)."""

    def __call__(self, params, velocity, state=None):
        return params / jnp.linalg.norm(params), velocity


def test_projection_every_k_steps():
    traj = discrete.run(discrete.GD(0.3), jnp.asarray(W0), logcosh_loss, 9,
                        projection=dyn.Every(_UnitSphere(), steps=3),
                        monitors=(dyn.monitors.Loss(),))
    w, ref = W0.copy(), [W0.copy()]
    for k in range(1, 10):
        w = w - 0.3 * np_grad(w)
        if k % 3 == 0:
            w = w / np.linalg.norm(w)
        ref.append(w)
    # Rounding only (9 steps).
    np.testing.assert_allclose(traj.params, np.stack(ref), rtol=1e-13)
    # The carried loss was recomputed after each projection.
    np.testing.assert_allclose(traj.monitors["loss"], [np_loss(x) for x in ref], rtol=1e-13)


def test_divergence_stops_keeps_and_says_where():
    # GD on L = exp(w²): |w| grows super-exponentially and overflows after a few steps.
    def loss(w):
        return jnp.sum(jnp.exp(w**2))

    w0 = jnp.asarray([1.5])
    traj = discrete.run(discrete.GD(0.5), w0, loss, 20, monitors=(dyn.monitors.Loss(),),
                        check_stability=False)
    ref = [1.5]
    with np.errstate(over="ignore", invalid="ignore"):
        while np.isfinite(ref[-1]) and np.isfinite(2 * ref[-1] * np.exp(ref[-1] ** 2)):
            ref.append(ref[-1] - 0.5 * 2 * ref[-1] * np.exp(ref[-1] ** 2))
    bad = len(ref) - 1  # the first non-finite iterate (or iterate with non-finite gradient)
    assert traj.diverged and not traj.success and traj.event == "non_finite"
    assert traj.meta["diverged_step"] == bad and "iterate" in traj.result
    np.testing.assert_allclose(traj.params[:, 0], ref[:bad], rtol=1e-13)
    assert traj.ts[-1] == pytest.approx(0.5 * (bad - 1)) and np.all(np.isfinite(traj.params))


def test_edge_of_stability_warns():
    # L = ½ wᵀ diag(1, 3) w: λ_max = 3, so η = 0.8 gives ηλ = 2.4 > 2 and η = 0.5 gives 1.5.
    a = jnp.asarray([1.0, 3.0])

    def loss(w):
        return 0.5 * jnp.sum(a * w**2)

    with pytest.warns(RuntimeWarning, match="edge of stability"):
        discrete.run(discrete.GD(0.8), jnp.ones(2), loss, 3)
    problem = dyn._problem.Problem(dyn.GradientFlow(), loss, None)
    # Two parameters: the Hessian is formed from 2 HVPs and diagonalised exactly.
    assert discrete.edge_of_stability(discrete.GD(0.5), problem, jnp.ones(2),
                                      warn=False) == pytest.approx(1.5, rel=1e-8)


def test_exact_gd_charge_law():
    # RePU(2) (p = 2) exercises the degree factor; the law holds on ReLU alike (the
    # discrete-gap study checks it there, under -m slow).
    activation = dyn.RePU(2)
    model = dyn.MLP([3, 5, 4, 1], activation, key=jax.random.key(1))

    def loss(m):
        return jnp.mean((jax.vmap(m)(jnp.asarray(X))[:, 0] - jnp.asarray(Y)) ** 2)

    eta = 0.05
    # The law is algebraic: it holds at any step size, even past the edge of stability
    # (RePU(2) at He init is very sharp), so the stability check is off.
    traj = discrete.run(discrete.GD(eta), model, loss, 15,
                        monitors=(dyn.monitors.RescalingCharges(),
                                  dyn.monitors.GDChargeDrift(eta)), check_stability=False)
    q, drift = traj.monitors["rescaling_charges"], traj.monitors["gd_charge_drift"]
    measured, predicted = np.diff(q, axis=0), drift[:-1]
    # An algebraic identity: only rounding of Q (~1e-16 · |Q|) separates the two.
    scale = np.max(np.abs(q))
    np.testing.assert_allclose(measured, predicted, rtol=0, atol=1e-12 * scale)
    # And the drift is not trivially zero: it is η²-small but resolved.
    assert np.max(np.abs(predicted)) > 1e-6 * scale
    # Independent check of the monitor at step 0 from a hand-written gradient split.
    g = jax.jit(jax.grad(loss))(model)
    g_in = np.sum(np.asarray(g.weights[0]) ** 2, 1) + np.asarray(g.biases[0]) ** 2
    g_out = np.sum(np.asarray(g.weights[1]) ** 2, 0)
    p = activation.degree
    np.testing.assert_allclose(drift[0][:5], eta**2 * (g_in - p * g_out), rtol=1e-12)


def test_exact_heavy_ball_charge_law():
    model = dyn.MLP([3, 5, 4, 1], dyn.RePU(2), key=jax.random.key(1))

    def loss(m):
        return jnp.mean((jax.vmap(m)(jnp.asarray(X))[:, 0] - jnp.asarray(Y)) ** 2)

    eta, beta = 0.01, 0.7
    v0 = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), model)  # momentum from step 0
    traj = discrete.run(discrete.HeavyBall(eta, beta), model, loss, 15, v0=v0,
                        monitors=(dyn.monitors.RescalingCharges(),
                                  dyn.monitors.HeavyBallChargeDrift(eta, beta)),
                        check_stability=False)
    q = traj.monitors["rescaling_charges"]
    predicted = traj.monitors["heavy_ball_charge_drift"][:-1]
    # Algebraic identity again: rounding of Q only.
    np.testing.assert_allclose(np.diff(q, axis=0), predicted, rtol=0,
                               atol=1e-12 * np.max(np.abs(q)))
    # The drift is resolved, not trivially zero.
    assert np.max(np.abs(predicted)) > 1e-6 * np.max(np.abs(q))


def _decayed_loss(lam):
    def loss(m):
        fit = jnp.mean((jax.vmap(m)(jnp.asarray(X))[:, 0] - jnp.asarray(Y)) ** 2)
        leaves = jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
        return fit + 0.5 * lam * sum(jnp.sum(x**2) for x in leaves)

    return loss


@pytest.mark.parametrize("beta", [0.0, 0.9], ids=["gd", "heavy_ball"])
def test_charge_laws_with_weight_decay(beta):
    # GD / heavy ball on L + (λ/2)‖w‖², RePU(2) (p = 2). β = 0.9 with ηλ = 0.01 >
    # (1 − √β)² = 0.0026 is the underdamped case: a² = 1.89² < 4β, the damped oscillator.
    model = dyn.MLP([3, 5, 4, 1], dyn.RePU(2), key=jax.random.key(1))
    eta, lam, steps = 0.05, 0.2, 40
    alg = discrete.GD(eta) if beta == 0 else discrete.HeavyBall(eta, beta)
    drift = (dyn.monitors.GDChargeDrift(eta, lam) if beta == 0
             else dyn.monitors.HeavyBallChargeDrift(eta, beta, lam))
    v0 = None if beta == 0 else jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), model)
    traj = discrete.run(alg, model, _decayed_loss(lam), steps, v0=v0,
                        monitors=(dyn.monitors.RescalingCharges(), drift,
                                  dyn.monitors.ChargeForcing(eta, beta, lam)),
                        check_stability=False)
    q = traj.monitors["rescaling_charges"]
    scale = np.max(np.abs(q))
    # One step: an algebraic identity, rounding of Q only.
    np.testing.assert_allclose(np.diff(q, axis=0), traj.monitors[drift.name][:-1], rtol=0,
                               atol=1e-12 * scale)
    # The closed form from the start and the recorded forcing: 40 steps of the exact
    # recurrence, summed as complex exponentials (the eigenvector matrix is
    # well-conditioned here), so rounding grows to a few 1e-13 of |Q| at most.
    q0, q_prev, s_prev = discrete.charge_start(model, v0, eta)
    forcing = traj.monitors["charge_forcing"][:-1]
    closed = discrete.charge_closed_form(q0, forcing, eta, beta, lam, q_prev, s_prev)
    np.testing.assert_allclose(closed, q, rtol=0, atol=1e-11 * scale)
    # The decay is resolved: Q moves by O(1) of itself, far above the tolerance.
    assert np.max(np.abs(q[-1] - q[0])) > 0.1 * scale


def test_charge_closed_form_is_the_damped_oscillator():
    # Zero gradient (L = 0, decay only): w_{k+1} = a w_k − β w_{k−1} exactly, in numpy,
    # independent of the derivation; Q from those iterates against the closed form.
    eta, beta, lam = 0.1, 0.9, 0.5  # a = 1.85, a² = 3.42 < 4β = 3.6: underdamped
    model = dyn.MLP([3, 5, 1], dyn.ReLU(), key=jax.random.key(2))
    v0 = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), model)
    a = 1 + beta - eta * lam
    w_in = [np.asarray(model.weights[0]), np.asarray(model.biases[0])]
    w_out = np.asarray(model.weights[1])

    def charge(w_in, w_out):  # Q_i = ‖W_1[i, :]‖² + b_i² − ‖W_2[:, i]‖² (ReLU, p = 1)
        return np.sum(w_in[0] ** 2, 1) + w_in[1] ** 2 - np.sum(w_out**2, 0)

    prev_in = [x - eta * 0.3 for x in w_in]
    prev_out = w_out - eta * 0.3
    qs = [charge(w_in, w_out)]
    for _ in range(60):
        nxt_in = [a * x - beta * p for x, p in zip(w_in, prev_in, strict=True)]
        nxt_out = a * w_out - beta * prev_out
        prev_in, prev_out, w_in, w_out = w_in, w_out, nxt_in, nxt_out
        qs.append(charge(w_in, w_out))
    q0, q_prev, s_prev = discrete.charge_start(model, v0, eta)
    closed = discrete.charge_closed_form(q0, np.zeros((60, 5)), eta, beta, lam, q_prev,
                                         s_prev)
    # Rounding only (60 products of a 3x3 recurrence).
    np.testing.assert_allclose(closed, np.stack(qs), rtol=0, atol=1e-13 * np.max(np.abs(qs)))
    # The damped oscillator: Q_k / β^k = c₀ + c₁ cos 2kφ + c₂ sin 2kφ, cos φ = a/(2√β),
    # fitted by least squares to the numpy iterates (60 steps, more than a half-period).
    phi = np.arccos(a / (2 * np.sqrt(beta)))
    k = np.arange(61)
    assert np.pi / (2 * phi) < 60
    basis = np.stack([np.ones(61), np.cos(2 * k * phi), np.sin(2 * k * phi)], 1)
    scaled = np.stack(qs) / beta ** k[:, None]
    coef = np.linalg.lstsq(basis, scaled, rcond=None)[0]
    # Rounding only, amplified by β^{−60} ≈ 550 at the last step.
    np.testing.assert_allclose(basis @ coef, scaled, rtol=0, atol=1e-10 * np.max(np.abs(scaled)))
    assert np.min(np.abs(coef[1:]).max(0)) > 1e-3 * np.max(np.abs(coef))  # it oscillates


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: discrete.GD(0.0), "eta"),
        (lambda: discrete.GD(-1.0), "eta"),
        (lambda: discrete.NAGD(float("nan")), "`s`"),
        (lambda: discrete.HeavyBall(0.1, 1.0), "beta"),
        (lambda: discrete.NesterovMomentum(0.1, -0.1), "beta"),
        (lambda: dyn.monitors.GDChargeDrift(0.0), "eta"),
        (lambda: dyn.monitors.HeavyBallChargeDrift(0.1, 0.5, -1.0), "weight_decay"),
        (lambda: dyn.monitors.ChargeForcing(0.1, 1.0), "beta"),
        (lambda: discrete.charge_closed_form(np.ones(3), np.ones((4, 2)), 0.1), "forcing"),
        (lambda: discrete.charge_closed_form(np.ones(3), np.ones((4, 3)), 0.1, 0.5), "q_prev"),
        (lambda: dyn.ModifiedHeavyBallFlow(0.1, 1.5), "beta"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "alg, kwargs, match",
    [
        (discrete.GD(0.1), dict(steps=0), "steps"),
        (discrete.GD(0.1), dict(steps=10, save_every=3), "multiple"),
        (discrete.GD(0.1), dict(steps=10, v0=jnp.zeros(3)), "first-order"),
        (discrete.HeavyBall(0.1, 0.5), dict(steps=10, v0=jnp.zeros(2)), "v0"),
        (discrete.NAGD(0.1), dict(steps=10, v0=jnp.ones(3)), "rest"),
        (discrete.GD(0.1), dict(steps=10, projection=_UnitSphere()), "Every"),
        (discrete.GD(0.1), dict(steps=10, monitors=("loss",)), "monitors"),
        ("gd", dict(steps=10), "alg"),
    ],
)
def test_bad_run_arguments(alg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        discrete.run(alg, jnp.asarray(W0), logcosh_loss, **kwargs)


class _Truncating(dyn.AbstractProjection):
    def __call__(self, params, velocity, state=None):
        return params[:1], velocity


class _ParamsOnly(dyn.AbstractProjection):
    def __call__(self, params, velocity, state=None):
        return params


def test_raw_errors_are_value_errors_naming_the_argument():
    """Each of these raised a raw jax error (TypeError, OverflowError, a lax.cond type
    mismatch) or a TypeError from iterating a monitor."""
    w = jnp.asarray(W0)
    with pytest.raises(ValueError, match="`loss` must return a real scalar"):
        discrete.run(discrete.GD(0.1), w, lambda w: w**2, 10)
    with pytest.raises(ValueError, match="`steps` must be at most 2147483646"):
        discrete.run(discrete.GD(0.1), w, logcosh_loss, 2**31)
    with pytest.raises(ValueError, match="`projection` _Truncating returned params with shape"):
        discrete.run(discrete.GD(0.1), w, logcosh_loss, 10,
                     projection=dyn.Every(_Truncating(), steps=2))
    with pytest.raises(ValueError, match="`projection` _ParamsOnly must return the pair"):
        discrete.run(discrete.GD(0.1), w, logcosh_loss, 10,
                     projection=dyn.Every(_ParamsOnly(), steps=2))
    # One monitor is accepted, as simulate accepts it.
    one = discrete.run(discrete.GD(0.1), w, logcosh_loss, 4, monitors=dyn.monitors.Loss(),
                       check_stability=False)
    many = discrete.run(discrete.GD(0.1), w, logcosh_loss, 4, monitors=(dyn.monitors.Loss(),),
                        check_stability=False)
    np.testing.assert_array_equal(one.monitors["loss"], many.monitors["loss"])


def test_exponentiated_gd_rejects_zero_weights():
    with pytest.raises(ValueError, match="non-zero"):
        discrete.run(discrete.ExponentiatedGD(0.1), jnp.asarray([1.0, 0.0, 2.0]),
                     logcosh_loss, 3)


def test_algorithms_know_their_flows():
    assert isinstance(discrete.GD(0.1).flow, dyn.GradientFlow)
    assert isinstance(discrete.Leapfrog(0.1).flow, dyn.NewtonianFlow)
    assert isinstance(discrete.NAGD(0.1).flow, dyn.NesterovFlow)
    k1, k2 = discrete.HeavyBall(0.1, 0.5).flow.kappas(0.0)
    # κ1 = 1 − β, κ2 = η(1 + β)/2 (Kunin et al. 2021).
    assert (float(k1), float(k2)) == pytest.approx((0.5, 0.075), rel=1e-15)
    flow = discrete.ExponentiatedGD(0.1).flow
    w = jnp.asarray([0.5, -2.0, 1.0])
    # Mirror flow of Σ|w|log|w| − |w| is ẇ = −|w| ⊙ ∇L.
    np.testing.assert_allclose(flow.vector_field(0.0, w, logcosh_loss),
                               -np.abs(w) * np_grad(np.asarray(w)), rtol=1e-12)
    assert not eqx.tree_equal(discrete.GD(0.1), discrete.GD(0.2))
