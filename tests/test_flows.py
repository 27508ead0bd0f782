"""The Lagrangian catalogue: closed forms against their own Lagrangians, energies,
limits. References are autodiff Euler–Lagrange equations, closed-form solutions and
scipy; nothing here is compared with the code under test alone."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import dynamics as dyn
from dynamics._models import MLP, Swish

TIGHT = diffrax.PIDController(rtol=1e-11, atol=1e-11)


def toy(w):
    """Głuch & Urbanke sec. 6.1: L(w) = (‖w‖² − 1)²."""
    return (jnp.sum(w**2) - 1.0) ** 2


def mlp_setup(key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    model = MLP((3, 4, 2), activation=Swish(beta=1.0, trainable=True), key=k1)
    x = jax.random.normal(k2, (5, 3))
    y = jax.random.normal(k3, (5, 2))
    w, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(w):
        out = jax.vmap(eqx.combine(w, static))(x)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return w, loss


def _random_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=True)]
    )


SECOND_ORDER = [
    dyn.NewtonianFlow(),
    dyn.NesterovFlow(),
    dyn.NesterovFlow(r=5.0),
    dyn.HeavyBallFlow(0.7),
    dyn.GeneralFlow(kappa1=0.3, kappa2=2.0),
    dyn.GeneralFlow(kappa1=lambda t: 3.0 / t, kappa2=lambda t: 1.0 + 0.1 * t**2),
]


@pytest.mark.parametrize("flow", SECOND_ORDER, ids=lambda f: repr(f)[:40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_equals_euler_lagrange(flow, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    t = 0.5 + jax.random.uniform(keys[0]) * 3.0
    w = jax.random.normal(keys[1], (3,))
    v = jax.random.normal(keys[2], (3,))
    closed = flow.acceleration(t, w, v, toy)
    derived = dyn.LagrangianFlow(flow.lagrangian).acceleration(t, w, v, toy)
    # Both are O(1) numbers from a handful of flops: agreement to 1e-10 is roundoff.
    np.testing.assert_allclose(closed, derived, rtol=0, atol=1e-10)


@pytest.mark.parametrize("flow", [SECOND_ORDER[1], SECOND_ORDER[5]], ids=["NAGF", "general"])
def test_closed_form_equals_euler_lagrange_on_mlp_pytree(flow):
    w, loss = mlp_setup()
    v = _random_like(w, jax.random.key(7))

    @eqx.filter_jit
    def both(flow, w, v):
        derived = dyn.LagrangianFlow(flow.lagrangian).acceleration(1.3, w, v, loss)
        return flow.acceleration(1.3, w, v, loss), derived

    closed, derived = both(flow, w, v)
    for a, b in zip(jax.tree.leaves(closed), jax.tree.leaves(derived), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)  # roundoff, as above


def test_lagrangian_flow_non_identity_mass():
    """ℒ = ½ vᵀMv − L with a constant SPD mass matrix gives M ẅ = −∇L."""
    m = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 3.0]])
    lag = lambda t, w, v, loss: 0.5 * v @ m @ v - loss(w)
    w, v = jnp.array([0.3, -0.2, 0.9]), jnp.array([1.0, 0.5, -0.4])
    a = dyn.LagrangianFlow(lag, positive_definite=True).acceleration(0.0, w, v, toy)
    expected = np.linalg.solve(np.asarray(m), -np.asarray(jax.grad(toy)(w)))
    np.testing.assert_allclose(a, expected, rtol=1e-12)  # a 3x3 solve: roundoff only


@pytest.mark.parametrize("r", [1.0, 3.0, 5.0])
def test_nesterov_limit_at_zero(r):
    """At t = 0 with ẇ = 0, ẅ(0) = −∇L/(1 + r) (ẇ ≈ a t in (r/t)ẇ), for several r, with
    ∇L of the toy in closed form, 4(‖w‖² − 1) w."""
    w = jnp.array([0.5, 0.2, -0.1])
    a = dyn.NesterovFlow(r=r).acceleration(0.0, w, jnp.zeros(3), toy)
    grad = 4.0 * (np.sum(np.asarray(w) ** 2) - 1.0) * np.asarray(w)
    np.testing.assert_allclose(a, -grad / (1.0 + r), rtol=1e-14)  # exact formula, roundoff


@pytest.mark.parametrize(
    "flow, t0",
    [(dyn.NewtonianFlow(), 0.0), (dyn.NesterovFlow(), 1.0), (dyn.HeavyBallFlow(0.4), 0.0),
     (dyn.GeneralFlow(kappa1=lambda t: 0.2 + 0.1 * jnp.sin(t), kappa2=lambda t: 1.0 + 0.05 * t),
      0.0)],
    ids=["ND", "NAGF", "HB", "general"],
)
def test_energy_identity_along_trajectory(flow, t0):
    """E(t) − E(t0) = ∫ dE/dt, with the rate taken from the flow's closed form and the
    integral by Simpson's rule on the saved trajectory."""
    ts = jnp.linspace(t0, t0 + 6.0, 3001)
    rate = dyn.monitors.Function(lambda t, w, v: flow.energy_rate(t, w, v, toy), "rate")
    traj = dyn.simulate(flow, jnp.array([0.5, 0.5, 0.5]), toy, t0=t0, t1=t0 + 6.0,
                        v0=jnp.array([-2.0, 1.0, 1.0]), ts=ts, stepsize_controller=TIGHT,
                        monitors=(dyn.monitors.Energy(), rate), max_steps=100_000,
                        save_params=False)
    energy, rates = traj.monitors["energy"], traj.monitors["rate"]
    integral = scipy.integrate.cumulative_simpson(rates, x=np.asarray(traj.ts), initial=0.0)
    # Simpson's error on h = 2e-3 is ~h^4 |E'''''| ~ 1e-10; the solve adds ~1e-10.
    np.testing.assert_allclose(energy - energy[0], integral, rtol=0, atol=2e-8)
    if isinstance(flow, dyn.NewtonianFlow):
        assert np.max(np.abs(energy - energy[0])) < 1e-8
    else:
        assert energy[-1] < energy[0] - 1e-3  # genuinely dissipative


