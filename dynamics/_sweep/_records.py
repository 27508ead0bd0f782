"""`dyn.sweep`'s records: a cell's results as plain arrays, their netCDF files (one per
chunk of cells that finished together), and the grid Dataset assembled from them."""

import datetime
import importlib.metadata
import json
import math
import numbers
import platform
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import xarray as xr

from .._flows import AbstractFirstOrderFlow
from .._io import load, save
from .._trajectory import Trajectory, variable_name
from ..events._events import AbstractDivergenceEvent
from ..monitors._carrying import all_record_names

# The scalars every run's record holds besides its monitors and parameters
# (`trajectory_record`); `stats_…` and `meta_…` name diffrax's counts and provenance.
RUN_SCALARS = ("t_final", "diverged", "success", "event", "result")
RUN_PREFIXES = ("stats_", "meta_")


def record_names(record: dict) -> set[str]:
    """The variable and dimension names a cell's record puts on the Dataset."""
    names = {"time"} if record["time"] is not None else set()
    for name, (dims, _) in record["data"].items():
        names.add(name)
        names.update(dims)
    names.update(f"meta_{k}" for k in record["meta"])
    return names


def spec_names(spec) -> set[str]:
    """The names the record of a solve of `spec` (a `SolveSpec`) will hold, known
    before it is solved (`record_names` of its record, less the dimensions of monitors,
    whose shapes are not known yet: `check_names` matches `<name>_dim<i>` instead)."""
    names = set(RUN_SCALARS) | {"time"}
    monitors = all_record_names(spec.monitors)
    if spec.nonsmooth is not None:
        monitors += list(spec.nonsmooth.record_names())
    for name in monitors:
        names |= {name, f"final_{name}"}
    if spec.save_params:
        first_order = isinstance(spec.problem.flow, AbstractFirstOrderFlow)
        w = spec.y0 if first_order else spec.y0[0]
        params = eqx.combine(w, spec.problem.static)
        for prefix in ("param",) if first_order else ("param", "velocity"):
            for path, leaf in jax.tree_util.tree_leaves_with_path(params):
                if isinstance(leaf, np.ndarray | jax.Array):
                    names.add(variable_name(prefix, path))
    return names


def check_names(axes, names: set[str], prefixes: bool = False) -> None:
    """A ValueError if an axis is named like a variable or dimension of the records
    (the Dataset could not hold both). `prefixes`: also refuse `<variable>_dim<i>`
    and the `stats_`/`meta_` names a run may add."""
    clash = []
    for axis in axes:
        dim = re.fullmatch(r"(.+)_dim\d+", axis)
        if axis in names or (prefixes and (
                (dim is not None and dim.group(1) in names) or axis.startswith(RUN_PREFIXES))):
            clash.append(axis)
    if clash:
        raise ValueError(
            f"axis name(s) {clash} are also the names of what each cell records "
            f"({sorted(n for n in names if n != 'time')[:12]}...): the Dataset cannot "
            f"hold both. Rename the axis (e.g. {clash[0]!r} -> '{clash[0]}_value' in "
            "`axes` and in `run_fn`'s arguments)."
        )


