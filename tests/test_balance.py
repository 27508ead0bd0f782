"""Tests of dyn.balance: the balancing fixes against independent references (scipy's
convex solve in the log-scales, closed forms, NumPy) in float64."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import dynamics as dyn
from dynamics import balance

ARCHS = ((3, 4, 2), (3, 5, 4, 2), (2, 3, 3, 3, 2))
X = np.random.default_rng(0).normal(size=(16, 5))


def _net(widths, activation=dyn.ReLU(), bias=True, seed=0):
    model = dyn.MLP(widths, activation, bias=bias, key=jax.random.key(seed))
    if bias:
        # Non-zero biases, so that the bias rescaling is exercised.
        rng = np.random.default_rng(seed + 1)
        biases = tuple(jnp.asarray(rng.normal(size=b.shape)) for b in model.biases)
        model = eqx.tree_at(lambda m: m.biases, model, biases)
    return model


def _out(model):
    return np.asarray(jax.vmap(model)(X[:, : model.widths[0]]))


def _np_lpq(weights, p, q):
    return sum(np.sum(np.sum(np.abs(np.asarray(w)) ** p, axis=1) ** (q / p))
               for w in weights) ** (1 / q)


def _scipy_min_norm(model, p, q, d):
    """min over u of Σ_i (Σ_j |W_ij|^p e^{p(u_i − d u_j)})^{q/p}: convex in u (Saul eq.
    30), solved by scipy's BFGS with its gradient by finite-free NumPy algebra."""
    ws = [np.abs(np.asarray(w)) ** p for w in model.weights]
    sizes = [w.shape[0] for w in ws[:-1]]
    cuts = np.cumsum([0] + sizes)

    def split(u):
        return [u[cuts[k]:cuts[k + 1]] for k in range(len(sizes))]

    def f(u):
        us = split(u)
        total, grads = 0.0, [np.zeros(n) for n in sizes]
        for k, m in enumerate(ws):
            e = np.zeros(m.shape)
            if k < len(ws) - 1:
                e = e + us[k][:, None]
            if k > 0:
                e = e - d * us[k - 1][None, :]
            mm = m * np.exp(p * e)
            s = mm.sum(axis=1)
            total += np.sum(s ** (q / p))
            ds = (q / p) * s ** (q / p - 1)  # d/ds of s^{q/p}
            if k < len(ws) - 1:
                grads[k] += ds * p * s
            if k > 0:
                grads[k - 1] += -d * p * (ds[:, None] * mm).sum(axis=0)
        return total, np.concatenate(grads)

    res = scipy.optimize.minimize(f, np.zeros(cuts[-1]), jac=True, method="BFGS",
                                  options={"gtol": 1e-13, "maxiter": 10000})
    return res.fun ** (1 / q)


# --------------------------------------------------------------------------- properties

FIXES = ("min_norm", "layer", "enorm")