def test_gradient_flow_energy_rate_along_trajectory():
    traj = dyn.simulate(dyn.GradientFlow(), jnp.array([0.1, 0.2, 0.3]), toy, t1=2.0,
                        ts=jnp.linspace(0.0, 2.0, 2001), stepsize_controller=TIGHT,
                        monitors=(dyn.monitors.Loss(), dyn.monitors.GradNorm()),
                        save_params=False)
    integral = scipy.integrate.cumulative_simpson(-traj.monitors["grad_norm"] ** 2,
                                                  x=traj.ts, initial=0.0)
    loss = traj.monitors["loss"]
    # dL/dt = −‖∇L‖²; Simpson on h = 1e-3 and a 1e-11 solve leave ~1e-9.
    np.testing.assert_allclose(loss - loss[0], integral, rtol=0, atol=1e-8)


def test_general_flow_approaches_gradient_flow_at_rate_eps():
    """κ2 = ε → 0 with κ1 = 1 tends to GF; the gap at t = 1 is O(ε)."""
    w0 = jnp.array([0.1, 0.2, 0.3])
    ref = dyn.simulate(dyn.GradientFlow(), w0, toy, t1=1.0, stepsize_controller=TIGHT)
    gf_end = ref.final_params
    gaps = []
    epsilons = [1e-2, 5e-3, 2.5e-3]
    for eps in epsilons:
        # Start on the slow manifold, v0 = −∇L(w0), so no boundary layer enters.
        traj = dyn.simulate(dyn.GeneralFlow(kappa1=1.0, kappa2=eps), w0, toy, t1=1.0,
                            v0=-jax.grad(toy)(w0), stepsize_controller=TIGHT,
                            max_steps=100_000)
        gaps.append(float(jnp.linalg.norm(traj.final_params - gf_end)))
    slope = np.polyfit(np.log(epsilons), np.log(gaps), 1)[0]
    assert 0.9 < slope < 1.1, (gaps, slope)  # O(ε): first order in ε
    assert gaps[-1] < 5e-2


