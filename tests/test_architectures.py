"""ConvNet, RNN and ResidualMLP: forward passes against independent NumPy/SciPy
references, and their rescaling units read by every symmetry tool (charges conserved by
gradient flow, residuals, min_norm_fix), in float64."""

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

import dynamics as dyn
from dynamics.symmetries import Rescaling, Slice, Units

KEY = jax.random.key(0)


def _conv():
    # stride 2 and padding 1 in the second layer: the Theory III layer type
    net = dyn.ConvNet(2, (3, 4), 3, 2, stride=(1, 2), padding=1, image_size=(6, 5),
                      activation=dyn.RePU(2), key=KEY, init="lecun")
    return _biased(net)


def _rnn(**kw):
    return _biased(dyn.RNN(3, (4, 3), 2, activation=dyn.RePU(2), key=KEY, init="lecun", **kw))


def _res(activation=dyn.RePU(2)):
    return _biased(dyn.ResidualMLP(3, 4, 5, 2, 2, activation=activation, key=KEY,
                                   init="lecun"))


def _biased(model, scale=0.1):
    """Non-zero biases (zero at init), so that the bias slices are exercised."""
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape) if a.ndim == 1 else a,
                        model)


def _inputs(model, n=6, seed=2):
    rng = np.random.default_rng(seed)
    if isinstance(model, dyn.ConvNet):
        shape = (n, model.in_channels, *model.image_size)
    elif isinstance(model, dyn.RNN):
        shape = (n, 5, model.input_size)
    else:
        shape = (n, model.in_size)
    return jnp.asarray(rng.normal(size=shape))


def _loss(model):
    x = _inputs(model)
    y = jnp.asarray(np.random.default_rng(3).normal(size=(x.shape[0], 2)))
    return lambda m: 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))


# --------------------------------------------------------------------------- forward


def test_conv_forward_matches_scipy_correlate():
    net = _conv()
    x = np.asarray(_inputs(net, 1)[0])
    h = x
    for k, b, s, p in zip(net.weights[:-1], net.biases[:-1], net.stride, net.padding):
        k, h = np.asarray(k), np.pad(h, ((0, 0), (p, p), (p, p)))
        full = np.stack([sum(scipy.signal.correlate(h[c], k[o, c], mode="valid")
                             for c in range(k.shape[1])) for o in range(k.shape[0])])
        h = np.maximum(full[:, ::s, ::s] + np.asarray(b)[:, None, None], 0) ** 2
    ref = np.asarray(net.weights[-1]).reshape(2, -1) @ h.ravel() + np.asarray(net.biases[-1])
    assert net.feature_size == (3, 3) == h.shape[1:]
    np.testing.assert_allclose(net(x), ref, rtol=1e-12)  # sums of ~100 products


def test_theory3_architectures_are_one_liners():
    five = dyn.ConvNet(3, (16,) * 5, 3, 10, stride=2, padding=1, image_size=32, key=KEY)
    fig8 = dyn.ConvNet(3, (16, 32, 64, 128), 3, 10, stride=2, padding=1, image_size=32,
                       key=KEY)
    count = lambda m: sum(a.size for a in jax.tree.leaves(m))  # noqa: E731
    assert (count(five), count(fig8)) == (9898, 102570)  # Banburski et al. ~10,000; Fig. 8
    assert five.feature_size == (1, 1) and fig8.feature_size == (2, 2)


def _np_rnn(net, x, mask):
    h = x
    for w_in, w_rec, b in zip(net.input_weights, net.recurrent_weights, net.biases):
        state, out = np.zeros(w_rec.shape[0]), []
        for t in range(len(h)):
            new = np.maximum(np.asarray(w_in) @ h[t] + np.asarray(w_rec) @ state
                             + np.asarray(b), 0) ** 2
            state = new if mask[t] else state
            out.append(state)
        h = np.stack(out)
    return h @ np.asarray(net.output_weight).T + np.asarray(net.biases[-1])