@settings(max_examples=4, deadline=None)
@given(
    arch=st.sampled_from(ARCHS[:2]),
    act=st.sampled_from([dyn.ReLU(), dyn.RePU(2), dyn.Identity(), dyn.LeakyReLU(0.1)]),
    bias=st.booleans(),
    p=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    q=st.sampled_from([1.0, 2.0, 3.0]),
    fix=st.sampled_from(FIXES),
    seed=st.integers(0, 5),
)
def test_fix_properties(arch, act, bias, p, q, fix, seed):
    model = _net(arch, act, bias, seed)
    if fix == "min_norm":
        run = lambda m: balance.min_norm_fix(m, p, q, tol=1e-12, max_iter=20000)  # noqa: E731
    elif fix == "enorm":
        run = lambda m: balance.enorm(m, p, tol=1e-12, max_sweeps=20000)  # noqa: E731
    else:
        run = lambda m: balance.neuron_balance(  # noqa: E731
            m, p, fix, include_bias=bias, tol=1e-12, max_sweeps=20000)
    new, info = run(model)
    y0, y1 = _out(model), _out(new)
    # Rescaling is exact up to rounding in a product of a few factors per weight.
    np.testing.assert_allclose(y1, y0, rtol=1e-10, atol=1e-10 * np.abs(y0).max())
    n = int(info.num_steps)
    vals = np.asarray(info.values[: n + 1])
    assert np.all(np.isfinite(vals)) and np.all(np.isnan(np.asarray(info.values[n + 1:])))
    # Never increases (Saul Thm 1; Baldi et al. Thm 34): up to rounding of the sums.
    assert np.all(np.diff(vals) <= 1e-12 * vals[0])
    assert bool(info.converged)
    again, _ = run(new)
    # Idempotent at convergence: the second run moves no weight beyond the tolerance.
    for a, b in zip(again.weights, new.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- Saul


@pytest.mark.parametrize("p,q,act", [(2.0, 2.0, dyn.ReLU()), (1.0, 3.0, dyn.ReLU()),
                                     (3.0, 1.5, dyn.RePU(2)), (1.5, 1.0, dyn.RePU(2))])
def test_min_norm_fix_matches_scipy(p, q, act):
    model = _net((3, 5, 4, 2), act, seed=3)
    d = float(act.degree)
    new, info = balance.min_norm_fix(model, p, q, tol=1e-12, max_iter=20000)
    ref = _scipy_min_norm(model, p, q, d)
    got = _np_lpq(new.weights, p, q)
    # Both at the convex minimum; scipy's BFGS stops at gradient 1e-13.
    np.testing.assert_allclose(got, ref, rtol=1e-8)
    np.testing.assert_allclose(float(balance.lpq_norm(new, p, q)), got, rtol=1e-12)
    vals = np.asarray(info.values[: int(info.num_steps) + 1])
    # Monotone history (Saul Thm 1), up to rounding of the sum once converged.
    assert np.all(np.diff(vals) <= 1e-14 * vals[0])
    assert vals[-1] < vals[0] * (1 - 1e-3)  # the He initialisation is far from balanced


def test_min_norm_fix_is_saul_eq8_for_relu():
    """One iteration of our log-scale form against eq. (8) written out in NumPy."""
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=False, seed=2)
    p, q = 1.5, 3.0
    new, info = balance.min_norm_fix(model, p, q, max_iter=1)
    assert int(info.num_steps) == 1
    w = [np.asarray(x) for x in model.weights]
    rho = [np.sum(np.abs(x) ** p, axis=1) ** (q / p) for x in w]
    pi = [np.abs(x) ** p / np.sum(np.abs(x) ** p, axis=1, keepdims=True) for x in w]
    a = [((rho[h + 1] @ pi[h + 1]) / rho[h]) ** (1 / (4 * max(p, q))) for h in range(2)]
    ref = [w[0] * a[0][:, None], w[1] * a[1][:, None] / a[0][None, :], w[2] / a[1][None, :]]
    for x, y in zip(new.weights, ref):
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-13)  # the same arithmetic


# --------------------------------------------------------------------------- Baldi


@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("act", [dyn.ReLU(), dyn.RePU(2)], ids=["relu", "repu2"])
def test_all_schedules_reach_min_norm(p, act):
    model = _net((3, 5, 4, 2), act, bias=False, seed=4)
    ref, _ = balance.min_norm_fix(model, p, p, tol=1e-13, max_iter=50000)
    runs = [balance.neuron_balance(model, p, s, key=jax.random.key(1), tol=1e-13,
                                   max_sweeps=5000)[0]
            for s in ("sequential", "stochastic", "layer")]
    runs.append(balance.enorm(model, p, tol=1e-13, max_sweeps=5000)[0])
    for new in runs:
        for a, b in zip(new.weights, ref.weights):
            # Unique optimum (Baldi et al. Thms 34, 42); both stopped at |λ − 1| < 1e-13.
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_regularizer_root_solve_matches_closed_form():
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=True, seed=5)
    closed, _ = balance.neuron_balance(model, 3.0, "layer", include_bias=True)
    solved, _ = balance.neuron_balance(model, 3.0, "layer", include_bias=True,
                                       regularizer=lambda a: a**3)
    for a, b in zip(solved.weights, closed.weights):
        # The Newton root solve stops at rtol 1e-12 in log λ.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9)


