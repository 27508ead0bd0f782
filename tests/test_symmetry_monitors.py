"""Symmetry monitors along `simulate` trajectories: residuals of eq. 17 and the charge laws
in integrated form for GF, ND, Nesterov, heavy ball and a general κ1/κ2 flow (Głuch &
Urbanke, Tables 2–5), on smooth homogeneous activations."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics.symmetries import InputRotation, LinearLayer, Rescaling

TIGHT = diffrax.PIDController(rtol=1e-12, atol=1e-12)


def _loss(model, key=1):
    k1, k2 = jax.random.split(jax.random.key(key))
    x = jax.random.normal(k1, (8, model.widths[0]))
    y = jax.random.normal(k2, (8, model.widths[-1]))
    return lambda m: 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))


# One linear network (smooth; 1-homogeneous, so rescalings and the GL action both apply).
MODEL = dyn.MLP((2, 3, 3, 2), activation=dyn.Identity(), key=jax.random.key(0), init="lecun")
A = np.asarray(jax.random.normal(jax.random.key(5), (3, 3)))  # not symmetric
# Few monitors: each ChargeLaw adds a state component and compile time.
GENERATORS = {"rescale_2_1": Rescaling(2, 1), "gl_1": LinearLayer(1, A)}
MONITORS = tuple(dyn.monitors.ChargeLaw(g, name="law_" + k) for k, g in GENERATORS.items()) + \
    tuple(dyn.monitors.SymmetryResidual(g, name="res_" + k) for k, g in GENERATORS.items())


# One loss function for every run: two runs that differ only in tolerance or times then
# share one compiled solve (a new closure per run retraced and recompiled it, ~10 s).
LOSS = _loss(MODEL)


def _run(flow, controller=TIGHT, t0=0.0, t1=1.0):
    v0 = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), MODEL)  # ẇ(0) ≠ 0: drives the laws
    v0 = None if isinstance(flow, dyn.GradientFlow) else v0
    return dyn.simulate(flow, MODEL, LOSS, t0=t0, t1=t1, v0=v0,
                        stepsize_controller=controller, ts=jnp.linspace(t0, t1, 6),
                        monitors=MONITORS, save_params=False)


FLOWS = [dyn.GradientFlow(), dyn.NewtonianFlow(), dyn.NesterovFlow(), dyn.HeavyBallFlow(0.7),
         dyn.GeneralFlow(kappa1=lambda t: 1.0 + 0.5 * t, kappa2=lambda t: 1.0 + 0.2 * t)]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: type(f).__name__)
def test_charge_laws_and_residuals(flow):
    t0 = 0.5 if isinstance(flow, dyn.NesterovFlow) else 0.0  # away from Nesterov's 3/t
    traj = _run(flow, t0=t0, t1=t0 + 1.0)
    for k in GENERATORS:
        # eq. 17 residual: ⟨κ2ẅ + κ1ẇ, ξ⟩ relative; round-off only (~1e-15).
        assert np.max(np.abs(traj.monitors["res_" + k])) < 1e-9, k
        law = traj.monitors["law_" + k]
        scale = np.max(np.abs(law)) + 1e-300
        # Integrated law constant to 1e-9 relative at rtol = atol = 1e-12 (solve error
        # ~1e-11 over ~30 parameters and a unit time).
        assert np.max(np.abs(law - law[0])) / scale < 1e-9, (k, law)
    # Independent reference for the value at t0: ½⟨w, Aw⟩ (GF) or μ(t0)⟨ẇ0, A w0⟩.
    v0 = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), MODEL)
    xi = GENERATORS["gl_1"](MODEL)
    w1, w2 = np.asarray(MODEL.weights[0]), np.asarray(MODEL.weights[1])
    b1 = np.asarray(MODEL.biases[0])
    if isinstance(flow, dyn.GradientFlow):
        m = w1 @ w1.T + np.outer(b1, b1) - w2.T @ w2
        np.testing.assert_allclose(traj.monitors["law_gl_1"][0], 0.5 * np.sum(A * m),
                                   rtol=1e-12)  # round-off
    elif isinstance(flow, dyn.NewtonianFlow):
        expected = float(sum(np.vdot(a, b) for a, b in zip(jax.tree.leaves(v0),
                                                             jax.tree.leaves(xi))))
        np.testing.assert_allclose(traj.monitors["law_gl_1"][0], expected, rtol=1e-12)


def test_charge_law_drift_shrinks_with_tolerance():
    """At a loose tolerance the ND charge law drifts visibly; 1e-4 → 1e-10 shrinks it."""
    drifts = []
    for tol in (1e-4, 1e-10):
        traj = _run(dyn.NewtonianFlow(), diffrax.PIDController(rtol=tol, atol=tol), t1=3.0)
        law = traj.monitors["law_gl_1"]
        drifts.append(np.max(np.abs(law - law[0])) / np.max(np.abs(law)))
    assert drifts[0] > 1e-7  # visible at 1e-4
    assert drifts[1] < 1e-3 * drifts[0]  # Tsit5 is 5th order: ~1e6 smaller expected


def test_angular_momentum_rotational_toy():
    """L(w) = ¼(‖w‖² − 1)² is rotation invariant: ND conserves w × ẇ, Nesterov t³ w × ẇ."""
    loss = lambda w: 0.25 * (jnp.sum(w**2) - 1.0) ** 2  # noqa: E731
    w0, v0 = jnp.array([1.5, 0.2, -0.3]), jnp.array([0.1, 0.8, 0.4])
    traj = dyn.simulate(dyn.NewtonianFlow(), w0, loss, t1=3.0, v0=v0,
                        stepsize_controller=TIGHT, ts=jnp.linspace(0, 3, 5),
                        monitors=(dyn.monitors.AngularMomentum(),))
    j = traj.monitors["angular_momentum"]
    np.testing.assert_allclose(j[0], np.cross(w0, v0), rtol=1e-14)  # closed form at t0
    np.testing.assert_allclose(j, np.broadcast_to(j[0], j.shape), rtol=1e-9)  # 1e-12 solve


def test_input_rotation_charge_law():
    """ND on a loss of W1 W1ᵀ only (rotation invariant): ⟨P, W1ᵀẆ1⟩ is conserved."""
    model = dyn.MLP((3, 2, 1), activation=dyn.Identity(), key=jax.random.key(3), init="lecun")
    c = jnp.array([[1.0, 0.2], [0.2, 0.5]])
    loss = lambda m: jnp.sum((m.weights[0] @ m.weights[0].T - c) ** 2)  # noqa: E731
    p = np.array([[0.0, 1.0, -0.5], [-1.0, 0.0, 0.3], [0.5, -0.3, 0.0]])
    gen = InputRotation(p)
    assert dyn.symmetries.check(gen, loss, model, key=jax.random.key(0)) < 1e-12  # round-off
    v0 = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), model)
    traj = dyn.simulate(dyn.NewtonianFlow(), model, loss, t1=1.0, v0=v0,
                        stepsize_controller=TIGHT, ts=jnp.linspace(0, 1, 4),
                        monitors=(dyn.monitors.ChargeLaw(gen), dyn.monitors.AngularMomentum()))
    law, mom = traj.monitors["charge_law"], traj.monitors["angular_momentum"]
    np.testing.assert_allclose(law, np.full(law.shape, law[0]), rtol=1e-9)  # 1e-12 solve
    # Same number from the matrix: ⟨W1 P, Ẇ1⟩ = tr(Ẇ1ᵀ W1 P) = −½⟨P, Ẇ1ᵀW1 − W1ᵀẆ1⟩.
    np.testing.assert_allclose(-0.5 * np.sum(p * mom, axis=(1, 2)), law, rtol=1e-10)
    assert abs(law[0]) > 0.1  # non-trivial


def test_nd_bound_and_nesterov_energy_law():
    model = dyn.MLP((2, 3, 3, 2), activation=dyn.ReLU(), key=jax.random.key(0))
    loss = _loss(model)
    nd = dyn.simulate(dyn.NewtonianFlow(), model, loss, t1=2.0, ts=jnp.linspace(0, 2, 9),
                      monitors=(dyn.monitors.NDBound(),), save_params=False)
    s, b = nd.monitors["nd_bound"].T
    assert np.all(s - s[0] <= b + 1e-9)  # eq. 34 (1e-9: solver tolerance 1e-7 on S)
    w = model.weights
    s0 = sum(abs(float(jnp.sum(w[k] ** 2) - jnp.sum(w[k + 1] ** 2))) for k in range(2))
    np.testing.assert_allclose(s[0], s0, rtol=1e-12)  # round-off
    nag = dyn.simulate(dyn.NesterovFlow(), model, loss, t0=0.0, t1=2.0, ts=jnp.linspace(0, 2, 9),
                       stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
                       monitors=(dyn.monitors.EnergyLaw(),), save_params=False)
    e, e0 = nag.monitors["energy_law"].T
    np.testing.assert_allclose(e0, float(loss(model)), rtol=1e-7)  # E(0) = L(0); 1e-10 solve
    assert np.all(np.diff(e) <= 1e-12) and e[-1] < 0.9 * e[0]  # eq. 35: E decreases


def test_monitor_bad_input():
    with pytest.raises(ValueError, match="second-order"):
        dyn.simulate(dyn.GradientFlow(), jnp.ones(3), lambda w: jnp.sum(w**2), t1=1.0,
                     monitors=(dyn.monitors.AngularMomentum(),))
    with pytest.raises(ValueError, match="generator"):
        dyn.monitors.SymmetryResidual(lambda m: m)
    with pytest.raises(ValueError, match="linear"):
        dyn.simulate(dyn.GradientFlow(), dyn.MLP((2, 3, 2), key=jax.random.key(0)),
                     lambda m: jnp.sum(m.weights[0] ** 2), t1=1.0,
                     monitors=(dyn.monitors.LinearBalance(),))
    tanh = dyn.MLP((2, 3, 2), activation=dyn.Tanh(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="Tanh"):
        dyn.simulate(dyn.GradientFlow(), tanh, lambda m: jnp.sum(m.weights[0] ** 2), t1=1.0,
                     monitors=(dyn.monitors.SymmetryResidual(Rescaling(1, 0)),))


def test_rescaling_residuals_all_neurons():
    """The vectorised per-neuron residual (eq. 17 for every neuron): round-off for ReLU
    along ND (each entry is relative to its own neuron's terms), and Tanh refused."""
    model = dyn.MLP((3, 5, 4, 2), activation=dyn.ReLU(), key=jax.random.key(0))
    loss = _loss(model)
    v0 = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), model)
    traj = dyn.simulate(dyn.NewtonianFlow(), model, loss, t1=0.2, v0=v0,
                        ts=jnp.linspace(0, 0.2, 3), monitors=(dyn.monitors.RescalingResiduals(),))
    r = traj.monitors["rescaling_residuals"]
    assert r.shape == (3, 9)
    assert np.max(np.abs(r)) < 1e-12  # relative, round-off of a 4-layer MLP
    with pytest.raises(ValueError, match="Tanh"):
        tanh = dyn.MLP((3, 5, 2), activation=dyn.Tanh(), key=jax.random.key(0))
        dyn.simulate(dyn.GradientFlow(), tanh, _loss(tanh), t1=0.1,
                     monitors=(dyn.monitors.RescalingResiduals(),))
