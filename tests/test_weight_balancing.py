"""Saul's weight-balancing flows, the ℓp,q regularizers and monitors, and Bregman
Lagrangian flows. References: closed forms (Saul eqs. 16, 20, 27–28; Wibisono et al.
eq. 1 through `LagrangianFlow`), NumPy dense linear algebra, and independent flows
(`GradientFlow`, `NesterovFlow`)."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn

TIGHT = diffrax.PIDController(rtol=1e-11, atol=1e-12)
LAM = 0.7


@functools.cache
def setup(activation=None, bias=True, key=0):
    """A (3, 4, 2) MLP on 6 points, hidden biases zero, output bias non-zero.

    Polynomial(2) is smooth and 2-homogeneous: the rescaling symmetry, hence eq. 20,
    holds exactly and the ODE is smooth, so an adaptive solver resolves it to its
    tolerance (ReLU's kink would make it a Filippov system and the solver chatter).
    Cached: the same loss function object lets every solve reuse one compilation."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    activation = dyn.Polynomial(2) if activation is None else activation
    model = dyn.MLP((3, 4, 2), activation, bias=bias, key=k1)
    if bias:
        model = eqx.tree_at(lambda m: m.biases, model, (jnp.zeros(4), jnp.array([0.3, -0.2])))
    x = jax.random.normal(k2, (6, 3))
    y = jax.random.normal(k3, (6, 2))

    def loss(m):
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(m)(x) - y) ** 2, axis=-1))

    return model, loss


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


@functools.cache
def setup_dynamic(activation=None):
    """setup()'s model as its dynamic part w and the loss E(w) (what a flow sees)."""
    model, loss = setup(activation)
    w, static = eqx.partition(model, eqx.is_inexact_array)
    return w, lambda w: loss(eqx.combine(w, static))


# --- the decay law and descent along solves ------------------------------------------


@pytest.mark.parametrize("p, q", [(2.0, 2.0), (1.0, 1.0), (1.5, 3.0)])
def test_imbalance_decays_at_rate_lambda_and_loss_descends(p, q):
    model, loss = setup()
    reg = dyn.regularizers.Lpq(p, q)
    flow = dyn.WeightBalancingFlow(reg, LAM)
    ts = np.linspace(0.0, 2.0, 9)
    traj = dyn.simulate(flow, model, loss, t1=2.0, ts=ts, stepsize_controller=TIGHT,
                        monitors=[dyn.monitors.Imbalance(reg), dyn.monitors.Energy()],
                        save_params=False)
    q_t = np.asarray(traj.monitors["imbalance"])
    expected = q_t[0] * np.exp(-LAM * ts)[:, None]  # Saul eq. 20
    assert np.max(np.abs(q_t[0])) > 0.1  # unbalanced at the start, so the test can fail
    # The solver's tolerance (1e-11 relative) accumulated over ~50 steps.
    np.testing.assert_allclose(q_t, expected, rtol=0, atol=1e-8 * np.max(np.abs(q_t[0])))
    energy = np.asarray(traj.monitors["energy"])  # L = E + λR, Theorems 5–6
    assert energy[-1] < 0.9 * energy[0]
    # Monotone up to the solver's error on L (rtol 1e-11 of L ~ 1).
    assert np.all(np.diff(energy) < 1e-10)


