"""dyn.sweep: grids of runs, vmapped and sharded, resumable, on Dask.

Every sweep here shares one structure (gradient flow on the rotational toy, Euler at a
constant step, 5 save times, the Loss monitor, chunks of 16 cells), so the file compiles
the batched solve once in process; the references are numpy Euler / Heun loops.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dynamics as dyn
from dynamics._sweep import _batch, _executors, _simulation

LOSS = dyn.losses.rotational_toy()  # L(w) = (|w|^2 - 1)^2, grad L = 4 (|w|^2 - 1) w
T1 = 4.0
TS = np.linspace(0.0, T1, 5)  # integer times: step ends for every dt = 1/k below
CHUNK = 16
ROOT = Path(__file__).resolve().parents[1]


def w0_of(seed):
    return np.random.default_rng(seed).normal(size=2)


def simulation(seed, dt, solver=None):
    return dyn.Simulation(
        dyn.GradientFlow(), jnp.asarray(w0_of(seed)), LOSS, t1=T1, dt0=dt,
        solver=diffrax.Euler() if solver is None else solver,
        stepsize_controller=diffrax.ConstantStepSize(), ts=TS,
        monitors=(dyn.monitors.Loss(),),
    )


def grad(w):
    return 4.0 * (w @ w - 1.0) * w


def reference(seed, dt, method="euler"):
    """numpy loop: the loss at TS and the final w (NaN/inf once it blew up)."""
    w = w0_of(seed)
    n = round(T1 / dt)
    losses = [(w @ w - 1.0) ** 2]
    with np.errstate(all="ignore"):
        for k in range(1, n + 1):
            g = grad(w)
            if method == "euler":
                w = w - dt * g
            else:  # Heun: the trapezoid over an Euler predictor
                w = w - 0.5 * dt * (g + grad(w - dt * g))
            if abs(k * dt - round(k * dt)) < 1e-9:
                losses.append((w @ w - 1.0) ** 2)
    return np.asarray(losses), w


def cells_equal(a: xr.Dataset, b: xr.Dataset):
    # Everything but the creation time stamp: values, coordinates, provenance.
    xr.testing.assert_equal(a, b)
    keys = set(a.attrs) | set(b.attrs)
    for key in keys - {"sweep_created"}:
        # NaN attributes (rtol of a constant step size) count as equal
        np.testing.assert_array_equal(a.attrs.get(key), b.attrs.get(key), err_msg=key)


def test_step_size_sweep_compiles_once_and_matches_numpy():
    dts = [1.0 / k for k in range(5, 21)]
    before = _batch.traces
    res = dyn.sweep(lambda dt: simulation(0, dt), {"dt": dts}, chunk_size=CHUNK,
                    progress=False)
    # One trace for 16 step sizes (0 if an earlier test compiled this structure).
    assert _batch.traces - before <= 1
    ds = res.dataset
    assert ds["loss"].dims == ("dt", "time") and np.allclose(ds["dt"], dts)
    np.testing.assert_array_equal(ds["time"], TS)
    for k, dt in zip(range(5, 21), dts, strict=True):
        losses, w = reference(0, dt)
        # Round-off only: the same Euler steps in another order of operations.
        np.testing.assert_allclose(ds["loss"].sel(dt=dt), losses, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(ds["param"].sel(dt=dt).isel(time=-1), w, rtol=1e-11)
        assert int(ds["stats_num_steps"].sel(dt=dt)) == 4 * k
    assert not ds["diverged"].any() and ds["success"].all()
    assert res.solved == 16 and res.loaded == 0
    table = res.table
    assert list(table["dt"]) == dts and "final_loss" in table and "diverged" in table
    # A second sweep of the same structure reuses the compiled call.
    before = _batch.traces
    dyn.sweep(lambda dt: simulation(1, dt), {"dt": dts[:3]}, chunk_size=CHUNK, progress=False)
    assert _batch.traces == before


class Interrupt(Exception):
    pass


def test_interrupted_sweep_resumes_and_equals_uninterrupted(tmp_path):
    axes = {"seed": range(12), "dt": [0.05, 0.25]}  # 24 cells: two chunks of 16
    calls = []

    def run(seed, dt, fail_at=None):
        if len(calls) == fail_at:
            raise Interrupt("killed")
        calls.append((seed, dt))
        return simulation(seed, dt)

    full = dyn.sweep(run, axes, out=tmp_path / "full.nc", chunk_size=CHUNK, progress=False)
    calls.clear()
    out = tmp_path / "resumed.nc"
    with pytest.raises(Interrupt):
        dyn.sweep(lambda seed, dt: run(seed, dt, fail_at=20), axes, out=out,
                  chunk_size=CHUNK, progress=False)
    # The first chunk finished and is on disk (one file per chunk); nothing else is.
    (part,) = (tmp_path / "resumed.nc.cells").glob("*.nc")
    assert dyn.load(part).sizes["cell"] == 16 and not out.exists()
    calls.clear()
    resumed = dyn.sweep(run, axes, out=out, chunk_size=CHUNK, progress=False)
    assert len(calls) == 8 and resumed.solved == 8 and resumed.loaded == 16
    cells_equal(resumed.dataset, full.dataset)
    cells_equal(dyn.load(out), dyn.load(tmp_path / "full.nc"))
    # A finished sweep run again does no solves (run_fn is not even called).
    calls.clear()
    again = dyn.sweep(run, axes, out=out, chunk_size=CHUNK, progress=False)
    assert calls == [] and again.solved == 0
    cells_equal(again.dataset, full.dataset)

    # The numbers, and the diverged cells, against numpy.
    assert 0 < diverged_against_numpy(full.dataset, axes) < 24  # the sweep went on past them


def diverged_against_numpy(ds, axes):
    """Check the losses and the diverged flags against numpy; count the diverged cells."""
    n_diverged = 0
    for seed in axes["seed"]:
        for dt in axes["dt"]:
            losses, w = reference(seed, dt)
            blew_up = not np.all(np.isfinite(w))
            n_diverged += blew_up
            assert bool(ds["diverged"].sel(seed=seed, dt=dt)) == blew_up
            # diffrax's own message, as `simulate` gives it (was "unknown" for cells
            # of a batch that took the per-cell path)
            result = str(ds["result"].sel(seed=seed, dt=dt).values)
            assert ("event occurred" in result) == blew_up, result
            if not blew_up:
                np.testing.assert_allclose(ds["loss"].sel(seed=seed, dt=dt), losses,
                                           rtol=1e-10, atol=1e-14)  # round-off
    return n_diverged


def test_structural_axis_loops_and_other_return_types():
    def run(solver, dt):
        return simulation(3, dt, solver)

    solvers = [diffrax.Euler(), diffrax.Heun()]
    ds = dyn.sweep(run, {"solver": solvers, "dt": [0.25, 0.125]}, chunk_size=CHUNK,
                   progress=False).dataset
    assert list(ds["solver"].values) == ["Euler", "Heun"]
    for name, method in (("Euler", "euler"), ("Heun", "heun")):
        for dt in (0.25, 0.125):
            losses, _ = reference(3, dt, method)
            np.testing.assert_allclose(ds["loss"].sel(solver=name, dt=dt), losses,
                                       rtol=1e-10, atol=1e-14)  # round-off
    assert list(ds["meta_solver"].values[:, 0]) == ["Euler", "Heun"]

    # run_fn returning a dict of arrays, with a width axis: shapes differ, NaN-padded.
    res = dyn.sweep(lambda width, scale: {"norm": scale * np.arange(width), "s": scale},
                    {"width": [2, 3], "scale": [1.0, 2.0]}, progress=False)
    np.testing.assert_array_equal(res.dataset["norm"].sel(width=2, scale=2.0), [0, 2, np.nan])
    np.testing.assert_array_equal(res.table["s"], [1.0, 2.0, 1.0, 2.0])


def test_bad_input():
    def run(seed, rtol=1e-6):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"unknown axis name 'sed'.*\['seed', 'rtol'\]"):
        dyn.sweep(run, {"sed": [0]})
    with pytest.raises(ValueError, match="axis 'seed' is empty"):
        dyn.sweep(run, {"seed": []})
    with pytest.raises(ValueError, match=r"'rtol' holds 0.0.*> 0"):
        dyn.sweep(run, {"seed": [0], "rtol": [1e-6, 0.0]})
    with pytest.raises(ValueError, match=r"needs \['seed'\]"):
        dyn.sweep(run, {"rtol": [1e-6]})
    with pytest.raises(ValueError, match="`axes` must be a non-empty dict"):
        dyn.sweep(run, {})
    with pytest.raises(ValueError, match="should end in .nc"):
        dyn.sweep(run, {"seed": [0]}, out="results/sweep.csv")
    with pytest.raises(ValueError, match="`stepsize_controller.rtol` must be a finite number >= 0"):
        dyn.Simulation(dyn.GradientFlow(), jnp.ones(2), LOSS, t1=1.0,
                       stepsize_controller=diffrax.PIDController(rtol=-1e-6, atol=1e-9)).prepare()
    with pytest.raises(ValueError, match="accepts dyn.simulate's keyword arguments"):
        dyn.Simulation(dyn.GradientFlow(), jnp.ones(2), LOSS, t1=1.0, progress=True)
    with pytest.raises(ValueError, match="must be None .in this process."):
        dyn.sweep(lambda seed: {"x": seed}, {"seed": [0]}, executor=4)


_SHARDED = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, sys.argv[2])
    import test_sweep as t
    import dynamics as dyn
    from dynamics._sweep import _batch
    assert len(jax.local_devices()) == 2
    seen = []
    shard = _batch._shard
    def spy(tree, devices, batched):
        out = shard(tree, devices, batched)
        # The cells' own arguments are split over both devices (shared ones are not).
        seen.extend(len(x.sharding.device_set)
                    for x, b in zip(jax.tree.leaves(out), batched) if b)
        return out
    _batch._shard = spy
    res = dyn.sweep(t.simulation, {"seed": range(3), "dt": [0.25, 0.125]},
                    chunk_size=t.CHUNK, progress=False)
    assert seen and set(seen) == {2}, seen
    dyn.save(res.dataset, sys.argv[1])
""")


