"""Solving a sweep's cells: those of one structure in one vmapped, compiled solve (in
chunks of one padded shape, so a group compiles once), the others one by one."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._driver._solve import solve
from .._trajectory import Trajectory
from ..events._events import AbstractDivergenceEvent
from ._records import (
    batch_records,
    check_names,
    dict_record,
    record_names,
    spec_names,
    trajectory_record,
)
from ._simulation import Simulation

# How many times the batched solve has been traced (each trace is one compilation);
# the tests read it to check that a sweep over step sizes compiles once.
traces = 0


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
    global traces
    traces += 1
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
    results = batch_records(items, out)
    for i, it in enumerate(items):
        if results[i] is not None:
            continue
        cell = jax.tree.map(lambda a, i=i: a[i], out)  # cell i's RawSolution
        traj = Trajectory.from_solve(it["problem"], it["events"], cell,
                                     throw=False, meta=it["meta"],
                                     divergence=AbstractDivergenceEvent)
        results[i] = trajectory_record(traj, it["ts"])
    return results


def run_cells(run_fn: Callable, cells: list, chunk_size: int | None,
               devices: Sequence | None) -> Iterator[list[tuple[tuple, dict]]]:
    """Run `cells` [(index, values)], yielding lists [(index, record)] of the cells that
    finished together (a vmapped chunk, or one cell run on its own). Cells
    that return a `Simulation` wait in a group of their structure until `chunk_size` of
    them are ready (or the cells run out), then are solved in one vmapped call."""
    devices = jax.local_devices() if devices is None else list(devices)
    groups: list[tuple[Any, list]] = []
    # An axis named like a recorded variable would fail in xarray after every cell was
    # solved: checked on the first cell of each kind, before anything more is solved.
    axes = list(cells[0][1]) if cells else []
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
                    check_names(axes, spec_names(spec), prefixes=True)
                    group = [key, [], None]
                    groups.append(group)
                ts = np.asarray(spec.ts)
                ts = ts[~np.isnan(ts)]  # the requested ones, without `pad_ts`'s padding
                # A few recent ones, so that a seed axis inside another (seed x dt) finds
                # its dt's template; each miss costs a tree comparison.
                templates = (templates + [(out, prepared, group, dynamic, static, ts)])[-4:]
            group[1].append(dict(index=index, dynamic=dynamic, static=static,
                                 problem=spec.problem, events=spec.events, meta=meta, ts=ts))
            if len(group[1]) >= limit:
                yield from flush(group)
        elif isinstance(out, Trajectory):
            record = trajectory_record(out, None)
            check_names(axes, record_names(record), prefixes=True)
            yield [(index, record)]
        elif isinstance(out, Mapping):
            record = dict_record(out)
            check_names(axes, record_names(record))
            yield [(index, record)]
        else:
            raise ValueError(
                "`run_fn` must return a dyn.Simulation (solved in a vmapped batch), a "
                f"dyn.Trajectory or a dict name -> array, got {type(out).__name__}."
            )
    for group in groups:
        if group[1]:
            yield from flush(group)


def run_chunk(run_fn, cells, chunk_size, x64):
    """One Dask task: run a chunk of cells on a worker, return its batches."""
    jax.config.update("jax_enable_x64", x64)  # a fresh worker process has the default
    return list(run_cells(run_fn, cells, chunk_size, None))