def trajectory_record(traj: Trajectory, ts_requested: np.ndarray | None) -> dict:
    """A cell's results: time series on the requested save times (NaN past the end of a
    run that stopped early; where and how it stopped is in the scalars)."""
    ts = np.asarray(traj.ts)
    if ts_requested is not None:
        m = min(len(ts), len(ts_requested))
        n = int(np.argmin(np.append(ts[:m] == ts_requested[:m], False)))
        time = np.asarray(ts_requested, dtype=float)
    else:
        n, time = len(ts), ts

    def series(values):
        values = np.asarray(values)
        if ts_requested is None:
            return values
        out = np.full((len(time),) + values.shape[1:], np.nan, dtype=np.result_type(values, float))
        out[:n] = values[:n]
        return out

    data: dict[str, tuple] = {}
    for name, values in traj.monitors.items():
        values = np.asarray(values)
        data[name] = (("time",) + tuple(f"{name}_dim{i}" for i in range(1, values.ndim)),
                      series(values))
        if values.ndim == 1 and values.size:
            data[f"final_{name}"] = ((), values[-1])
    for prefix, tree in (("param", traj.params), ("velocity", traj.velocities)):
        if tree is None:
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if isinstance(leaf, np.ndarray | jax.Array):
                var = variable_name(prefix, path)
                leaf = np.asarray(leaf)
                data[var] = (("time",) + tuple(f"{var}_dim{i}" for i in range(1, leaf.ndim)),
                             series(leaf))
    data["t_final"] = ((), np.float64(traj.t_final))
    data["diverged"] = ((), np.bool_(traj.diverged))
    data["success"] = ((), np.bool_(traj.success))
    data["event"] = ((), "none" if traj.event is None else traj.event)
    data["result"] = ((), traj.result)
    for k, v in traj.stats.items():
        data[f"stats_{k}"] = ((), np.int64(v))
    meta = {k: v for k, v in traj.meta.items() if k != "created"}
    return {"data": data, "time": time, "meta": json.loads(_json(meta))}


def dict_record(out: Mapping) -> dict:
    data = {}
    for name, value in out.items():
        value = np.asarray(value)
        if value.dtype == object:
            raise ValueError(f"`run_fn` returned {name!r} that is not an array or number.")
        data[str(name)] = (tuple(f"{name}_dim{i}" for i in range(value.ndim)), value)
    return {"data": data, "time": None, "meta": {}}


def _json(obj) -> str:
    return json.dumps(obj, default=lambda x: x.item() if isinstance(x, np.generic) else str(x))


def _uniform(records: list[dict]) -> bool:
    first = records[0]
    shape = {n: (d, np.shape(v)) for n, (d, v) in first["data"].items()}
    t = None if first["time"] is None else len(first["time"])
    return all({n: (d, np.shape(v)) for n, (d, v) in r["data"].items()} == shape
               and (None if r["time"] is None else len(r["time"])) == t for r in records)


def write_batch(folder: Path, batch: list[tuple[str, dict]]) -> None:
    """Cells that finished together, in one netCDF file along a `cell` dimension labelled
    by the cells' keys (one file per cell costs ~10 ms per variable in h5netcdf)."""
    records = [r for _, r in batch]
    if len(batch) > 1 and not _uniform(records):
        for item in batch:
            write_batch(folder, [item])
        return
    data = {}
    for name, (dims, _) in records[0]["data"].items():
        values = [r["data"][name][1] for r in records]
        values = [np.asarray(v, dtype=object) if isinstance(v, str) else np.asarray(v)
                  for v in values]
        data[name] = (("cell",) + tuple(dims), np.stack(values))
    if records[0]["time"] is not None:
        data["sweep_time"] = (("cell", "time"), np.stack([r["time"] for r in records]))
    data["sweep_meta"] = ("cell", np.asarray([_json(r["meta"]) for r in records], dtype=object))
    keys = [k for k, _ in batch]
    save(xr.Dataset(data, coords={"cell": ("cell", np.asarray(keys, dtype=object))}),
         folder / f"{keys[0]}.nc")


def read_batch(path: Path) -> Iterator[tuple[str, dict]]:
    """The cells of one file written by `write_batch`. A file that cannot be read (cut
    short by a crash of the file system, emptied, not a sweep's) is named in a
    warning and set aside as `<file>.corrupt`; its cells are solved again."""
    try:
        ds = load(path)
        if "cell" not in ds.coords or "sweep_meta" not in ds:
            raise ValueError("not a file of sweep cells")
    except Exception as exc:
        aside = path.with_name(path.name + ".corrupt")
        warnings.warn(
            f"sweep: the cell file {str(path)!r} cannot be read ({type(exc).__name__}: "
            f"{exc}); its cells will be solved again (the file is kept as "
            f"{aside.name!r}).", RuntimeWarning, stacklevel=3)
        path.replace(aside)
        return
    names = [n for n in ds.data_vars if not n.startswith("sweep_")]
    for j, key in enumerate(ds["cell"].values):
        data = {n: (ds[n].dims[1:], ds[n].values[j]) for n in names}
        time = ds["sweep_time"].values[j] if "sweep_time" in ds else None
        yield str(key), {"data": data, "time": time,
                         "meta": json.loads(ds["sweep_meta"].values[j])}