def test_sharded_sweep_equals_in_process(tmp_path):
    # (the parent's XLA_FLAGS too: conftest's compile setting, so both runs round alike)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags.strip(),
               JAX_PLATFORMS="cpu", PYTHONPATH=_pythonpath())
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s.nc"),
                           str(Path(__file__).parent)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = dyn.sweep(simulation, {"seed": range(3), "dt": [0.25, 0.125]}, chunk_size=CHUNK,
                      progress=False, devices=[jax_device()]).dataset
    cells_equal(dyn.load(tmp_path / "s.nc"), local)


def jax_device():
    import jax

    return jax.local_devices()[0]


def _pythonpath():
    # This tree's `dynamics` first, in processes started from here as in this one.
    return os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@pytest.mark.parametrize("processes", [
    False,  # worker threads: no new process to start and compile in, so the default run
    pytest.param(True, marks=pytest.mark.slow),  # covers it; the full round trip is slow
])
def test_dask_local_cluster_equals_in_process(monkeypatch, processes):
    distributed = pytest.importorskip(
        "distributed", reason="Dask distributed is not installed (pip install dynamics[dist])")
    monkeypatch.setenv("PYTHONPATH", _pythonpath())  # the worker processes inherit it
    axes = {"seed": range(12), "dt": [0.05, 0.25]}  # two tasks of 16 cells (the 2nd padded)
    local = dyn.sweep(simulation, axes, chunk_size=CHUNK, progress=False).dataset
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=processes,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            res = dyn.sweep(simulation, axes, executor=client, chunk_size=CHUNK,
                            progress=False)
            assert len(client.scheduler_info()["workers"]) == 2
    cells_equal(res.dataset, local)
    assert res.solved == 24