def test_regularizer_balance_is_stationary():
    """For g(a) = a² + a⁴ every neuron ends at ∂/∂s [Σ g(e^s x) + Σ g(e^{-s} y)] = 0."""
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=False, seed=6)
    g = lambda a: a**2 + a**4  # noqa: E731
    new, info = balance.neuron_balance(model, schedule="layer", regularizer=g)
    w = [np.abs(np.asarray(x)) for x in new.weights]
    for h in range(2):
        x, y = w[h], w[h + 1].T
        grad = np.sum(2 * x**2 + 4 * x**4, axis=1) - np.sum(2 * y**2 + 4 * y**4, axis=1)
        scale = np.sum(2 * x**2 + 4 * x**4, axis=1)
        assert np.all(np.abs(grad) <= 1e-8 * scale)  # tol 1e-10 in λ, a few sweeps' slack
    vals = np.asarray(info.values[: int(info.num_steps) + 1])
    ref = sum(np.sum(g(np.abs(np.asarray(x)))) for x in model.weights)
    np.testing.assert_allclose(vals[0], ref, rtol=1e-13)  # objective = Σ g(|w|)
    assert np.all(np.diff(vals) <= 1e-14 * vals[0])  # monotone up to rounding
    assert vals[-1] < vals[0] * 0.99  # and it did move


@pytest.mark.parametrize("act", [dyn.ReLU(), dyn.RePU(2)], ids=["relu", "repu2"])
def test_tied_layer_closed_form(act):
    """Tied balancing of layer log-scales s_h (one per hidden layer): with t_k =
    p(s_k − d s_{k−1}) the objective is Σ_k N_k e^{t_k}, N_k = ‖W_k‖_p^p, under the one
    constraint Σ_k d^{K−1−k} t_k = 0 (s_{−1} = s_{K−1} = 0). Lagrange: N_k' = μ d^{K−1−k}
    with log μ = Σ c_k (log N_k − log c_k) / Σ c_k, c_k = d^{K−1−k}; for d = 1 every layer
    ends at the geometric mean of the initial layer norms, which is Baldi et al.'s
    eq. (49) for p = 2 (their "M_i = λ_i/Λ_{i−1}" before eq. 46 should read Λ_i/Λ_{i−1});
    the d ≠ 1 weights c_k are derived here."""
    p, d = 2.0, float(act.degree)
    model = _net((3, 5, 4, 2), act, bias=False, seed=7)
    new, _ = balance.neuron_balance(model, p, "tied", tol=1e-13)
    n0 = np.array([np.sum(np.abs(np.asarray(w)) ** p) for w in model.weights])
    c = d ** np.arange(len(n0) - 1, -1, -1)
    log_mu = np.sum(c * (np.log(n0) - np.log(c))) / np.sum(c)
    ref = np.exp(log_mu) * c
    got = np.array([np.sum(np.abs(np.asarray(w)) ** p) for w in new.weights])
    np.testing.assert_allclose(got, ref, rtol=1e-10)  # converged at |λ − 1| < 1e-13
    if d == 1:
        np.testing.assert_allclose(got, np.exp(np.mean(np.log(n0))), rtol=1e-10)


# --------------------------------------------------------------------------- degenerate units


@pytest.mark.parametrize("fix", ["min_norm", "sequential", "stochastic", "layer", "tied",
                                 "enorm", "charge"])