def _normal(value):
    value = np.asarray(value)
    if value.dtype.kind in "US":
        return value.astype(object)
    return value


def combine(axes: dict[str, list], records: dict[tuple, dict], attrs: dict) -> xr.Dataset:
    """Place each cell's record at its index on the grid: dims (*axes, *own dims); a
    variable whose shape differs between cells (a width axis) is NaN-padded."""
    names = list(axes)
    grid = tuple(len(v) for v in axes.values())
    times = [r["time"] for r in records.values() if r["time"] is not None]
    time = None
    if times:
        time = times[0]
        if any(len(t) != len(time) or np.any(t != time) for t in times):
            time = np.unique(np.concatenate(times))
    variables: dict[str, Any] = {}
    order: list[str] = []
    for r in records.values():
        for name, (dims, _) in r["data"].items():
            if name not in variables:
                variables[name] = tuple(dims)
                order.append(name)
            elif tuple(dims) != variables[name]:
                raise ValueError(f"cells disagree on the dimensions of {name!r}.")
    data = {}
    for name in order:
        dims = variables[name]
        vals = {i: _normal(r["data"][name][1]) for i, r in records.items()
                if name in r["data"]}
        shape = [max(v.shape[k] for v in vals.values()) for k in range(len(dims))]
        if "time" in dims:
            if dims.index("time") != 0:
                raise ValueError(f"{name!r}: time must be its first dimension.")
            shape[0] = len(time)
        dtype = np.result_type(*vals.values())
        padded = (len(vals) < math.prod(grid)
                  or any(list(v.shape) != shape for v in vals.values()))
        if dtype.kind == "O":
            fill = ""
        else:
            if padded and dtype.kind in "biu":
                dtype = np.dtype(float)
            fill = np.nan if dtype.kind in "fc" else 0
        arr = np.full(grid + tuple(shape), fill, dtype=dtype)
        for i, v in vals.items():
            where = tuple(slice(0, s) for s in v.shape)
            if dims[:1] == ("time",) and v.shape[0] != len(time):
                # This cell saved at other times: place it on the union of save times.
                where = (np.searchsorted(time, records[i]["time"]),) + where[1:]
            arr[i + where] = v if v.ndim else v[()]  # a str, not a 0-d array of one
        data[name] = (tuple(names) + dims, arr)
    meta_keys = sorted({k for r in records.values() for k in r["meta"]})
    ds_attrs = dict(attrs)
    for key in meta_keys:
        values = [r["meta"].get(key) for r in records.values()]
        if all(_eq(v, values[0]) for v in values):
            ds_attrs[key] = values[0]
        else:  # provenance that varies over the grid (solver, rtol) is a variable
            numeric = all(isinstance(v, numbers.Real) for v in values)
            arr = np.full(grid, np.nan if numeric else "", dtype=float if numeric else object)
            for i, r in records.items():
                v = r["meta"].get(key)
                arr[i] = v if numeric else str(v)
            data[f"meta_{key}"] = (tuple(names), arr)
    coords = {n: (n, np.asarray(v)) for n, v in axes.items()}
    if time is not None:
        coords["time"] = ("time", np.asarray(time))
    return xr.Dataset(data, coords=coords, attrs=ds_attrs)


