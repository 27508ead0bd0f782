"""ChargeProjection, WeightBalancingFlow and the discrete charge laws on models that state
their rescaling units (ConvNet, RNN), in float64, against independent references: the
charges of the unprojected model, NumPy sums of Saul's V = W ⊙ ∂R/∂W, the closed form
Q(t) = Q(0) e^{−λt} and the exact per-step law of GD."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import balance

jax.config.update("jax_enable_x64", True)
KEY = jax.random.key(0)


def _conv(bias=True):
    return dyn.ConvNet(1, (2, 3), 3, 2, stride=(1, 2), image_size=5, activation=dyn.RePU(2),
                       bias=bias, key=KEY, init="lecun")


def _rnn(bias=True):
    return dyn.RNN(2, (3,), 2, activation=dyn.RePU(2), bias=bias, key=KEY, init="lecun")


def _biased(model, seed=1, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape) if a.ndim == 1 else a,
                        model)


def _data(model, n=8, seed=2):
    rng = np.random.default_rng(seed)
    shape = ((n, 1, 5, 5) if isinstance(model, dyn.ConvNet) else (n, 4, 2))
    return jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.normal(size=(n, 2)))


def _loss(model):
    x, y = _data(model)
    return lambda m: 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))


def _flat(charges):
    return np.concatenate([np.asarray(q) for q in charges])


MAKERS = pytest.mark.parametrize("make", [_conv, _rnn], ids=["conv", "rnn"])


# --------------------------------------------------------------------------- ChargeProjection


def test_charge_projection_restores_unit_charges():
    model = _biased(_rnn())
    proj = balance.ChargeProjection()
    state = proj.init(model, None)
    rng = np.random.default_rng(3)
    moved = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.normal(size=a.shape)), model)
    velocity = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), moved)
    new, v_new = proj(moved, velocity, state)
    q0, scale = _flat(state), np.abs(_flat(state)).max()
    assert np.abs(_flat(dyn.charges.rescaling(moved)) - q0).max() > 1e-3 * scale
    # Newton stops at rounding: 1e-12 of the largest charge, the bar
    np.testing.assert_allclose(_flat(dyn.charges.rescaling(new)), q0, rtol=0,
                               atol=1e-12 * scale)
    x, _ = _data(model)
    y0, y1 = np.asarray(jax.vmap(moved)(x)), np.asarray(jax.vmap(new)(x))
    # a rescaling is exact up to rounding of the multipliers (~1e-16 each)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-12 * np.abs(y0).max())
    # the velocity is pushed forward by the same (linear) map: V scales as W
    for w, w_new, v, vn in zip(jax.tree.leaves(moved), jax.tree.leaves(new),
                               jax.tree.leaves(velocity), jax.tree.leaves(v_new)):
        np.testing.assert_allclose(np.asarray(vn), np.asarray(v) * np.asarray(w_new / w),
                                   rtol=1e-12)


@MAKERS
def test_gradient_flow_with_charge_projection_keeps_unit_charges(make):
    """Euler steps of dt = 0.05 move the charges by O(dt²)‖∇L‖² a step; projected after
    every step, they stay at their initial values."""
    model = _biased(make())
    loss = _loss(model)
    q0 = _flat(dyn.charges.rescaling(model))
    scale = np.abs(q0).max()
    kw = dict(t1=1.0, solver=diffrax.Euler(), dt0=0.05, ts=jnp.linspace(0.0, 1.0, 5),
              stepsize_controller=diffrax.ConstantStepSize(),
              monitors=(dyn.monitors.RescalingCharges(), dyn.monitors.Loss()))
    step = jax.tree.map(lambda a, g: a - 0.05 * g, model, jax.grad(loss)(model))
    assert np.abs(_flat(dyn.charges.rescaling(step)) - q0).max() > 1e-6 * scale
    kept = dyn.simulate(dyn.GradientFlow(), model, loss,
                        projection=dyn.Every(balance.ChargeProjection(), steps=1), **kw)
    assert kept.monitors["loss"][-1] < 0.99 * kept.monitors["loss"][0]  # it trained
    np.testing.assert_allclose(np.asarray(kept.monitors["rescaling_charges"]),
                               np.broadcast_to(q0, (5, q0.size)), rtol=0, atol=1e-12 * scale)


# --------------------------------------------------------------------------- WeightBalancingFlow


def _np_imbalance_rnn(rnn, p, q, degree):
    """Saul's eq. 17 on the RNN in NumPy: V = |W|^p S^{q/p − 1} per row (S the row sums
    of |W|^p), Q_i = Σ_j V_in[i, j] + Σ_j V_rec[i, j] − d Σ_k V_rec[k, i] − d Σ_k V_out[k, i]
    (the self-loop with 1 − d)."""
    def v(w):
        a = np.abs(np.asarray(w)) ** p
        return a * np.sum(a, axis=1, keepdims=True) ** (q / p - 1)
    v_in, v_rec, v_out = (v(w) for w in (rnn.input_weights[0], rnn.recurrent_weights[0],
                                         rnn.output_weight))
    return v_in.sum(1) + v_rec.sum(1) - degree * v_rec.sum(0) - degree * v_out.sum(0)


def test_unit_imbalance_matches_numpy():
    rnn = _rnn(bias=False)
    for p, q in ((2.0, 2.0), (1.5, 3.0)):
        got = dyn.regularizers.imbalance(rnn, dyn.regularizers.Lpq(p, q))
        np.testing.assert_allclose(got[0], _np_imbalance_rnn(rnn, p, q, 2.0), rtol=1e-13)


@pytest.mark.parametrize("make", [pytest.param(_conv, marks=pytest.mark.slow), _rnn],
                         ids=["conv", "rnn"])
def test_weight_balancing_flow_decays_unit_imbalance_at_rate_lambda(make):
    """Saul eq. 20: Q_i(t) = Q_i(0) e^{−λt} for every unit, with zero hidden biases
    (frozen) and the output bias by gradient flow."""
    model, lam = make(), 0.7
    reg = dyn.regularizers.Lpq(2.0, 3.0)  # q ≠ p: the rank-one term of the closed form
    traj = dyn.simulate(dyn.WeightBalancingFlow(reg, lam), model, _loss(model), t1=1.0,
                        solver=diffrax.Dopri5(), ts=jnp.linspace(0.0, 1.0, 5),
                        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
                        monitors=(dyn.monitors.Imbalance(reg), dyn.monitors.Loss()))
    q = np.asarray(traj.monitors["imbalance"])
    ts = np.asarray(traj.ts)
    assert traj.monitors["loss"][-1] < traj.monitors["loss"][0]
    # the solve's error is ~1e-11 relative per unit time: 1e-8 leaves 1000x room
    np.testing.assert_allclose(q, q[0] * np.exp(-lam * ts)[:, None], rtol=0,
                               atol=1e-8 * np.abs(q[0]).max())
    hidden_biases = traj.params.biases[:-1]
    assert all(np.all(np.asarray(b) == 0) for b in hidden_biases)  # frozen at zero
    assert np.any(np.asarray(traj.params.biases[-1]) != 0)  # the output bias moved


def test_weight_balancing_flow_on_units_bad_input():
    with pytest.raises(ValueError, match="Tanh"):
        dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2, 2)).vector_field(
            0.0, dyn.ConvNet(1, (2,), 3, 2, image_size=4, activation="tanh", key=KEY),
            lambda m: 0.0)
    with pytest.raises(ValueError, match="`params` must be a model that states"):
        dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2, 2)).vector_field(
            0.0, {"w": jnp.ones(3)}, lambda m: 0.0)


# --------------------------------------------------------------------------- discrete laws


@MAKERS
def test_exact_gd_charge_law_on_units(make):
    """GD moves every unit charge by exactly η²⟨g, g⟩_M a step (symmetries._laws); the
    monitor against the measured change, and at step 0 against a NumPy sum over the
    unit's slices of the gradient."""
    model, eta = _biased(make()), 0.3
    loss = _loss(model)
    traj = dyn.discrete.run(dyn.discrete.GD(eta), model, loss, 8,
                            monitors=(dyn.monitors.RescalingCharges(),
                                      dyn.monitors.GDChargeDrift(eta)),
                            check_stability=False)
    q, drift = traj.monitors["rescaling_charges"], traj.monitors["gd_charge_drift"]
    scale = np.max(np.abs(q))
    # an algebraic identity: only rounding of Q (~1e-16 |Q| per sum) separates the two
    np.testing.assert_allclose(np.diff(q, axis=0), drift[:-1], rtol=0, atol=1e-14 * scale)
    assert np.max(np.abs(drift[:-1])) > 1e-6 * scale  # resolved, not trivially zero
    g = jax.grad(loss)(model)
    if isinstance(model, dyn.ConvNet):  # channel c of conv layer 1: p = 2
        k1, b1, k2 = (np.asarray(a) for a in (g.weights[0], g.biases[0], g.weights[1]))
        ref = (k1**2).sum((1, 2, 3)) + b1**2 - 2 * (k2**2).sum((0, 2, 3))
    else:  # the recurrent unit: its self-loop with exponent 1 − p = −1
        w_in, w_rec, w_out, b = (np.asarray(a) for a in (g.input_weights[0],
                                                         g.recurrent_weights[0],
                                                         g.output_weight, g.biases[0]))
        ref = ((w_in**2).sum(1) + b**2 + (w_rec**2).sum(1) - 2 * (w_rec**2).sum(0)
               - 2 * (w_out**2).sum(0))
    np.testing.assert_allclose(drift[0][:ref.size], eta**2 * ref, rtol=1e-12)