def test_zero_units_left_alone(fix):
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=False, seed=8)
    w0 = model.weights[0].at[1].set(0.0)  # unit (layer 1, #1): no in-weights
    w1 = model.weights[1].at[:, 3].set(0.0)  # unit (layer 1, #3): no out-weights
    w2 = model.weights[2].at[:, 0].set(0.0)  # unit (layer 2, #0): no out-weights
    model = eqx.tree_at(lambda m: m.weights, model, (w0, w1, w2))
    if fix == "min_norm":
        new, info = balance.min_norm_fix(model, 2, 3)
        u = info.log_scales
    elif fix == "enorm":
        new, info = balance.enorm(model)
        u = info.log_scales
    elif fix == "charge":
        perturbed = eqx.tree_at(lambda m: m.weights, model,
                                tuple(1.05 * w for w in model.weights))
        new, _ = balance.ChargeProjection()(perturbed, None, balance.ChargeProjection().init(
            model, None))
        u = None
    else:
        new, info = balance.neuron_balance(model, 2, fix, key=jax.random.key(0))
        u = info.log_scales
    assert all(np.all(np.isfinite(np.asarray(w))) for w in new.weights)
    if u is not None and fix != "tied":  # tied moves whole layers, dead units with them
        assert float(u[0][1]) == 0.0 and float(u[0][3]) == 0.0 and float(u[1][0]) == 0.0
    # The dead units' own weights stay exactly zero.
    assert np.all(np.asarray(new.weights[0][1]) == 0.0)
    assert np.all(np.asarray(new.weights[1][:, 3]) == 0.0)


# --------------------------------------------------------------------------- projections


# One hidden layer (diagonal Newton system), two and three (Schur complements chained
# through the block-tridiagonal solve), with and without biases, d = 1 and d = 2.
@pytest.mark.parametrize("widths,activation,bias", [
    ((3, 5, 4, 2), dyn.RePU(2), True), ((3, 4, 2), dyn.ReLU(), False),
    ((2, 4, 3, 5, 2), dyn.Polynomial(2), True)])
def test_charge_projection_restores_charges_and_pushes_velocity(widths, activation, bias):
    model = _net(widths, activation, bias=bias, seed=9)
    proj = balance.ChargeProjection()
    state = proj.init(model, None)
    # Move off the charge level set by a step of (non-conservative) noise.
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape)), model)
    velocity = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), moved)
    new, v_new = proj(moved, velocity, state)
    for a, b in zip(dyn.charges.rescaling(new), state):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12 * scale)
    y0, y1 = _out(moved), _out(new)
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12 * np.abs(y0).max())
    # Idempotent: on the level set already, Newton stays at u = 0 (to rounding).
    again, _ = proj(new, None, state)
    for a, b in zip(again.weights, new.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
    # Push-forward: V_ij scales exactly as W_ij does (the rescaling is linear).
    for w, w_new, v, v_new_k in zip(moved.weights, new.weights, velocity.weights,
                                    v_new.weights):
        np.testing.assert_allclose(np.asarray(v_new_k), np.asarray(v) * np.asarray(w_new / w),
                                   rtol=1e-12)
    _, v_keep = balance.ChargeProjection(velocity="keep")(moved, velocity, state)
    assert v_keep is velocity
    _, v_zero = balance.ChargeProjection(velocity="zero")(moved, velocity, state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(v_zero))


def test_projections_match_functions():
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=True, seed=10)
    fn, _ = balance.min_norm_fix(model, 1.5, 2.5)
    pr, v = balance.MinNormFix(1.5, 2.5)(model, None)
    assert v is None
    for a, b in zip(fn.weights + fn.biases, pr.weights + pr.biases):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)  # same code
    fn, _ = balance.neuron_balance(model, 2, "layer")
    pr, _ = balance.NeuronBalance(2, "layer")(model, None)
    for a, b in zip(fn.weights, pr.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)  # same code
    fn, _ = balance.enorm(model, 2, c=1.5)
    pr, _ = balance.ENorm(2, c=1.5)(model, None)
    for a, b in zip(fn.weights, pr.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)  # same code
    assert isinstance(balance.MinNormFix(), dyn.AbstractProjection)


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    tanh = _net((3, 4, 2), dyn.Tanh())
    relu = _net((3, 4, 2))
    with pytest.raises(ValueError, match="Tanh"):
        balance.min_norm_fix(tanh)
    with pytest.raises(ValueError, match="Tanh"):
        balance.neuron_balance(tanh)
    with pytest.raises(ValueError, match="Tanh"):
        balance.MinNormFix()(tanh, None)
    with pytest.raises(ValueError, match="Tanh"):
        balance.ChargeProjection().init(tanh, None)
    with pytest.raises(ValueError, match="`p`"):
        balance.min_norm_fix(relu, p=0.5)
    with pytest.raises(ValueError, match="`q`"):
        balance.MinNormFix(q=0.9)
    with pytest.raises(ValueError, match="`p`"):
        balance.neuron_balance(relu, p=0.5)
    with pytest.raises(ValueError, match="key"):
        balance.neuron_balance(relu, schedule="stochastic")
    with pytest.raises(ValueError, match="key"):
        balance.NeuronBalance(schedule="stochastic")
    with pytest.raises(ValueError, match="NeuronBalance.*`key`"):
        balance.NeuronBalance(schedule="stochastic", key="seed")
    with pytest.raises(ValueError, match="schedule"):
        balance.neuron_balance(relu, schedule="random")
    with pytest.raises(ValueError, match="velocity"):
        balance.MinNormFix(velocity="reflect")
    with pytest.raises(ValueError, match="`c`"):
        balance.enorm(relu, c=0.0)
    with pytest.raises(ValueError, match="regularizer"):
        balance.neuron_balance(relu, regularizer=2.0)


