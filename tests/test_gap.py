"""`dyn.gap` / `dyn.gap_order`: the gap against scipy's DOP853, the fitted orders that
backward-error analysis predicts (docs/guides/discrete.md), compile-once
sweeps, and bad input. Smooth problem: log-cosh regression on 3 parameters."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import dynamics as dyn
from dynamics import discrete
from dynamics._gap import sharpness_warning

RNG = np.random.default_rng(0)
X = RNG.normal(size=(12, 3))
Y = RNG.normal(size=12)
W0 = jnp.asarray([0.7, -0.4, 0.9])
T1 = 2.0


def loss(w):
    r = jnp.asarray(X) @ w - jnp.asarray(Y)
    return jnp.mean(jnp.logaddexp(r, -r) - jnp.log(2.0))


def np_grad(w):
    return X.T @ np.tanh(X @ w - Y) / len(Y)


# Heavy ball and Nesterov momentum start on their flows' slow manifold, v_0 = −∇L/(1−β):
# from rest they would spend O(1) steps building momentum, an O(η) offset (order 1).
BETA = 0.5
V_SLOW = jnp.asarray(-np_grad(np.asarray(W0)) / (1 - BETA))


def test_gap_against_dop853():
    # Start and end saved (save_every=20): the same compiled GF solve as the GD → GF
    # gap_order below, so this test compiles no flow of its own.
    traj = discrete.run(discrete.GD(0.1), W0, loss, 20, save_every=20,
                        monitors=(dyn.monitors.Loss(), dyn.monitors.GradNorm()))
    ds = dyn.gap(traj, dyn.GradientFlow(), loss,
                 monitors=(dyn.monitors.Loss(), dyn.monitors.GradNorm()))
    ref = scipy.integrate.solve_ivp(lambda t, w: -np_grad(w), (0, 2.0), np.asarray(W0),
                                    method="DOP853", t_eval=traj.ts, rtol=1e-13, atol=1e-13)
    expected = np.linalg.norm(np.asarray(traj.params) - ref.y.T, axis=1)
    # The flow is solved at rtol 1e-10: its error is ~1e-10 against gaps of ~1e-2.
    np.testing.assert_allclose(ds["distance"], expected, rtol=1e-7, atol=1e-10)
    assert ds["distance"][0] == 0.0 and ds["distance"][-1] > 1e-3
    np.testing.assert_allclose(ds["loss_flow"], [float(loss(jnp.asarray(w))) for w in ref.y.T],
                               rtol=1e-8)
    np.testing.assert_allclose(ds["loss_gap"], ds["loss_discrete"] - ds["loss_flow"], rtol=0)
    grad_norms = [np.linalg.norm(np_grad(w)) for w in ref.y.T]
    np.testing.assert_allclose(ds["grad_norm_flow"], grad_norms, rtol=1e-8)
    assert ds.attrs["algorithm"] == "GD" and ds.attrs["flow"] == "GradientFlow"


def _order(ds):
    return ds.attrs["order"], ds.attrs["order_ci_low"], ds.attrs["order_ci_high"]


def test_gd_orders_and_the_flow_compiles_once_over_eight_step_sizes(capsys):
    traces = []

    def counted(w):
        traces.append(1)  # runs at trace time only
        return loss(w)

    def modified_flow(a):
        return dyn.ModifiedGradientFlow(a.eta)

    sizes = [0.2, 0.1, 0.05]
    # Stability checks off: test_edge_of_stability_warns_in_gap covers them.
    first = dyn.gap_order(discrete.GD, W0, loss, sizes, T1, check_stability=False,
                          progress=False)
    modified = dyn.gap_order(discrete.GD, W0, counted, sizes, T1, flow=modified_flow,
                             check_stability=False)
    order, low, high = _order(first)
    # The bounds: GD → GF order 1 ± 0.15, GD → modified flow 2 ± 0.2.
    assert abs(order - 1) < 0.15 and low < order < high
    assert abs(_order(modified)[0] - 2) < 0.2
    # The modified flow is the better model at every step size.
    assert np.all(modified["gap"] < 0.2 * first["gap"])
    # Eight new step sizes, eight new step counts: neither the flow nor the run retraces.
    n = len(traces)
    capsys.readouterr()
    sizes = [2.0 / k for k in (6, 7, 9, 11, 13, 15, 17, 19)]
    ds = dyn.gap_order(discrete.GD, W0, counted, sizes, T1, flow=modified_flow,
                       check_stability=False, progress=True)
    assert len(traces) == n
    # Progress off a terminal: a line at the start, at each quarter and at the end.
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["gap_order"] * 5, lines
    assert lines[-1].startswith("gap_order: done (8 step sizes")
    assert ds.sizes["step_size"] == 8 and abs(ds.attrs["order"] - 2) < 0.2


@pytest.mark.parametrize(
    "make, flow",
    [
        (lambda eta: discrete.HeavyBall(eta, BETA),
         lambda a: dyn.ModifiedHeavyBallFlow(a.eta, a.beta)),
        (lambda eta: discrete.NesterovMomentum(eta, BETA), None),  # alg.flow is its modified flow
    ],
    ids=["heavy_ball", "nesterov_momentum"],
)
def test_momentum_orders_against_modified_flows(make, flow):
    ds = dyn.gap_order(make, W0, loss, [0.2, 0.1, 0.05], T1, flow=flow, v0=V_SLOW,
                       check_stability=False)
    # The bound: 2 ± 0.2 (the derived coefficient for Nesterov momentum,
    # η(1−β+2β²)/(4(1−β)²), is what makes this 2 rather than 1).
    assert abs(_order(ds)[0] - 2) < 0.2


def test_heavy_ball_order_against_second_order_modified_flow():
    # HeavyBall's own flow, η(1+β)/2 ẅ + (1−β)ẇ + ∇L = 0 (Kunin et al. 2021), matches the
    # recurrence to O(η²) in the equation: (w_{k+1} − 2w_k + w_{k−1})/η² = ẅ + O(η²) and
    # (w_k − w_{k−1})/η = ẇ − (η/2)ẅ + O(η²). Started near the slow manifold the gap is
    # O(η²); measured local slopes 2.91, 2.50, 2.18, 2.08 from η = 0.2 down to 0.0125
    # (η³ terms still count at the larger steps), fitted 2.13 over 0.05–0.0125 (CI 1.76–2.49).
    make = lambda eta: discrete.HeavyBall(eta, BETA)  # noqa: E731
    sizes = [0.05, 0.025, 0.0125]
    slow = dyn.gap_order(make, W0, loss, sizes, T1, v0=V_SLOW, check_stability=False)
    assert slow.attrs["flow"] == "GeneralFlow"
    assert abs(_order(slow)[0] - 2) < 0.2
    # From rest both build momentum in an initial layer of O(η) flow time, but not alike:
    # the recurrence lags the slow motion by ηβ/(1−β)² · ∇L, the flow by
    # η(1+β)/(2(1−β)²) · ∇L (constant gradient). That O(η) offset persists: order 1
    # (measured 1.02, 95% CI 0.96–1.08).
    rest = dyn.gap_order(make, W0, loss, sizes, T1, v0=jnp.zeros(3), check_stability=False)
    assert abs(_order(rest)[0] - 1) < 0.15


@pytest.mark.slow  # one more flow to compile; the first-order modified flow is in the default run
def test_gd_order_against_second_order_modified_flow():
    # (η/2)ẅ + ẇ + ∇L = 0 from the slow manifold v(0) = −∇L(w0): order 2 like its
    # first-order reduction (measured 2.02).
    ds = dyn.gap_order(discrete.GD, W0, loss, [0.2, 0.1, 0.05], T1,
                       flow=lambda a: dyn.modified_second_order_flow(a.eta),
                       check_stability=False)
    assert abs(_order(ds)[0] - 2) < 0.2


def test_nagd_and_leapfrog_orders():
    sizes = [0.1**2, 0.05**2, 0.025**2]  # √s = Δt = 0.1, 0.05, 0.025 divide T1
    nagd = dyn.gap_order(discrete.NAGD, W0, loss, sizes, T1, check_stability=False)
    leapfrog = dyn.gap_order(discrete.Leapfrog, W0, loss, sizes, T1, against="time_step",
                             check_stability=False)
    # The bounds: NAGD → NAGF shrinks like √s (0.5 ± 0.15 in s); Leapfrog → ND
    # is order 2 ± 0.2 in its step √η.
    assert abs(_order(nagd)[0] - 0.5) < 0.15
    assert abs(_order(leapfrog)[0] - 2) < 0.2
    np.testing.assert_allclose(leapfrog["time_step"], [0.1, 0.05, 0.025], rtol=1e-14)


def test_relu_reference_through_the_filippov_mode():
    """GD against GF on a one-hidden-unit ReLU net whose flow crosses a kink and then
    slides along one (t ≈ 0.29 to 2.11): a plain adaptive reference chatters there
    (measured: 1,000,000 Tsit5 steps at 1e-10 without reaching t = 3); with
    `nonsmooth=dyn.Filippov()` the reference is exact, checked against the SciPy
    piecewise reference of tests/test_filippov.py."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _filippov_reference import filippov_reference
    from test_filippov import _one_unit, _theta

    model, relu_loss, x, y = _one_unit()
    mode = dyn.Filippov(max_sliding=2)
    ds = dyn.gap_order(discrete.GD, model, relu_loss, [0.04, 0.02, 0.01, 0.005], 3.0,
                       nonsmooth=mode)
    # measured 1.00, 95% CI [0.56, 1.44]: GD zigzags across the sliding kink and
    # crosses at other times than the flow, an irregular O(η) error (over the first
    # three step sizes alone the slope is 0.83)
    assert abs(ds.attrs["order"] - 1) < 0.15 and "Filippov" in ds.attrs["nonsmooth"]
    ref, _ = filippov_reference(_theta(model), np.asarray(x), np.asarray(y), 3.0)
    gd = discrete.run(discrete.GD(0.01), model, relu_loss, 300, save_every=300)
    expected = np.linalg.norm(_theta(jax.tree.map(lambda a: a[-1], gd.params)) - ref)
    # the reference and the mode both hold ~1e-10; the gap is ~8e-3
    assert float(ds["gap"].sel(step_size=0.01)) == pytest.approx(expected, abs=1e-9)


