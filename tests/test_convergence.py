"""`dyn.convergence_order`: observed orders against closed forms and Dopri8 references.

GF least squares: the linear problem has the closed form w* + e^{−Ht}(w0 − w*); on it
Dopri8 and Tsit5 converge faster than nominal (their stability polynomials match e^z
beyond their order), so the high orders are measured on the nonlinear least-squares
fit of a small tanh network against Dopri8 at rtol 1e-13.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import dynamics as dyn

rng = np.random.default_rng(0)
X, Y = rng.normal(size=(8, 3)) / np.sqrt(8), rng.normal(size=8)
H = X.T @ X
W_STAR = np.linalg.solve(H, X.T @ Y)


def linear_loss(w):
    return 0.5 * jnp.sum((jnp.asarray(X) @ w - Y) ** 2)


def closed_form(t):
    return W_STAR + scipy.linalg.expm(-H * t) @ (np.zeros(3) - W_STAR)


@pytest.mark.parametrize("solver, order", [
    (diffrax.Euler(), 1), (diffrax.Heun(), 2), (dyn.solvers.GaussLegendre(2), 4)])
def test_orders_on_linear_least_squares(solver, order):
    result = dyn.convergence_order(dyn.GradientFlow(), jnp.zeros(3), linear_loss, solver=solver,
                                   t1=4.0, reference=closed_form)
    assert order in result
    assert abs(result.order - order) < 0.1  # the issue's ±0.1
    assert result.interval[1] - result.interval[0] < 0.2  # a real measurement, not a shrug
    # The errors it reports are the closed form's: recompute one by hand.
    dt = result.dts[result.used][0]
    traj = dyn.simulate(dyn.GradientFlow(), jnp.zeros(3), linear_loss, t1=4.0, dt0=dt,
                        solver=solver, stepsize_controller=diffrax.ConstantStepSize(),
                        max_steps=None)
    np.testing.assert_allclose(result.errors[result.used][0],
                               np.abs(traj.final_params - closed_form(4.0)).max(), rtol=1e-12)


def _tanh_problem():
    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jnp.sin(x[:, :1])
    model = dyn.MLP((2, 3, 1), dyn.Tanh(), key=jax.random.key(1))
    return model, lambda m: 0.5 * jnp.mean((jax.vmap(m)(x) - y) ** 2)


@pytest.mark.parametrize("solver, order, dts", [
    (diffrax.Dopri8(), 8, 8.0 * 2.0 ** -np.arange(2, 7)),
    (diffrax.Tsit5(), 5, None),
])
def test_high_orders_on_nonlinear_least_squares(solver, order, dts):
    model, loss = _tanh_problem()
    result = dyn.convergence_order(dyn.GradientFlow(), model, loss, solver=solver, t1=8.0,
                                   dts=dts)
    assert result.used.sum() >= 3 and np.all(result.errors[result.used] >= result.floor)
    if order == 8:
        assert order in result
    else:
        # Tsit5's fifth-order error constant is minimised (Tsitouras 2011), so above the
        # float64 floor its sixth-order term still dominates: measured 6.0–6.4 here.
        assert order < result.order < order + 1.5


def test_stops_at_the_floor_and_bad_input():
    result = dyn.convergence_order(dyn.GradientFlow(), jnp.zeros(3), linear_loss,
                                   solver=dyn.solvers.GaussLegendre(3), t1=4.0,
                                   reference=closed_form, dts=4.0 * 2.0 ** -np.arange(1, 9))
    # Order 6: from dt = 1/8 on the error is rounding; those points are left out.
    assert not result.used[-1] and result.errors[-1] < 1e-11
    assert 6 in result
    with pytest.raises(ValueError, match="confidence"):
        dyn.convergence_order(dyn.GradientFlow(), jnp.zeros(3), linear_loss,
                              solver=diffrax.Euler(), t1=1.0, confidence=1.5)
    with pytest.raises(ValueError, match="dts"):
        dyn.convergence_order(dyn.GradientFlow(), jnp.zeros(3), linear_loss,
                              solver=diffrax.Euler(), t1=1.0, dts=[0.1, -0.1, 0.2])
    with pytest.raises(ValueError, match="floor"):  # everything at rounding level
        dyn.convergence_order(dyn.GradientFlow(), jnp.zeros(3), linear_loss,
                              solver=diffrax.Dopri8(), t1=1.0, reference=closed_form,
                              dts=[1e-3, 5e-4, 2.5e-4])