@pytest.mark.parametrize("trainable", [True, False])
def test_swish_rejected_by_every_fix(trainable):
    # A rescaling of the weights alone is function-preserving only for positively
    # homogeneous units; Swish with trainable β needs β_i -> β_i/a_i too, which no fix does.
    swish = _net((3, 4, 2), dyn.Swish(trainable=trainable))
    doubled = eqx.tree_at(lambda m: (m.weights[0], m.weights[1]), swish,
                          (2.0 * swish.weights[0], 0.5 * swish.weights[1]))
    assert np.abs(_out(doubled) - _out(swish)).max() > 1e-3  # why the fixes must refuse
    match = "Swish\\(trainable=True\\)" if trainable else "Swish, which is not positively"
    calls = (lambda: balance.min_norm_fix(swish), lambda: balance.neuron_balance(swish),
             lambda: balance.enorm(swish), lambda: balance.MinNormFix()(swish, None),
             lambda: balance.NeuronBalance()(swish, None), lambda: balance.ENorm()(swish, None),
             lambda: balance.ChargeProjection().init(swish, None),
             lambda: balance.ChargeProjection()(swish, None))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=match):  # inside simulate, at trace time
        dyn.simulate(dyn.GradientFlow(), swish, lambda m: jnp.sum(m(jnp.ones(3)) ** 2),
                     t1=0.1, dt0=0.05, solver=diffrax.Euler(),
                     stepsize_controller=diffrax.ConstantStepSize(),
                     projection=dyn.Every(balance.MinNormFix(), steps=1))


def _np_min_norm_residual(weights, p, q, d):
    """Worst relative violation of the stationarity of ‖W‖_{p,q}^q in the log-scales:
    ρ_i = d Σ_k ρ_k π_ki at every hidden unit (Saul eq. 8's fixed point, a_i = 1)."""
    ws = [np.abs(np.asarray(w)) ** p for w in weights]
    rows = [w.sum(axis=1) for w in ws]
    rho = [r ** (q / p) for r in rows]
    worst = 0.0
    for h in range(len(ws) - 1):
        out = d * (rho[h + 1] / rows[h + 1]) @ ws[h + 1]
        worst = max(worst, np.max(np.abs(rho[h] - out) / (rho[h] + out)))
    return worst


