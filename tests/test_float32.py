"""The float32 subset: the package end to end in JAX's default precision.

Run by `make test` as `DYNAMICS_FLOAT32=1 pytest -n 2 -m float32 tests/test_float32.py`;
skipped in the float64 run. The default controller in float32 is rtol = 1e-5,
atol = 1e-7 (`simulate`), so references are met to ~1e-4 relative, not 1e-10: tight
conservation checks need float64 and live in the main suite.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import dynamics as dyn

pytestmark = pytest.mark.float32

# Default float32 controller (rtol 1e-5) and a handful of steps to t1 = 2: the global
# error is a few times rtol; 2e-4 leaves a margin and still fails a wrong flow by orders.
RTOL = 2e-4

W0 = jnp.ones(2)
TS = jnp.linspace(0.0, 2.0, 5)


def quad(w):
    return 0.5 * jnp.sum(w**2)


# First in the file: the subset's longest test (~14 s of its ~36), so that one xdist
# worker starts it at once while the other takes the rest.
def test_quickstart_quick_float32(tmp_path):
    from studies import quickstart

    written = quickstart.run(tmp_path, quick=True)
    ds = dyn.load(written["results"])
    assert "quick" in ds.attrs and ds.attrs["quick"] == 1
    assert jax.config.read("jax_enable_x64") is False


def test_default_precision_is_float32():
    assert jnp.result_type(float) == jnp.float32  # the subset really runs in float32


def test_real_events_float32():
    """LossBelow: L = e^{-2t} under GF from (1, 1), so L = 0.1 at t* = ½ ln 10. NormAbove:
    ẇ = w from (1, 1) reaches ‖w‖ = 10 at t* = ln(10/√2). Condition: t − 0.7 = 0. The
    root finder's tolerance follows the dtype (4 ulps of t in float32); a 1e-13
    tolerance here ran the root find out of steps before the tolerance followed the dtype."""
    gf = dyn.GradientFlow()
    traj = dyn.simulate(gf, W0, quad, t1=5.0, events=dyn.events.LossBelow(0.1))
    assert traj.event == "loss_below" and traj.success
    np.testing.assert_allclose(traj.event_time, 0.5 * np.log(10.0), rtol=RTOL)

    traj = dyn.simulate(gf, W0, lambda w: -quad(w), t1=5.0, throw=False,
                        events=dyn.events.NormAbove(10.0))
    assert traj.event == "norm_above" and traj.diverged
    np.testing.assert_allclose(traj.event_time, np.log(10.0 / np.sqrt(2.0)), rtol=RTOL)

    traj = dyn.simulate(gf, W0, quad, t1=5.0,
                        events=dyn.events.Condition(lambda t, w, v: t - 0.7, "t07"))
    assert traj.event == "t07"
    # The condition is exact in t: the bracket closes to a few ulps of t (float32).
    np.testing.assert_allclose(traj.event_time, 0.7, rtol=8 * np.finfo(np.float32).eps)


def _rk(fun, y0, t0=0.0):
    # A float64 SciPy reference at tight tolerance (its error is ~1e-10, far below RTOL).
    sol = solve_ivp(fun, (t0, float(TS[-1])), y0, t_eval=np.asarray(TS, float) + 0 * t0,
                    rtol=1e-11, atol=1e-12, method="DOP853")
    return sol.y[0]


def _nesterov_ref():
    # ẅ + (3/t) ẇ + w = 0 from t0 = 0.5, w = 1, ẇ = 0 (Su, Boyd & Candès, r = 3).
    sol = solve_ivp(lambda t, y: [y[1], -3.0 / t * y[1] - y[0]], (0.5, 2.5), [1.0, 0.0],
                    t_eval=np.linspace(0.5, 2.5, 5), rtol=1e-11, atol=1e-12, method="DOP853")
    return sol.y[0]


om = np.sqrt(3.0) / 2.0
t = np.asarray(TS, float)
damped = np.exp(-t / 2) * (np.cos(om * t) + np.sin(om * t) / (2 * om))  # ẅ + ẇ + w = 0

CATALOGUE = [
    ("GF", dyn.GradientFlow(), 0.0, np.exp(-t)),
    ("Mirror", dyn.MirrorFlow(lambda w: 0.5 * jnp.sum(w**2)), 0.0, np.exp(-t)),
    ("ND", dyn.NewtonianFlow(), 0.0, np.cos(t)),
    ("HB", dyn.HeavyBallFlow(1.0), 0.0, damped),
    ("General", dyn.GeneralFlow(1.0, 1.0), 0.0, damped),
    ("Lagrangian", dyn.LagrangianFlow(lambda t, w, v, loss: 0.5 * jnp.sum(v**2) - loss(w)),
     0.0, np.cos(t)),
    ("Nesterov", dyn.NesterovFlow(), 0.5, None),
]


@pytest.mark.parametrize("name, flow, t0, reference", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_every_flow_float32(name, flow, t0, reference):
    """Every catalogue entry on L = ½‖w‖² from w = (1, 1), ẇ = 0, against its closed form
    (exp, cos, the damped oscillator) or, for Nesterov, a float64 SciPy solve."""
    ts = TS + t0
    traj = dyn.simulate(flow, W0, quad, t0=t0, t1=float(ts[-1]), ts=ts,
                        monitors=dyn.monitors.Loss())
    assert traj.success and traj.params.dtype == np.float32
    ref = _nesterov_ref() if reference is None else reference
    # Compare on the scale of the solution, since cos t crosses zero.
    np.testing.assert_allclose(traj.params[:, 0], ref, rtol=0, atol=RTOL)
    np.testing.assert_allclose(traj.monitors["loss"], ref**2, rtol=0, atol=2 * RTOL)


def test_fixed_steps_and_step_to_float32():
    """Euler in float32 with a constant step and with StepTo: w_n = 0.9^n exactly (up to
    float32 rounding over ten steps)."""
    for kw in (dict(dt0=0.1, stepsize_controller=diffrax.ConstantStepSize()),
               dict(stepsize_controller=diffrax.StepTo(jnp.linspace(0.0, 1.0, 11)))):
        traj = dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, solver=diffrax.Euler(), **kw)
        np.testing.assert_allclose(traj.final_params, 0.9**10, rtol=1e-5)  # ~10 roundings


def test_times_are_checked_in_the_solves_float32():
    """t1 that rounds to t0 in float32 integrated nothing and reported success; save times
    from jnp.linspace(0, 0.3, 4) ended at 0.30000001 (t1 rounded) and were refused."""
    with pytest.raises(ValueError, match=r"`t0` = 1.*`t1` = 1.*equal in float32"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t0=1e8, t1=1e8 + 1)
    ts = jnp.linspace(0.0, 0.3, 4)
    traj = dyn.simulate(dyn.GradientFlow(), W0, quad, t1=0.3, ts=ts,
                        monitors=dyn.monitors.Loss())
    assert traj.success and traj.ts.dtype == np.float32 and len(traj.ts) == 4
    np.testing.assert_array_equal(traj.ts, np.asarray(ts))
    np.testing.assert_allclose(traj.monitors["loss"], np.exp(-2 * np.asarray(ts)), rtol=RTOL)
    with pytest.raises(ValueError, match="ts.*lie in"):  # beyond a few ulps: refused
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=0.3, ts=jnp.linspace(0.0, 0.31, 4))
    # diffrax counts steps in int32 here: 2**31 raised a raw OverflowError.
    with pytest.raises(ValueError, match="max_steps.*int32"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=0.3, max_steps=2**31)


def test_default_references_finish_float32():
    """The default reference was Dopri8 at 1e-13, which float32 cannot meet: the
    convergence_order one ran into max_steps and work_precision's (unbounded) never
    ended. In float32 it is 100 eps; GF on ½‖w‖² from (1, 1): Euler's order is 1."""
    result = dyn.convergence_order(dyn.GradientFlow(), W0, quad, solver=diffrax.Euler(),
                                   t1=1.0, progress=False)
    assert 1 in result and result.reliable and result.used.sum() >= 3
    ds = dyn.work_precision(dyn.GradientFlow(), W0, quad, {"Tsit5": diffrax.Tsit5()},
                            t1=1.0, tolerances=(1e-3, 1e-5), repeats=1, progress=False)
    assert ds.finished.values.all() and ds.attrs["reference"] == "Dopri8 rtol=atol=1.19209e-05"
    assert np.all(ds.error.values < 1e-2)


