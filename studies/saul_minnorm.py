"""Saul (2023), Fig. 2: convergence of the multiplicative updates of Algorithm 1.

Three ReLU networks with the same numbers of input (200), hidden (3750) and output (10)
units, 200-2500-1250-10, 200-2000-1000-500-250-10 and 200-1000-750-750-500-500-250-10,
zero biases and He-initialised Gaussian weights (variance 2/fan-in). For each (p, q) in
{1, 2, 3}², `dyn.balance.min_norm_fix` is run for 40 updates and the ratio
‖W‖_{p,q}/‖W0‖_{p,q} recorded after every update; the iterations needed to come within
1e-6 (relative) of the global minimum are counted, the minimum being the norm at
convergence (|a_i − 1| < 1e-12 or `max_iter` updates).

Quick mode uses the same depths with every hidden width divided by 50 (8-100-50-1 is too
thin: 10 outputs and 200 inputs are kept, i.e. 200-100-50-10 and so on).

Writes out/figures/saul_minnorm_ratio.png, out/figures/saul_minnorm_iterations.png and
out/results/saul_minnorm.nc (variables `ratio` (network, p, q, update) and
`iterations_to_1e-6`, `min_ratio` (network, p, q)).
"""

from pathlib import Path

import jax
import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

__all__ = ["run"]

NETWORKS = {
    "3-layer": (200, 2500, 1250, 10),
    "5-layer": (200, 2000, 1000, 500, 250, 10),
    "7-layer": (200, 1000, 750, 750, 500, 500, 250, 10),
}
GRID = (1.0, 2.0, 3.0)
UPDATES = 40
TOL = 1e-12
FULL = {"shrink": 1, "max_iter": 1000}
QUICK = {"shrink": 50, "max_iter": 300}
COLORS = {"3-layer": "tab:blue", "5-layer": "tab:orange", "7-layer": "tab:green"}


def _widths(widths, shrink):
    return (widths[0], *(max(2, w // shrink) for w in widths[1:-1]), widths[-1])


def _run_grid(cfg):
    ratio = np.full((len(NETWORKS), len(GRID), len(GRID), UPDATES + 1), np.nan)
    iters = np.zeros((len(NETWORKS), len(GRID), len(GRID)), int)
    min_ratio = np.zeros_like(iters, dtype=float)
    converged = np.zeros_like(iters, dtype=bool)
    widths = {}
    for n, (name, w) in enumerate(NETWORKS.items()):
        widths[name] = _widths(w, cfg["shrink"])
        model = dyn.MLP(widths[name], dyn.ReLU(), bias=True, key=jax.random.key(n))
        for i, p in enumerate(GRID):
            for j, q in enumerate(GRID):
                _, info = dyn.balance.min_norm_fix(model, p, q, tol=TOL,
                                                   max_iter=cfg["max_iter"])
                k = int(info.num_steps)
                v = np.asarray(info.values[: k + 1])
                m = min(k, UPDATES)
                ratio[n, i, j, : m + 1] = v[: m + 1] / v[0]
                ratio[n, i, j, m + 1:] = v[m] / v[0]  # converged before 40: flat
                iters[n, i, j] = int(np.nonzero(v - v[-1] <= 1e-6 * v[-1])[0][0])
                min_ratio[n, i, j] = v[-1] / v[0]
                converged[n, i, j] = bool(info.converged)
    return ratio, iters, min_ratio, converged, widths


def _fig_ratio(ratio, min_ratio, quick, max_iter) -> Figure:
    fig = Figure(figsize=(11, 9.5), layout="constrained")
    axes = fig.subplots(len(GRID), len(GRID), sharex=True)
    ks = np.arange(UPDATES + 1)
    for i, p in enumerate(GRID):
        for j, q in enumerate(GRID):
            ax = axes[i, j]
            for n, name in enumerate(NETWORKS):
                ax.plot(ks, ratio[n, i, j], color=COLORS[name], label=name)
                ax.axhline(min_ratio[n, i, j], color=COLORS[name], ls=":", lw=0.8)
            ax.set_title(f"p = {p:g}, q = {q:g}")
            ax.grid(alpha=0.3)
            if i == len(GRID) - 1:
                ax.set_xlabel("multiplicative updates")
            if j == 0:
                ax.set_ylabel(r"$\|W\|_{p,q}\,/\,\|W_0\|_{p,q}$")
    axes[0, 0].legend(title="dotted: global minimum")
    fig.suptitle("Saul Alg. 1 (dyn.balance.min_norm_fix), He-initialised ReLU nets, zero "
                 "biases, float64" + (" — quick mode: hidden widths / 50" if quick else "")
                 + f"\nglobal minimum (dotted): max|a_i − 1| < {TOL:g} or {max_iter} updates")
    return fig


def _fig_iterations(iters, converged, quick) -> Figure:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    labels = [f"({p:g},{q:g})" for p in GRID for q in GRID]
    x = np.arange(len(labels))
    for n, name in enumerate(NETWORKS):
        ax.bar(x + (n - 1) * 0.27, iters[n].ravel(), width=0.27, color=COLORS[name],
               label=name)
    ax.set_xticks(x, labels)
    ax.set_xlabel("(p, q)")
    ax.set_ylabel("updates to 1e-6 of the minimum")
    ax.set_yscale("log")
    ax.legend()
    note = "" if converged.all() else " (some runs stopped at max_iter; see results)"
    ax.set_title("Iterations to reach 1e-6 relative of the global minimum" + note
                 + (" — quick" if quick else ""), fontsize=10)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("saul-minnorm measures 1e-6 relative gaps; enable float64 first "
                           "(jax.config.update('jax_enable_x64', True); the CLI does).")
    cfg = QUICK if quick else FULL
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    ratio, iters, min_ratio, converged, widths = _run_grid(cfg)
    written = {}
    with matplotlib.rc_context({"font.size": 10}):
        for key, fig in (("ratio", _fig_ratio(ratio, min_ratio, quick, cfg["max_iter"])),
                         ("iterations", _fig_iterations(iters, converged, quick))):
            path = out / "figures" / f"saul_minnorm_{key}.png"
            fig.savefig(path, dpi=110)
            written[key] = path
    coords = {"network": list(NETWORKS), "p": list(GRID), "q": list(GRID)}
    ds = xr.Dataset(
        {
            "ratio": (("network", "p", "q", "update"), ratio),
            "iterations_to_1e-6": (("network", "p", "q"), iters),
            "min_ratio": (("network", "p", "q"), min_ratio),
            "converged": (("network", "p", "q"), converged.astype(np.int8)),
        },
        coords={**coords, "update": np.arange(UPDATES + 1)},
        attrs={"study": "saul-minnorm", "quick": int(quick), "tol": TOL,
               "max_iter": cfg["max_iter"],
               "widths": "; ".join(f"{k}: {'-'.join(map(str, v))}" for k, v in widths.items()),
               "description": "Saul (2023) Fig. 2: min-norm fix convergence"},
    )
    written["results"] = dyn.save(ds, out / "results" / "saul_minnorm.nc")
    return written


if __name__ == "__main__":
    import argparse

    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(run(args.out, args.quick))
