"""Hessian spectrum monitors (TopEigenvalues, Sharpness, SpectralDensity) against a dense
`eigh` of the full Hessian (`jax.hessian` on the flattened parameters), alone, inside
`simulate` and `dyn.discrete.run`, and the edge-of-stability warning that uses them."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import wasserstein_distance

import dynamics as dyn
from dynamics._problem import Problem
from dynamics._tree import partition

# Lanczos stops at an eigenvalue-error estimate of 1e-10·|λ_1|; measured true errors on
# these nets are 2e-12–2e-11 relative to λ_1, so 1e-9 leaves a 50× margin.
RTOL = 1e-9


def _net(widths, loss_fn, n=60, activation="tanh"):
    data = dyn.datasets.digits(n)
    model = dyn.MLP(widths, activation, key=jax.random.key(1), init="lecun")
    return model, loss_fn(data)


@eqx.filter_jit
def _hessian(loss, params):
    w, static = partition(params)
    flat, unravel = ravel_pytree(w)
    return jax.hessian(lambda x: loss(eqx.combine(unravel(x), static)))(flat)


def _dense(loss, params):
    """Eigenvalues of the full Hessian of loss in the dynamic params, descending (one
    compilation per net shape and loss type: the data and weights are traced)."""
    return np.linalg.eigvalsh(np.asarray(_hessian(loss, params)))[::-1]


def _evaluate(monitor, loss, params):
    w, static = partition(params)
    problem = Problem(dyn.GradientFlow(), lambda w: loss(eqx.combine(w, static)), static)
    return np.asarray(eqx.filter_jit(lambda w: monitor(0.0, w, None, problem))(w))


@pytest.mark.parametrize("widths, loss_fn", [((64, 6, 10), dyn.losses.mse),
                                             ((64, 8, 8, 10), dyn.losses.cross_entropy)])
def test_top_eigenvalues_match_dense(widths, loss_fn):
    # 460 (MSE) and 682 (cross-entropy) parameters: Lanczos, not the dense path.
    model, loss = _net(widths, loss_fn)
    ref = _dense(loss, model)
    top = _evaluate(dyn.monitors.TopEigenvalues(10), loss, model)
    np.testing.assert_allclose(top, ref[:10], rtol=0, atol=RTOL * abs(ref[0]))
    if loss_fn is dyn.losses.mse:  # (one loss is enough for k = 1: the same code path)
        sharp = _evaluate(dyn.monitors.Sharpness(), loss, model)
        assert sharp.shape == () and abs(sharp - ref[0]) <= RTOL * abs(ref[0])


def test_relu_is_the_hessian_of_the_piece():
    # ReLU: autodiff's σ'' = 0, the Hessian of the current activation pattern; the
    # monitor agrees with jax.hessian, which differentiates the same way.
    model, loss = _net((64, 6, 10), dyn.losses.mse, activation="relu")
    ref = _dense(loss, model)
    top = _evaluate(dyn.monitors.TopEigenvalues(3), loss, model)
    np.testing.assert_allclose(top, ref[:3], rtol=0, atol=RTOL * abs(ref[0]))


def test_spectral_density_wasserstein():
    # The docstring's statement: W1 ≤ 3e-3 of the range at the defaults on these nets
    # (measured 2.0e-3 here, 682 parameters).
    model, loss = _net((64, 8, 8, 10), dyn.losses.cross_entropy)
    ref = _dense(loss, model)
    span = ref[0] - ref[-1]
    rec = _evaluate(dyn.monitors.SpectralDensity(), loss, model)
    assert rec.shape == (2, 16 * 80)
    assert rec[1].sum() == pytest.approx(1.0, abs=1e-12) and np.all(rec[1] >= 0)
    w1 = wasserstein_distance(rec[0], ref, rec[1])
    assert w1 <= 3e-3 * span


def _small():
    # The MSE net of test_top_eigenvalues_match_dense (460 parameters): its dense
    # Hessian is compiled already.
    return _net((64, 6, 10), dyn.losses.mse)


def test_monitors_inside_simulate():
    model, loss = _small()
    monitors = (dyn.monitors.TopEigenvalues(3),)
    traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=2.0, ts=jnp.linspace(0, 2, 3),
                        solver=diffrax.Euler(), dt0=0.5,
                        stepsize_controller=diffrax.ConstantStepSize(), monitors=monitors)
    assert traj.monitors["top_eigenvalues"].shape == (3, 3)
    for i in (0, 2):
        params = jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, traj.params)
        ref = _dense(loss, params)
        np.testing.assert_allclose(traj.monitors["top_eigenvalues"][i], ref[:3], rtol=0,
                                   atol=RTOL * abs(ref[0]))
    assert list(traj.coords["top_eigenvalues"]["index"]) == [1, 2, 3]


def test_monitors_inside_discrete_run():
    model, loss = _small()
    density = dyn.monitors.SpectralDensity(probes=2, steps=10, deflate=3)
    traj = dyn.discrete.run(dyn.discrete.GD(0.05), model, loss, 4, save_every=2,
                            monitors=(dyn.monitors.TopEigenvalues(2), density))
    assert traj.monitors["spectral_density"].shape == (3, 2, 3 + 2 * 10)
    for i in range(3):
        params = jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, traj.params)
        ref = _dense(loss, params)
        np.testing.assert_allclose(traj.monitors["top_eigenvalues"][i], ref[:2], rtol=0,
                                   atol=RTOL * abs(ref[0]))
        # Deflation: the top 3 eigenvalues are exact atoms of mass 1/n.
        nodes, weights = traj.monitors["spectral_density"][i]
        np.testing.assert_allclose(nodes[:3], ref[:3], rtol=0, atol=RTOL * abs(ref[0]))
        np.testing.assert_allclose(weights[:3], 1 / ref.size, rtol=1e-12)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_edge_of_stability_reached_during_the_run():
    # L = ½eʸx² − y: GD keeps x ≈ 0 while y grows at rate ≈ 1, so λ_1 ≈ eʸ passes
    # 2/η = 4 (y = ln 4) near t = 1.4; the start (λ_1 = 1) is stable: no start warning.
    def loss(w):
        return 0.5 * jnp.exp(w[1]) * w[0] ** 2 - w[1]

    with pytest.warns(RuntimeWarning, match=r"reaches .* at t = ") as record:
        traj = dyn.discrete.run(dyn.discrete.GD(0.5), jnp.asarray([0.01, 0.0]), loss, 8,
                                monitors=dyn.monitors.Sharpness())
    assert len(record) == 1
    lam = np.asarray(traj.monitors["sharpness"])
    first = int(np.argmax(0.5 * lam > 2.0))
    assert first > 0 and f"t = {traj.ts[first]:.6g}" in str(record[0].message)
    # Along the run, λ_1 is the exact top eigenvalue of the 2×2 Hessian.
    x, y = np.asarray(traj.params).T
    h = np.stack([[np.exp(y) , x * np.exp(y)], [x * np.exp(y), 0.5 * x**2 * np.exp(y)]])
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(h.transpose(2, 0, 1))[:, -1],
                               rtol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        dyn.monitors.TopEigenvalues(0)
    with pytest.raises(ValueError, match="`tol` must be > 0 and < 1"):
        dyn.monitors.Sharpness(tol=2.0)
    with pytest.raises(ValueError, match="`max_hvp` must be an int >= 4"):
        dyn.monitors.TopEigenvalues(3, max_hvp=3)
    with pytest.raises(ValueError, match="`probes` must be an int >= 1"):
        dyn.monitors.SpectralDensity(probes=0)
    with pytest.raises(ValueError, match="`deflate` must be an int >= 0"):
        dyn.monitors.SpectralDensity(deflate=-1)

    def loss(w):
        return 0.5 * jnp.sum(w**2)

    with pytest.raises(ValueError, match=r"k = 5 exceeds the number of parameters n = 3"):
        dyn.discrete.run(dyn.discrete.GD(0.1), jnp.ones(3), loss, 2,
                         monitors=dyn.monitors.TopEigenvalues(5), check_stability=False)
    with pytest.raises(ValueError, match=r"steps \+ deflate = 80 \+ 0 exceeds"):
        dyn.discrete.run(dyn.discrete.GD(0.1), jnp.ones(3), loss, 2,
                         monitors=dyn.monitors.SpectralDensity(), check_stability=False)


@pytest.mark.float32
def test_sharpness_float32():
    # float32: the default tol becomes 1e-5 (what a float32 Rayleigh quotient resolves);
    # the reference is float64 eigh of the float32 Hessian, itself rounded at ~1e-6.
    model, loss = _net((64, 6, 10), dyn.losses.mse)
    assert jnp.result_type(float) == jnp.float32
    ref = _dense(loss, model)
    top = _evaluate(dyn.monitors.TopEigenvalues(3), loss, model)
    assert top.dtype == np.float32
    np.testing.assert_allclose(top, ref[:3], rtol=0, atol=1e-4 * abs(ref[0]))