def test_energy_rate_is_the_preconditioned_descent_of_theorem_5():
    # dL/dt = −(∂L/∂ω)ᵀ H⁻¹ ∂L/∂ω − ‖∂L/∂b_out‖² (Saul eq. 25, arXiv v1 eq. 50), with H
    # the dense Hessian of R(s e^ω) in ω by jax.hessian, inverted by NumPy.
    w, e = setup_dynamic()
    reg = dyn.regularizers.Lpq(1.5, 3.0)
    flow = dyn.WeightBalancingFlow(reg, LAM)
    shapes = [a.shape for a in w.weights]
    sizes = [a.size for a in w.weights]
    signs = [jnp.sign(a) for a in w.weights]

    def split(flat):
        parts = np.cumsum(sizes)[:-1]
        return [c.reshape(s) for c, s in zip(jnp.split(flat, parts), shapes)]

    def weights_of(omega):
        return tuple(s * jnp.exp(o) for s, o in zip(signs, split(omega)))

    omega = jnp.concatenate([jnp.log(jnp.abs(a)).ravel() for a in w.weights])

    def total(omega, b_out):
        m = eqx.tree_at(lambda m: (m.weights, m.biases), w,
                        (weights_of(omega), (w.biases[0], b_out)))
        return flow.total_loss(m, e)

    @jax.jit  # one compile instead of hundreds of eager dispatches
    def compute(omega):
        hess = jax.hessian(lambda o: reg(weights_of(o)))(omega)
        g_omega, g_b = jax.grad(total, argnums=(0, 1))(omega, w.biases[1])
        return hess, g_omega, g_b, flow.energy_rate(0.0, w, None, e)

    hess, g_omega, g_b, rate = (np.asarray(a) for a in compute(omega))
    expected = -g_omega @ np.linalg.solve(hess, g_omega) - np.sum(g_b**2)
    assert expected < 0
    np.testing.assert_allclose(rate, expected, rtol=1e-10)  # two exact formulas, roundoff


# --- the vector field: eq. 16 and its special cases -----------------------------------


@eqx.filter_jit
def _closed_and_implicit(reg, w, e):
    closed = dyn.WeightBalancingFlow(reg, LAM).vector_field(0.0, w, e)
    # The same R through the generic path: the lineax solve with H(ω) (eq. 24).
    implicit = dyn.WeightBalancingFlow(dyn.regularizers.FromFunction(reg), LAM)
    return closed, implicit.vector_field(0.0, w, e)


@pytest.mark.parametrize("p, q", [(2.0, 2.0), (1.0, 1.0), (1.5, 3.0), (3.0, 1.2)])
def test_closed_form_solves_eq16_and_matches_the_implicit_form(p, q):
    w, e = setup_dynamic()
    reg = dyn.regularizers.Lpq(p, q)
    closed, implicit = _closed_and_implicit(reg, w, e)
    # A dense solve of a 20×20 system against a closed form: roundoff times cond(H).
    np.testing.assert_allclose(_flat(closed), _flat(implicit), rtol=1e-10, atol=1e-12)
    # Eq. 16 itself: d/dt (W ⊙ ∂R/∂W), by forward-mode autodiff of W ⊙ jax.grad(R),
    # equals −W ⊙ ∂(E + λR)/∂W.
    v_of = lambda ws: tuple(a * g for a, g in zip(ws, jax.grad(reg)(ws)))  # noqa: E731
    dv = jax.jvp(v_of, (tuple(w.weights),), (tuple(closed.weights),))[1]
    grad = jax.grad(lambda m: e(m) + LAM * reg(m.weights))(w)
    rhs = tuple(-a * g for a, g in zip(w.weights, grad.weights))
    np.testing.assert_allclose(_flat(dv), _flat(rhs), rtol=1e-11, atol=1e-13)  # roundoff
    # Hidden biases frozen, output biases by gradient flow (Cor. 3.5).
    np.testing.assert_array_equal(closed.biases[0], 0.0)
    np.testing.assert_allclose(closed.biases[1], -grad.biases[1], rtol=1e-14)


