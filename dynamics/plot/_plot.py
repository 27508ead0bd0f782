"""Figures: pure functions from runs to matplotlib Figures.

A *run* is a `Trajectory`, or the `xarray.Dataset` that `Trajectory.to_xarray()` (and
so a file written by `dyn.save`) gives back, so a figure can be redrawn from disk. Every
function takes an optional `ax` to draw into and returns the Figure it drew on. Figures
are made with `matplotlib.figure.Figure`, not pyplot: no global figure registry and no
backend is touched, so they work headless (Agg on `savefig`) and display in notebooks.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "series",
    "positions",
    "plot_monitor",
    "plot_loss",
    "plot_drift",
    "plot_layer_norms",
    "plot_trajectory_3d",
]

Run = Any  # a Trajectory or an xarray.Dataset from Trajectory.to_xarray()


def series(run: Run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(time, values) of the monitor `name`; values keep their trailing axes."""
    if isinstance(run, xr.Dataset):
        if name not in run:
            raise ValueError(f"no monitor {name!r} in the dataset; it has {sorted(run.data_vars)}.")
        return np.asarray(run["time"]), np.asarray(run[name])
    monitors = getattr(run, "monitors", None)
    if monitors is None or name not in monitors:
        have = sorted(monitors) if monitors is not None else []
        raise ValueError(
            f"no monitor {name!r} on the run; it recorded {have}. Pass "
            f"dyn.monitors.* with that name to dyn.simulate."
        )
    return np.asarray(run.ts), np.asarray(monitors[name])


def positions(run: Run | np.ndarray) -> np.ndarray:
    """The parameters along the run as an (n, d) array (a run of a single array leaf)."""
    if isinstance(run, xr.Dataset):
        if "param" not in run:
            raise ValueError(
                "the dataset has no `param` variable: simulate with save_params=True on a "
                "single array of parameters."
            )
        w = np.asarray(run["param"])
    elif isinstance(run, np.ndarray):
        w = run
    else:
        if getattr(run, "params", None) is None:
            raise ValueError("the run has no saved params; simulate with save_params=True.")
        w = np.asarray(run.params)
    if w.ndim != 2:
        raise ValueError(f"expected parameters of shape (n, d), got {w.shape}.")
    return w


def _axes(ax: Axes | None, figsize=(6.0, 4.0)) -> Axes:
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def _color(colors: Mapping[str, str] | None, label: str) -> str | None:
    return None if colors is None else colors.get(label)


def _finish(ax: Axes, xlabel: str, ylabel: str, title: str | None, legend: bool | None) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0]
    if handles and (legend or (legend is None and len(handles) > 1)):
        ax.legend(frameon=False)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return ax.figure


def plot_monitor(
    runs: Mapping[str, Run],
    name: str,
    ax: Axes | None = None,
    *,
    ylabel: str | None = None,
    logy: bool = False,
    title: str | None = None,
    xlabel: str = "time $t$",
    colors: Mapping[str, str] | None = None,
    legend: bool | None = None,
) -> Figure:
    """One line per run of the scalar monitor `name` against time.

    `colors` maps run labels to colours (default: matplotlib's cycle); `legend`: draw
    one (default: when there is more than one line)."""
    ax = _axes(ax)
    for label, run in runs.items():
        t, y = series(run, name)
        if y.ndim != 1:
            raise ValueError(f"monitor {name!r} is not scalar (shape {y.shape[1:]} per time).")
        if logy:
            y = np.where(y > 0, y, np.nan)  # log axes cannot show 0; leave a gap
        ax.plot(t, y, label=label, color=_color(colors, label))
    if logy:
        ax.set_yscale("log")
    return _finish(ax, xlabel, ylabel or name, title, legend)


def plot_loss(
    runs: Mapping[str, Run], ax: Axes | None = None, *, logy: bool = False,
    title: str | None = None, colors: Mapping[str, str] | None = None,
    legend: bool | None = None,
) -> Figure:
    """The loss L(w(t)) of each run (monitor `loss`), one line per run."""
    return plot_monitor(runs, "loss", ax, ylabel=r"loss $L(w(t))$", logy=logy, title=title,
                        colors=colors, legend=legend)


