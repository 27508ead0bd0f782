"""`sweep`: a grid of runs over named axes -> one `xarray.Dataset`.

A cell of the grid is one value per axis; `run_fn(**cell)` says what to do there. Cells
whose runs differ only in array values (seed -> initial weights, step size, tolerance,
a loss hyperparameter) share one compiled solve, `jax.vmap`-ed over the cells and sharded
across local devices; cells that differ in structure (solver, flow, width) are solved in
separate groups, looped in Python. Which cells can share a call is read off the runs
themselves (same pytree structure, shapes and static parts), not declared. Finished cells
are written to netCDF as they come (atomically, by `dyn.save`), so an interrupted sweep
resumes where it stopped; chunks of cells can run as tasks on Dask distributed.
"""

import contextlib
import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import xarray as xr

from .._io import load, save
from .._validate import one_of
from ._axes import axis_keys, axis_labels, cell_key, check_axes
from ._batch import run_cells
from ._executors import client_of, run_dask
from ._records import check_names, combine, read_batch, record_names, sweep_attrs, write_batch

# What a sweep does when `out` (or its cells) holds the results of another grid.
IF_EXISTS = ("error", "replace", "extend")
# The grid whose cells `<out>.cells/` holds, written before the first cell is solved.
MANIFEST = "sweep.json"


class SweepResult(eqx.Module):
    """What `dyn.sweep` returns.

    - `dataset`: an `xarray.Dataset` with one dimension per axis (labelled by the axis
      values; objects such as solvers by their class name), a `time` dimension for time
      series, and provenance in `attrs`.
    - `table`: a tidy `pandas.DataFrame` of the per-cell scalars (one row per cell).
    - `path`: the netCDF file written, or None.
    - `solved`, `loaded`: how many cells this call ran and how many it read back from an
      earlier, interrupted or finished, run.
    """

    dataset: xr.Dataset
    path: Path | None
    solved: int
    loaded: int

    @property
    def table(self):
        ds = self.dataset
        axes = json.loads(ds.attrs["sweep_axes"])
        scalars = [n for n, v in ds.data_vars.items() if set(v.dims) <= set(axes)]
        return ds[scalars].to_dataframe().reset_index()




