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

import hashlib
import inspect
import itertools
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .._driver._prepare import check_finite, prepare, strong
from .._driver._solve import solve
from .._driver._spec import Prepared
from .._flows import AbstractFirstOrderFlow, NesterovFlow
from .._io import load, save
from .._simulate import simulate
from .._trajectory import Trajectory
from .._tree import partition
from ..events._events import AbstractDivergenceEvent
from ._records import (
    _batch_records,
    _combine,
    _dict_record,
    _read_batch,
    _sweep_attrs,
    _trajectory_record,
    _write_batch,
)

# Axis names whose values must be > 0: tolerances and step sizes.
_TOLERANCE_AXES = ("rtol", "atol", "tol", "tolerance")
_STEP_AXES = ("dt", "dt0", "step_size", "lr", "learning_rate", "eta")
_SIMULATE_KWARGS = tuple(
    name for name, p in inspect.signature(simulate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("progress", "throw")
)
_SIMULATE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(simulate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
}

# How long to wait for a Dask scheduler before saying it cannot be reached.
_CONNECT_TIMEOUT = "5s"

# How many times the batched solve has been traced (each trace is one compilation);
# the tests read it to check that a sweep over step sizes compiles once.
_TRACES = 0


class Simulation:
    """What `dyn.simulate` would run, without running it: `run_fn` returns one per cell
    and `dyn.sweep` solves all cells of the same structure in one vmapped call.

    `Simulation(flow, params, loss, t1=..., solver=..., ...)` takes the arguments of
    `dyn.simulate` except `progress` (the sweep has one bar) and `throw` (a failed cell
    is recorded, not raised). They are validated as `simulate` validates them.
    """

    def __init__(self, flow, params, loss, **kwargs):
        unknown = sorted(set(kwargs) - set(_SIMULATE_KWARGS))
        if unknown:
            raise ValueError(
                f"Simulation got unknown argument(s) {unknown}; it accepts dyn.simulate's "
                f"keyword arguments {list(_SIMULATE_KWARGS)}."
            )
        self.flow, self.params, self.loss = flow, params, loss
        self.kwargs = {**{k: _SIMULATE_DEFAULTS[k] for k in _SIMULATE_KWARGS
                          if k in _SIMULATE_DEFAULTS}, **kwargs}

    def prepare(self) -> Prepared:
        """The validated spec of the solve and its provenance (without the creation
        time: cells written at different times must compare equal)."""
        if "t1" not in self.kwargs:
            raise ValueError("Simulation needs `t1`, the end of the time interval.")
        controller = self.kwargs.get("stepsize_controller")
        for name in ("rtol", "atol"):
            value = getattr(controller, name, None)
            if value is not None and not np.all(np.asarray(value) > 0):
                raise ValueError(
                    f"`stepsize_controller.{name}` must be > 0, got {value!r}; tolerances "
                    "are positive numbers such as 1e-6."
                )
        prepared = prepare(self.flow, self.params, self.loss, **self.kwargs)
        meta = {k: v for k, v in prepared.meta.items() if k != "created"}
        return Prepared(prepared.spec, meta)

    def prepare_like(self, template: "Simulation", prepared: Prepared) -> Prepared | None:
        """`prepare()`, short-cut when this simulation differs from `template` (already
        prepared as `prepared`) only in the values of `params` and `v0`: then every
        other check `prepare` makes has the same outcome, so only the new parameters
        and velocity are checked (structure, shapes, dtypes, finiteness) and put into
        the template's arguments. Returns None when the short cut does not apply.

        A seed axis is the common case: `prepare` costs ~1-5 ms per cell, this ~0.1 ms,
        and in a vmapped sweep the per-cell Python work, not the solve, was the cost."""
        if self.kwargs.keys() != template.kwargs.keys():
            return None
        if isinstance(self.flow, NesterovFlow) and self.kwargs.get("v0") is not None:
            return None  # its v0 check depends on the values (and on t0)
        rest = lambda sim: (sim.flow, sim.loss,  # noqa: E731
                            {k: v for k, v in sim.kwargs.items() if k != "v0"})
        if not _same_values(rest(self), rest(template)):
            return None
        spec = prepared.spec
        old_w = spec.y0 if isinstance(self.flow, AbstractFirstOrderFlow) else spec.y0[0]
        w = _values_like(self.params, old_w, spec.problem.static, "params")
        if w is None:
            return None
        if isinstance(self.flow, AbstractFirstOrderFlow):
            if self.kwargs.get("v0") is not None:
                return None  # `prepare` raises the error for this
            y0 = w
        elif self.kwargs.get("v0") is None:
            y0 = (w, spec.y0[1])  # the template's zero velocity: one array, shared
        else:
            v = _values_like(self.kwargs["v0"], old_w, None, "v0")
            if v is None:
                return None
            y0 = (w, v)
        return Prepared(eqx.tree_at(lambda s: s.y0, spec, y0), prepared.meta)


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array | np.generic)


