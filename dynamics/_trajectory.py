"""The result of a run: save times, parameters, monitors, how it ended, provenance."""

import dataclasses
import datetime
import functools
import importlib.metadata
import platform
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np
import xarray as xr
from jaxtyping import Array, PyTree

from .events._events import NonFinite


@functools.cache  # reading package metadata costs ~10 ms, on every simulate call
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(flow, solver, controller, **settings) -> dict[str, Any]:
    """What produced a run, as netCDF-friendly attributes (str / float / int)."""
    meta: dict[str, Any] = {
        "flow": type(flow).__name__,
        "flow_repr": eqx.tree_pformat(flow, short_arrays=False),
        "solver": type(solver).__name__,
        "stepsize_controller": type(controller).__name__,
        "rtol": float(getattr(controller, "rtol", np.nan)),
        "atol": float(getattr(controller, "atol", np.nan)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python_version": platform.python_version(),
    }
    for package in ("dynamics", "jax", "jaxlib", "equinox", "diffrax", "numpy"):
        meta[f"{package}_version"] = _version(package)
    for key, value in settings.items():
        meta[key] = "none" if value is None else value
    return meta


@functools.cache
def _result_names() -> dict[str, str]:
    # diffrax's message of each outcome `simulate` tells apart (all distinct) -> name.
    names = ("successful", "event_occurred", "max_steps_reached", "dt_min_reached",
             "max_steps_rejected", "internal_error")
    return {diffrax.RESULTS[getattr(diffrax.RESULTS, n)]: n for n in names}


def stopped_event(events, fired, stopped: bool):
    """The event a run stopped at: the first of `events` whose entry of `fired` (the
    solve's event mask, as bools) is set; `NonFinite()` where the run `stopped` with
    `event_occurred` and none is set (the controller's guard ended it at a non-finite
    state, `_driver/_guard.py`); else None."""
    event = next((e for e, m in zip(events, fired, strict=True) if m), None)
    if event is None and stopped:
        return NonFinite()
    return event


def _result_name(message: str) -> str:
    # By the message `RESULTS[result]` gives anyway: comparing `result == RESULTS.x`
    # is an eager jax op (~30 µs) per outcome.
    return _result_names().get(message, "nonlinear_solver_failed")


def _failure_hint(name: str, stats: dict, t_final: float, meta: dict) -> str:
    """What a run that stopped short of t1 without an event tells its user besides
    diffrax's message: where it stopped, how many steps it took, and for a controller
    that could not accept a step at all, what to pass."""
    def count(key):
        value = stats.get(key)
        return None if value is None else int(np.asarray(value))

    accepted, rejected = count("num_accepted_steps"), count("num_rejected_steps")
    span = (f" of [{meta['t0']:g}, {meta['t1']:g}]"
            if isinstance(meta.get("t0"), float) and isinstance(meta.get("t1"), float) else "")
    if name == "max_steps_rejected":
        text = (f" The solve stopped at t = {t_final:.6g}{span}: the step-size controller "
                f"rejected a long run of steps in a row ({accepted} accepted before) and no "
                "step size met the tolerance there.")
        if accepted == 0:
            return text + (
                " Not one step was accepted: the first step is too large for the scale of "
                "this problem (its error estimate overflows), or the tolerance is below "
                "what the precision resolves. Pass a small `dt0` (e.g. dt0=1e-8), looser "
                "tolerances, or rescale the problem (smaller initial weights or loss).")
        return text + (
            " The solution may blow up there (a finite-time singularity: pass "
            "events=dyn.events.NormAbove(bound) to stop such a run as diverged), the field "
            "be discontinuous (a ReLU network: pass nonsmooth=dyn.Filippov()), or the "
            "tolerance below what the precision resolves (loosen rtol and atol).")
    if name == "max_steps_reached" and accepted is not None:
        text = (f" It stopped at t = {t_final:.6g}{span} after {accepted} accepted and "
                f"{rejected} rejected steps.")
        if span and accepted > 1000 and (t_final - meta["t0"]) < 1e-3 * (meta["t1"] - meta["t0"]):
            text += (" Steps this small mean the problem is stiff or badly scaled there: an "
                     "implicit solver such as diffrax.Kvaerno5(), or smaller initial weights "
                     "(or loss), may do better than a larger max_steps.")
        return text
    return ""


def _stack_time(saved: PyTree, n_kept: int, final: PyTree | None) -> PyTree:
    """Saved values at the first `n_kept` save times, with the final state appended if
    given. A slice, not a mask: a view of the solver's buffer, so no second copy of
    every saved parameter is made (that doubled peak memory with `save_params=True`)."""

    def take(a, f):
        a = np.asarray(a)[:n_kept]
        return a if f is None else np.concatenate([a, np.asarray(f)], axis=0)

    if final is None:
        return jax.tree.map(lambda a: take(a, None), saved)
    return jax.tree.map(take, saved, final)


def check_variable_name(name: Any, what: str) -> str:
    """A monitor name that `to_xarray` can use as a variable: a non-empty string without
    '/' (netCDF's group separator), and not `time`, the coordinate. A clash with a
    parameter's `param_…` name is caught by `to_xarray` itself, before anything is
    written."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"`{what}`: a monitor name must be a non-empty string without '/', got {name!r}."
        )
    if name == "time":
        raise ValueError(
            f"`{what}`: the monitor name 'time' is reserved for the time coordinate of "
            "to_xarray and dyn.save; rename it, e.g. Function(fn, name='my_time')."
        )
    return name


def plain_attr(value: Any) -> Any:
    # netCDF attributes: str, int, float (a JAX or NumPy scalar becomes a Python one).
    if isinstance(value, str | bool | int | float):
        return int(value) if isinstance(value, bool) else value
    arr = np.asarray(value)
    if arr.ndim == 0 and arr.dtype.kind in "biuf":
        return arr.item()
    return str(value)


def variable_name(prefix: str, path) -> str:
    parts = [prefix]
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "_".join(parts)


class Trajectory(eqx.Module):
    """A recorded run.

    - `ts`: save times (n,); a run stopped by an event or a failure ends at `t_final`,
      which is appended when it falls between save times.
    - `params`, `velocities`: the model with a leading time axis on every array (None
      when `save_params=False`; `velocities` is None for first-order flows).
    - `monitors`: name -> array with a leading time axis.
    - `t_final`, `final_params`, `final_velocity`: where the run ended.
    - `event`: the name of the event that stopped the run, or None; `event_time`.
    - `diverged`: a divergence event fired or the state went non-finite.
    - `success`: reached t1 or stopped by an event (False for max_steps and the like);
      `result`: diffrax's message for the way the run ended.
    - `stats`: diffrax's step counts (plus `num_actions` with a projection); `meta`:
      provenance (flow, solver, tolerances, package versions).
    - `actions`: the times at which `simulate`'s projection fired, in order (empty
      without one; the first 10 000 are kept; `stats["num_actions"]` counts all).
    - `switches`: the times at which a nonsmooth mode switched (`dyn.Filippov`: each
      step that ended on a crossing, entry or exit), kept apart from the user's
      actions in the same way (`stats["num_switches"]`).
    - `coords`: monitor name -> {coordinate name: values} for the monitor's first axis
      after time (`AbstractMonitor.coords`, e.g. `layer` and `unit` of each rescaling
      charge); `to_xarray` puts them on `<name>_dim1`.
    """

    ts: np.ndarray
    params: PyTree | None
    velocities: PyTree | None
    monitors: dict[str, np.ndarray]
    t_final: float
    final_params: PyTree
    final_velocity: PyTree | None
    event: str | None
    event_time: float | None
    diverged: bool
    success: bool
    result: str
    stats: dict[str, int]
    meta: dict[str, Any]
    actions: np.ndarray = eqx.field(default_factory=lambda: np.zeros(0))
    switches: np.ndarray = eqx.field(default_factory=lambda: np.zeros(0))
    coords: dict[str, dict[str, np.ndarray]] = eqx.field(default_factory=dict)

    def with_monitor_coords(self, monitors, params) -> "Trajectory":
        """This run with the coordinates of `monitors` (`AbstractMonitor.coords`, on the
        full model `params`) in `coords`."""
        coords = {m.name: c for m in monitors if (c := m.coords(params))}
        return self if not coords else dataclasses.replace(self, coords=coords)

    @classmethod
    def from_solve(cls, problem, events, out, *, throw, meta,
                   divergence) -> "Trajectory":
        """The Trajectory of a compiled solve's `RawSolution` `out` (`dynamics/_driver/
        _spec.py`) of `problem` with `events`; `throw`: raise a RuntimeError on a
        failure other than an event; `divergence`: the event class whose firing means
        the run diverged."""
        ts_saved, ts_end, ys_saved, ys_final = out.ts, out.t_end, out.saved, out.final
        result, event_mask, stats = out.result, out.event_mask, dict(out.stats)
        actions = switches = np.zeros(0)
        if out.action_count is not None:
            count, times = int(np.asarray(out.action_count)), np.asarray(out.action_times)
            actions = times[: min(count, times.size)]
            stats["num_actions"] = count
        if out.switch_count is not None:
            count, times = int(np.asarray(out.switch_count)), np.asarray(out.switch_times)
            switches = times[: min(count, times.size)]
            stats["num_switches"] = count
        # An array inside, as diffrax leaves it: a sweep's per-cell slice holds a NumPy
        # scalar there, which `RESULTS[...]` reads as "unknown".
        message = diffrax.RESULTS[jax.tree.map(np.asarray, result)]
        name = _result_name(message)
        success = name in ("successful", "event_occurred")
        if not success:
            message += _failure_hint(name, stats, float(np.asarray(out.t_end)[-1]), meta)
        if throw and not success:
            hint = ""
            if name == "nonlinear_solver_failed" and meta.get("nonsmooth", "none") == "none":
                # the stage equations of an implicit solver at a fixed step (adaptive steps
                # shrink instead): say what to change, not only optimistix's words
                hint = (" An implicit solver's stage equations did not converge at this "
                        "step: use a smaller dt0, an adaptive stepsize_controller, or a "
                        "Newton root finder; for dyn.solvers.GaussLegendre keep its "
                        "default fallback (Newton with matrix-free GMRES, for when the "
                        "fixed-point iteration stalls: h·Lip(∇L) not small) or pass "
                        "root_finder=optx.Newton(rtol, atol, linear_solver=lx.GMRES(rtol, "
                        "atol)), and raise max_iterations.")
            raise RuntimeError(
                f"simulate failed: {message}{hint} (pass throw=False to get the partial "
                "trajectory back, flagged, instead of an error)."
            )
        ts_saved, t_final = np.asarray(ts_saved), float(np.asarray(ts_end)[-1])
        # diffrax leaves inf at the save times it never reached, which are always the last.
        n_kept = int(np.sum(np.isfinite(ts_saved)))
        kept = ts_saved[:n_kept]
        # A run that stopped early also records where it stopped.
        append = name != "successful" and (kept.size == 0 or t_final > kept[-1])
        ts = np.concatenate([kept, [t_final]]) if append else kept
        if append and "w" not in ys_saved:
            ys_final_saved = {"monitors": ys_final["monitors"]}
        else:
            ys_final_saved = ys_final
        saved = _stack_time(ys_saved, n_kept, ys_final_saved if append else None)

        fired = [bool(m) for m in jax.tree.leaves(event_mask)] if event_mask is not None else []
        event = stopped_event(events, fired, name == "event_occurred")
        w_end, v_end = ys_final.get("w"), ys_final.get("v")
        end_monitors = {k: np.asarray(a)[-1] for k, a in ys_final["monitors"].items()}
        finite_end = all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(end_monitors))
        if w_end is not None:
            finite_end = finite_end and all(
                np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves((w_end, v_end))
            )

        def model(tree):
            return None if tree is None else eqx.combine(tree, problem.static)

        def last(tree):
            return None if tree is None else jax.tree.map(lambda a: np.asarray(a)[-1], tree)

        return cls(
            ts=ts,
            params=model(saved.get("w")),
            velocities=model(saved.get("v")),
            monitors=dict(saved["monitors"]),
            t_final=t_final,
            final_params=model(last(w_end)),
            final_velocity=model(last(v_end)),
            event=None if event is None else event.name,
            event_time=None if event is None else t_final,
            diverged=isinstance(event, divergence) or not finite_end,
            success=success,
            result=message or "successful",
            stats={k: int(np.asarray(v)) for k, v in stats.items()
                   if v is not None and np.ndim(np.asarray(v)) == 0},
            meta=meta,
            actions=actions,
            switches=switches,
        )

    def to_xarray(self) -> xr.Dataset:
        """The run as an `xarray.Dataset` on a `time` coordinate, with provenance attrs.

        Monitors become variables of their own name; parameters become
        `param_<path>` / `velocity_<path>` (e.g. `param_weights_0`). Names that would
        collide (params `{"w_0": a, "w": [b]}` both give `param_w_0`; a monitor named
        `time`) raise a ValueError: no variable is ever silently dropped.
        """
        data: dict[str, Any] = {}
        origin: dict[str, str] = {"time": "the time coordinate"}

        def add(var: str, values, what: str, lead: str = "time"):
            values = np.asarray(values)
            dims = (lead,) + tuple(f"{var}_dim{i}" for i in range(1, values.ndim))
            for name in (var, *dims[1:]):
                if name in origin:
                    raise ValueError(
                        f"to_xarray: {what} and {origin[name]} would both be named "
                        f"{name!r}; rename one (a monitor's `name`, or a key of the "
                        "params pytree) so that no data is lost."
                    )
                origin[name] = what
            data[var] = (dims, values)

        for name, values in self.monitors.items():
            check_variable_name(name, "monitors")
            add(name, values, f"the monitor {name!r}")
        for prefix, tree in (("param", self.params), ("velocity", self.velocities)):
            if tree is None:
                continue
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                if not isinstance(leaf, (np.ndarray, Array)):
                    continue
                where = f"the {prefix} leaf {jax.tree_util.keystr(path) or '(root)'}"
                add(variable_name(prefix, path), leaf, where)
        coords = {"time": ("time", np.asarray(self.ts))}
        for name, by_name in self.coords.items():
            dim = f"{name}_dim1"
            if name not in self.monitors or dim not in data.get(name, ((),))[0]:
                continue
            for coord, values in by_name.items():
                values = np.asarray(values)
                if values.shape != (np.shape(self.monitors[name])[1],):
                    continue  # (not this run's shape: nothing to label)
                # `layer`, unless another monitor's axis took the name: then prefixed
                key = coord if coord not in coords and coord not in origin \
                    else f"{name}_{coord}"
                coords[key] = (dim, values)
        if self.actions.size:
            add("action_time", self.actions, "the action times", lead="action")
        if self.switches.size:
            add("switch_time", self.switches, "the nonsmooth mode's switch times",
                lead="switch")
        attrs = {k: plain_attr(v) for k, v in self.meta.items()}
        attrs.update(
            t_final=self.t_final,
            event="none" if self.event is None else self.event,
            event_time=np.nan if self.event_time is None else self.event_time,
            diverged=int(self.diverged),
            success=int(self.success),
            result=self.result,
            **{f"stats_{k}": v for k, v in self.stats.items()},
        )
        attrs = {k: plain_attr(v) for k, v in attrs.items()}
        return xr.Dataset(data, coords=coords, attrs=attrs)
