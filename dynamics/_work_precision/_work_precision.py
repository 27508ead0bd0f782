"""`work_precision`: error against cost for methods × tolerances or fixed steps, in the
manner of DifferentialEquations.jl's work-precision diagrams. Each method brings its own
runner (`_base.AbstractMethod`); this module loops over methods and settings."""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffrax
import numpy as np
import xarray as xr
from jaxtyping import PyTree, Scalar

from .._convergence import dopri8_reference, reference_tolerance
from .._flows import AbstractFlow
from .._progress import Progress
from .._validate import real
from ..monitors._monitors import AbstractMonitor
from ._base import AbstractMethod, WorkProblem, flat
from ._diffrax import DiffraxMethod


def _drift(values: np.ndarray) -> float:
    return float(np.max(np.abs(values - values[0])))


def _as_method(name: str, m) -> AbstractMethod:
    if isinstance(m, AbstractMethod):
        return m
    if isinstance(m, diffrax.AbstractSolver):
        return DiffraxMethod(m)
    raise ValueError(
        f"`methods[{name!r}]` must be a diffrax solver, a dyn.solvers one, "
        f"dyn.ScipyMethod(...), dyn.TorchdiffeqMethod(...) or "
        f"dyn.NonsmoothMethod(...), got {m!r}."
    )


def work_precision(
    flow: AbstractFlow,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    methods: Mapping[str, Any],
    *,
    t1: float,
    t0: float = 0.0,
    v0: PyTree | None = None,
    tolerances: Sequence[float] = (1e-4, 1e-6, 1e-8, 1e-10),
    dts: Sequence[float] | None = None,
    reference: Callable[[float], Any] | None = None,
    monitors: Sequence[AbstractMonitor] = (),
    n_save: int = 11,
    repeats: int = 3,
    min_time: float = 0.0,
    max_steps: int | None = 100_000,
    progress: bool = True,
) -> xr.Dataset:
    """Error against cost for each method at each tolerance (or fixed step).

    **Arguments:**

    - `flow`, `params`, `loss`, `t0`, `t1`, `v0`: as in `simulate`.
    - `methods`: name -> a diffrax solver or one of `dyn.solvers` (adaptive ones are
      swept over `tolerances` with `PIDController(rtol=tol, atol=tol)`, the others
      over `dts` with fixed steps), `ScipyMethod("RK45" | "DOP853" | "LSODA")` or
      `TorchdiffeqMethod("dopri5" | "dopri8" | ...)` or
      `NonsmoothMethod(solver, dyn.Filippov())` (swept over `tolerances`).
    - `tolerances`: rtol = atol values, each > 0.
    - `dts`: fixed step sizes for solvers without an error estimate (required then).
    - `reference`: t1 -> exact final state (`params`, or `(params, velocity)` for a
      second-order flow); default Dopri8 at rtol = atol = 1e-13 (float32: 100 eps,
      ~1e-5, as 1e-13 cannot be met there), within `max_steps` (a reference that needs
      more is a ValueError: pass `reference=` or a larger budget).
    - `monitors`: each gives a drift max_t |m(t) − m(t0)| over `n_save` save times,
      e.g. `Energy()` on Newtonian flow or `RescalingCharges()` on gradient flow.
    - `repeats`: timed runs per setting (after one compiling run at a method's first
      setting); the minimum is kept.
    - `min_time`: each timed run repeats the solve back to back until it has lasted at
      least this long (s) and reports the mean per solve: runs of a few milliseconds
      are otherwise inside the timer's and the machine's noise (0.2 is a good value
      for benchmarks; 0, the default, times one solve).
    - `max_steps`: a budget per run (default 100 000, as `simulate`'s; None: unbounded).
      A diffrax run that uses it up, or an external one that evaluates the field more
      than 12 × `max_steps` times (12: a DOP853 step), has not finished: its `finished`
      is False, its error NaN, and it is not repeated. What a ReLU network needs: plain
      adaptive solvers chatter on its kinks at tight tolerances and would run for hours.
    - `progress`: a line per quarter of the runs (a tqdm bar on a terminal).

    **Returns:** an `xarray.Dataset` on dims (solver, setting), one `solver` per
    method, with `error` (max norm of the final state against the reference),
    `wall_time` (s, min over repeats),
    `grad_evals` (loss-gradient evaluations: counted in a separate run for diffrax
    solvers, by the external library's own count otherwise), `tolerance` or
    `dt` (NaN where the other applies), `finished`, `drift_<monitor>`, and per solver
    `compile_time` (s; first call minus the fastest: a tolerance or step sweep of a
    diffrax solver compiles once, as `simulate` traces both).
    """
    if not isinstance(flow, AbstractFlow):
        raise ValueError(
            f"`flow` must be a catalogue entry such as dyn.GradientFlow(), got {flow!r}."
        )
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("`methods` must be a non-empty mapping name -> solver or ScipyMethod.")
    tolerances = np.asarray(tolerances, dtype=float)
    if tolerances.ndim != 1 or tolerances.size == 0 or np.any(~(tolerances > 0)):
        raise ValueError(
            f"`tolerances` must be a non-empty list of numbers > 0, got {tolerances}."
        )
    if dts is not None:
        dts = np.asarray(dts, dtype=float)
        if dts.ndim != 1 or dts.size == 0 or np.any(~(dts > 0)):
            raise ValueError(f"`dts` must be a non-empty list of step sizes > 0, got {dts}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}.")
    min_time = real(min_time, "min_time", "work_precision", low=0.0)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}.")
    if not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True or False, got {progress!r}.")
    methods = {name: _as_method(name, m) for name, m in methods.items()}
    for name, m in methods.items():
        m.check(name, dts)
    monitors = tuple(monitors)
    ts = np.linspace(t0, t1, n_save)
    problem = WorkProblem(flow, params, loss, v0, t0, t1, ts, monitors, max_steps)
    plan = {name: method.settings(tolerances, dts) for name, method in methods.items()}
    bar = Progress(sum(map(len, plan.values())) + (reference is None), "work_precision",
                   unit="runs", enabled=progress)
    with bar:
        if reference is None:
            # A budget even when the methods have none: a badly scaled problem made the
            # unbounded reference run for more than five minutes, printing nothing.
            exact = dopri8_reference(flow, params, loss, t0=t0, t1=t1, v0=v0,
                                     max_steps=max_steps or 100_000, owner="work_precision")
            bar.update()
        else:
            exact = flat(reference(t1))
        return _sweep_methods(flow, methods, plan, problem, exact, monitors, t0, t1,
                              repeats, min_time, reference, bar)