def _same_values(a, b) -> bool:
    """Equal pytrees: same structure (static fields included) and equal leaves, arrays
    compared by identity first and by value after."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    try:
        if ta != tb:
            return False
    except Exception:  # static fields that cannot be compared (arrays inside)
        return False
    for x, y in zip(la, lb, strict=True):
        if x is y:
            continue
        if _is_array(x) or _is_array(y):
            if not (_is_array(x) and _is_array(y)) or np.shape(x) != np.shape(y) \
                    or np.result_type(x) != np.result_type(y) \
                    or not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
                return False
        elif type(x) is not type(y) or not (x == y):
            return False
    return True


def _values_like(tree, like, static, name):
    """The inexact arrays of `tree`, checked to match `like` (structure, shapes, dtypes)
    and its other leaves to match `static` (when given); finite, else a ValueError as
    `simulate` raises. None when they do not match (the full checks then decide)."""
    w, rest = partition(tree)
    if jax.tree.structure(w) != jax.tree.structure(like):
        return None
    if static is not None and not _same_values(rest, static):
        return None
    w = strong(w)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(like), strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
    check_finite(name, w)
    return w


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


# ----------------------------------------------------------------------------- axes


def _label(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    return type(value).__name__


def _labels(name: str, values: list) -> list:
    labels = [_label(v) for v in values]
    if len(set(labels)) < len(labels):  # e.g. GaussLegendre(2) and GaussLegendre(3)
        labels = [eqx.tree_pformat(v, short_arrays=False) if not isinstance(lab, int | float)
                  else lab for v, lab in zip(values, labels, strict=True)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"axis `{name}` repeats a value ({values!r}); give distinct values.")
    kinds = {type(lab) for lab in labels}
    if len(kinds) > 1 and kinds != {int, float}:  # one dtype per coordinate
        labels = [str(lab) for lab in labels]
    return labels


def _check_axes(run_fn: Callable, axes: Mapping[str, Iterable]) -> dict[str, list]:
    if not callable(run_fn):
        raise ValueError(f"`run_fn` must be a function of the axis values, got {run_fn!r}.")
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(
            "`axes` must be a non-empty dict axis name -> values, e.g. "
            "{'seed': range(8), 'rtol': [1e-4, 1e-6]}."
        )
    try:
        params = inspect.signature(run_fn).parameters
    except (TypeError, ValueError):  # builtins, some callables: trust the user
        params = None
    named = []
    if params is not None:
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        for name in axes:
            if not var_kw and name not in named:
                raise ValueError(
                    f"unknown axis name {name!r}: `run_fn` accepts {named}; name the axes "
                    "after its arguments (or give it **kwargs)."
                )
        missing = [n for n in named if n not in axes
                   and params[n].default is inspect.Parameter.empty]
        if missing:
            raise ValueError(
                f"`run_fn` needs {missing} but `axes` has no such axis; add one, or bind the "
                "argument with functools.partial."
            )
    out = {}
    for name, values in axes.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"axis names must be identifiers, got {name!r}.")
        if name in ("time", "cell") or name.startswith("sweep_"):
            raise ValueError(f"axis name {name!r} is reserved; accepted: any other identifier.")
        if isinstance(values, str | bytes) or not isinstance(values, Iterable):
            raise ValueError(
                f"axis {name!r} must be a list (or range, array) of values, got {values!r}."
            )
        values = list(values)
        if not values:
            raise ValueError(f"axis {name!r} is empty; give it at least one value.")
        if name in _TOLERANCE_AXES + _STEP_AXES:
            for v in values:
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0
                if not ok or not math.isfinite(v):
                    kind = "tolerances" if name in _TOLERANCE_AXES else "step sizes"
                    raise ValueError(
                        f"axis {name!r} holds {v!r}; {kind} must be finite real numbers > 0."
                    )
        out[name] = values
    return out


def _key(labels: dict) -> str:
    text = json.dumps(sorted(labels.items()), default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- solving


def _group_key(dynamic, static):
    leaves, treedef = jax.tree.flatten(dynamic)
    return treedef, tuple((x.shape, x.dtype) for x in leaves), static


def _same(a, b) -> bool:
    if a[0] != b[0] or a[1] != b[1]:
        return False
    try:
        return bool(eqx.tree_equal(a[2], b[2]))
    except Exception:  # statics that cannot be compared (e.g. with arrays inside)
        return False


@eqx.filter_jit
def _solve_batch(dynamic, static, batched=None):
    """`solve` vmapped over the leading axis of the leaves of `dynamic` flagged in
    `batched` (a tuple of bools over its leaves; default all); the other leaves (save
    times, tolerances, a shared loss's data) are shared by every cell, not copied."""
    global _TRACES
    _TRACES += 1
    leaves, treedef = jax.tree.flatten(dynamic)
    if batched is None:
        batched = (True,) * len(leaves)
    axes = jax.tree.unflatten(treedef, [0 if b else None for b in batched])
    return jax.vmap(lambda d: solve(eqx.combine(d, static), diffrax.NoProgressMeter()),
                    in_axes=(axes,))(dynamic)


def _shard(tree, devices: Sequence, batched):
    if len(devices) < 2:
        return tree
    mesh = jax.sharding.Mesh(np.asarray(devices), ("cells",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("cells"))
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jax.device_put(x, sharding) if b else x
                                        for x, b in zip(leaves, batched, strict=True)])


