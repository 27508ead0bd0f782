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

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import xarray as xr

from .._io import load, save
from ._axes import axis_labels, cell_key, check_axes
from ._batch import run_cells
from ._executors import client_of, run_dask
from ._records import combine, read_batch, sweep_attrs, write_batch


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
      `run_fn`. Axes named rtol/atol/tol/tolerance or dt/dt0/step_size/lr/learning_rate/eta
      must hold numbers > 0. Labels on the Dataset: numbers and strings as given, other
      objects by class name (by repr when two share a class).
    - `out`: a `.nc` path. Each finished cell is written atomically to `<out>.cells/`
      as it finishes; a sweep started again with the same `out` skips those cells, and
      when every cell is done the whole grid is written to `out` (also atomically). A
      sweep whose `out` already holds this grid returns it without solving anything.
      Files are matched by the grid (axis names and labels), not by what `run_fn` does:
      after changing `run_fn`, delete `out` and `<out>.cells/` to start over.
    - `executor`: None runs in this process. A `distributed.Client`, 'dask' (the current
      client) or a scheduler address 'tcp://host:port' runs chunks of cells as Dask
      tasks (each worker vmaps its chunk); an unreachable address raises ConnectionError.
    - `chunk_size`: cells per vmapped call (and per Dask task). Default: all cells of a
      structure in one call in process (fastest); two tasks per Dask worker. Smaller
      chunks save progress more often; every chunk of a group has the same padded shape,
      so a group still compiles once.
    - `devices`: the local devices to shard vmapped cells across (default all of
      `jax.local_devices()`).
    - `progress`: one tqdm bar over cells, with an ETA.

    A cell whose run diverges is recorded (`diverged` is True, its time series NaN after
    it stopped) and the sweep goes on. An exception inside `run_fn` stops the sweep;
    what finished before is on disk and nothing is written for unfinished cells.

    **Returns:** a `SweepResult` (`.dataset`, `.table`, `.path`, `.solved`, `.loaded`).
    """
    grid = check_axes(run_fn, axes)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    axes_labels = {name: axis_labels(name, values) for name, values in grid.items()}
    fingerprint = cell_key(axes_labels)
    attrs = sweep_attrs(axes_labels, fingerprint)
    path = cells_dir = None
    if out is not None:
        path = Path(out)
        if path.suffix not in (".nc", ".nc4", ".h5"):
            raise ValueError(f"`out` should end in .nc (netCDF), got {str(out)!r}.")
        if path.exists():
            ds = load(path)
            if ds.attrs.get("sweep_fingerprint") == fingerprint:
                return SweepResult(ds, path, 0, math.prod(map(len, grid.values())))
        cells_dir = path.with_name(path.name + ".cells")
    client = owned = None
    if executor is not None:
        client, owned = client_of(executor)

    cells = []
    for index in itertools.product(*(range(len(v)) for v in grid.values())):
        values = {n: grid[n][i] for n, i in zip(grid, index, strict=True)}
        labels = {n: axes_labels[n][i] for n, i in zip(grid, index, strict=True)}
        cells.append((index, values, labels))
    records: dict[tuple, dict] = {}
    if cells_dir is not None and cells_dir.is_dir():
        by_key = {cell_key(labels): index for index, _, labels in cells}
        for file in sorted(cells_dir.glob("*.nc")):
            for key, record in read_batch(file):
                if key in by_key:  # cells of an earlier, larger grid are left alone
                    records[by_key[key]] = record
    loaded = len(records)
    todo = [(index, values) for index, values, _ in cells if index not in records]
    labels_of = {index: labels for index, _, labels in cells}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), initial=loaded, disable=not progress, unit="cell",
               desc="sweep", dynamic_ncols=True)
    try:
        stream = (run_cells(run_fn, todo, chunk_size, devices) if client is None
                  else run_dask(client, run_fn, todo, chunk_size))
        for batch in stream:
            if cells_dir is not None:
                write_batch(cells_dir, [(cell_key(labels_of[i]), r) for i, r in batch])
            records.update(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        if owned:
            client.close()
    ds = combine(axes_labels, records, attrs)
    if path is not None:
        save(ds, path)
        ds = load(path)
    return SweepResult(ds, path, len(records) - loaded, loaded)