def test_any_differentiable_regularizer_satisfies_eq16_and_eq20():
    w, e = setup_dynamic()

    def reg(ws):  # smooth, not a norm: Σ (W⁴/4 + W²/2) + Σ_i (Σ_j W_ij²)² / 8
        return sum(jnp.sum(a**4) / 4 + jnp.sum(a**2) / 2
                   + jnp.sum(jnp.sum(a**2, axis=-1) ** 2) / 8 for a in ws)

    flow = dyn.WeightBalancingFlow(reg, LAM)
    wdot = jax.jit(lambda w: flow.vector_field(0.0, w, e))(w)
    v_of = lambda ws: tuple(a * g for a, g in zip(ws, jax.grad(reg)(ws)))  # noqa: E731
    dv = jax.jvp(v_of, (tuple(w.weights),), (tuple(wdot.weights),))[1]
    grad = jax.grad(lambda m: e(m) + LAM * reg(m.weights))(w)
    rhs = tuple(-a * g for a, g in zip(w.weights, grad.weights))
    np.testing.assert_allclose(_flat(dv), _flat(rhs), rtol=1e-10, atol=1e-12)  # dense solve
    # dQ/dt = −λQ at this point (eq. 20), Q by hand: in-sum minus 2 × out-sum (degree 2).
    v1, v2 = v_of(tuple(w.weights))
    q_of = lambda m: (jnp.sum(v_of(m.weights)[0], -1)  # noqa: E731
                      - 2 * jnp.sum(v_of(m.weights)[1], -2))
    dq = jax.jvp(q_of, (w,), (wdot,))[1]
    np.testing.assert_allclose(dq, -LAM * (np.sum(v1, -1) - 2 * np.sum(v2, -2)),
                               rtol=1e-10, atol=1e-12)  # dense solve, roundoff
    np.testing.assert_allclose(
        dyn.regularizers.imbalance(setup()[0], reg)[0], np.sum(v1, -1) - 2 * np.sum(v2, -2),
        rtol=1e-14)


def test_p2_is_half_speed_gradient():
    # Saul below eq. 26: p = q = 2 (R = ½‖W‖²) gives Ẇ = −½ ∂L/∂W exactly.
    w, e = setup_dynamic()
    out = dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2.0, 2.0), LAM).vector_field(0.0, w, e)
    grad = jax.grad(lambda m: e(m) + LAM * 0.5 * sum(jnp.sum(a**2) for a in m.weights))(w)
    for g, o in zip(grad.weights, out.weights):
        np.testing.assert_allclose(o, -0.5 * g, rtol=1e-13, atol=1e-15)  # roundoff


@pytest.mark.slow
def test_p2_is_half_speed_gradient_flow():
    # Saul below eq. 26: p = q = 2 gives Ẇ = −½ ∂L/∂W, so W_WBF(t) = W_GF(t/2) on a
    # bias-free network (biases would move at full speed).
    model, loss = setup(bias=False)
    reg = dyn.regularizers.Lpq(2.0, 2.0)
    wbf = dyn.simulate(dyn.WeightBalancingFlow(reg, LAM), model, loss, t1=2.0,
                       stepsize_controller=TIGHT)
    gf = dyn.simulate(dyn.GradientFlow(), model, lambda m: loss(m) + LAM * reg(m.weights),
                      t1=1.0, stepsize_controller=TIGHT)
    a, b = _flat(wbf.final_params.weights), _flat(gf.final_params.weights)
    assert np.max(np.abs(a - _flat(model.weights))) > 0.05  # it moved
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)  # two solves at rtol 1e-11


def test_p1_is_abs_weighted_gradient():
    # Saul eq. 28's flow: Ẇ = −|W| ⊙ ∂L/∂W with L = E + λ Σ|W|.
    w, e = setup_dynamic()
    reg = dyn.regularizers.Lpq(1.0, 1.0)
    out = dyn.WeightBalancingFlow(reg, LAM).vector_field(0.0, w, e)
    grad = jax.grad(lambda m: e(m) + LAM * sum(jnp.sum(jnp.abs(a)) for a in m.weights))(w)
    for a, g, o in zip(w.weights, grad.weights, out.weights):
        np.testing.assert_allclose(o, -np.abs(a) * g, rtol=1e-13, atol=1e-15)  # roundoff


def test_monitors_against_numpy():
    model, _ = setup(dyn.ReLU())
    ws = [np.asarray(a) for a in model.weights]
    p, q = 1.5, 3.0
    norm = sum(np.sum(np.sum(np.abs(a) ** p, axis=1) ** (q / p)) for a in ws) ** (1 / q)
    w, static = eqx.partition(model, eqx.is_inexact_array)
    problem = dyn._problem.Problem(dyn.GradientFlow(), lambda m: 0.0, static)
    np.testing.assert_allclose(dyn.monitors.LpqNorm(p, q)(0.0, w, None, problem), norm,
                               rtol=1e-14)  # roundoff
    # Saul eq. 17 with V = π ρ (eqs. 6–7), degree 1: Σ_j V_ij − Σ_k V_ki.
    s1 = np.sum(np.abs(ws[0]) ** p, axis=1, keepdims=True)
    v1 = np.abs(ws[0]) ** p / s1 * s1 ** (q / p)
    s2 = np.sum(np.abs(ws[1]) ** p, axis=1, keepdims=True)
    v2 = np.abs(ws[1]) ** p / s2 * s2 ** (q / p)
    q_ref = v1.sum(1) - v2.sum(0)
    got = dyn.monitors.Imbalance(dyn.regularizers.Lpq(p, q))(0.0, w, None, problem)
    np.testing.assert_allclose(got, q_ref, rtol=1e-13)  # roundoff