def sweep(
    run_fn: Callable[..., Any],
    axes: Mapping[str, Iterable],
    *,
    out: str | os.PathLike | None = None,
    if_exists: str = "error",
    executor: Any = None,
    chunk_size: int | None = None,
    devices: Sequence | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run `run_fn` on every cell of the grid `axes` and gather the results.

    ```python
    def run(seed, dt):
        model = dyn.MLP((2, 8, 1), activation=dyn.Tanh(), key=jax.random.key(seed))
        return dyn.Simulation(dyn.GradientFlow(), model, loss, t1=1.0, dt0=dt,
                              solver=diffrax.Euler(),
                              stepsize_controller=diffrax.ConstantStepSize(),
                              ts=jnp.linspace(0, 1, 11), monitors=(dyn.monitors.Loss(),))

    res = dyn.sweep(run, {"seed": range(8), "dt": [1e-2, 1e-3]}, out="results/sweep.nc")
    res.dataset["loss"].sel(dt=1e-3)        # dims (seed, time)
    res.table                                # one row per cell: seed, dt, diverged, ...
    ```

    **Arguments:**

    - `run_fn`: called as `run_fn(**cell)` with one value per axis. It returns
      - a `dyn.Simulation` (the arguments of `dyn.simulate`): cells whose simulations
        differ only in array values (initial weights, `dt0`, tolerances, arrays inside a
        loss or flow) are solved in ONE compiled, `jax.vmap`-ed call, sharded over
        `devices`; a change of structure (solver, flow, model width, monitors) starts a
        separate group. Losses and flows should be Equinox modules (all of `dyn`'s are):
        a fresh `lambda` per cell is a new function and gets a group of its own;
      - a `dyn.Trajectory` (run_fn calls `dyn.simulate` itself): cells run one by one;
      - a dict name -> array: any computation, one cell at a time.
    - `axes`: axis name -> values (list, range, array), e.g. `{"seed": range(8),
      "solver": [diffrax.Tsit5(), diffrax.Dopri5()]}`. Names must be arguments of
      `run_fn`, and not the names of what the cells record (a monitor's name such as
      `loss`, `success`, a key of `run_fn`'s dict): that is refused when the first cell
      is prepared, before anything is solved. Axes named rtol/atol/tol/tolerance or
      dt/dt0/step_size/lr/learning_rate/eta must hold numbers > 0. Labels on the
      Dataset: numbers and strings as given, other objects by class name (by repr when
      two share a class).
    - `out`: a `.nc` path. Each finished cell is written atomically to `<out>.cells/`
      as it finishes; a sweep started again with the same `out` skips those cells, and
      when every cell is done the whole grid is written to `out` (also atomically). A
      sweep whose `out` already holds this grid returns it without solving anything.
      Cells are matched by their axis values: numbers and strings as they are, other
      objects by their class and fields (`rotational_toy(1.0)` is not
      `rotational_toy(2.0)`); an axis value with no such identity (a lambda, a local
      function) is refused with `out`. What `run_fn` does is not part of the match:
      after changing it, pass `if_exists="replace"`. While a sweep writes, `out` is
      locked (`<out>.lock`): a second sweep on it is refused. A file in
      `<out>.cells/` (or `out` itself) that cannot be read is named in a warning, set
      aside as `<file>.corrupt`, and its cells are solved again.
    - `if_exists`: what to do when `out` (or `<out>.cells/`) holds a sweep over another
      grid: "error" (the default) refuses, naming `out`; "replace" deletes `out` and its
      cells and starts over; "extend" keeps them, loads the cells this grid shares with
      the earlier one and solves the others, then writes this grid to `out` (the
      earlier grid's other cells stay in `<out>.cells/`: give the union of both grids
      to have them all in `out`). With "replace" even the same grid is solved again. A
      readable `out` that is not a sweep's results is refused unless "replace".
    - `executor`: None runs in this process. A `distributed.Client`, 'dask' (the current
      client) or a scheduler address 'tcp://host:port' runs chunks of cells as Dask
      tasks (each worker vmaps its chunk); an unreachable address raises ConnectionError.
    - `chunk_size`: cells per vmapped call (and per Dask task). Default: all cells of a
      structure in one call in process (fastest); two tasks per Dask worker. Smaller
      chunks save progress more often; every chunk of a group has the same padded shape,
      so a group still compiles once.
    - `devices`: the local devices to shard vmapped cells across (default all of
      `jax.local_devices()`).
    - `progress`: progress over cells, with an ETA: a tqdm bar on a terminal, a line at
      each quarter elsewhere (a pipe, a log file).

    A cell whose run diverges is recorded (`diverged` is True, its time series NaN after
    it stopped) and the sweep goes on. An exception inside `run_fn` stops the sweep;
    what finished before is on disk and nothing is written for unfinished cells.

    **Returns:** a `SweepResult` (`.dataset`, `.table`, `.path`, `.solved`, `.loaded`).
    """
    grid = check_axes(run_fn, axes)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    one_of(if_exists, "if_exists", IF_EXISTS, meaning="when `out` holds another grid: "
           "refuse, start over, or keep its cells and add this grid's")
    if not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True or False, got {progress!r}.")
    axes_labels = {name: axis_labels(name, values) for name, values in grid.items()}
    path = None
    if out is not None:
        path = Path(out)
        if path.suffix not in (".nc", ".nc4", ".h5"):
            raise ValueError(f"`out` should end in .nc (netCDF), got {str(out)!r}.")
        if path.is_dir():
            raise ValueError(f"`out` {str(out)!r} is a directory; give a file path ending "
                             "in .nc, e.g. out='results/sweep.nc'.")
        # Cells are keyed by value only where they are written: without `out` an axis
        # of lambdas is fine.
        axes_keys = {name: axis_keys(name, values) for name, values in grid.items()}
    else:
        axes_keys = axes_labels
    fingerprint = cell_key(axes_keys)
    attrs = sweep_attrs(axes_labels, fingerprint)
    client = owned = None
    with contextlib.ExitStack() as stack:
        if path is not None:
            stack.enter_context(_locked(path))
            done = _existing(path, fingerprint, axes_labels, if_exists)
            if done is not None:
                return SweepResult(done, path, 0, math.prod(map(len, grid.values())))
        if executor is not None:
            client, owned = client_of(executor)
            if owned:
                stack.callback(client.close)
        return _run(run_fn, grid, axes_labels, axes_keys, fingerprint, attrs, path, client,
                    chunk_size, devices, progress)


def _run(run_fn, grid, axes_labels, axes_keys, fingerprint, attrs, path, client, chunk_size,
         devices, progress) -> SweepResult:
    from .._progress import Progress

    cells_dir = None if path is None else path.with_name(path.name + ".cells")
    cells = []
    for index in itertools.product(*(range(len(v)) for v in grid.values())):
        values = {n: grid[n][i] for n, i in zip(grid, index, strict=True)}
        keys = {n: axes_keys[n][i] for n, i in zip(grid, index, strict=True)}
        cells.append((index, values, keys))
    records: dict[tuple, dict] = {}
    if cells_dir is not None and cells_dir.is_dir():
        by_key = {cell_key(keys): index for index, _, keys in cells}
        for file in sorted(cells_dir.glob("*.nc")):
            for key, record in read_batch(file):
                if key in by_key:  # cells of an earlier, larger grid are left alone
                    records[by_key[key]] = record
    if records:  # a resume: the loaded cells name their variables already
        check_names(grid, record_names(next(iter(records.values()))), prefixes=True)
    loaded = len(records)
    todo = [(index, values) for index, values, _ in cells if index not in records]
    keys_of = {index: keys for index, _, keys in cells}
    if cells_dir is not None and todo:
        cells_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"sweep_fingerprint": fingerprint, "sweep_grid": axes_labels}
        (cells_dir / MANIFEST).write_text(json.dumps(manifest, default=str))

    with Progress(len(cells), "sweep", unit="cells", enabled=progress,
                  initial=loaded) as bar:
        stream = (run_cells(run_fn, todo, chunk_size, devices) if client is None
                  else run_dask(client, run_fn, todo, chunk_size))
        for batch in stream:
            if cells_dir is not None:
                write_batch(cells_dir, [(cell_key(keys_of[i]), r) for i, r in batch])
            records.update(batch)
            bar.update(len(batch))
    ds = combine(axes_labels, records, attrs)
    if path is not None:
        save(ds, path)
        ds = load(path)
    return SweepResult(ds, path, len(records) - loaded, loaded)


def _existing(path: Path, fingerprint: str, labels: dict, if_exists: str):
    """What `out` holds: the Dataset if it is this grid's (and `if_exists` is not
    "replace"), else None after checking `if_exists` allows going on."""
    cells_dir = path.with_name(path.name + ".cells")
    if if_exists == "replace":
        path.unlink(missing_ok=True)
        shutil.rmtree(cells_dir, ignore_errors=True)
        return None
    held = {}  # fingerprint -> where, of earlier grids
    if path.exists():
        try:
            ds = load(path)
        except Exception as exc:
            aside = path.with_name(path.name + ".corrupt")
            warnings.warn(
                f"sweep: `out` {str(path)!r} cannot be read as a sweep's results "
                f"({type(exc).__name__}: {exc}); it is kept as {aside.name!r} and written "
                "again when the sweep finishes.", RuntimeWarning, stacklevel=3)
            path.replace(aside)
        else:
            if not isinstance(ds, xr.Dataset) or "sweep_fingerprint" not in ds.attrs:
                # readable, but not a sweep's: someone else's file, not overwritten
                raise ValueError(
                    f"`out` {str(path)!r} holds a netCDF file that is not a sweep's results; "
                    "give another `out`, or pass if_exists='replace' to overwrite it."
                )
            if ds.attrs["sweep_fingerprint"] == fingerprint:
                return ds
            held[ds.attrs["sweep_fingerprint"]] = (str(path), ds.attrs.get("sweep_grid"))
    manifest = cells_dir / MANIFEST
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            if info["sweep_fingerprint"] != fingerprint:
                held[info["sweep_fingerprint"]] = (str(cells_dir),
                                                   json.dumps(info["sweep_grid"]))
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable manifest: the cells still match by their keys
    if held and if_exists == "error":
        where, grid = next(iter(held.values()))
        mine = json.dumps(labels, default=str)
        other = (f"({grid}), not this one ({mine})" if grid != mine else
                 f"with the same labels ({mine}) but other values (objects are compared "
                 "by their fields)")
        raise ValueError(
            f"`out` {str(path)!r}: {where!r} holds a sweep over another grid {other}. Pass "
            "if_exists='replace' to delete it and start over, if_exists='extend' to keep "
            "its cells and solve only this grid's new ones, or another `out`."
        )
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """Hold `<out>.lock` while a sweep writes `out`: a second sweep on the same `out` (in
    this process or another) is refused rather than interleaving its cells and files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Another sweep may have removed the file between our open and our lock.
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"`out` {str(path)!r} is being written by another sweep (process "
                f"{holder}, lock {str(lock)!r}); wait for it to finish, or give this "
                "sweep another `out`."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
