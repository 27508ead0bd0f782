"""Noether charges: conserved by gradient flow (to solver tolerance), and the p in
the p-homogeneous charge matters (the p = 1 formula drifts for RePU(2))."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn

# Not tighter: GF on ReLU nets slides along kinks (a pre-activation pinned at 0, a
# Filippov sliding mode), where 1e-10 costs ~1e5 steps; 1e-8 takes ~5e3.
TOL = diffrax.PIDController(rtol=1e-8, atol=1e-8)


def _regression(model, key=1):
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (16, model.widths[0]))
    y = jax.random.normal(k2, (16, model.widths[-1]))
    return lambda m: 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))


def _charges_along_gf(model, monitor, t1=1.0):
    loss = _regression(model)
    traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=t1, stepsize_controller=TOL,
                        ts=jnp.linspace(0.0, t1, 5), monitors=(monitor, dyn.monitors.Loss()),
                        max_steps=100_000)
    assert traj.monitors["loss"][-1] < 0.9 * traj.monitors["loss"][0]  # it did train
    return traj


@pytest.mark.parametrize(
    "activation", [dyn.LeakyReLU(0.1), dyn.Polynomial(3), dyn.Swish(beta=1.0, trainable=True)],
    ids=lambda a: type(a).__name__)
def test_rescaling_charges_conserved_by_gradient_flow(activation):
    model = dyn.MLP((3, 5, 4, 2), activation=activation, key=jax.random.key(0), init="lecun")
    traj = _charges_along_gf(model, dyn.monitors.RescalingCharges(), t1=0.5)
    q = traj.monitors["rescaling_charges"]
    assert q.shape == (5, 9)
    # Conserved up to the solve's error (rtol = atol = 1e-8 over ~60 parameters: ~1e-8).
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), rtol=0, atol=1e-6)
    # The charge matches the per-neuron formula on the initial model.
    w, b = model.weights, model.biases
    p = activation.degree or 1.0
    first = b[0] ** 2 + jnp.sum(w[0] ** 2, axis=1) - p * jnp.sum(w[1] ** 2, axis=0)
    if model.betas is not None:
        first = first - model.betas[0] ** 2
    np.testing.assert_allclose(q[0, :5], first, rtol=1e-13)


def test_wrong_degree_is_not_conserved():
    """For RePU(2) the p = 1 combination ‖in‖² − ‖out‖² is not a charge: it drifts."""
    model = dyn.MLP((3, 5, 2), activation=dyn.RePU(2), key=jax.random.key(0), init="lecun")
    wrong = dyn.monitors.Function(
        lambda t, m, v: jnp.sum(m.weights[0] ** 2, 1) + m.biases[0] ** 2
        - jnp.sum(m.weights[1] ** 2, 0), "wrong")
    traj = _charges_along_gf(model, wrong)
    assert np.max(np.abs(traj.monitors["wrong"][-1] - traj.monitors["wrong"][0])) > 1e-3


def test_linear_balance_conserved():
    model = dyn.MLP((3, 4, 4, 2), activation=dyn.Identity(), key=jax.random.key(2),
                    init="lecun")
    balance = dyn.monitors.Function(lambda t, m, v: jnp.stack(dyn.charges.linear_balance(m)),
                                    "balance")
    traj = _charges_along_gf(model, balance)
    q = traj.monitors["balance"]
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), rtol=0, atol=1e-6)
    assert np.max(np.abs(q[0])) > 0.1  # a non-trivial matrix


def test_charges_bad_input():
    with pytest.raises(ValueError, match="homogeneous"):
        dyn.charges.rescaling(dyn.MLP((2, 3, 1), activation=dyn.Tanh(), key=jax.random.key(0)))
    with pytest.raises(ValueError, match="linear"):
        dyn.charges.linear_balance(dyn.MLP((2, 3, 1), key=jax.random.key(0)))
    with pytest.raises(ValueError, match="MLP"):
        dyn.charges.rescaling(jnp.ones(3))