# --- bad input -------------------------------------------------------------------------


def test_bad_input():
    w, e = setup_dynamic()
    for p, q in [(0.5, 2.0), (2.0, 0.9)]:
        with pytest.raises(ValueError, match="`[pq]` must be"):
            dyn.regularizers.Lpq(p, q)
    with pytest.raises(ValueError, match="`lam`"):
        dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2, 2), -1.0)
    with pytest.raises(ValueError, match="`regularizer`"):
        dyn.WeightBalancingFlow(3.0, 1.0)
    zero = eqx.tree_at(lambda m: m.weights[0], w, w.weights[0].at[0, 0].set(0.0))
    with pytest.raises(ValueError, match="not differentiable"):
        dyn.WeightBalancingFlow(dyn.regularizers.Lpq(1, 1), 1.0).vector_field(0.0, zero, e)

    def sqrt_reg(ws):  # ∂/∂W √|W| is infinite at 0
        return sum(jnp.sum(jnp.sqrt(jnp.abs(a))) for a in ws)

    with pytest.raises(ValueError, match="not differentiable"):
        dyn.WeightBalancingFlow(sqrt_reg, 1.0).vector_field(0.0, zero, e)
    tanh, tanh_loss = setup(dyn.Tanh())
    with pytest.raises(ValueError, match="Tanh"):
        dyn.simulate(dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2, 2), 1.0), tanh,
                     tanh_loss, t1=1.0)
    with pytest.raises(ValueError, match="Tanh"):
        dyn.regularizers.imbalance(tanh, dyn.regularizers.Lpq(2, 2))
    with pytest.raises(ValueError, match="dyn.MLP"):
        dyn.WeightBalancingFlow(dyn.regularizers.Lpq(2, 2), 1.0).vector_field(
            0.0, jnp.ones(3), lambda x: jnp.sum(x**2))
    with pytest.raises(ValueError, match="`h`"):
        dyn.BregmanLagrangianFlow(1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="`p` and `C`"):
        dyn.BregmanLagrangianFlow.polynomial(lambda x: x @ x, p=-1.0)


# --- Bregman Lagrangian flows ----------------------------------------------------------

A = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
B = jnp.array([1.0, -1.0, 0.5])


def quadratic(w):
    return 0.5 * w @ A @ w - B @ w


def h_exp(w):
    """Strictly convex and not quadratic: a non-Euclidean Bregman divergence."""
    return jnp.sum(jnp.exp(w)) + 0.5 * jnp.sum(w**2)


def h_euclid(w):
    return 0.5 * jnp.sum(w**2)


W_STAR = np.linalg.solve(np.asarray(A), np.asarray(B))
L_STAR = float(quadratic(jnp.asarray(W_STAR)))


def test_bregman_closed_form_is_the_euler_lagrange_flow_of_its_lagrangian():
    w, v = jnp.array([0.3, -0.2, 0.1]), jnp.array([0.5, 0.1, -0.3])
    flows = [dyn.BregmanLagrangianFlow.polynomial(h_exp, 3.0, 0.5),
             dyn.BregmanLagrangianFlow.exponential(h_exp, 0.7),
             dyn.BregmanLagrangianFlow(h_exp, lambda t: 0.3 * jnp.sin(t), lambda t: t,
                                       lambda t: t**2)]  # not ideal scaling

    @eqx.filter_jit
    def both(flow):
        reference = dyn.LagrangianFlow(flow.lagrangian).acceleration(1.3, w, v, quadratic)
        return flow.acceleration(1.3, w, v, quadratic), reference

    for flow in flows:
        # Two exact expressions, second derivatives by autodiff: roundoff.
        np.testing.assert_allclose(*both(flow), rtol=1e-11, atol=1e-12)


