"""The mistakes a new user makes, each answered by a ValueError that names the
argument (or by doing the right thing), and the silent wrong results it found.

Few solves, all on one tiny quadratic, so this file compiles little."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics.__main__ import main
from dynamics._trajectory import Trajectory


def quad(w):
    return 0.5 * jnp.sum(w**2)


W0 = jnp.ones(2)


# ---- _validate primitives -----------------------------------------------------------

def test_int_seed_is_a_prng_key():
    a = dyn.MLP((2, 3, 1), key=0)
    b = dyn.MLP((2, 3, 1), key=jax.random.key(0))
    np.testing.assert_array_equal(a.weights[0], b.weights[0])  # same draw, bit for bit
    x = dyn.datasets.digits(5, key=3).x
    np.testing.assert_array_equal(x, dyn.datasets.digits(5, key=jax.random.key(3)).x)
    r = dyn.datasets.rotational(4, key=1)
    np.testing.assert_array_equal(r.x, dyn.datasets.rotational(4, key=jax.random.key(1)).x)


@pytest.mark.parametrize("key, match", [
    (True, "PRNG key"),
    (-1, r"\[0, 2\*\*32\)"),
    (jax.random.split(jax.random.key(0)), "one PRNG key"),
    ("0", "PRNG key"),
])
def test_bad_keys(key, match):
    with pytest.raises(ValueError, match=match):
        dyn.MLP((2, 3, 1), key=key)


# ---- simulate: single objects, bools, complex, StepTo, provenance ---------------------

def test_single_monitor_and_event_and_array_dt0_and_numpy_max_steps(tmp_path):
    """`monitors=Loss()` and `events=LossBelow(..)` without a tuple; dt0 as a JAX array
    (provenance must stay a plain float for dyn.save); max_steps as a NumPy int."""
    traj = dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, dt0=jnp.asarray(0.1),
                        solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(),
                        monitors=dyn.monitors.Loss(), events=dyn.events.LossBelow(1e-9),
                        max_steps=np.int64(100))
    # Euler on ẇ = −w with h = 0.1: w_n = 0.9^n w0 exactly (up to rounding).
    np.testing.assert_allclose(traj.final_params, 0.9**10 * np.ones(2), rtol=1e-12)
    assert type(traj.meta["dt0"]) is float
    path = dyn.save(traj, tmp_path / "run.nc")
    assert dyn.load(path).attrs["dt0"] == 0.1


def test_step_to():
    """diffrax.StepTo needs no dt0: Euler then steps exactly to the given times."""
    steps = jnp.asarray([0.0, 0.1, 0.3, 0.6, 1.0])
    traj = dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, solver=diffrax.Euler(),
                        stepsize_controller=diffrax.StepTo(steps))
    expected = np.prod(1.0 - np.diff(np.asarray(steps)))  # Π (1 − h_k), Euler on ẇ = −w
    np.testing.assert_allclose(traj.final_params, expected * np.ones(2), rtol=1e-12)
    with pytest.raises(ValueError, match="dt0"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, dt0=0.1, solver=diffrax.Euler(),
                     stepsize_controller=diffrax.StepTo(steps))
    with pytest.raises(ValueError, match="ts\\[-1\\] = t1"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=2.0, solver=diffrax.Euler(),
                     stepsize_controller=diffrax.StepTo(steps))


def test_complex_params_rejected():
    z = jnp.zeros(1, jnp.complex128)
    with pytest.raises(ValueError, match="complex"):
        dyn.simulate(dyn.GradientFlow(), z, lambda z: jnp.sum(jnp.abs(z - (1 + 1j)) ** 2),
                     t1=1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_steps=True), "`max_steps` must be an int >= 1, got True"),
    (dict(max_steps=10.0), "max_steps"),
    (dict(progress="yes"), "progress"),
    (dict(throw=0), "throw"),
    (dict(save_params=None), "save_params"),
    (dict(monitors="loss"), "monitors"),
    (dict(monitors=[dyn.monitors.Loss(), "grad"]), "monitors"),
    (dict(events=[dyn.monitors.Loss()]), "events"),
    (dict(monitors=dyn.monitors.Function(lambda t, w, v: t, "time")), "time"),
    (dict(monitors=dyn.monitors.Function(lambda t, w, v: t, "a/b")), "'/'"),
    (dict(t1=jnp.inf), "t1"),
    (dict(dt0=-0.1), "dt0"),
])
def test_bad_simulate_arguments(kwargs, match):
    kw = dict(t1=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        dyn.simulate(dyn.GradientFlow(), W0, quad, **kw)


def test_tolerance_below_resolution_warns():
    controller = diffrax.PIDController(rtol=1e-17, atol=1e-17)
    # max_steps=0 stops the call after the warning, before anything compiles.
    with pytest.warns(UserWarning, match="below the resolution"), \
            pytest.raises(ValueError, match="max_steps"):
        dyn.simulate(dyn.GradientFlow(), W0, quad, t1=1.0, stepsize_controller=controller,
                     max_steps=0)


# ---- recompiles: thresholds and t_ref are traced ----------------------------------------

def test_threshold_and_t_ref_changes_do_not_retrace():
    traces = []

    def loss(w):
        traces.append(1)  # a Python side effect runs only while tracing
        return 0.5 * jnp.sum(w**2)

    def run(below, above, t_ref):
        return dyn.simulate(dyn.GeneralFlow(1.0, 1.0, t_ref=t_ref), W0, loss, t1=20.0,
                            events=(dyn.events.LossBelow(below), dyn.events.NormAbove(above)))

    first = run(0.1, 10.0, 1.0)
    n = len(traces)
    second = run(0.2, 20.0, 2.0)
    assert len(traces) == n  # new threshold, guard and t_ref: the same compiled solve
    # ẅ + ẇ + w = 0 from (1, 0): L = ‖w‖²/2 falls through 0.2 before 0.1.
    assert first.event == second.event == "loss_below"
    assert 0 < second.event_time < first.event_time
    # Independent check of the event time: L(w(t)) at the recorded time, with the
    # closed-form solution w = e^{-t/2}(cos ωt + sin ωt/(2ω)), ω = √3/2.
    om = np.sqrt(3) / 2
    for traj, level in ((first, 0.1), (second, 0.2)):
        t = traj.event_time
        w = np.exp(-t / 2) * (np.cos(om * t) + np.sin(om * t) / (2 * om))
        np.testing.assert_allclose(0.5 * 2 * w**2, level, rtol=1e-6)  # solver rtol 1e-7


def test_bad_event_and_flow_numbers():
    for bad in (True, "0.1", np.nan, None):
        with pytest.raises(ValueError, match="value"):
            dyn.events.LossBelow(bad)
    with pytest.raises(ValueError, match="> 0"):
        dyn.events.NormAbove(0.0)
    with pytest.raises(ValueError, match="t_ref"):
        dyn.GeneralFlow(1.0, 1.0, t_ref=np.nan)
    with pytest.raises(ValueError, match="name"):
        dyn.events.Condition(lambda t, w, v: t - 1.0, name=3)


# ---- monitors ---------------------------------------------------------------------------

def test_function_monitor_validates():
    with pytest.raises(ValueError, match="did you mean"):
        dyn.monitors.Function("loss")
    with pytest.raises(ValueError, match="name"):
        dyn.monitors.Function(lambda t, w, v: t, "")


# ---- to_xarray / save: never lose a variable --------------------------------------------

def _trajectory(params, monitors):
    ts = np.linspace(0.0, 1.0, 3)
    return Trajectory(ts=ts, params=params, velocities=None, monitors=monitors, t_final=1.0,
                      final_params=None, final_velocity=None, event=None, event_time=None,
                      diverged=False, success=True, result="successful", stats={},
                      meta={"dt0": np.float32(0.5)})


def test_colliding_names_raise_before_writing(tmp_path):
    params = {"w_0": np.zeros((3, 2)), "w": [np.ones((3, 2))]}  # both "param_w_0"
    path = tmp_path / "run.nc"
    with pytest.raises(ValueError, match="param_w_0"):
        dyn.save(_trajectory(params, {}), path)
    assert not path.exists()
    # A monitor named "param" and bare-array params, also named "param".
    with pytest.raises(ValueError, match="'param'"):
        _trajectory(np.zeros((3, 2)), {"param": np.zeros(3)}).to_xarray()
    ds = _trajectory({"w_0": np.zeros((3, 2)), "v": [np.ones((3, 2))]},
                     {"loss": np.arange(3.0)}).to_xarray()
    assert sorted(ds.data_vars) == ["loss", "param_v_0", "param_w_0"]
    assert type(ds.attrs["dt0"]) is float  # plain numbers in the attributes


# ---- datasets, losses, CLI --------------------------------------------------------------

def test_dataset_rejects_non_finite_and_string_labels():
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        dyn.datasets.Dataset(np.where(np.eye(3, 2), np.nan, x), np.arange(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        dyn.datasets.Dataset(x, np.full((3, 1), np.inf))
    with pytest.raises(ValueError, match="ints 0..k-1"):
        dyn.datasets.Dataset(x, np.array(["cat", "dog", "cat"]))
    with pytest.raises(ValueError, match="complex"):
        dyn.datasets.Dataset(x + 1j, np.arange(3))
    data = dyn.datasets.Dataset(x, np.array([True, False, True]))  # bool labels: 0/1
    assert data.num_classes == 2 and data.y.tolist() == [1, 0, 1]


def test_sum_of_losses_and_bad_hyperparameters():
    w = {"a": jnp.asarray([1.0, 2.0])}
    loss = sum([dyn.losses.l2(1.0), dyn.losses.l2(2.0)])
    np.testing.assert_allclose(loss(w), 1.5 * 5.0, rtol=1e-15)  # (1+2)/2 · ‖w‖², ‖w‖² = 5
    for bad in ("1", None, True):
        with pytest.raises(ValueError, match="lam"):
            dyn.losses.l2(bad)


def test_cli_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "a_file.txt"
    target.write_text("x")
    assert main(["run", "quickstart", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "x"


# ---- more new-user mistakes ("a dozen more") --------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(monitors=dyn.monitors.Loss), r"did you mean Loss\(\)"),
    (dict(events=[dyn.events.NonFinite]), r"did you mean NonFinite\(\)"),
    (dict(solver=diffrax.Tsit5), r"did you mean Tsit5\(\)"),
    (dict(stepsize_controller=diffrax.ConstantStepSize), r"did you mean ConstantStepSize\(\)"),
    (dict(monitors=dyn.monitors.Function(lambda t, w: t, "f")), "'f'.*(t, params, velocity)"),
    (dict(monitors=dyn.monitors.Function(lambda t, w, v: {"a": t}, "f")), "real array"),
    (dict(events=dyn.events.Condition(lambda t, w, v: w - 1.0, "c")), "scalar float"),
])
def test_more_bad_simulate_arguments(kwargs, match):
    kw = dict(t1=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        dyn.simulate(dyn.GradientFlow(), W0, quad, **kw)
    with pytest.raises(ValueError, match=r"did you mean GradientFlow\(\)"):
        dyn.simulate(dyn.GradientFlow, W0, quad, t1=1.0)


def test_more_bad_model_and_data_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"did you mean ReLU\(\)"):
        dyn.MLP((2, 3, 1), dyn.ReLU, key=0)
    with pytest.raises(ValueError, match="astype\\(int\\)"):
        dyn.datasets.Dataset(np.ones((3, 2)), np.array([0.0, 1.0, 1.0]))
    # A key without n shuffles the whole set rather than being ignored.
    shuffled = dyn.datasets.digits(key=0)
    ordered = dyn.datasets.digits()
    assert len(shuffled) == len(ordered) == 1797
    assert not np.array_equal(shuffled.y, ordered.y)
    np.testing.assert_array_equal(np.sort(shuffled.y), np.sort(ordered.y))  # a permutation
    target = tmp_path / "a_file.txt"
    target.write_text("x")
    assert main(["run", "quickstart", "--out", str(target / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
