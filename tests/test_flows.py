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


def test_nesterov_limit_at_zero():
    """At t = 0 with ẇ = 0, ẅ(0) = −∇L/(1 + r) (ẇ ≈ a t in (r/t)ẇ)."""
    w = jnp.array([0.5, 0.5, 0.5])
    a = dyn.NesterovFlow().acceleration(0.0, w, jnp.zeros(3), toy)
    np.testing.assert_allclose(a, -jax.grad(toy)(w) / 4.0, rtol=1e-14)  # exact formula
    assert np.all(np.isfinite(a))


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
    """The pair fixed-step Euler carries equals the two computed apart."""
    w, loss = mlp_setup()
    field, value = flow.vector_field_and_loss(0.0, w, loss)
    for a, b in zip(jax.tree.leaves(field), jax.tree.leaves(flow.vector_field(0.0, w, loss)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)  # same ops, roundoff
    np.testing.assert_allclose(value, loss(w), rtol=1e-15)  # the forward pass of the grad


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