def test_bregman_polynomial_p2_is_nesterov_r3_vector_field():
    # h = ½‖·‖², p = 2, C = ¼: ẅ + (3/t)ẇ + ∇L = 0 (Wibisono et al. eq. 6 ff.); the same
    # acceleration at random (t, w, ẇ) is the same ODE (the solves: the slow test below).
    flow = dyn.BregmanLagrangianFlow.polynomial(h_euclid, 2.0, 0.25)
    nesterov = dyn.NesterovFlow(3.0)
    key = jax.random.key(1)
    ws, vs = jax.random.normal(key, (2, 5, 3))
    ts = jnp.array([0.3, 1.0, 2.5, 7.0, 40.0])
    a, b = jax.jit(jax.vmap(lambda t, w, v: (flow.acceleration(t, w, v, quadratic),
                                             nesterov.acceleration(t, w, v, quadratic))))(
        ts, ws, vs)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)  # a 3×3 solve: roundoff


@pytest.mark.slow
def test_bregman_polynomial_p2_is_nesterov_r3():
    # h = ½‖·‖², p = 2, C = ¼: ẅ + (3/t)ẇ + ∇L = 0 (Wibisono et al. eq. 6 ff.).
    flow = dyn.BregmanLagrangianFlow.polynomial(h_euclid, 2.0, 0.25)
    w0 = jnp.array([1.0, -1.0, 2.0])
    kw = dict(t0=0.5, t1=6.0, stepsize_controller=TIGHT, ts=np.linspace(0.5, 6.0, 5))
    a = dyn.simulate(flow, w0, quadratic, **kw)
    b = dyn.simulate(dyn.NesterovFlow(3.0), w0, quadratic, **kw)
    # Two solves of one ODE at rtol 1e-11 (the Bregman one through a 3×3 solve).
    np.testing.assert_allclose(np.asarray(a.params), np.asarray(b.params), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("schedule", ["polynomial", "exponential"])
def test_bregman_rate_exp_minus_beta(schedule):
    # Ideal scaling: D_h(w*, y) + e^β (L − L*) is non-increasing, so e^β (L − L*) stays
    # below its initial value (Wibisono et al. Thm 1.1); checked on a convex quadratic
    # with a non-Euclidean h, for p = 3 (rate t^{-3}) and the exponential schedule.
    if schedule == "polynomial":
        flow = dyn.BregmanLagrangianFlow.polynomial(h_exp, 3.0, 0.5)
    else:
        flow = dyn.BregmanLagrangianFlow.exponential(h_exp, 1.0)
    ts = np.linspace(1.0, 8.0, 30)
    # Params and velocities saved, the Lyapunov function evaluated afterwards: no
    # closure in the solve, so both schedules share one compilation.
    traj = dyn.simulate(flow, jnp.array([1.0, -1.0, 2.0]), quadratic, t0=1.0, t1=8.0, ts=ts,
                        stepsize_controller=TIGHT)
    lyap = jax.jit(jax.vmap(lambda t, w, v: flow.lyapunov(t, w, v, quadratic,
                                                          jnp.asarray(W_STAR), L_STAR)))
    beta = np.asarray(jax.vmap(flow.beta)(jnp.asarray(ts)))
    e = np.asarray(lyap(jnp.asarray(ts), traj.params, traj.velocities))
    gap = np.exp(beta) * (np.asarray(jax.vmap(quadratic)(traj.params)) - L_STAR)
    assert np.all(np.diff(e) <= 1e-9 * e[0])  # non-increasing up to solver error
    assert np.all(gap <= e[0] * (1 + 1e-9))
    # And the gap itself did fall by about e^{β(1) − β(8)}: L − L* ≤ e^{−β(t)} E(1).
    raw = gap / np.exp(beta)
    assert raw[-1] < 1e-2 * raw[0]


def test_quick_study_runs(tmp_path):
    from studies import saul_flows

    saul_flows.run(tmp_path, quick=True)
    assert (tmp_path / "results" / "saul_flows.nc").exists()
    assert any((tmp_path / "figures").glob("saul_flows_*.png"))