def test_rnn_forward_matches_numpy_loop():
    net = _rnn(readout="all")
    x = np.asarray(_inputs(net, 1)[0])
    mask = np.array([1, 1, 0, 1, 0])
    ref = _np_rnn(net, x, mask)
    np.testing.assert_allclose(net(x, mask=mask), ref, rtol=1e-12)  # a few dozen products
    last = _rnn()  # the same weights, readout="last"
    np.testing.assert_allclose(last(x), _np_rnn(net, x, np.ones(5))[-1], rtol=1e-12)


def test_residual_forward_matches_numpy():
    net = _res(dyn.ReLU())
    x = np.asarray(_inputs(net, 1)[0])
    z = np.asarray(net.embedding) @ x + np.asarray(net.embedding_bias)
    for u, c, v, d in zip(net.weights_in, net.biases_in, net.weights_out, net.biases_out):
        z = z + np.asarray(v) @ np.maximum(np.asarray(u) @ z + np.asarray(c), 0) + np.asarray(d)
    ref = np.asarray(net.head) @ z + np.asarray(net.head_bias)
    np.testing.assert_allclose(net(x), ref, rtol=1e-12)


# --------------------------------------------------------------------------- symmetries


def _rescaled(model, family, index, lam):
    """The model with unit `index` of `family` scaled by λ (the finite group action)."""
    xi = dyn.symmetries.LayerRescaling(family)(model) if index is None else \
        Rescaling(family, index)(model)
    exps = jax.tree.map(lambda w, x: jnp.where(w != 0, x / jnp.where(w != 0, w, 1), 0),
                        model, xi)
    return jax.tree.map(lambda w, e: w * lam**e, model, exps)


@pytest.mark.parametrize("make", [_conv, _rnn, _res], ids=["conv", "rnn", "residual"])
def test_units_are_symmetries(make):
    model = make()
    loss = _loss(model)
    families = model.rescaling_units()
    for fam in range(1, len(families) + 1):
        gen = Rescaling(fam, families[fam - 1].size - 1)
        # ⟨∇L, ξ⟩ = 0 at random points: round-off of a small net
        assert dyn.symmetries.check(gen, loss, model, key=KEY, num_points=3) < 1e-12
        # the finite rescaling by λ = 1.7 leaves the loss unchanged (to rounding)
        moved = _rescaled(model, fam, families[fam - 1].size - 1, 1.7)
        assert abs(loss(moved) - loss(model)) < 1e-13 * loss(model)
        # and d/dt Q = ⟨∇Q, −∇L⟩ = 0, by a central difference of Q along −∇L
        g = jax.grad(loss)(model)
        q = lambda m, fam=fam: dyn.charges.rescaling(m)[fam - 1]  # noqa: E731
        h = 1e-5
        dq = (q(jax.tree.map(lambda w, d: w - h * d, model, g))
              - q(jax.tree.map(lambda w, d: w + h * d, model, g))) / (2 * h)
        # each piece of Q moves at a rate ~ ‖w‖‖∇L‖; their sum is 0 up to the O(h²) error
        scale = float(jnp.linalg.norm(_flat(model)) * jnp.linalg.norm(_flat(g)))
        assert np.max(np.abs(dq)) < 1e-8 * scale


def _flat(tree):
    return jax.flatten_util.ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0]


def test_wrong_units_are_not_symmetries():
    rnn = _rnn()
    # a recurrent unit's row of W_rec without its column: the cycle constraint broken
    fam = rnn.rescaling_units()[0]
    rows_only = Units("rows", fam.size, [s for s in fam.slices if not (
        s.path == ("recurrent_weights", 0) and s.axis == 1)], fam.degree)
    # the residual stream rescaled in one block only: the skip carries the old scale on
    res = _res()
    one_block = Units("stream of block 1", 4, [Slice(("weights_in", 0), 1, "-p", 2),
                                               Slice(("weights_out", 0), 0, 1.0, 2),
                                               Slice(("biases_out", 0), 0, 1.0, 1)], 1.0)
    for model, units in ((rnn, rows_only), (res, one_block)):
        wrong = _WithUnits(model, (units,))
        loss = lambda m, loss=_loss(model): loss(m.model)  # noqa: E731
        assert dyn.symmetries.check(Rescaling(1, 0), loss, wrong, key=KEY,
                                    num_points=3) > 1e-3  # O(0.1) when broken


