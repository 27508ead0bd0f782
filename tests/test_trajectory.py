"""Trajectory -> xarray -> netCDF and back; atomic writes; monitors on a real MLP."""

import os

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dynamics as dyn


@pytest.fixture(scope="module")
def mlp_run():
    data = dyn.datasets.digits(64, key=jax.random.key(1))
    # Tanh: a smooth field (a ReLU net chatters at its kinks at this tolerance)
    model = dyn.MLP((64, 8, 10), activation=dyn.Tanh(), key=jax.random.key(0))
    loss = dyn.losses.cross_entropy(data)
    traj = dyn.simulate(
        dyn.NewtonianFlow(), model, loss, t1=1.0, ts=jnp.linspace(0.0, 1.0, 6),
        stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        monitors=(dyn.monitors.Loss(), dyn.monitors.Energy(), dyn.monitors.GradNorm(),
                  dyn.monitors.LayerNorms()),
    )
    return model, loss, traj


def test_params_keep_model_structure(mlp_run):
    model, loss, traj = mlp_run
    assert isinstance(traj.params, dyn.MLP) and isinstance(traj.final_params, dyn.MLP)
    assert traj.params.weights[0].shape == (6, 8, 64)
    assert traj.velocities.biases[1].shape == (6, 10)
    np.testing.assert_array_equal(traj.params.weights[1][0], model.weights[1])
    # The final model is a working network: its loss is the monitored loss at t1.
    np.testing.assert_allclose(loss(traj.final_params), traj.monitors["loss"][-1], rtol=1e-12)


def test_monitors_against_direct_evaluation(mlp_run):
    model, loss, traj = mlp_run
    k = 3
    params = jax.tree.map(lambda a: a[k], traj.params)
    velocity = jax.tree.map(lambda a: a[k], traj.velocities)
    grads = jax.grad(loss)(params)
    # Each monitor recomputed here from the saved state: identical up to roundoff.
    np.testing.assert_allclose(traj.monitors["loss"][k], loss(params), rtol=1e-12)
    np.testing.assert_allclose(
        traj.monitors["grad_norm"][k],
        np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads))), rtol=1e-10)
    np.testing.assert_allclose(
        traj.monitors["layer_norms"][k],
        [np.linalg.norm(np.asarray(w)) for w in params.weights], rtol=1e-12)
    kinetic = 0.5 * sum(np.sum(np.asarray(v) ** 2) for v in jax.tree.leaves(velocity))
    np.testing.assert_allclose(traj.monitors["energy"][k], kinetic + loss(params), rtol=1e-12)
    # ND conserves H; at rtol = atol = 1e-9 per coordinate over ~600 coordinates, with
    # ReLU kinks making ∇L non-smooth, the drift observed is ~1e-6.
    assert np.ptp(traj.monitors["energy"]) < 1e-5