@pytest.mark.parametrize("flow", [
    dyn.GradientFlow(),
    dyn.MirrorFlow(lambda w: sum(jnp.sum(jnp.cosh(x)) for x in jax.tree.leaves(w))),
], ids=["GF", "mirror"])
def test_vector_field_and_loss(flow):
    """The pair fixed-step Euler carries, against independent formulas: −∇L for GF and,
    for φ = Σ cosh w (Hessian diag(cosh w)), the leafwise −∇L / cosh(w)."""
    w, loss = mlp_setup()
    field, value = flow.vector_field_and_loss(0.0, w, loss)
    grads = jax.grad(loss)(w)
    mirror = isinstance(flow, dyn.MirrorFlow)
    for a, g, x in zip(jax.tree.leaves(field), jax.tree.leaves(grads), jax.tree.leaves(w),
                       strict=True):
        expected = -np.asarray(g) / (np.cosh(np.asarray(x)) if mirror else 1.0)
        np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-15)  # a solve: roundoff
    np.testing.assert_allclose(value, loss(w), rtol=1e-15)  # the forward pass of the grad


def test_mirror_flow_dense_hessian_against_numpy():
    """φ(w) = ½ wᵀAw + ¼ Σ w⁴ couples the coordinates: ẇ = −(A + 3 diag w²)⁻¹ ∇L, with the
    Hessian written by hand and solved by numpy."""
    rng = np.random.default_rng(0)
    b = rng.normal(size=(4, 4))
    a = b @ b.T + 4 * np.eye(4)
    w = jnp.asarray(rng.normal(size=4))
    flow = dyn.MirrorFlow(lambda w: 0.5 * w @ jnp.asarray(a) @ w + 0.25 * jnp.sum(w**4))
    hess = a + 3 * np.diag(np.asarray(w) ** 2)
    grad = 4.0 * (np.sum(np.asarray(w) ** 2) - 1.0) * np.asarray(w)  # ∇ of the toy
    expected = -np.linalg.solve(hess, grad)
    np.testing.assert_allclose(flow.vector_field(0.0, w, toy), expected, rtol=1e-12)  # cond ~10
    # dL/dt = −∇Lᵀ H⁻¹ ∇L.
    np.testing.assert_allclose(flow.energy_rate(0.0, w, None, toy), grad @ expected,
                               rtol=1e-12)  # same solve, roundoff


@pytest.mark.parametrize("flow", [
    dyn.GradientFlow(),
    dyn.MirrorFlow(lambda w: jnp.sum(jnp.cosh(w))),
], ids=["GF", "mirror"])
def test_first_order_energy_rate_along_trajectory(flow):
    """E(t) − E(0) = ∫ energy_rate (Simpson) along the solve, for each first-order flow's
    own `energy_rate` (GF: −‖∇L‖²; mirror: −∇Lᵀ(∇²φ)⁻¹∇L)."""
    rate = dyn.monitors.Function(lambda t, w, v: flow.energy_rate(t, w, None, toy), "rate")
    traj = dyn.simulate(flow, jnp.array([0.1, 0.2, 0.3]), toy, t1=2.0,
                        ts=jnp.linspace(0.0, 2.0, 2001), stepsize_controller=TIGHT,
                        monitors=(dyn.monitors.Energy(), rate), save_params=False)
    energy = traj.monitors["energy"]
    integral = scipy.integrate.cumulative_simpson(traj.monitors["rate"], x=traj.ts,
                                                  initial=0.0)
    # Simpson on h = 1e-3 and a 1e-11 solve leave ~1e-9; the loss falls by ~0.7.
    np.testing.assert_allclose(energy - energy[0], integral, rtol=0, atol=1e-8)
    assert energy[-1] < energy[0] - 0.1