def test_edge_of_stability_warns_in_gap():
    # log-cosh curvature here is below mean‖x‖² ≈ 3; η = 1 puts ηλ_max past 2.
    lam = np.linalg.eigvalsh(X.T @ (X / np.cosh(X @ np.asarray(W0) - Y)[:, None] ** 2)
                             / len(Y)).max()
    eta = 2.5 / lam
    traj = discrete.run(discrete.GD(eta), W0, loss, 2, check_stability=False)
    # `gap` calls this before it integrates the flow (called alone here to save a solve).
    with pytest.warns(RuntimeWarning, match="edge of stability"):
        sharpness = sharpness_warning(traj, loss, W0)
    # Lanczos (or, for a few parameters, a dense eigh): far within 1e-3.
    assert sharpness == pytest.approx(2.5, rel=1e-3)


def test_fit_order_confidence_interval():
    from dynamics._gap import fit_order

    h = np.asarray([0.4, 0.2, 0.1, 0.05])
    # Exact power law: slope 1.5 with a zero-width interval (rounding only).
    slope, low, high = fit_order(h, 3.0 * h**1.5)
    assert slope == pytest.approx(1.5, rel=1e-12) and high - low < 1e-10
    noisy = 3.0 * h**1.5 * np.asarray([1.1, 0.9, 1.05, 1.0])
    slope, low, high = fit_order(h, noisy)
    ref = jax.numpy.polyfit(np.log(h), np.log(noisy), 1)[0]
    assert slope == pytest.approx(float(ref), rel=1e-10) and low < 1.5 < high