def _eq(a, b) -> bool:
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def sweep_attrs(axes_labels: dict, fingerprint: str) -> dict:
    attrs = {"sweep_axes": json.dumps(list(axes_labels)),
             "sweep_grid": json.dumps(axes_labels, default=str),
             "sweep_fingerprint": fingerprint,
             "sweep_created": datetime.datetime.now(datetime.timezone.utc)
             .isoformat(timespec="seconds"),
             "sweep_python_version": platform.python_version()}
    for package in ("dynamics", "jax", "jaxlib", "equinox", "diffrax", "numpy", "xarray"):
        try:
            attrs[f"sweep_{package}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            attrs[f"sweep_{package}_version"] = "unknown"
    return attrs




def batch_records(items: list[dict], out) -> list[dict | None]:
    """Records of the cells of one vmapped solve that ran to t1 without an event, read
    off the batched arrays directly (what `trajectory_record(Trajectory.from_solve())`
    gives, without building a Trajectory per cell: that was ~5 ms a cell, more than
    the vmapped solve itself). None for the other cells, which take that slow path;
    also for all of them if the first regular cell's record differs from the slow
    path's (a check that costs one slow record per batch)."""
    n = len(items)
    none: list[dict | None] = [None] * n
    ts_saved, ts_end, ys_saved, ys_final = out.ts, out.t_end, out.saved, out.final
    result, event_mask, stats = out.result, out.event_mask, out.stats
    problem = items[0]["problem"]
    if out.action_count is not None or any(isinstance(x, np.ndarray | jax.Array)
                                for x in jax.tree.leaves(problem.static)):
        return none
    ts_saved = np.asarray(ts_saved)[:n]
    requested = [np.asarray(it["ts"], dtype=float) for it in items]
    m = requested[0].size
    if any(r.shape != (m,) for r in requested) or m > ts_saved.shape[1]:
        return none
    # The save times are padded to a bucket size (`prepare`'s `pad_ts`): the slots past
    # the requested ones are never saved.
    ts_saved = ts_saved[:, :m]
    ys_saved = jax.tree.map(lambda a: np.asarray(a)[:, :m], ys_saved)
    ok = np.all(ts_saved == np.stack(requested), axis=1)
    ok &= np.asarray(jax.tree.leaves(result)[0])[:n] == 0  # RESULTS.successful
    for mask in jax.tree.leaves(event_mask):
        ok &= ~np.asarray(mask, dtype=bool)[:n]
    for leaf in jax.tree.leaves(ys_final):
        ok &= np.all(np.isfinite(np.asarray(leaf)[:n].reshape(n, -1)), axis=1)
    if not ok.any():
        return none
    first = int(np.argmax(ok))
    it = items[first]
    template = trajectory_record(
        Trajectory.from_solve(problem, it["events"], jax.tree.map(lambda a: a[first], out),
                              throw=False, meta=it["meta"],
                              divergence=AbstractDivergenceEvent), it["ts"])

    # Batched sources of the record's variables, named as `trajectory_record` names them.
    source: dict[str, np.ndarray] = {}
    for name, values in ys_saved["monitors"].items():
        source[name] = np.asarray(values)
        if source[name].ndim == 2:
            source[f"final_{name}"] = source[name][:, -1]
    for prefix, key in (("param", "w"), ("velocity", "v")):
        tree = ys_saved.get(key)
        if tree is None:
            continue
        for path, leaf in jax.tree_util.tree_leaves_with_path(
                eqx.combine(tree, problem.static)):
            source[variable_name(prefix, path)] = np.asarray(leaf)
    source["t_final"] = np.asarray(ts_end)[:, -1]
    for k, v in stats.items():
        if v is not None and np.ndim(v) == 1:
            source[f"stats_{k}"] = np.asarray(v)

    metas: dict[int, dict] = {}
    records: list[dict | None] = []
    for i, item in enumerate(items):
        if not ok[i]:
            records.append(None)
            continue
        data = {}
        for var, (dims, value) in template["data"].items():
            if var in source:
                new = source[var][i]
                value = (np.asarray(new, dtype=value.dtype) if isinstance(value, np.ndarray)
                         else value.dtype.type(new))
            data[var] = (dims, value)
        meta = metas.get(id(item["meta"]))
        if meta is None:
            meta = metas[id(item["meta"])] = json.loads(_json(
                {k: v for k, v in item["meta"].items() if k != "created"}))
        records.append({"data": data, "time": requested[i], "meta": meta})
    mine = records[first]
    same = (mine["data"].keys() == template["data"].keys()
            and all(mine["data"][k][0] == d and np.array_equal(mine["data"][k][1], v)
                    for k, (d, v) in template["data"].items())
            and np.array_equal(mine["time"], template["time"]) and mine["meta"] == template["meta"])
    return records if same else none