def test_unreachable_scheduler(monkeypatch):
    pytest.importorskip("distributed", reason="Dask distributed is not installed")
    monkeypatch.setattr(_executors, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(ConnectionError, match="could not reach a Dask scheduler at"):
        dyn.sweep(lambda seed: {"x": seed}, {"seed": [0]}, executor="tcp://127.0.0.1:1")


def test_seed_axis_prepares_once_and_equals_the_per_cell_path(monkeypatch):
    """Cells that differ only in their initial weights are checked against one fully
    prepared template and their records read off the batched solve; the Dataset is the
    one the per-cell path (`prepare` and a Trajectory for every cell) gives, diverged
    cells included, and the numbers are numpy's."""
    axes = {"dt": [0.25, 0.05], "seed": range(12)}
    prepared = []
    full_prepare = _simulation.prepare

    def counting(*args, **kwargs):
        prepared.append(1)
        return full_prepare(*args, **kwargs)

    monkeypatch.setattr(_simulation, "prepare", counting)
    fast = dyn.sweep(simulation, axes, chunk_size=CHUNK, progress=False).dataset
    assert len(prepared) == 2  # once per step size, not per cell
    # Both paths taken: diverged cells go the per-cell way.
    assert 0 < diverged_against_numpy(fast, axes) < 24

    monkeypatch.setattr(dyn.Simulation, "prepare_like", lambda *a: None)
    monkeypatch.setattr(_batch, "batch_records", lambda items, out: [None] * len(items))
    slow = dyn.sweep(simulation, axes, chunk_size=CHUNK, progress=False).dataset
    assert len(prepared) == 2 + 24
    cells_equal(slow, fast)

    def bad(seed):  # a NaN start in a cell that would take the short cut
        sim = simulation(seed, 0.25)
        if seed == 2:
            sim.params = jnp.asarray([np.nan, 1.0])
        return sim

    monkeypatch.undo()
    with pytest.raises(ValueError, match="`params` contains NaN"):
        dyn.sweep(bad, {"seed": range(4)}, progress=False)


def toy_run(objective):
    """The file's structure with the loss as the axis value (the radius is an array
    leaf of RotationalToy: one compiled solve for every radius)."""
    return dyn.Simulation(
        dyn.GradientFlow(), jnp.asarray(w0_of(0)), objective, t1=T1, dt0=0.25,
        solver=diffrax.Euler(), stepsize_controller=diffrax.ConstantStepSize(), ts=TS,
        monitors=(dyn.monitors.Loss(),),
    )


def test_object_axis_cells_are_keyed_by_value(tmp_path):
    out = tmp_path / "toy.nc"
    one = dyn.sweep(toy_run, {"objective": [dyn.losses.rotational_toy(1.0)]}, out=out,
                    progress=False)
    axes = {"objective": [dyn.losses.rotational_toy(0.9)]}
    # Same label ("RotationalToy"), another value: not the grid `out` holds.
    with pytest.raises(ValueError, match=r"toy.nc.*same labels.*other values.*if_exists"):
        dyn.sweep(toy_run, axes, out=out, progress=False)
    two = dyn.sweep(toy_run, axes, out=out, progress=False, if_exists="extend")
    assert two.solved == 1 and two.loaded == 0
    final = float(two.dataset["final_loss"].squeeze())
    assert final != float(one.dataset["final_loss"].squeeze())
    np.testing.assert_allclose(final, reference_toy(0.9), rtol=1e-10)
    # Without the .nc the cells answer, each for its own radius.
    out.unlink()
    again = dyn.sweep(toy_run, axes, out=out, progress=False)
    assert again.loaded == 1 and float(again.dataset["final_loss"].squeeze()) == final
    # A value with no identity outside this process cannot key a cell file.
    with pytest.raises(ValueError, match="axis 'objective'.*cannot be keyed.*lambda"):
        dyn.sweep(toy_run, {"objective": [lambda w: w @ w]}, out=tmp_path / "f.nc",
                  progress=False)


def reference_toy(radius):
    """Euler at dt = 0.25 on (|w|^2 - r^2)^2 from w0_of(0): the loss at T1."""
    w = w0_of(0)
    for _ in range(round(T1 / 0.25)):
        w = w - 0.25 * 4.0 * (w @ w - radius**2) * w
    return (w @ w - radius**2) ** 2


def test_out_holding_another_grid_is_refused_replaced_or_locked(tmp_path):
    import fcntl

    out = tmp_path / "grid.nc"
    first = dyn.sweep(simulation, {"seed": range(3), "dt": [0.25]}, out=out, progress=False)
    assert first.solved == 3
    smaller = {"seed": [0], "dt": [0.25]}
    with pytest.raises(ValueError, match=r"grid.nc.*another grid.*\[0, 1, 2\].*replace"):
        dyn.sweep(simulation, smaller, out=out, progress=False)
    assert dyn.load(out).sizes["seed"] == 3  # nothing was overwritten
    # "extend" loads the cell both grids share; "replace" starts over.
    extended = dyn.sweep(simulation, smaller, out=out, progress=False, if_exists="extend")
    assert (extended.solved, extended.loaded) == (0, 1)
    replaced = dyn.sweep(simulation, smaller, out=out, progress=False, if_exists="replace")
    assert (replaced.solved, replaced.loaded) == (1, 0)
    assert [p.name for p in (tmp_path / "grid.nc.cells").glob("*.nc")] != []
    with pytest.raises(ValueError, match="`if_exists` must be one of"):
        dyn.sweep(simulation, smaller, out=out, if_exists="overwrite")
    # Someone else's netCDF file at `out` is not overwritten.
    other = tmp_path / "other.nc"
    dyn.save(xr.Dataset({"a": ("x", np.zeros(3))}), other)
    with pytest.raises(ValueError, match="other.nc' holds a netCDF file that is not a sweep"):
        dyn.sweep(simulation, smaller, out=other, progress=False, if_exists="extend")
    # While a sweep writes `out`, another one is refused (here: the lock held by hand).
    with open(tmp_path / "grid.nc.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(ValueError, match=r"being written by another sweep .process 4242"):
            dyn.sweep(simulation, smaller, out=out, progress=False)
    assert dyn.sweep(simulation, smaller, out=out, progress=False).solved == 0


def test_axis_named_like_a_record_is_refused_before_solving():
    calls = []

    def run(success, loss_dim1=0):
        calls.append(success)
        return simulation(0, 0.25)

    with pytest.raises(ValueError, match=r"axis name\(s\) \['success'\].*Rename the axis"):
        dyn.sweep(run, {"success": [0, 1, 2]}, progress=False)
    assert calls == [0]  # the first cell was prepared, none solved
    with pytest.raises(ValueError, match=r"\['loss_dim1'\]"):
        dyn.sweep(lambda loss_dim1: run(0), {"loss_dim1": [0, 1]}, progress=False)

    def record(norm, scale=1.0):
        calls.append(norm)
        return {"norm": np.arange(3.0) * scale}

    calls.clear()
    with pytest.raises(ValueError, match=r"\['norm'\]"):
        dyn.sweep(record, {"norm": [1, 2, 3]}, progress=False)
    assert calls == [1]


def test_unreadable_cell_files_are_named_and_solved_again(tmp_path):
    out = tmp_path / "c.nc"
    axes = {"seed": range(3), "dt": [0.25]}
    full = dyn.sweep(simulation, axes, out=out, chunk_size=1, progress=False)
    files = sorted((tmp_path / "c.nc.cells").glob("*.nc"))
    assert len(files) == 3
    files[0].write_bytes(b"")  # emptied
    files[1].write_bytes(b"\x89HDF\r\n garbage")  # cut short
    out.write_bytes(b"not netcdf")
    with pytest.warns(RuntimeWarning) as caught:
        again = dyn.sweep(simulation, axes, out=out, chunk_size=1, progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert files[0].name in said and files[1].name in said and "c.nc" in said
    assert (again.solved, again.loaded) == (2, 1)
    cells_equal(again.dataset, full.dataset)
    assert (tmp_path / "c.nc.corrupt").exists()


def test_padded_save_times_take_the_batched_path(monkeypatch):
    """Eleven save times are padded to twelve slots (`pad_ts`), so a sweep with twelve
    and then one with eleven share a compiled solve; the records have the eleven asked
    for, read off the batched solve (one Trajectory per batch, for the check), and equal
    simulate's."""
    def run(seed, n=11):
        sim = simulation(seed, 0.25)
        sim.kwargs["ts"] = np.linspace(0.0, T1, n)
        return sim

    dyn.sweep(lambda seed: run(seed, 12), {"seed": range(3)}, progress=False)
    before = _batch.traces
    built = []
    from_solve = dyn.Trajectory.from_solve.__func__
    monkeypatch.setattr(dyn.Trajectory, "from_solve", classmethod(
        lambda cls, *a, **k: built.append(1) or from_solve(cls, *a, **k)))
    ts = np.linspace(0.0, T1, 11)
    ds = dyn.sweep(run, {"seed": range(3)}, progress=False).dataset
    assert _batch.traces == before  # not compiled again
    assert len(built) == 1 and ds.sizes["time"] == 11
    np.testing.assert_array_equal(ds["time"], ts)
    monkeypatch.undo()
    for seed in range(3):
        traj = dyn.simulate(**{"flow": dyn.GradientFlow(), "params": jnp.asarray(w0_of(seed)),
                               "loss": LOSS}, **run(seed).kwargs)
        np.testing.assert_allclose(ds["loss"].sel(seed=seed), traj.monitors["loss"],
                                   rtol=1e-12)


def test_seed_sweep_emits_no_deprecation_warning():
    import warnings

    def run(seed):  # a fresh loss per cell: its arrays are compared by value
        sim = simulation(seed, 0.25)
        sim.loss = dyn.losses.rotational_toy()
        return sim

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        dyn.sweep(run, {"seed": range(3)}, progress=False)