def _sweep_methods(flow, methods, plan, problem, exact, monitors, t0, t1, repeats, min_time,
                   reference, bar) -> xr.Dataset:
    """Every method at each of its settings (`plan`), timed; the diagram's Dataset."""

    n_settings = max(len(settings) for settings in plan.values())
    shape = (len(methods), n_settings)
    data = {k: np.full(shape, np.nan) for k in ("error", "wall_time", "grad_evals",
                                                 "tolerance", "dt")}
    finished = np.zeros(shape, bool)
    drifts = {m.name: np.full(shape, np.nan) for m in monitors}
    compile_time = np.full(len(methods), np.nan)

    for i, (name, method) in enumerate(methods.items()):
        settings = plan[name]
        runner = method.runner(problem)
        for j, (kind, value) in enumerate(settings):
            if j == 0:
                # The first call compiles (diffrax: the solve, once for the whole sweep,
                # tolerances and step sizes being traced; scipy, torchdiffeq: the jitted
                # field); later settings reuse it, so only this one is warmed up.
                start = time.perf_counter()
                runner(kind, value, False)
                elapsed = time.perf_counter() - start
            # Timed runs compute the solution only: monitors, when asked for, and the
            # evaluation count of a diffrax solver come from separate runs, so neither
            # is charged to the method.
            times = []
            for _ in range(repeats):
                count, start = 0, time.perf_counter()
                while True:  # back to back until min_time has passed
                    out = runner(kind, value, False)
                    count += 1
                    lasted = time.perf_counter() - start
                    if lasted >= min_time or not out.finished:
                        break
                times.append(lasted / count)
                if not out.finished:  # (budget, failure): no point in repeating
                    break
            if j == 0:
                compile_time[i] = max(elapsed - min(times), 0.0)
            if monitors and out.finished:
                out = runner(kind, value, True)
            state, monitor_values, ok, nfev = (out.state, out.monitors, out.finished,
                                               out.grad_evals)
            data[kind][i, j] = value
            finished[i, j] = ok
            data["wall_time"][i, j] = min(times)
            if not ok:
                nfev = np.nan  # the cost of a run that did not finish is not its cost
            elif nfev is None:
                nfev = runner.count(kind, value)
            data["grad_evals"][i, j] = nfev
            data["error"][i, j] = float(np.max(np.abs(state - exact))) if ok else np.nan
            for m in monitors:
                drifts[m.name][i, j] = _drift(monitor_values[m.name]) if ok else np.nan
            bar.update()

    # "solver", not "method": ds.sel(method=...) is xarray's own `method` argument.
    dims = ("solver", "setting")
    variables = {k: (dims, v) for k, v in data.items()}
    variables.update({f"drift_{k}": (dims, v) for k, v in drifts.items()})
    variables["finished"] = (dims, finished)
    variables["compile_time"] = (("solver",), compile_time)
    return xr.Dataset(
        variables,
        coords={"solver": list(methods), "setting": np.arange(n_settings)},
        attrs=dict(flow=type(flow).__name__, t0=float(t0), t1=float(t1), repeats=repeats,
                   min_time=min_time,
                   reference=(f"Dopri8 rtol=atol={reference_tolerance():g}"
                              if reference is None else "given")),
    )
