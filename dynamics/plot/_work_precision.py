"""Work-precision diagrams from `dyn.work_precision`, in the style of
DifferentialEquations.jl's: error on a log x-axis, cost on a log y-axis, one line per
method through its tolerances (or step sizes)."""

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_COSTS = {"wall_time": "wall time (s, min over repeats)",
          "grad_evals": "gradient evaluations"}


def plot_work_precision(ds: xr.Dataset, *, error: str = "error", cost: str = "wall_time",
                        ax: Axes | None = None, title: str | None = None) -> Figure:
    """Error against cost, one line per method, each point labelled by its tolerance or
    step size.

    **Arguments:** `ds` from `dyn.work_precision`; `error`: `"error"` (final state,
    max norm) or a `"drift_<monitor>"` variable; `cost`: `"wall_time"` or
    `"grad_evals"`; `ax`: an Axes to draw into; `title`: defaults to the flow and t1.
    """
    if not isinstance(ds, xr.Dataset) or "solver" not in ds.dims:
        raise ValueError("`ds` must be the xarray.Dataset that dyn.work_precision returns.")
    if error not in ds:
        have = [v for v in ds.data_vars if v == "error" or v.startswith("drift_")]
        raise ValueError(f"`error` must be one of {have}, got {error!r}.")
    if cost not in _COSTS:
        raise ValueError(f"`cost` must be one of {sorted(_COSTS)}, got {cost!r}.")
    if ax is None:
        fig = Figure(figsize=(6.0, 4.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    for name in ds["solver"].values:
        row = ds.sel(solver=name)
        x, y = np.asarray(row[error]), np.asarray(row[cost])
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
        if not ok.any():
            continue
        (line,) = ax.plot(x[ok], y[ok], marker="o", label=str(name))
        tol, dt = np.asarray(row["tolerance"]), np.asarray(row["dt"])
        for k in np.flatnonzero(ok):
            text = f"tol {tol[k]:.0e}" if np.isfinite(tol[k]) else f"dt {dt[k]:.2g}"
            ax.annotate(text, (x[k], y[k]), fontsize=6, color=line.get_color(),
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    what = "final-state error (max norm)" if error == "error" else \
        f"{error.removeprefix('drift_')} drift max|m(t) − m(t0)|"
    ax.set_xlabel(what)
    ax.set_ylabel(_COSTS[cost])
    ax.set_title(title or f"{ds.attrs.get('flow', '')} to t = {ds.attrs.get('t1', '')}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