def test_lagrangian_flow_energy_along_trajectory():
    """LagrangianFlow's Jacobi integral E = ⟨v, ∂ℒ/∂v⟩ − ℒ and its rate −∂ℒ/∂t, for the
    time-dependent ℒ = e^{γt}(½‖v‖² − L) (heavy ball, Głuch & Urbanke eq. 24): E(t) − E(0)
    against ∫ rate, and E against the hand-written e^{γt}(½‖v‖² + L)."""
    gamma = 0.4

    def lag(t, w, v, loss):
        return jnp.exp(gamma * t) * (0.5 * jnp.sum(v**2) - loss(w))

    flow = dyn.LagrangianFlow(lag)
    rate = dyn.monitors.Function(lambda t, w, v: flow.energy_rate(t, w, v, toy), "rate")
    ts = jnp.linspace(0.0, 3.0, 1001)
    traj = dyn.simulate(flow, jnp.array([0.5, 0.5, 0.5]), toy, t1=3.0,
                        v0=jnp.array([-2.0, 1.0, 1.0]), ts=ts, stepsize_controller=TIGHT,
                        monitors=(dyn.monitors.Energy(), rate))
    energy = traj.monitors["energy"]
    w, v, t = traj.params, traj.velocities, np.asarray(traj.ts)
    by_hand = np.exp(gamma * t) * (0.5 * np.sum(v**2, axis=1)
                                   + (np.sum(w**2, axis=1) - 1.0) ** 2)
    np.testing.assert_allclose(energy, by_hand, rtol=1e-12)  # the same formula, roundoff
    integral = scipy.integrate.cumulative_simpson(traj.monitors["rate"], x=t, initial=0.0)
    # Simpson on h = 3e-3 (~h⁴ E⁽⁵⁾ ~ 1e-9) plus the 1e-11 solve, on E of order 10.
    np.testing.assert_allclose(energy - energy[0], integral, rtol=0, atol=5e-8)
    assert abs(energy[-1] - energy[0]) > 0.1  # E changes with t here: the check is not vacuous


def test_mirror_flow_with_half_square_is_gradient_flow():
    w0 = jnp.array([0.1, 0.2, 0.3])
    gf = dyn.simulate(dyn.GradientFlow(), w0, toy, t1=1.0, stepsize_controller=TIGHT)
    mirror = dyn.MirrorFlow(lambda w: 0.5 * jnp.sum(w**2))
    md = dyn.simulate(mirror, w0, toy, t1=1.0, stepsize_controller=TIGHT)
    np.testing.assert_allclose(md.final_params, gf.final_params, rtol=1e-12)  # same ODE


def test_mirror_flow_entropy_closed_form():
    """φ = Σ w log w, L = ⟨c, w⟩: d/dt log w = −c, so w(t) = w0 exp(−c t)."""
    c = jnp.array([1.0, -0.5, 2.0])
    w0 = jnp.array([0.3, 0.5, 0.2])
    flow = dyn.MirrorFlow(lambda w: jnp.sum(w * jnp.log(w)))
    traj = dyn.simulate(flow, w0, lambda w: c @ w, t1=1.5, ts=jnp.linspace(0, 1.5, 7),
                        stepsize_controller=TIGHT, monitors=(dyn.monitors.Loss(),))
    expected = w0 * np.exp(-np.outer(np.asarray(traj.ts), c))
    np.testing.assert_allclose(traj.params, expected, rtol=1e-9)  # solver tolerance 1e-11
    # dL/dt = −∇Lᵀ(∇²φ)⁻¹∇L = −Σ c² w < 0 at every point.
    rate = flow.energy_rate(0.0, w0, None, lambda w: c @ w)
    np.testing.assert_allclose(rate, -np.sum(c**2 * w0), rtol=1e-13)


def test_mirror_flow_vs_scipy_on_nonquadratic_potential():
    """φ = Σ cosh(w) (Hessian diag cosh w): ẇ = −∇L / cosh(w), against DOP853."""
    flow = dyn.MirrorFlow(lambda w: jnp.sum(jnp.cosh(w)))
    w0 = jnp.array([0.1, 0.2, 0.3])
    traj = dyn.simulate(flow, w0, toy, t1=2.0, stepsize_controller=TIGHT)
    grad = jax.jit(jax.grad(toy))
    sol = scipy.integrate.solve_ivp(
        lambda t, w: -np.asarray(grad(jnp.asarray(w))) / np.cosh(w),
        (0.0, 2.0), np.asarray(w0), method="DOP853", rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(traj.final_params, sol.y[:, -1], rtol=1e-8)  # both ~1e-11


def test_flow_validation():
    with pytest.raises(ValueError, match="gamma"):
        dyn.HeavyBallFlow(-1.0)
    with pytest.raises(ValueError, match="r"):
        dyn.NesterovFlow(r=float("nan"))
    with pytest.raises(ValueError, match="kappa2"):
        dyn.GeneralFlow(kappa1=1.0, kappa2=0.0)
    with pytest.raises(ValueError, match="kappa1"):
        dyn.GeneralFlow(kappa1="fast")
    with pytest.raises(ValueError, match="phi"):
        dyn.MirrorFlow(3.0)
    with pytest.raises(ValueError, match="lagrangian"):
        dyn.LagrangianFlow(None)