def plot_drift(
    runs: Mapping[str, Run], ax: Axes | None = None, *, name: str = "energy",
    title: str | None = None, colors: Mapping[str, str] | None = None,
) -> Figure:
    """|H(t) − H(t0)| of the monitor `name` (default the energy) on a log axis.

    The conservation error of a flow with a conserved H (ND: H = ½‖ẇ‖² + L); t0 itself,
    where the drift is exactly 0, is left out.
    """
    ax = _axes(ax)
    for label, run in runs.items():
        t, h = series(run, name)
        drift = np.abs(h - h[0])
        ax.plot(t, np.where(drift > 0, drift, np.nan), label=label, color=_color(colors, label))
    ax.set_yscale("log")
    return _finish(ax, "time $t$", r"energy drift $|H(t) - H(t_0)|$", title, legend=None)


def plot_layer_norms(
    runs: Mapping[str, Run], ax: Axes | None = None, *, title: str | None = None,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """‖W_k(t)‖_F of every layer (monitor `layer_norms`): colour per run, style per layer."""
    ax = _axes(ax)
    styles = ("-", "--", ":", "-.")
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run) in enumerate(runs.items()):
        t, norms = series(run, "layer_norms")
        colour = _color(colors, label) or cycle[i % len(cycle)]
        for k in range(norms.shape[1]):
            ax.plot(t, norms[:, k], color=colour, linestyle=styles[k % len(styles)],
                    label=f"{label}, $W_{k + 1}$")
    return _finish(ax, "time $t$", r"layer norm $\|W_k(t)\|_F$", title, legend=None)


def plot_trajectory_3d(
    run: Run | np.ndarray,
    ax: Axes | None = None,
    *,
    label: str | None = None,
    title: str | None = None,
    sphere: float | None = 1.0,
    plane_normal: Sequence[float] | None = None,
    color: str | None = None,
) -> Figure:
    """The path w(t) ∈ R³, its start (○) and end (×).

    `sphere`: radius of a reference sphere drawn as a wireframe (None for none);
    `plane_normal`: draw the plane through 0 with this normal (e.g. (0, 1, −1) for y = z).
    """
    if ax is None:
        ax = Figure(figsize=(5.0, 5.0), layout="constrained").add_subplot(projection="3d")
    elif not hasattr(ax, "get_zlim"):
        raise ValueError("`ax` must be a 3-D Axes: add_subplot(projection='3d').")
    w = positions(run)
    if w.shape[1] != 3:
        raise ValueError(f"plot_trajectory_3d needs parameters in R³, got dimension {w.shape[1]}.")
    extent = max(float(np.max(np.abs(w))), sphere or 0.0) * 1.05
    if sphere is not None:
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
        ax.plot_wireframe(sphere * np.cos(u) * np.sin(v), sphere * np.sin(u) * np.sin(v),
                          sphere * np.cos(v), color="0.75", linewidth=0.4)
    if plane_normal is not None:
        n = np.asarray(plane_normal, dtype=float)
        n = n / np.linalg.norm(n)
        a = np.cross(n, [1.0, 0, 0] if abs(n[0]) < 0.9 else [0, 1.0, 0])
        a /= np.linalg.norm(a)
        b = np.cross(n, a)
        s, r = np.meshgrid(np.linspace(-extent, extent, 2), np.linspace(-extent, extent, 2))
        ax.plot_surface(*(s[None] * a[:, None, None] + r[None] * b[:, None, None]),
                        color="tab:blue", alpha=0.12, linewidth=0)
    line = ax.plot(w[:, 0], w[:, 1], w[:, 2], color=color, linewidth=1.2, label=label)[0]
    c = line.get_color()
    ax.scatter(*w[0], color=c, marker="o", s=30, depthshade=False)
    ax.scatter(*w[-1], color=c, marker="x", s=40, depthshade=False)
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_zlim(-extent, extent)
    ax.set_box_aspect((1, 1, 1), zoom=0.85)  # room for the axis labels
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("$w_1$ (x)")
    ax.set_ylabel("$w_2$ (y)")
    ax.set_zlabel("$w_3$ (z)")
    if title is not None:
        ax.set_title(title)
    return ax.figure
