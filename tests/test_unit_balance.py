"""`neuron_balance` on models that state their rescaling units (RNN, ConvNet,
ResidualMLP): the balanced network against `scipy.optimize.minimize` on the same convex
objective in the units' log-scales, written out here by hand per architecture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import dynamics as dyn

KEY = jax.random.key(0)


def _biased(model, scale=0.1):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape) if a.ndim == 1 else a,
                        model)


def _rnn(activation):
    return _biased(dyn.RNN(3, (4, 3), 2, activation=activation, key=KEY, init="lecun"))


def _conv():
    return _biased(dyn.ConvNet(2, (3, 4), 3, 2, stride=(1, 2), padding=1, image_size=(6, 5),
                               activation=dyn.ReLU(), key=KEY, init="lecun"))


def _rnn_objective(model, p, d):
    """Σ |w|^p over W_in, W_rec, W_out with unit i of layer l scaled by e^{u_l[i]}."""
    sizes = model.hidden

    def f(v):
        u = jnp.split(v, np.cumsum(sizes)[:-1])
        total = 0.0
        for layer in range(len(sizes)):
            prev = u[layer - 1] if layer else jnp.zeros(model.input_size)
            w_in = model.input_weights[layer] * jnp.exp(u[layer][:, None] - d * prev[None, :])
            w_rec = model.recurrent_weights[layer] * jnp.exp(u[layer][:, None]
                                                              - d * u[layer][None, :])
            total = total + jnp.sum(jnp.abs(w_in) ** p) + jnp.sum(jnp.abs(w_rec) ** p)
        w_out = model.output_weight * jnp.exp(-d * u[-1])[None, :]
        return total + jnp.sum(jnp.abs(w_out) ** p)

    return f


def _conv_objective(model, p, d):
    """Σ |w|^p over the kernels and the head, channel c of layer l scaled by e^{u_l[c]}."""
    sizes = model.channels

    def f(v):
        u = jnp.split(v, np.cumsum(sizes)[:-1])
        total = 0.0
        for k, w in enumerate(model.weights):
            e = jnp.zeros(w.shape[:2])
            if k < len(sizes):
                e = e + u[k][:, None]
            if k > 0:
                e = e - d * u[k - 1][None, :]
            total = total + jnp.sum(jnp.abs(w * jnp.exp(e)[:, :, None, None]) ** p)
        return total

    return f


def _scipy_min(f, n):
    """The convex solve: trust-region Newton-CG with the exact gradient and Hessian
    ("trust-exact" stops at gradients ~1e-8 here, where F's values stop resolving)."""
    f = jax.jit(f)
    g, h = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    res = scipy.optimize.minimize(lambda v: float(f(v)), np.zeros(n),
                                  jac=lambda v: np.asarray(g(v)),
                                  hess=lambda v: np.asarray(h(v)), method="trust-ncg",
                                  options={"gtol": 1e-13})
    assert np.max(np.abs(g(res.x))) < 1e-10 * res.fun  # a converged reference
    return res.x, res.fun


def _inputs(model, seed=2):
    rng = np.random.default_rng(seed)
    if isinstance(model, dyn.ConvNet):
        return jnp.asarray(rng.normal(size=(4, model.in_channels, *model.image_size)))
    return jnp.asarray(rng.normal(size=(4, 5, model.input_size)))


@pytest.mark.parametrize("schedule", ["sequential", "layer"])
@pytest.mark.parametrize("activation,p", [(dyn.ReLU(), 2.0), (dyn.RePU(2), 2.0),
                                          (dyn.ReLU(), 3.0)], ids=["relu-l2", "repu-l2",
                                                                    "relu-l3"])
def test_rnn_neuron_balance_is_the_convex_optimum(activation, p, schedule):
    rnn = _rnn(activation)
    d = activation.degree
    new, info = dyn.balance.neuron_balance(rnn, p, schedule, tol=1e-13, max_sweeps=20000)
    assert bool(info.converged)
    vals = np.asarray(info.values[: int(info.num_steps) + 1])
    assert np.all(np.diff(vals) <= 1e-14 * vals[0])  # every sweep descends
    f = _rnn_objective(rnn, p, d)
    u_ref, f_ref = _scipy_min(f, sum(rnn.hidden))
    u = np.concatenate([np.asarray(a) for a in info.log_scales])
    # strictly convex (Hessian eigenvalues >= ~2), unique minimiser: gradients ~1e-12
    np.testing.assert_allclose(u, u_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(vals[-1], f_ref, rtol=1e-12)  # quadratic at the minimum
    np.testing.assert_allclose(float(f(jnp.asarray(u))), vals[-1], rtol=1e-13)
    x = _inputs(rnn)
    out, ref = jax.vmap(new)(x), jax.vmap(rnn)(x)
    # the rescaling is a symmetry: only rounding in the rescaled weights
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))
    if d == 1:
        # p = 1 homogeneity: the row and column exponents cancel on the self-loop
        for a, b in zip(rnn.recurrent_weights, new.recurrent_weights):
            np.testing.assert_allclose(np.diag(b), np.diag(a), rtol=1e-15)