class _WithUnits(eqx.Module):
    """A user's own model: any Equinox module with a `rescaling_units()` method."""

    model: eqx.Module
    units: tuple = eqx.field(static=True)

    def rescaling_units(self):
        return tuple(Units(u.name, u.size, [Slice(("model", *s.path), s.axis, s.exponent,
                                                  s.ndim) for s in u.slices], u.degree)
                     for u in self.units)

    def __call__(self, x):
        return self.model(x)


# --------------------------------------------------------------------------- charges


@pytest.mark.parametrize("make", [_conv, _rnn, _res], ids=["conv", "rnn", "residual"])
def test_unit_charges_conserved_by_gradient_flow(make):
    model = make()
    loss = _loss(model)
    # tight Dopri5 rather than Gauss-Legendre: its implicit solve compiled for ~25 s on
    # the conv net, this runs in ~4 s
    traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=1.0, solver=diffrax.Dopri5(),
                        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
                        ts=jnp.linspace(0.0, 1.0, 3), max_steps=100_000,
                        monitors=(dyn.monitors.RescalingCharges(),
                                  dyn.monitors.RescalingResiduals(), dyn.monitors.Loss()))
    q = traj.monitors["rescaling_charges"]
    assert traj.monitors["loss"][-1] < 0.99 * traj.monitors["loss"][0]  # it did move
    assert q.shape[1] == sum(u.size for u in model.rescaling_units())
    # the solve's local error is 1e-12 relative per step over ~500 steps (measured drift
    # 1.2e-13 of the largest charge on the conv net): 1e-10 leaves ~1000x room
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), rtol=0,
                               atol=1e-10 * np.max(np.abs(q[0])))
    np.testing.assert_allclose(q[0], np.concatenate(dyn.charges.rescaling(model)), rtol=1e-13)
    # eq. 17 for every unit at once: zero up to rounding (relative numbers)
    assert np.max(np.abs(traj.monitors["rescaling_residuals"])) < 1e-12


def test_rnn_charge_counts_the_self_loop_with_exponent_one_minus_p():
    rnn = _rnn()
    w_in, w_rec, w_next = (np.asarray(a) for a in (rnn.input_weights[0],
                                                    rnn.recurrent_weights[0],
                                                    rnn.input_weights[1]))
    b, p = np.asarray(rnn.biases[0]), 2.0
    diag = np.diag(w_rec) ** 2
    ref = (np.sum(w_in**2, 1) + b**2 + np.sum(w_rec**2, 1) - diag
           - p * (np.sum(w_rec**2, 0) - diag) - p * np.sum(w_next**2, 0) + (1 - p) * diag)
    np.testing.assert_allclose(dyn.charges.rescaling(rnn)[0], ref, rtol=1e-13)
    # the generator's charge ⟨w, ξ(w)⟩ is the same number
    np.testing.assert_allclose(Rescaling(1, 2).charge(rnn), ref[2], rtol=1e-13)


# --------------------------------------------------------------------------- balance


@pytest.mark.parametrize("make", [_conv, _rnn, _res], ids=["conv", "rnn", "residual"])
def test_min_norm_fix_keeps_the_function(make):
    model = make()
    x = _inputs(model)
    new, info = dyn.balance.min_norm_fix(model, tol=1e-12)
    assert bool(info.converged)
    vals = np.asarray(info.values[: int(info.num_steps) + 1])
    assert np.all(np.diff(vals) <= 1e-14 * vals[0]) and vals[-1] < vals[0]  # descent
    out, ref = jax.vmap(new)(x), jax.vmap(model)(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.max(np.abs(ref)))
    # at the least ℓ2 norm the gradient in the log-scales vanishes (Newton stops at steps
    # below 1e-12, so the gradient is ~1e-12 of the curvature ~ the squared norm)
    grad = jax.grad(lambda u: _norm_along(model, u))(
        tuple(jnp.asarray(a) for a in info.log_scales))
    assert max(float(jnp.max(jnp.abs(g))) for g in grad) < 1e-8 * vals[-1] ** 2


