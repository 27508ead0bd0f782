"""`Paths`: many independent runs of one stochastic simulation, recorded together.

What `dyn.simulate` returns for a stochastic flow given a batch of keys, and what
`dyn.discrete.run` returns for SGD given a batch of keys: one `Trajectory`'s fields with
a leading `path` axis, and per-path outcomes. A path that diverges (a non-finite state)
stops there: its values after that time are NaN, `diverged[i]` is True and `t_final[i]`
says when; the other paths are kept. Nothing averages over the NaNs silently: a mean
over paths is NaN until the diverged paths are dealt with (`alive`).
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
import xarray as xr
from jaxtyping import PyTree

from ._trajectory import check_variable_name, plain_attr, variable_name


class Paths(eqx.Module):
    """Independent paths of one stochastic run.

    - `ts`: the save times (n,), common to all paths.
    - `monitors`: name -> array (paths, n, ...); NaN after a path stopped.
    - `params`, `velocities`: the model with leading (paths, n) axes on every array
      (None unless saved).
    - `final_params`, `final_velocity`: the state where each path stopped (leading
      `paths` axis; non-finite for a diverged SDE path, the last finite iterate for a
      diverged SGD path).
    - `diverged`: (paths,) bool, the path went non-finite; `t_final`: (paths,) where
      each path stopped (t1 if it did not).
    - `meta`: provenance, as a `Trajectory`'s, with the number of paths.
    """

    ts: np.ndarray
    monitors: dict[str, np.ndarray]
    params: PyTree | None
    velocities: PyTree | None
    final_params: PyTree | None
    final_velocity: PyTree | None
    diverged: np.ndarray
    t_final: np.ndarray
    meta: dict[str, Any]

    @property
    def num_paths(self) -> int:
        return int(self.diverged.shape[0])

    @property
    def alive(self) -> np.ndarray:
        """(paths,) bool: the paths that did not diverge."""
        return ~self.diverged

    def to_xarray(self) -> xr.Dataset:
        """The paths as an `xarray.Dataset` on (`path`, `time`): monitors under their
        names, parameters as `param_<path>` (when saved), `diverged` and `t_final` on
        `path`, the provenance as attrs."""
        data: dict[str, Any] = {
            "diverged": ("path", self.diverged.astype(np.int8)),
            "t_final": ("path", self.t_final),
        }

        def add(var, values):
            values = np.asarray(values)
            if var in data:
                raise ValueError(f"to_xarray: two variables would be named {var!r}; rename one.")
            dims = ("path", "time") + tuple(f"{var}_dim{i}" for i in range(2, values.ndim))
            data[var] = (dims, values)

        for name, values in self.monitors.items():
            add(check_variable_name(name, "monitors"), values)
        for prefix, tree in (("param", self.params), ("velocity", self.velocities)):
            if tree is None:
                continue
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                if isinstance(leaf, np.ndarray | jax.Array):
                    add(variable_name(prefix, path), leaf)
        attrs = {k: plain_attr(v) for k, v in self.meta.items()}
        return xr.Dataset(data, coords={"time": ("time", np.asarray(self.ts)),
                                        "path": ("path", np.arange(self.num_paths))},
                          attrs=attrs)


def mask_after(values: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """`values` (paths, n, ...) with NaN where `reached` (paths, n) is False."""
    values = np.array(values, dtype=np.result_type(values.dtype, np.float32))
    shape = reached.shape + (1,) * (values.ndim - 2)
    return np.where(reached.reshape(shape), values, np.nan)


def paths_from_solves(problem, events, raw, ts, *, throw: bool, meta: dict,
                      divergence: type) -> Paths:
    """`Paths` from a vmapped solve's `RawSolution` `raw` (NumPy, leading path axis),
    with `ts` the requested save times. `throw`: raise a RuntimeError if a path failed
    for a reason other than an event (max_steps, say)."""
    import diffrax

    reached = np.isfinite(np.asarray(raw.ts))
    num = reached.shape[0]
    # The outcome codes (the enumeration item's one leaf), compared with those of the
    # two outcomes that are not failures; the message only for the first failure.
    codes = np.asarray(jax.tree.leaves(raw.result)[0]).reshape(num)
    fine = [int(jax.tree.leaves(r)[0]) for r in (diffrax.RESULTS.successful,
                                                 diffrax.RESULTS.event_occurred)]
    failed = np.flatnonzero(~np.isin(codes, fine))
    if throw and failed.size:
        first = jax.tree.map(lambda a: np.asarray(np.asarray(a).reshape(num)[failed[0]]),
                             raw.result)
        raise RuntimeError(
            f"simulate failed on {failed.size} of {num} paths (first: path {failed[0]}: "
            f"{diffrax.RESULTS[first]}); pass throw=False to get them back, flagged."
        )
    fired = np.zeros(num, bool)
    any_fired = np.zeros(num, bool)
    if raw.event_mask is not None:
        for event, mask in zip(events, jax.tree.leaves(raw.event_mask), strict=True):
            mask = np.asarray(mask, bool).reshape(num)
            any_fired |= mask
            if isinstance(event, divergence):
                fired |= mask
    # `event_occurred` with no event marked: the controller's guard ended the path at a
    # non-finite state (`_trajectory.stopped_event`).
    fired |= (codes == fine[1]) & ~any_fired
    w_end = raw.final.get("w")
    finite = np.ones(num, bool)
    for leaf in jax.tree.leaves(w_end):
        finite &= np.all(np.isfinite(np.asarray(leaf).reshape(num, -1)), axis=1)
    diverged = fired | ~finite
    monitors = {k: mask_after(v, reached) for k, v in raw.saved["monitors"].items()}

    def model(tree, fn):
        return None if tree is None else eqx.combine(jax.tree.map(fn, tree), problem.static)

    saved_w, saved_v = raw.saved.get("w"), raw.saved.get("v")
    meta = {**meta, "paths": num, "failed_paths": int(failed.size)}
    return Paths(
        ts=np.asarray(ts),
        monitors=monitors,
        params=model(saved_w, lambda a: mask_after(a, reached)),
        velocities=model(saved_v, lambda a: mask_after(a, reached)),
        final_params=model(w_end, lambda a: np.asarray(a)[:, -1]),
        final_velocity=model(raw.final.get("v"), lambda a: np.asarray(a)[:, -1]),
        diverged=diverged,
        t_final=np.asarray(raw.t_end)[:, -1].astype(float),
        meta=meta,
    )