@pytest.mark.parametrize("schedule", ["sequential", "layer"])
def test_conv_neuron_balance_is_the_convex_optimum(schedule):
    conv = _conv()
    new, info = dyn.balance.neuron_balance(conv, 2.0, schedule, tol=1e-13, max_sweeps=20000)
    assert bool(info.converged)
    u_ref, f_ref = _scipy_min(_conv_objective(conv, 2.0, 1.0), sum(conv.channels))
    u = np.concatenate([np.asarray(a) for a in info.log_scales])
    np.testing.assert_allclose(u, u_ref, rtol=0, atol=1e-8)  # unique minimiser
    np.testing.assert_allclose(info.values[info.num_steps], f_ref, rtol=1e-12)
    x = _inputs(conv)
    out, ref = jax.vmap(new)(x), jax.vmap(conv)(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))


def test_every_schedule_on_units_matches_min_norm_fix_and_keeps_the_function():
    """Baldi Thm 34/42: sequential, stochastic and layer reach one optimum, which for L2
    without bias is `min_norm_fix` with q = p; "tied" keeps the function and descends."""
    rnn = _rnn(dyn.RePU(2))
    ref, _ = dyn.balance.min_norm_fix(rnn, 2, 2, tol=1e-13)
    x = _inputs(rnn)
    for schedule in ("sequential", "stochastic", "layer", "tied"):
        new, info = dyn.balance.neuron_balance(rnn, 2.0, schedule, tol=1e-13,
                                               max_sweeps=20000, key=jax.random.key(1))
        assert bool(info.converged), schedule
        np.testing.assert_allclose(jax.vmap(new)(x), jax.vmap(rnn)(x), rtol=0, atol=1e-12)
        if schedule != "tied":
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
                np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)  # two solvers ~1e-9


def test_units_neuron_balance_with_bias_regularizer_and_velocity():
    res = _biased(dyn.ResidualMLP(3, 4, 5, 2, 2, activation=dyn.ReLU(), key=KEY,
                                  init="lecun"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)))
    lp, info = dyn.balance.neuron_balance(res, 2.0, include_bias=True, tol=1e-12)
    g, _ = dyn.balance.neuron_balance(res, include_bias=True, tol=1e-12,
                                      regularizer=lambda a: a**2)
    assert bool(info.converged)
    for a, b in zip(jax.tree.leaves(lp), jax.tree.leaves(g)):  # Newton vs closed form
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(jax.vmap(lp)(x), jax.vmap(res)(x), rtol=0, atol=1e-12)
    v = jax.tree.map(jnp.ones_like, res)
    new, vel = dyn.balance.NeuronBalance(2.0)(res, v)
    # the pushed-forward velocity is the rescaling's multipliers, w'/w on every entry
    np.testing.assert_allclose(vel.weights_in[0] * res.weights_in[0], new.weights_in[0],
                               rtol=1e-13)


def test_units_neuron_balance_bad_input():
    with pytest.raises(ValueError, match="neuron_balance: .*homogeneous"):
        dyn.balance.neuron_balance(dyn.RNN(3, (4,), 2, activation="tanh", key=KEY))
    with pytest.raises(ValueError, match="neuron_balance: `model`.*rescaling_units"):
        dyn.balance.neuron_balance(jnp.ones(3))
    with pytest.raises(ValueError, match="enorm: `model` must be a dyn.MLP"):
        dyn.balance.enorm(_rnn(dyn.ReLU()))
