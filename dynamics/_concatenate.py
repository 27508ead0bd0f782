"""`dyn.concatenate`: consecutive runs as one `Trajectory`."""

from collections.abc import Sequence

import jax
import numpy as np

from ._trajectory import Trajectory


def _same_structure(trees, what: str) -> None:
    present = [t is not None for t in trees]
    if any(present) and not all(present):
        raise ValueError(
            f"concatenate: some runs saved their {what} and some did not (save_params); "
            "run them all with the same save_params.")
    if not all(present):
        return
    first = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees[1:], start=1):
        same = jax.tree.structure(tree) == first and all(
            np.shape(a)[1:] == np.shape(b)[1:]
            for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(tree), strict=True))
        if not same:
            raise ValueError(
                f"concatenate: the {what} of `trajectories[{i}]` differ in structure or "
                "shape from those of `trajectories[0]`; only runs of the same model join.")


def _join(trees):
    if trees[0] is None:
        return None
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(x) for x in a]), *trees)


def concatenate(trajectories: Sequence[Trajectory]) -> Trajectory:
    """Consecutive runs as one `Trajectory`: a run continued from where another ended,
    possibly after something happened in between (a balancing fix applied by hand, a
    change of solver or of tolerance), reads as one run.

    Save times, parameters, monitors, action times and nonsmooth switch times are joined
    in order. Where a run starts at the time the previous one ended, both saves are kept
    (the state before and after what happened in between): the time axis then repeats
    that time, which `to_xarray` keeps (select by position there, or drop one with
    `ds.drop_duplicates("time", keep="last")`). The end (`t_final`, `final_params`,
    `event`) is the last run's; `success` holds if every run succeeded (`result` is the
    first failure's message), `diverged` if any diverged; `stats` are summed; `meta` is
    the first run's with `runs` (how many were joined); `coords` are the first run's.

    **Arguments:**

    - `trajectories`: the runs in time order, each starting no earlier than the previous
      ended, with the same monitors and the same model structure.

    **Returns:** a `Trajectory`.

    **Raises:** `ValueError` when `trajectories` is empty or not made of `Trajectory`
    objects, when a run starts before the previous one ended, or when the runs' monitors
    or parameters differ in names, structure or shape.
    """
    if isinstance(trajectories, Trajectory) or not isinstance(trajectories, Sequence):
        raise ValueError(
            "concatenate: `trajectories` must be a list or tuple of Trajectory objects "
            f"in time order, got {type(trajectories).__name__}.")
    runs = list(trajectories)
    if not runs:
        raise ValueError("concatenate: `trajectories` is empty; pass at least one run.")
    for i, run in enumerate(runs):
        if not isinstance(run, Trajectory):
            raise ValueError(
                f"concatenate: `trajectories[{i}]` is a {type(run).__name__}, not a "
                "Trajectory (what dyn.simulate returns).")
    for i in range(1, len(runs)):
        before, after = runs[i - 1], runs[i]
        start = float(after.ts[0]) if after.ts.size else after.t_final
        slack = 4 * np.finfo(np.asarray(after.ts).dtype if after.ts.size
                             else float).eps * max(1.0, abs(before.t_final))
        if start < before.t_final - slack:
            raise ValueError(
                f"concatenate: `trajectories[{i}]` starts at t = {start:.6g}, before "
                f"`trajectories[{i - 1}]` ended (t = {before.t_final:.6g}); pass the runs "
                "in time order, each continuing from the previous one's end.")
        if set(after.monitors) != set(runs[0].monitors):
            raise ValueError(
                f"concatenate: `trajectories[{i}]` records the monitors "
                f"{sorted(after.monitors)}, `trajectories[0]` {sorted(runs[0].monitors)}; "
                "run them all with the same monitors.")
        for name, values in after.monitors.items():
            if np.shape(values)[1:] != np.shape(runs[0].monitors[name])[1:]:
                raise ValueError(
                    f"concatenate: the monitor {name!r} has shape {np.shape(values)[1:]} "
                    f"per save in `trajectories[{i}]` and "
                    f"{np.shape(runs[0].monitors[name])[1:]} in `trajectories[0]`.")
    _same_structure([r.params for r in runs], "parameters")
    _same_structure([r.velocities for r in runs], "velocities")

    last = runs[-1]
    failed = [r for r in runs if not r.success]
    stats: dict[str, int] = {}
    for run in runs:
        for key, value in run.stats.items():
            stats[key] = stats.get(key, 0) + int(value)
    return Trajectory(
        ts=np.concatenate([np.asarray(r.ts) for r in runs]),
        params=_join([r.params for r in runs]),
        velocities=_join([r.velocities for r in runs]),
        monitors={name: np.concatenate([np.asarray(r.monitors[name]) for r in runs])
                  for name in runs[0].monitors},
        t_final=last.t_final,
        final_params=last.final_params,
        final_velocity=last.final_velocity,
        event=last.event,
        event_time=last.event_time,
        diverged=any(r.diverged for r in runs),
        success=not failed,
        result=failed[0].result if failed else last.result,
        stats=stats,
        meta={**runs[0].meta, "runs": len(runs)},
        actions=np.concatenate([np.asarray(r.actions) for r in runs]),
        switches=np.concatenate([np.asarray(r.switches) for r in runs]),
        coords=runs[0].coords,
    )
