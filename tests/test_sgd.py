"""Minibatch SGD (`dyn.discrete.SGD`, `HeavyBallSGD`, `NesterovSGD`, `SVAG`): the
covariance factors against exact enumeration, Floyd's sampler against the uniform law,
a path against a hand-written loop, the exact per-step charge laws on every path of a
ReLU net, divergence recorded per path, per-example losses, and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import dynamics as dyn
from dynamics import datasets, discrete, losses

RNG = np.random.default_rng(0)
N, B = 24, 4
DATA = datasets.Dataset(RNG.normal(size=(N, 3)), RNG.integers(0, 2, N), num_classes=2)
LOSS = losses.cross_entropy(DATA)
RELU = dyn.MLP((3, 5, 2), dyn.ReLU(), key=jax.random.key(1))


def _per_example_grads(model, loss):
    """(n, D) per-example gradients, by jacrev of the per-example loss vector."""
    w, static = jax.tree.map(lambda x: x, dyn._tree.partition(model))
    jac = jax.jacrev(lambda w: loss.example_losses(jax.tree_util.tree_map(
        lambda a, b: a if a is not None else b, w, static, is_leaf=lambda x: x is None)))(w)
    return np.concatenate([np.asarray(j).reshape(j.shape[0], -1)
                           for j in jax.tree.leaves(jac)], axis=1)


@pytest.mark.parametrize("replacement", [True, False])
def test_batch_factor_against_exact_enumeration(replacement):
    # Every minibatch of a 6-example problem with its probability: the covariance of
    # the mean gradient, exactly, against c_b Σ_1 (Σ_1 divides by n).
    n, b = 6, 3
    g = RNG.normal(size=(n, 4))
    gbar = g.mean(0)
    sigma1 = (g - gbar).T @ (g - gbar) / n
    batches = (list(itertools.product(range(n), repeat=b)) if replacement
               else list(itertools.combinations(range(n), b)))
    means = np.stack([g[list(s)].mean(0) for s in batches])  # all equally likely
    cov = (means - gbar).T @ (means - gbar) / len(batches)
    np.testing.assert_allclose(means.mean(0), gbar, atol=1e-15)
    c = discrete.batch_factor(n, b, replacement)
    np.testing.assert_allclose(cov, c * sigma1, atol=1e-15)  # rounding of ~100 terms
    assert c == (1 / 3 if replacement else 3 / 15)


def test_floyd_sampler_is_uniform_over_subsets():
    n, b, draws = 6, 3, 20_000
    keys = jax.random.split(jax.random.key(0), draws)
    idx = np.asarray(jax.vmap(lambda k: discrete.draw_batch(k, n, b, False))(keys))
    assert np.all(np.sort(idx, 1)[:, 1:] != np.sort(idx, 1)[:, :-1])  # no repeats
    counts = {}
    for row in map(tuple, np.sort(idx, 1)):
        counts[row] = counts.get(row, 0) + 1
    assert len(counts) == 20
    chi2 = sum((c - draws / 20) ** 2 / (draws / 20) for c in counts.values())
    # 19 degrees of freedom: P(χ² > 43.8) = 0.001 under the uniform law.
    assert chi2 < scipy.stats.chi2.ppf(0.999, 19)


def test_one_path_against_a_hand_written_loop():
    # The same batches (drawn from the documented keys) and plain jax.grad on the
    # batch's mean loss, in a Python loop.
    eta, steps, key = 0.3, 6, jax.random.key(7)
    traj = discrete.run(discrete.SGD(eta, B), RELU, LOSS, steps, key=key,
                        monitors=(dyn.monitors.Loss(),), check_stability=False)
    w, static = dyn._tree.partition(RELU)

    def batch_loss(w, idx):
        model = jax.tree_util.tree_map(lambda a, s: s if a is None else a, w, static,
                                       is_leaf=lambda x: x is None)
        return jnp.mean(LOSS.example_losses(model)[idx])

    @jax.jit
    def step(w, k):  # (jitted: eager op-by-op dispatch would dominate the test's time)
        idx = discrete.draw_batch(jax.random.fold_in(jax.random.fold_in(key, k), 1), N, B,
                                  False)
        return jax.tree.map(lambda a, g: a - eta * g, w, jax.grad(batch_loss)(w, idx))

    for k in range(steps):
        w = step(w, k)
    for a, b in zip(jax.tree.leaves(traj.final_params), jax.tree.leaves(w), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)  # same operations, reordered
    assert traj.meta["algorithm"] == "SGD" and traj.ts[-1] == pytest.approx(eta * steps)
    np.testing.assert_allclose(traj.monitors["loss"][-1], LOSS(traj.final_params), rtol=1e-15)


@pytest.mark.parametrize("alg, law", [
    (discrete.SGD(0.2, B), dyn.monitors.SGDChargeDrift(0.2)),
    (discrete.HeavyBallSGD(0.2, B, 0.5), dyn.monitors.SGDChargeDrift(0.2, 0.5)),
    (discrete.NesterovSGD(0.2, B, 0.5), dyn.monitors.SGDChargeDrift(0.2, 0.5, nesterov=True)),
], ids=["sgd", "heavy_ball", "nesterov"])
def test_exact_charge_law_on_every_path(alg, law):
    # Q_{k+1} − Q_k = the law with the step's own minibatch gradient, every path and
    # step, to rounding; and the charges do move (the law is not trivially 0 = 0).
    paths = discrete.run(alg, RELU, LOSS, 20, key=jax.random.split(jax.random.key(0), 32),
                         monitors=(dyn.monitors.RescalingCharges(), law),
                         check_stability=False, save_params=False)
    q, drift = paths.monitors["rescaling_charges"], paths.monitors["sgd_charge_drift"]
    assert q.shape == (32, 21, 5) and not paths.diverged.any()
    assert np.max(np.abs(q[:, 1:] - q[:, :-1] - drift[:, :-1])) < 1e-12
    assert np.max(np.abs(q[:, -1] - q[:, 0])) > 1e-3


def test_svag_with_one_level_is_sgd():
    # ℓ = 1, order 1: r = 1, a₂ = 0, the same batch (slot 1) and update as SGD.
    keys = jax.random.split(jax.random.key(3), 4)
    kw = dict(key=keys, check_stability=False, monitors=(dyn.monitors.Loss(),))
    sgd = discrete.run(discrete.SGD(0.2, B), RELU, LOSS, 5, **kw)
    svag = discrete.run(discrete.SVAG(0.2, B, ell=1), RELU, LOSS, 5, **kw)
    np.testing.assert_allclose(svag.monitors["loss"], sgd.monitors["loss"], rtol=1e-14)


def _blowup_loss():
    # ℓ_0 = cosh(w) − 1, ℓ_1..3 = 0 (the inner `where` keeps their gradient 0, not
    # 0·∞): from w = 10 one step on example 0 (η = 1) lands at w ≈ −1.1e4, where
    # sinh overflows, so a path diverges at its second pick of example 0 (probability
    # 0.63 in 8 one-example steps) and the others stay finite.
    def fn(w, ex):
        on = ex["c"] > 0
        return jnp.where(on, jnp.cosh(jnp.where(on, w[0], 0.0)) - 1.0, 0.0)

    return losses.PerExample(fn, {"c": jnp.asarray([1.0, 0, 0, 0])})


def test_divergence_is_recorded_per_path_and_the_rest_kept():
    steps = 8
    paths = discrete.run(discrete.SGD(1.0, 1), jnp.asarray([10.0]), _blowup_loss(), steps,
                         key=jax.random.split(jax.random.key(0), 64),
                         monitors=(dyn.monitors.Function(lambda t, p, v: p[0], name="w"),),
                         check_stability=False)
    dead, alive = paths.diverged, paths.alive
    assert dead.any() and alive.any()
    w = paths.monitors["w"]
    assert np.all(np.isfinite(w[alive]))
    for i in np.flatnonzero(dead):  # NaN after the last finite iterate, finite before
        last = int(round(paths.t_final[i]))
        assert last < steps
        assert np.all(np.isfinite(w[i, : last + 1])) and np.all(np.isnan(w[i, last + 1:]))
    assert np.all(np.isfinite(np.asarray(paths.final_params)))  # frozen, not NaN
    assert paths.meta["diverged_paths"] == int(dead.sum())
    ds = paths.to_xarray()
    assert ds["w"].dims == ("path", "time") and int(ds["diverged"].sum()) == dead.sum()


def test_per_example_loss_matches_the_data_loss():
    mine = losses.PerExample(
        lambda m, ex: -jax.nn.log_softmax(m(ex["x"]))[ex["y"]], {"x": DATA.x, "y": DATA.y})
    np.testing.assert_allclose(mine.example_losses(RELU), LOSS.example_losses(RELU),
                               rtol=1e-14)
    assert mine.num_examples == N and float(mine(RELU)) == pytest.approx(float(LOSS(RELU)))
    idx = jnp.asarray([3, 3, 7])
    np.testing.assert_allclose(mine.subset(idx).example_losses(RELU),
                               LOSS.example_losses(RELU)[idx], rtol=1e-14)
    with_decay = losses.as_data_loss(LOSS + losses.l2(0.1), "test")
    np.testing.assert_allclose(with_decay(RELU), (LOSS + losses.l2(0.1))(RELU), rtol=1e-15)


def test_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="larger than the data"):
        discrete.run(discrete.SGD(0.1, N + 1), RELU, LOSS, 2, key=key)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            discrete.SGD(0.1, bad)
    with pytest.raises(ValueError, match="PRNG key"):
        discrete.run(discrete.SGD(0.1, B), RELU, LOSS, 2)
    with pytest.raises(ValueError, match="deterministic: drop `key`"):
        discrete.run(discrete.GD(0.1), RELU, LOSS, 2, key=key)
    with pytest.raises(ValueError, match="expose its examples"):
        discrete.run(discrete.SGD(0.1, B), RELU, lambda m: LOSS(m), 2, key=key)
    with pytest.raises(ValueError, match="replacement"):
        discrete.SGD(0.1, B, replacement="yes")
    with pytest.raises(ValueError, match="same first dimension"):
        losses.PerExample(lambda w, ex: ex["a"], {"a": jnp.ones(3), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match="one real scalar per example"):
        discrete.run(discrete.SGD(0.1, 1), jnp.ones(2),
                     losses.PerExample(lambda w, ex: w * ex, jnp.ones(3)), 2, key=key)
    with pytest.raises(ValueError, match="minibatch gradient of an SGD step"):
        dyn.simulate(dyn.GradientFlow(), RELU, LOSS, t1=0.1,
                     monitors=dyn.monitors.SGDChargeDrift(0.1))
    with pytest.raises(ValueError, match="SVAG draws several minibatches"):
        discrete.run(discrete.SVAG(0.1, B, 2), RELU, LOSS, 2, key=key,
                     monitors=dyn.monitors.SGDChargeDrift(0.1))
