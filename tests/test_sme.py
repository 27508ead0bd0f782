"""`dyn.SME` in `simulate`: the VJP diffusion against the explicit D×n product, the
drifts against the gradient and modified flows, Euler–Maruyama in `simulate` against a
hand-written `lax.scan` with diffrax's own increments, batched keys, the charges' noise
law (monitors against explicit traces; one EM step's expected charge change), bad
input, and a float32 smoke run."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics import datasets, discrete, losses

RNG = np.random.default_rng(1)
N, B, ETA = 10, 3, 0.2
DATA = datasets.Dataset(RNG.normal(size=(N, 3)), RNG.integers(0, 3, N), num_classes=3)
LOSS = losses.cross_entropy(DATA)
C = (N - B) / (B * (N - 1))  # without replacement (tests/test_sgd.py enumerates it)


def _net(activation):
    return dyn.MLP((3, 4, 3), activation, key=jax.random.key(2))


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def _parts(model):
    w, static = eqx.partition(model, eqx.is_inexact_array)

    def examples(x):
        return LOSS.example_losses(eqx.combine(x, static))

    jac = jax.jacrev(examples)(w)
    J = np.concatenate([np.asarray(a).reshape(N, -1) for a in jax.tree.leaves(jac)], 1)
    return w, static, examples, J


def test_vjp_diffusion_against_the_explicit_product():
    w, _, examples, J = _parts(_net(dyn.Tanh()))
    xi = RNG.normal(size=N)
    for order in (1, 2):
        sme = dyn.SME(ETA, B, order=order)
        noise = _flat(sme.increment(0.0, w, 0.0, jnp.asarray(xi), examples))
        # √(ηc/n) Σ_i (g_i − ḡ) ξ_i, the D×n matrix formed explicitly
        np.testing.assert_allclose(noise, -np.sqrt(ETA * C / N) * J.T @ (xi - xi.mean()),
                                   rtol=0, atol=1e-15)
    # Its covariance per unit time is η Σ_b = η c Σ_1, Σ_1 the per-example covariance.
    P = np.eye(N) - 1.0 / N
    G = J - J.mean(0)
    np.testing.assert_allclose(ETA * C / N * J.T @ P @ J, ETA * C * G.T @ G / N, atol=1e-15)


@pytest.mark.parametrize("order, flow", [(1, dyn.GradientFlow()),
                                         (2, dyn.ModifiedGradientFlow(ETA))])
def test_drift_is_the_gradient_or_modified_flow(order, flow):
    w, static, examples, _ = _parts(_net(dyn.Tanh()))
    sme = dyn.SME(ETA, B, order=order)
    dt = 0.125

    def loss(x):
        return LOSS(eqx.combine(x, static))

    drift = _flat(sme.increment(0.0, w, dt, jnp.zeros(N), examples))
    np.testing.assert_allclose(drift, dt * _flat(flow.vector_field(0.0, w, loss)),
                               rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(_flat(sme.vector_field(0.0, w, loss)),
                               _flat(flow.vector_field(0.0, w, loss)), rtol=1e-13)


def test_euler_maruyama_equals_a_hand_written_scan():
    # Same key, same increments (diffrax's UnsafeBrownianPath at the same step times),
    # same VJP: equal to rounding. Fixed steps of 1/16 to t1 = 1: the step ends are
    # exact binary fractions, so diffrax's k/K·t1 and the scan's agree bitwise.
    model, key, steps = _net(dyn.Tanh()), jax.random.key(5), 16
    w0, static, examples, _ = _parts(model)
    traj = dyn.simulate(dyn.SME(ETA, B), model, LOSS, t1=1.0, dt0=1 / steps, key=key)
    s = np.sqrt(ETA * C / N)

    @jax.jit
    def scan():
        bm = diffrax.UnsafeBrownianPath(shape=(N,), key=key)

        def step(w, k):
            t0, t1 = k / steps, (k + 1) / steps
            db = bm.evaluate(t0, t1)
            _, vjp = jax.vjp(examples, w)
            return jax.tree.map(lambda a, b: a - b,
                                w, vjp((t1 - t0) / N + s * (db - db.mean()))[0]), None

        return jax.lax.scan(step, w0, jnp.arange(steps, dtype=jnp.float64))[0]

    np.testing.assert_allclose(_flat(traj.final_params), _flat(scan()), rtol=0, atol=1e-14)
    assert traj.stats["num_steps"] == steps and traj.meta["flow"] == "SME"


def test_batched_keys_are_the_single_paths():
    model = _net(dyn.Tanh())
    keys = jax.random.split(jax.random.key(0), 3)
    kw = dict(t1=0.5, dt0=0.125, ts=[0.0, 0.25, 0.5], monitors=dyn.monitors.Loss())
    paths = dyn.simulate(dyn.SME(ETA, B, order=2), model, LOSS, key=keys, **kw)
    one = dyn.simulate(dyn.SME(ETA, B, order=2), model, LOSS, key=keys[2], **kw)
    assert paths.monitors["loss"].shape == (3, 3) and not paths.diverged.any()
    np.testing.assert_allclose(paths.monitors["loss"][2], one.monitors["loss"], rtol=1e-13)
    assert np.ptp(paths.monitors["loss"][:, -1]) > 1e-4  # independent paths differ
    assert paths.to_xarray()["loss"].dims == ("path", "time")


def _charge_parts(model):
    w, static, examples, J = _parts(model)
    g = J.mean(0)
    sigma1 = (J - g).T @ (J - g) / N
    # A_i: +1 on neuron i's in-weights and bias, −1 on its out-weights (ReLU, p = 1)
    masks = []
    for i in range(4):
        tree = jax.tree.map(jnp.zeros_like, w)
        tree = eqx.tree_at(lambda m: (m.weights[0], m.biases[0], m.weights[1]), tree,
                           (tree.weights[0].at[i].set(1.0), tree.biases[0].at[i].set(1.0),
                            tree.weights[1].at[:, i].set(-1.0)))
        masks.append(_flat(tree))
    return w, static, examples, g, sigma1, np.stack(masks)


def test_noise_and_gradient_rates_against_explicit_traces():
    model = _net(dyn.ReLU())
    w, static, _, g, sigma1, masks = _charge_parts(model)
    problem = dyn._problem.Problem(dyn.SME(ETA, B), LOSS, static)
    noise = dyn.monitors.ChargeNoiseRate(ETA, B)(0.0, w, None, problem)
    grad = dyn.monitors.ChargeGradientRate(ETA)(0.0, w, None, problem)
    np.testing.assert_allclose(noise, ETA * C * masks @ np.diag(sigma1), rtol=1e-12)
    np.testing.assert_allclose(grad, ETA * masks @ g**2, rtol=1e-12)
    assert np.all(np.abs(noise) > 1e-6)


def test_one_step_changes_the_charges_by_the_noise_law():
    # Rescaling invariance makes every increment ⊥ ∇Q, so one EM step of size h changes
    # Q_i by exactly ⟨Δ, A_iΔ⟩ (pathwise), whose mean is h·(noise rate) + (h²/η)·(gradient
    # rate): the SME-1 law plus the drift's own O(h²).
    model, h, samples = _net(dyn.ReLU()), 0.05, 4000
    w, static, examples, g, sigma1, masks = _charge_parts(model)
    problem = dyn._problem.Problem(dyn.SME(ETA, B), LOSS, static)
    sme = dyn.SME(ETA, B)

    def charges(x):
        return jnp.concatenate(dyn.charges.rescaling(eqx.combine(x, static)))

    @jax.vmap
    def change(key):
        db = jnp.sqrt(h) * jax.random.normal(key, (N,))
        delta = sme.increment(0.0, w, h, db, examples)
        moved = charges(jax.tree.map(jnp.add, w, delta)) - charges(w)
        sq = jnp.concatenate(dyn.symmetries._laws.charge_inner(
            eqx.combine(delta, static), eqx.combine(delta, static), 1))
        return moved, sq

    moved, sq = map(np.asarray, change(jax.random.split(jax.random.key(0), samples)))
    np.testing.assert_allclose(moved, sq, rtol=0, atol=1e-13)  # pathwise, to rounding
    expected = (h * dyn.monitors.ChargeNoiseRate(ETA, B)(0.0, w, None, problem)
                + h**2 / ETA * dyn.monitors.ChargeGradientRate(ETA)(0.0, w, None, problem))
    z = (moved.mean(0) - expected) / (moved.std(0) / np.sqrt(samples))
    assert np.all(np.abs(z) < 4.5)  # 4 neurons: a false alarm has probability ~3e-5


def test_bad_input():
    model, key = _net(dyn.Tanh()), jax.random.key(0)
    kw = dict(t1=0.5, dt0=0.125)
    with pytest.raises(ValueError, match="order"):
        dyn.SME(ETA, B, order=3)
    with pytest.raises(ValueError, match="order-1 SME only"):
        dyn.SME(ETA, B, order=2, beta=0.5)
    with pytest.raises(ValueError, match="PRNG key is required"):
        dyn.simulate(dyn.SME(ETA, B), model, LOSS, **kw)
    with pytest.raises(ValueError, match="deterministic: drop `key`"):
        dyn.simulate(dyn.GradientFlow(), model, LOSS, key=key, **kw)
    with pytest.raises(ValueError, match="Itô SDE"):
        dyn.simulate(dyn.SME(ETA, B), model, LOSS, key=key, solver=diffrax.Heun(), **kw)
    with pytest.raises(ValueError, match="fixed steps"):
        dyn.simulate(dyn.SME(ETA, B), model, LOSS, key=key, t1=0.5,
                     stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(ValueError, match="larger than the data"):
        dyn.simulate(dyn.SME(ETA, N + 1), model, LOSS, key=key, **kw)
    with pytest.raises(ValueError, match="expose its examples"):
        dyn.simulate(dyn.SME(ETA, B), model, lambda m: LOSS(m), key=key, **kw)
    with pytest.raises(ValueError, match="integral monitors"):
        dyn.simulate(dyn.SME(ETA, B), model, LOSS, key=key,
                     monitors=dyn.monitors.EnergyLaw(), **kw)


@pytest.mark.float32
def test_sme_and_sgd_in_float32():
    model = _net(dyn.Tanh())
    traj = dyn.simulate(dyn.SME(ETA, B, order=2), model, LOSS, t1=0.5, dt0=0.125,
                        key=jax.random.key(0), monitors=dyn.monitors.Loss())
    run = discrete.run(discrete.SGD(ETA, B), model, LOSS, 4, key=jax.random.key(0),
                       monitors=(dyn.monitors.Loss(),), check_stability=False)
    for out in (traj.monitors["loss"], run.monitors["loss"]):
        assert out.dtype == np.float32 and np.all(np.isfinite(out))
        assert out[-1] < out[0]