def _stack(dyn: list, batched: tuple | None):
    """The cells' dynamic arguments along a new leading axis, except the leaves that
    every cell shares (the same object: save times, tolerances, the loss's data, from a
    template), which stay as they are; returns (tree, which leaves are batched).
    `batched` from an earlier chunk of the group is kept when it still holds, so the
    group compiles once."""
    flat = [jax.tree.leaves(d) for d in dyn]
    treedef = jax.tree.structure(dyn[0])

    def shared(k):
        return all(f[k] is flat[0][k] for f in flat[1:])

    if batched is None or any(not b and not shared(k) for k, b in enumerate(batched)):
        batched = tuple(not shared(k) for k in range(len(flat[0])))
        if not any(batched):  # one cell (and its padding): vmap needs a batched input
            batched = (True,) * len(batched)
    leaves = [jnp.stack([f[k] for f in flat]) if b else flat[0][k]
              for k, b in enumerate(batched)]
    return jax.tree.unflatten(treedef, leaves), batched


def _solve_group(items: list, size: int, devices: Sequence, group: list) -> list:
    """Solve the prepared cells `items` (same structure) in one vmapped call of `size`
    cells (padded with copies of the last cell, so every chunk of a group has the same
    shape and the group compiles once), sharded over `devices`. `group[2]` remembers
    which arguments the group's cells share."""
    n_dev = max(len(devices), 1)
    size = -(-max(size, len(items)) // n_dev) * n_dev
    dyn = [it["dynamic"] for it in items]
    dyn += [dyn[-1]] * (size - len(dyn))
    stacked, batched = _stack(dyn, group[2])
    group[2] = batched
    out = _solve_batch(_shard(stacked, devices, batched), items[0]["static"], batched)
    out = jax.tree.map(np.asarray, out)
    results = _batch_records(items, out)
    for i, it in enumerate(items):
        if results[i] is not None:
            continue
        cell = jax.tree.map(lambda a, i=i: a[i], out)  # cell i's RawSolution
        traj = Trajectory.from_solve(it["problem"], it["events"], cell,
                                     throw=False, meta=it["meta"],
                                     divergence=AbstractDivergenceEvent)
        results[i] = _trajectory_record(traj, it["ts"])
    return results


def _run_cells(run_fn: Callable, cells: list, chunk_size: int | None,
               devices: Sequence | None) -> Iterator[list[tuple[tuple, dict]]]:
    """Run `cells` [(index, values)], yielding lists [(index, record)] of the cells that
    finished together (a vmapped chunk, or one cell run on its own). Cells
    that return a `Simulation` wait in a group of their structure until `chunk_size` of
    them are ready (or the cells run out), then are solved in one vmapped call."""
    devices = jax.local_devices() if devices is None else list(devices)
    groups: list[tuple[Any, list]] = []
    limit = chunk_size or len(cells)

    def flush(group):
        items = group[1]
        group[1] = []
        records = _solve_group(items, limit, devices, group)
        yield [(it["index"], rec) for it, rec in zip(items, records, strict=True)]

    # The last fully prepared Simulation of each group, to prepare others against:
    # (simulation, prepare() output, group, dynamic and static arguments, save times).
    templates: list[tuple] = []
    for index, values in cells:
        out = run_fn(**values)
        if isinstance(out, Simulation):
            fast = None
            for template, prepared, group, dynamic, static, ts in reversed(templates):
                fast = out.prepare_like(template, prepared)
                if fast is not None:
                    spec, meta = fast.spec, fast.meta
                    # Only the state differs from the template: its arrays, nothing else.
                    dynamic = eqx.tree_at(lambda s: s.y0, dynamic, spec.y0)
                    break
            if fast is None:
                prepared = out.prepare()
                spec, meta = prepared.spec, prepared.meta
                dynamic, static = eqx.partition(spec, eqx.is_array)
                key = _group_key(dynamic, static)
                group = next((g for g in groups if _same(g[0], key)), None)
                if group is None:
                    group = [key, [], None]
                    groups.append(group)
                ts = np.asarray(spec.ts)
                # A few recent ones, so that a seed axis inside another (seed x dt) finds
                # its dt's template; each miss costs a tree comparison.
                templates = (templates + [(out, prepared, group, dynamic, static, ts)])[-4:]
            group[1].append(dict(index=index, dynamic=dynamic, static=static,
                                 problem=spec.problem, events=spec.events, meta=meta, ts=ts))
            if len(group[1]) >= limit:
                yield from flush(group)
        elif isinstance(out, Trajectory):
            yield [(index, _trajectory_record(out, None))]
        elif isinstance(out, Mapping):
            yield [(index, _dict_record(out))]
        else:
            raise ValueError(
                "`run_fn` must return a dyn.Simulation (solved in a vmapped batch), a "
                f"dyn.Trajectory or a dict name -> array, got {type(out).__name__}."
            )
    for group in groups:
        if group[1]:
            yield from flush(group)


def _run_chunk(run_fn, cells, chunk_size, x64):
    """One Dask task: run a chunk of cells on a worker, return its batches."""
    jax.config.update("jax_enable_x64", x64)  # a fresh worker process has the default
    return list(_run_cells(run_fn, cells, chunk_size, None))


# ----------------------------------------------------------------------------- executors


def _client(executor):
    try:
        import distributed
    except ImportError:
        raise ValueError(
            "`executor` needs Dask distributed, which is not installed; pip install "
            "'dynamics[dist]', or pass executor=None to run in this process."
        ) from None
    if isinstance(executor, distributed.Client):
        return executor, False
    if executor == "dask":
        try:
            return distributed.get_client(), False
        except ValueError:
            raise ValueError(
                "executor='dask' but no Dask client is running; create one first "
                "(distributed.Client() or Client('tcp://host:8786')), pass it, or pass "
                "executor=None to run in this process."
            ) from None
    if isinstance(executor, str):
        try:
            return distributed.Client(executor, timeout=_CONNECT_TIMEOUT), True
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(
                f"could not reach a Dask scheduler at {executor!r} within {_CONNECT_TIMEOUT} "
                f"({exc}); "
                "start one (`dask scheduler`), check the address (tcp://host:8786), or "
                "pass executor=None to run in this process."
            ) from None
    raise ValueError(
        "`executor` must be None (in this process), 'dask' (the current Dask client), a "
        f"distributed.Client or a scheduler address 'tcp://host:port'; got {executor!r}."
    )


def _run_dask(client, run_fn, todo, chunk_size) -> Iterator[list[tuple[tuple, dict]]]:
    import distributed

    workers = max(len(client.scheduler_info().get("workers", {})), 1)
    size = chunk_size or -(-len(todo) // (2 * workers))  # two tasks per worker
    x64 = bool(jax.config.read("jax_enable_x64"))
    futures = [client.submit(_run_chunk, run_fn, todo[i:i + size], chunk_size or size, x64,
                             pure=False)
               for i in range(0, len(todo), size)]
    try:
        for future in distributed.as_completed(futures):
            yield from future.result()
    finally:
        client.cancel(futures)


# ----------------------------------------------------------------------------- sweep


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
    grid = _check_axes(run_fn, axes)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    axes_labels = {name: _labels(name, values) for name, values in grid.items()}
    fingerprint = _key(axes_labels)
    attrs = _sweep_attrs(axes_labels, fingerprint)
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
        client, owned = _client(executor)

    cells = []
    for index in itertools.product(*(range(len(v)) for v in grid.values())):
        values = {n: grid[n][i] for n, i in zip(grid, index, strict=True)}
        labels = {n: axes_labels[n][i] for n, i in zip(grid, index, strict=True)}
        cells.append((index, values, labels))
    records: dict[tuple, dict] = {}
    if cells_dir is not None and cells_dir.is_dir():
        by_key = {_key(labels): index for index, _, labels in cells}
        for file in sorted(cells_dir.glob("*.nc")):
            for key, record in _read_batch(file):
                if key in by_key:  # cells of an earlier, larger grid are left alone
                    records[by_key[key]] = record
    loaded = len(records)
    todo = [(index, values) for index, values, _ in cells if index not in records]
    labels_of = {index: labels for index, _, labels in cells}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), initial=loaded, disable=not progress, unit="cell",
               desc="sweep", dynamic_ncols=True)
    try:
        stream = (_run_cells(run_fn, todo, chunk_size, devices) if client is None
                  else _run_dask(client, run_fn, todo, chunk_size))
        for batch in stream:
            if cells_dir is not None:
                _write_batch(cells_dir, [(_key(labels_of[i]), r) for i, r in batch])
            records.update(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        if owned:
            client.close()
    ds = _combine(axes_labels, records, attrs)
    if path is not None:
        save(ds, path)
        ds = load(path)
    return SweepResult(ds, path, len(records) - loaded, loaded)