def test_tight_tolerance_warns_in_float32():
    with pytest.warns(UserWarning, match="float32"), pytest.raises(ValueError, match="max_"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, max_steps=0,
                     stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12))


def test_mlp_on_digits_float32():
    """A small MLP on digits in float32: GF decreases the loss at every save time, and
    the recorded L(0) is the loss evaluated directly."""
    data = dyn.datasets.digits(32, key=0)
    model = dyn.MLP((64, 8, 10), "tanh", key=1)
    loss = dyn.losses.cross_entropy(data)
    traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=1.0, ts=jnp.linspace(0, 1, 3),
                        monitors=dyn.monitors.Loss())
    values = np.asarray(traj.monitors["loss"])
    assert values.dtype == np.float32 and np.all(np.diff(values) < 0)
    np.testing.assert_allclose(values[0], float(loss(model)), rtol=1e-6)  # same float32 ops


def test_filippov_mode_refuses_float32():
    """The Filippov mode refuses float32 parameters, naming the switch to float64: run
    anyway, the 5-7-6-3 net of tests/test_filippov.py (Dopri5, rtol 1e-4) finished
    'successfully' 2.0 away from the float64 solution (4 sliding entries for 10)."""
    model = dyn.MLP((1, 2, 1), activation=dyn.ReLU(), key=jax.random.key(0))
    loss = dyn.losses.mse(dyn.datasets.Dataset(jnp.ones((3, 1)), jnp.zeros((3, 1))))
    assert model.weights[0].dtype == jnp.float32
    with pytest.raises(ValueError, match=r"float64.*jax_enable_x64"):
        dyn.simulate(dyn.GradientFlow(), model, loss, t1=1.0, nonsmooth=dyn.Filippov())


def test_central_flow_toy_float32():
    """`dyn.CentralFlow` on the toy L = ½(1 − y)x² + 0.05y of tests/test_eos.py, on its
    edge y* = 1 − 2/η: X = σ² = 2b and ẇ = 0 in closed form. The 2×2 Hessian is dense;
    1e-5 is a few float32 ulps of the operands."""

    def toy(w):
        return 0.5 * (1.0 - w[1]) * w[0] ** 2 + 0.05 * w[1]

    flow = dyn.CentralFlow(0.5)
    st = jax.jit(lambda w: flow.state(0.0, w, toy))(jnp.array([0.0, -3.0]))
    assert st.velocity.dtype == jnp.float32
    np.testing.assert_allclose(st.covariance, [[0.1]], rtol=1e-5)
    np.testing.assert_allclose(st.velocity, [0.0, 0.0], atol=1e-6)