def test_to_xarray_and_save_roundtrip(mlp_run, tmp_path):
    _, _, traj = mlp_run
    ds = traj.to_xarray()
    assert set(ds.data_vars) >= {"loss", "energy", "grad_norm", "layer_norms",
                                 "param_weights_0", "param_biases_1", "velocity_weights_1"}
    assert ds["layer_norms"].dims == ("time", "layer_norms_dim1")
    path = dyn.save(traj, tmp_path / "sub" / "run.nc")
    assert path.exists() and os.listdir(path.parent) == ["run.nc"]  # no temp file left
    back = dyn.load(path)
    xr.testing.assert_identical(back, ds)
    np.testing.assert_array_equal(back["param_weights_0"].values, traj.params.weights[0])
    assert back.attrs["flow"] == "NewtonianFlow" and back.attrs["success"] == 1


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.nc"
    good = xr.Dataset({"a": ("x", np.arange(3.0))})
    dyn.save(good, path)

    def broken(self, *args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    with pytest.raises(OSError, match="disk full"):
        dyn.save(xr.Dataset({"a": ("x", np.zeros(5))}), path)
    monkeypatch.undo()
    # The old file is intact and no temporary is left behind.
    xr.testing.assert_identical(dyn.load(path), good)
    assert os.listdir(tmp_path) == ["run.nc"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="obj"):
        dyn.save({"a": 1}, tmp_path / "x.nc")
    with pytest.raises(ValueError, match="path"):
        dyn.save(xr.Dataset(), tmp_path / "x.csv")
    # A directory named like the file: IsADirectoryError from os.replace before.
    (tmp_path / "run.nc").mkdir()
    with pytest.raises(ValueError, match="`path` .*run.nc' is a directory"):
        dyn.save(xr.Dataset(), tmp_path / "run.nc")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        dyn.save(xr.Dataset(), tmp_path / "file" / "run.nc")


def test_monitor_only_run_has_no_params():
    traj = dyn.simulate(dyn.GradientFlow(), jnp.ones(3), lambda w: jnp.sum(w**2), t1=1.0,
                        ts=jnp.linspace(0.0, 1.0, 4), monitors=(dyn.monitors.Loss(),),
                        save_params=False)
    assert traj.params is None and traj.velocities is None
    np.testing.assert_allclose(traj.final_params, np.exp(-2.0), rtol=1e-6)  # default tol 1e-7
    ds = traj.to_xarray()
    assert list(ds.data_vars) == ["loss"]
    np.testing.assert_allclose(ds["loss"], 3.0 * np.exp(-4.0 * np.linspace(0, 1, 4)), rtol=1e-6)


def test_load_returns_tree_for_grouped_files(tmp_path):
    runs = {"a": xr.Dataset({"x": ("t", np.arange(3.0))}),
            "b": xr.Dataset({"x": ("t", np.arange(5.0))})}
    path = dyn.save(xr.DataTree.from_dict(runs), tmp_path / "runs.nc")
    back = dyn.load(path)
    assert isinstance(back, xr.DataTree) and set(back.children) == {"a", "b"}
    np.testing.assert_array_equal(back["b"]["x"], np.arange(5.0))


def test_unbounded_max_steps_and_gf_velocity_in_function_monitor():
    """`max_steps=None` works; a Function monitor under GF sees ẇ = −∇L = −2w."""
    speed = dyn.monitors.Function(lambda t, w, v: v, "velocity")
    traj = dyn.simulate(dyn.GradientFlow(), jnp.ones(2), lambda w: jnp.sum(w**2), t1=1.0,
                        max_steps=None, monitors=(speed,),
                        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10))
    assert "max_steps" not in traj.stats
    np.testing.assert_allclose(traj.monitors["velocity"], -2.0 * traj.params, rtol=1e-14)


def test_rescaling_charges_carry_layer_and_unit(tmp_path):
    """`rescaling_charges_dim1` had no coordinate: a reader could not tell which charge
    belongs to which neuron. Now `layer` (hidden layer, from 1) and `unit` label it, in
    to_xarray and through dyn.save, for simulate and for discrete runs."""
    model = dyn.MLP((3, 4, 2, 1), dyn.ReLU(), key=0)
    loss = dyn.losses.mse(dyn.datasets.teacher_student(16, (3, 4, 1), key=1))
    monitors = (dyn.monitors.RescalingCharges(), dyn.monitors.Loss())
    runs = (dyn.simulate(dyn.GradientFlow(), model, loss, t1=0.1, monitors=monitors),
            dyn.discrete.run(dyn.discrete.GD(0.01), model, loss, 4, monitors=monitors,
                             check_stability=False))
    for traj in runs:
        ds = dyn.load(dyn.save(traj, tmp_path / "run.nc"))
        charges = ds["rescaling_charges"]
        np.testing.assert_array_equal(charges["layer"], [1, 1, 1, 1, 2, 2])
        np.testing.assert_array_equal(charges["unit"], [0, 1, 2, 3, 0, 1])
        # The labels are right: the charge of layer 2, unit 1 is ‖W_2[1,:]‖² − ‖W_3[:,1]‖².
        w2, w3 = np.asarray(model.weights[1]), np.asarray(model.weights[2])
        q = charges.isel(time=0).where((charges.layer == 2) & (charges.unit == 1), drop=True)
        np.testing.assert_allclose(q.values, [w2[1] @ w2[1] - w3[:, 1] @ w3[:, 1]], rtol=1e-12)
        assert "layer" not in ds["loss"].coords
