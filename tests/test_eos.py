"""Edge-of-stability flows (`dyn.CentralFlow`) against independent references: closed forms
on a toy whose central flow is known exactly, a brute-force solution of the
complementarity problem, a dense `eigh` of the Hessian with finite differences for the
third derivative, and the study's quick run."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

import dynamics as dyn
from dynamics._flows._cone import solve_psd_qp, sym_mat

# ---------------------------------------------------------------------------------------
# The complementarity problem: min_{X ⪰ 0} ½⟨X, QX⟩ + ⟨C, X⟩


@pytest.mark.parametrize("k", [2, 3])
def test_psd_qp_matches_brute_force(k):
    # Reference: the same objective over X = LLᵀ (L lower triangular, unconstrained), BFGS
    # from 10 random starts. Its optimum agrees to ~1e-15; 1e-10 allows for BFGS's stop.
    rng = np.random.default_rng(k)
    p = k * (k + 1) // 2
    solve = jax.jit(solve_psd_qp, static_argnums=2)
    i, j = np.tril_indices(k)
    ui, uj = np.triu_indices(k)
    weight = np.where(ui == uj, 1.0, np.sqrt(2.0))  # sym_vec in NumPy (BFGS calls it often)
    for _ in range(4):
        g = rng.normal(size=(p, p + 2))
        Q, c = g @ g.T, rng.normal(size=p)
        x, res = solve(jnp.asarray(Q), jnp.asarray(c), k)
        x = np.asarray(x)

        def objective(v, Q=Q, c=c):
            return 0.5 * v @ Q @ v + c @ v

        def over_factor(v, objective=objective):
            L = np.zeros((k, k))
            L[i, j] = v
            return objective((L @ L.T)[ui, uj] * weight)

        best = min((minimize(over_factor, rng.normal(size=len(i)), method="BFGS",
                             options={"gtol": 1e-12}) for _ in range(10)),
                   key=lambda r: r.fun)
        assert objective(x) <= best.fun + 1e-10 * (1 + abs(best.fun))
        # KKT: X ⪰ 0, S = QX + C ⪰ 0, ⟨X, S⟩ = 0, each to rounding (1e-12 of the scale).
        X = np.asarray(sym_mat(jnp.asarray(x), k))
        S = np.asarray(sym_mat(jnp.asarray(Q @ x + c), k))
        scale = np.linalg.norm(c) * (1 + np.linalg.norm(x))
        assert np.linalg.eigvalsh(X).min() >= -1e-12 * scale
        assert np.linalg.eigvalsh(S).min() >= -1e-12 * scale
        assert abs(np.sum(X * S)) <= 1e-12 * scale
        assert float(res) < 1e-10


# ---------------------------------------------------------------------------------------
# A toy with a closed-form central flow: L = ½ a(y)|x|² + b·y, a(y) = c − y.
# The Hessian at x = 0 is diag(a(y)·I, 0): gradient flow sharpens at rate b (ẏ = −b) until
# a = 2/η; on the edge σ² = 2⟨−∇L, ∇S⟩/‖∇S‖² = 2b with ∇S = (0, −1), so ẏ = −b + σ²/2 = 0:
# the flow stops at y* = c − 2/η and predicts GD's average loss b·y* + ½σ²·(2/η).

C, B, ETA = 1.0, 0.05, 0.5


def _toy(w):
    x, y = w[:-1], w[-1]
    return 0.5 * (C - y) * jnp.sum(x**2) + B * y


def test_central_flow_toy_closed_form():
    flow = dyn.CentralFlow(ETA)
    y_star = C - 2.0 / ETA
    on_edge = jnp.array([0.0, y_star])
    st = flow.state(0.0, on_edge, _toy)
    # Closed forms, to rounding (the eigenproblem is 2×2, dense).
    np.testing.assert_allclose(st.covariance, [[2 * B]], rtol=1e-12)
    np.testing.assert_allclose(st.velocity, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(flow.time_averaged_loss(0.0, on_edge, _toy),
                               B * y_star + 2 * B / ETA, rtol=1e-12)
    # Below the edge it is gradient flow (X = 0), exactly.
    below = flow.state(0.0, jnp.array([0.0, 0.0]), _toy)
    assert float(below.covariance[0, 0]) == 0.0
    np.testing.assert_allclose(below.velocity, [0.0, -B], atol=1e-15)
    # Integrated: y = −bt until the edge, then held at y*. The relaxation (τ = 1 step)
    # rounds the corner over a few η; 1e-6 is the solve's tolerance with margin.
    traj = dyn.simulate(flow, jnp.array([0.0, 0.0]), _toy, t1=150.0,
                        ts=jnp.array([0.0, 40.0, 100.0, 150.0]),
                        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-10))
    y = np.asarray(traj.params)[:, 1]
    np.testing.assert_allclose(y[1], -B * 40.0, rtol=1e-6)
    np.testing.assert_allclose(y[2:], y_star, atol=1e-6)


def test_central_flow_two_unstable_directions():
    # Two x's share one y: the top eigenvalue a(y) is double, so the flow needs k = 2 and
    # the complementarity problem (B is singular here: only tr X is determined). On the
    # edge tr X = 2b and ẏ = 0; with k = 1 the second direction is not watched.
    flow = dyn.CentralFlow(ETA, k=2)
    st = flow.state(0.0, jnp.array([0.0, 0.0, C - 2.0 / ETA]), _toy)
    assert np.trace(np.asarray(st.covariance)) == pytest.approx(2 * B, rel=1e-9)
    assert np.linalg.eigvalsh(np.asarray(st.covariance)).min() >= -1e-12
    np.testing.assert_allclose(st.velocity, 0.0, atol=1e-12)
    assert float(st.residual) < 1e-10


# ---------------------------------------------------------------------------------------
# A small Tanh MLP: the field against a dense eigh and finite differences.


@pytest.fixture(scope="module")
def mlp():
    data = dyn.datasets.digits(40)
    model = dyn.MLP((64, 3, 10), dyn.Tanh(), key=jax.random.key(2), init="lecun")
    w, static = eqx.partition(model, eqx.is_inexact_array)
    loss = dyn.losses.mse(data)
    flat, unravel = ravel_pytree(w)

    def flat_loss(x):
        return loss(eqx.combine(unravel(x), static))

    return flat, flat_loss


def _dense_sharpness(flat_loss, x):
    return np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(flat_loss))(x)))[-1]


def test_central_flow_field_matches_dense_reference(mlp):
    flat, flat_loss = mlp
    hess = jax.jit(jax.hessian(flat_loss))
    evals, evecs = np.linalg.eigh(np.asarray(hess(flat)))
    s, u = evals[-1], evecs[:, -1]
    eta = 0.99 * 2.0 / s  # just below the edge: X is decided by the rate, not the margin
    flow = dyn.CentralFlow(eta)
    st = jax.jit(lambda x: flow.state(0.0, x, flat_loss))(flat)
    # Lanczos against dense eigh: the eigenvalue to 1e-10 (its tol is 1e-12 relative).
    assert abs(float(st.evals[0]) - s) <= 1e-10 * s
    # ∇S by Hellmann–Feynman against central differences of the dense top eigenvalue along
    # random directions (h = 1e-4: O(h²) truncation ~1e-8 of the value).
    rng = np.random.default_rng(0)
    grad_s = np.asarray(st.third[0])
    for _ in range(3):
        d = rng.normal(size=flat.shape)
        d /= np.linalg.norm(d)
        h = 1e-4
        fd = (_dense_sharpness(flat_loss, flat + h * d)
              - _dense_sharpness(flat_loss, flat - h * d)) / (2 * h)
        assert abs(grad_s @ d - fd) <= 1e-6 * np.linalg.norm(grad_s)
    # σ² from the closed form of the k = 1 problem with the dense references.
    g = np.asarray(jax.grad(flat_loss)(flat))
    tau = float(flow.tau) * eta
    sigma2 = max(0.0, -2.0 * ((2.0 / eta - s) + tau * grad_s @ g) / (tau * grad_s @ grad_s))
    np.testing.assert_allclose(float(st.covariance[0, 0]), sigma2, rtol=1e-7)
    np.testing.assert_allclose(st.velocity, -(g + 0.5 * sigma2 * grad_s),
                               atol=1e-7 * np.linalg.norm(g))
    del u


def test_central_flow_bad_input(mlp):
    flat, flat_loss = mlp
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eta"):
            dyn.CentralFlow(bad)
    with pytest.raises(ValueError, match="`k`"):
        dyn.CentralFlow(0.1, k=0)
    with pytest.raises(ValueError, match="tau"):
        dyn.CentralFlow(0.1, tau=0.0)
    with pytest.raises(ValueError, match="max_hvp"):
        dyn.CentralFlow(0.1, k=3, max_hvp=3)
    with pytest.raises(ValueError, match="tol"):
        dyn.CentralFlow(0.1, tol=1.5)
    with pytest.raises(ValueError, match="k = 3 exceeds the number of parameters n = 2"):
        dyn.CentralFlow(0.1, k=3).vector_field(0.0, jnp.zeros(2), _toy)