def test_fixes_inside_simulate():
    # RePU(2): smooth and 2-homogeneous, so Euler's charge drift is a clean O(dt²) per
    # step (ReLU's Filippov kinks would blur it); the projections must undo it.
    model = _net((3, 5, 4, 2), dyn.RePU(2), bias=True, seed=11)
    model = jax.tree.map(lambda a: 0.5 * a, model)  # outputs O(1): a degree-4 network
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.normal(size=(32, 3))), jnp.asarray(rng.normal(size=(32, 2)))

    def loss(m):
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))

    kw = dict(t1=1.0, solver=diffrax.Euler(), dt0=0.01,
              stepsize_controller=diffrax.ConstantStepSize(), ts=jnp.linspace(0.0, 1.0, 11),
              monitors=(dyn.monitors.RescalingCharges(),))
    q0 = np.concatenate([np.asarray(q) for q in dyn.charges.rescaling(model)])
    scale = np.abs(q0).max()
    # One Euler step alone moves the charges by O(dt²)·‖∇L‖², far above the bar below.
    step = jax.tree.map(lambda a, g: a - 0.01 * g, model, jax.grad(loss)(model))
    q1 = np.concatenate([np.asarray(q) for q in dyn.charges.rescaling(step)])
    assert np.abs(q1 - q0).max() > 1e-6 * scale
    charged = dyn.simulate(dyn.GradientFlow(), model, loss,
                           projection=dyn.Every(balance.ChargeProjection(), steps=1), **kw)
    # Newton stops at rounding; 1e-12 is the bar for the targeted quantity.
    np.testing.assert_allclose(np.asarray(charged.monitors["rescaling_charges"]),
                               np.broadcast_to(q0, (11, q0.size)), rtol=0, atol=1e-12 * scale)
    assert np.isfinite(np.asarray(charged.actions)).sum() == 100  # one per Euler step
    # MinNormFix every 10 steps: the saves fall on action times (right-continuous path),
    # so each saved network is at its least ℓ_{2,3} norm (the fixed point of Saul eq. 8).
    fixed = dyn.simulate(dyn.GradientFlow(), model, loss,
                         projection=dyn.Every(balance.MinNormFix(2, 3, tol=1e-12), steps=10),
                         **kw)
    weights = [np.asarray(w) for w in fixed.params.weights]
    # tol 1e-12 on the update factors leaves a stationarity residual of that order.
    assert all(_np_min_norm_residual([w[k] for w in weights], 2, 3, 2) < 1e-10
               for k in range(1, 11))
    assert _np_min_norm_residual([w[0] for w in weights], 2, 3, 2) > 1e-3  # W0 is not
    np.testing.assert_allclose(np.asarray(fixed.actions)[:10], np.linspace(0.1, 1.0, 10),
                               rtol=1e-12)


def test_nan_weight_is_refused_or_not_converged():
    """min_norm_fix on a NaN weight left every scale at 1 and reported converged=True."""
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=False, seed=4)
    bad = eqx.tree_at(lambda m: m.weights[1], model, model.weights[1].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"min_norm_fix: `model` has NaN or Inf at .weights\[1\]"):
        balance.min_norm_fix(bad)
    with pytest.raises(ValueError, match="neuron_balance: `model` has NaN"):
        balance.neuron_balance(bad)
    # Traced (inside a solve, a jitted step) there is nothing to raise: not converged.
    converged = eqx.filter_jit(lambda m: balance.min_norm_fix(m)[1].converged)(bad)
    assert not bool(converged)
    assert bool(eqx.filter_jit(lambda m: balance.min_norm_fix(m)[1].converged)(model))


def test_stochastic_schedule_takes_an_int_seed():
    """An int seed is a key (README): `key=1` raised a raw TypeError in jax.random."""
    model = _net((3, 5, 4, 2), dyn.ReLU(), bias=False, seed=4)
    by_seed, info = balance.neuron_balance(model, 2.0, "stochastic", key=1, tol=1e-10)
    by_key, _ = balance.neuron_balance(model, 2.0, "stochastic", key=jax.random.key(1),
                                       tol=1e-10)
    assert bool(info.converged)
    for a, b in zip(by_seed.weights, by_key.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