@pytest.mark.slow  # the GD law on the conv net (default) is its β = λ = 0 case
def test_heavy_ball_charge_law_with_weight_decay_on_a_conv_net():
    model, eta, beta, lam = _biased(_conv()), 0.05, 0.9, 0.2
    fit = _loss(model)

    def loss(m):
        return fit(m) + 0.5 * lam * sum(jnp.sum(a**2) for a in jax.tree.leaves(m))

    v0 = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), model)
    traj = dyn.discrete.run(dyn.discrete.HeavyBall(eta, beta), model, loss, 20, v0=v0,
                            monitors=(dyn.monitors.RescalingCharges(),
                                      dyn.monitors.HeavyBallChargeDrift(eta, beta, lam),
                                      dyn.monitors.ChargeForcing(eta, beta, lam)),
                            check_stability=False)
    q = traj.monitors["rescaling_charges"]
    scale = np.max(np.abs(q))
    np.testing.assert_allclose(np.diff(q, axis=0),
                               traj.monitors["heavy_ball_charge_drift"][:-1], rtol=0,
                               atol=1e-14 * scale)  # rounding of Q only
    q0, q_prev, s_prev = dyn.discrete.charge_start(model, v0, eta)
    closed = dyn.discrete.charge_closed_form(q0, traj.monitors["charge_forcing"][:-1], eta,
                                             beta, lam, q_prev, s_prev)
    # 20 steps of the recurrence summed as complex exponentials: a few 1e-13 at most
    np.testing.assert_allclose(closed, q, rtol=0, atol=1e-11 * scale)