def _norm_along(model, u):
    from dynamics.balance._units import rescale_by_units

    moved = rescale_by_units(model, model, model.rescaling_units(), u)
    return sum(jnp.sum(w**2) for w in jax.tree.leaves(moved) if w.ndim >= 2)


def test_min_norm_fix_units_path_agrees_with_saul_on_an_mlp():
    from dynamics.balance._units import units_min_norm

    mlp = dyn.MLP((3, 5, 4, 2), dyn.RePU(2), key=jax.random.key(3))
    new, _ = dyn.balance.min_norm_fix(mlp, 2, 3, tol=1e-12, max_iter=20000)
    _, it, values, conv = units_min_norm(mlp, 2.0, 3.0, 1e-12, 100)
    assert bool(conv)
    # one convex minimum, two algorithms: Saul's stops at |a − 1| < 1e-12
    np.testing.assert_allclose(values[it], dyn.balance.lpq_norm(new, 2, 3), rtol=1e-10)


def test_rnn_balance_keeps_self_loops():
    rnn = dyn.RNN(3, (4, 3), 2, key=KEY)  # ReLU: the self-loop scales by λ^(1−1) = 1
    new, _ = dyn.balance.min_norm_fix(rnn)
    for a, b in zip(rnn.recurrent_weights, new.recurrent_weights):
        np.testing.assert_allclose(np.diag(b), np.diag(a), rtol=1e-15)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    cases = [
        (lambda: dyn.ConvNet(3, (16, 0), 3, 10, image_size=8, key=KEY), "`channels`"),
        (lambda: dyn.ConvNet(3, (4,), 3, 10, stride=(1, 2), image_size=8, key=KEY),
         "`stride`"),
        (lambda: dyn.ConvNet(3, (4,) * 3, 3, 10, stride=2, padding=0, image_size=8, key=KEY),
         "kernel"),
        (lambda: dyn.ConvNet(3, (4,), 3, 10, image_size=8, key=KEY)(jnp.ones((2, 8, 8))),
         "`x`"),
        (lambda: dyn.RNN(3, (), 2, key=KEY), "`hidden`"),
        (lambda: dyn.RNN(3, (4,), 2, readout="mean", key=KEY), "`readout`"),
        (lambda: dyn.RNN(3, (4,), 2, key=KEY)(jnp.ones((5, 3)), mask=jnp.ones(4)), "`mask`"),
        (lambda: dyn.RNN(3, (4,), 2, key=KEY)(jnp.ones(3)), "`x`"),
        (lambda: dyn.ResidualMLP(3, 4, 5, 0, 2, key=KEY), "`num_blocks`"),
        (lambda: dyn.charges.rescaling(dyn.RNN(3, (4,), 2, activation=dyn.Tanh(), key=KEY)),
         "Tanh"),
        (lambda: dyn.charges.rescaling(jnp.ones(3)), "rescaling_units"),
        (lambda: Rescaling(3, 0)(_rnn()), "hidden layers 1..2"),
        (lambda: Rescaling(1, 9)(_rnn()), "`neuron`"),
        (lambda: dyn.balance.min_norm_fix(dyn.RNN(3, (4,), 2, activation="tanh", key=KEY)),
         "homogeneous"),
        (lambda: Slice(("w",), -1), "`axis`"),
        (lambda: Units("u", 2, [Slice("w", 0), Slice("w", 0, "-p")], 1), "same array"),
        (lambda: dyn.charges.rescaling(_WithUnits(_rnn(), (Units("u", 7, [Slice(
            ("input_weights", 0), 0, 1.0, 2)], 1.0),))), "number 7"),
        (lambda: dyn.charges.rescaling(_WithUnits(_rnn(), (Units("u", 4, [Slice(
            ("nope",), 0)], 1.0),))), "does not have"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