@pytest.mark.parametrize(
    "alg, flow, match",
    [
        (discrete.Leapfrog(0.01), dyn.GradientFlow(), "second-order flow"),
        (discrete.NAGD(0.01), dyn.ModifiedGradientFlow(0.1), "second-order flow"),
        (discrete.GD(0.1), dyn.NewtonianFlow(), "friction"),
        (discrete.GD(0.1), "gf", "catalogue"),
    ],
)
def test_wrong_pairings(alg, flow, match):
    v0 = None if alg.first_order else jnp.zeros(3)
    traj = discrete.run(alg, W0, loss, 2, v0=v0, check_stability=False)
    with pytest.raises(ValueError, match=match):
        dyn.gap(traj, flow, loss)


def test_bad_gap_input():
    traj = discrete.run(discrete.GD(0.1), W0, loss, 2, check_stability=False)
    with pytest.raises(ValueError, match="two or more"):
        dyn.gap(eqx.tree_at(lambda t: t.ts, traj, traj.ts[:1]), dyn.GradientFlow(), loss)
    traj = eqx.tree_at(lambda t: t.meta, traj, {})  # as from dyn.simulate
    with pytest.raises(ValueError, match="dyn.discrete.run"):
        dyn.gap(traj, dyn.GradientFlow(), loss)
    with pytest.raises(ValueError, match="three or more"):
        dyn.gap_order(discrete.GD, W0, loss, [0.1, 0.2], T1)
    with pytest.raises(ValueError, match="whole number of steps"):
        dyn.gap_order(discrete.GD, W0, loss, [0.3, 0.2, 0.1], T1)
    with pytest.raises(ValueError, match="positive"):
        dyn.gap_order(discrete.GD, W0, loss, [0.1, 0.0, 0.2], T1)
    with pytest.raises(ValueError, match="eta"):
        dyn.modified_second_order_flow(-0.1)


@pytest.mark.slow  # ~20 s of compilation; test_gap and test_discrete cover its claims
def test_discrete_gap_study_quick(tmp_path):
    from studies import discrete_gap

    written = discrete_gap.run(tmp_path, quick=True)
    for key in ("orders", "charges", "edge"):
        assert written[key].stat().st_size > 10_000
    tree = dyn.load(written["results"])
    order = tree["orders/GD_vs_modified_flow"].attrs["order"]
    assert abs(order - 2) < 0.2  # the bound for GD → modified flow
    charges = tree["charges"].to_dataset()
    # The exact law: measured and summed predicted drift agree to rounding (~1e-15 |Q|).
    np.testing.assert_allclose(charges["measured"], charges["predicted"], rtol=0, atol=1e-12)
    # Heavy ball with weight decay: the closed form (damped oscillator + η² forcing) on
    # the measured charges, rounding only (40 steps of a 3-term recurrence).
    decay = tree["decay"].to_dataset()
    scale = float(np.max(np.abs(decay["measured"])))
    np.testing.assert_allclose(decay["closed_form"], decay["measured"], rtol=0,
                               atol=1e-12 * scale)
