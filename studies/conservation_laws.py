"""Lie-algebra-rank count of conservation laws on 50 random linear and 50 ReLU nets vs closed forms.

`dyn.symmetries.count_conservation_laws` (Marcotte, Gribonval & Peyré 2023: D − dim
Lie(V)(θ), brackets by `jax.jvp`, rank by SVD in float64) on random architectures of
depth 2–4 and widths 2–9 (inputs: 60 Gaussian points), each against
`dyn.symmetries.known_count`: for linear nets the independent entries of the balance
matrices W_h W_hᵀ − W_{h+1}ᵀ W_{h+1}; for ReLU nets (biases on every other one) one law per
hidden neuron, k(k − 1)/2 more per group of k neurons of a layer with one activation
pattern, plus the first layer's unseen directions and the dead connections of deeper
layers (an input that is zero wherever the neuron it feeds is live), on generic draws
(`random_alive_mlp`: every neuron alive, full-rank live inputs behind layer 1 but for dead
connections).
Marcotte et al.'s SageMath code took 34 min for their 50 linear and 1 h 53 min for their
50 ReLU nets on 64 threads; the figure gives our times on this machine.

Writes `out/figures/conservation_laws.png`, `out/results/conservation_laws.nc` (a Dataset
over `net`: kind, widths, bias, num_params, count, expected, levels, seconds) and the same
table as `out/results/conservation_laws.md`.
"""

import time
from pathlib import Path

import jax
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics._random import normal
from dynamics.symmetries._known import generic
from dynamics.symmetries._random_nets import random_alive_mlp

from ._common import folders, require_x64, save_figures, save_tree, say

__all__ = ["architectures", "count_one", "run"]

FULL, QUICK = 50, 2  # architectures per kind
SAGE_MINUTES = {"linear": 34.0, "relu": 113.0}  # Marcotte et al.'s code, 64 threads


def architectures(n: int, seed: int = 0):
    """(kind, widths, bias, seed) of n random linear then n random ReLU architectures:
    depth 2–4, widths 2–9, biases on every other ReLU net."""
    rng = np.random.default_rng(seed)
    for kind in ("linear", "relu"):
        for k in range(n):
            depth = int(rng.integers(2, 5))
            widths = tuple(int(w) for w in rng.integers(2, 10, depth + 1))
            yield kind, widths, kind == "relu" and k % 2 == 0, k


def count_one(kind: str, widths, bias: bool, seed: int) -> dict:
    """Count one random net (60 Gaussian inputs) and its closed form (−1 when none: a
    ReLU net with no generic draw, see `known_count`); with the wall time of the count."""
    key = jax.random.key(seed)
    # jax.random.normal's numbers, from a sampler compiled once (`_random.normal`)
    x = normal(jax.random.fold_in(key, 7), (60, widths[0]))
    try:
        model = random_alive_mlp(widths, x, relu=kind == "relu", bias=bias, key=key,
                                 require_generic=False)
    except ValueError:  # no draw with every neuron alive: count the first one anyway
        model = dyn.MLP(widths, activation=dyn.ReLU(), bias=bias,
                        key=jax.random.fold_in(key, 0))
    start = time.perf_counter()
    r = dyn.symmetries.count_conservation_laws(model, x, key=key)
    seconds = time.perf_counter() - start
    closed = kind == "linear" or generic(model, x)
    return {"kind": kind, "widths": "-".join(map(str, widths)), "bias": bias,
            "num_params": r.num_params, "count": r.count,
            "expected": dyn.symmetries.known_count(model, x) if closed else -1,
            "levels": len(r.rank_history), "seconds": seconds,
            "smallest_kept": r.singular_values.min(), "largest_dropped": r.largest_dropped,
            "ranks": r.rank_history}


def _table(n: int) -> xr.Dataset:
    rows = []
    for kind, widths, bias, seed in architectures(n):
        r = count_one(kind, widths, bias, seed)
        say(f"{kind:6s} {r['widths']:12s} bias {bias!s:5s} D {r['num_params']:4d} count "
            f"{r['count']:3d} expected {r['expected']:3d} ranks {r['ranks']} "
            f"{r['seconds']:5.2f} s")
        rows.append(r)
    names = ("kind", "widths", "bias", "num_params", "count", "expected", "levels", "seconds",
             "smallest_kept", "largest_dropped")
    return xr.Dataset({k: ("net", np.asarray([r[k] for r in rows])) for k in names},
                      coords={"net": np.arange(len(rows))},
                      attrs={"inputs": "60 points N(0, I)", "threshold": 1e-9})


def _markdown(ds: xr.Dataset) -> str:
    lines = ["| kind | widths | bias | D | count | expected | levels | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for i in range(ds.sizes["net"]):
        r = {k: ds[k].values[i] for k in ds.data_vars}
        lines.append(f"| {r['kind']} | {r['widths']} | {r['bias']} | {r['num_params']} | "
                     f"{r['count']} | {r['expected']} | {r['levels']} | {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def _figure(ds: xr.Dataset) -> Figure:
    fig = Figure(figsize=(13.0, 4.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    colors = {"linear": "tab:blue", "relu": "tab:red"}
    for kind in ("linear", "relu"):
        sel = ds["kind"].values == kind
        known = sel & (ds["expected"].values >= 0)
        ok = int(np.sum(ds["count"].values[known] == ds["expected"].values[known]))
        ax.scatter(ds["expected"].values[known], ds["count"].values[known], color=colors[kind],
                   alpha=0.7, label=f"{kind}: {ok}/{int(known.sum())} equal"
                   + (f" ({int(sel.sum() - known.sum())} without closed form)"
                      if known.sum() < sel.sum() else ""))
        bx.scatter(ds["num_params"].values[sel], ds["seconds"].values[sel], color=colors[kind],
                   alpha=0.7, label=f"{kind}: total {ds['seconds'].values[sel].sum():.1f} s "
                                    f"(SageMath: {SAGE_MINUTES[kind]:g} min on 64 threads)")
        # name the nets off the diagonal, so a reader can look them up in the table
        for i in np.flatnonzero(known & (ds["count"].values != ds["expected"].values)):
            ax.annotate(f"{ds['widths'].values[i]}{' +b' if ds['bias'].values[i] else ''}",
                        (ds["expected"].values[i], ds["count"].values[i]), fontsize=8,
                        xytext=(-6, 10), textcoords="offset points", ha="right",
                        color=colors[kind])
    top = max(ds["expected"].max(), ds["count"].max()) * 1.1
    ax.plot([0, top], [0, top], "k:", lw=1, label="count = expected")
    ax.set_xlabel("expected number of laws (closed form: `known_count`)")
    ax.set_ylabel("counted: D − dim Lie(V)(θ)")
    ax.set_title("Conservation laws, random nets of depth 2–4, widths 2–9")
    ax.text(0.98, 0.02, "rank threshold 1e-9 (float64); kept ≥ "
            f"{ds['smallest_kept'].min():.0e}, dropped ≤ {ds['largest_dropped'].max():.0e}",
            ha="right", transform=ax.transAxes, fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("number of parameters D")
    bx.set_ylabel("wall time per net (s), compilation included")
    bx.set_title("Cost (the first nets compile one function per bracket level)")
    for a, where in ((ax, "upper left"), (bx, "lower right")):
        a.grid(True, which="both", alpha=0.3)
        a.legend(loc=where, fontsize=8)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("conservation-laws", quick=False, reason="the rank is taken in float64")
    figures, results = folders(out)
    start = time.perf_counter()
    ds = _table(QUICK if quick else FULL)
    ds.attrs["total_seconds"] = time.perf_counter() - start
    written = save_figures(figures, "conservation_laws", {"counts": lambda: _figure(ds)})
    results.mkdir(parents=True, exist_ok=True)
    md = results / "conservation_laws.md"
    md.write_text(_markdown(ds), encoding="utf-8")
    written["table"] = md
    written["results"] = save_tree({"/counts": ds}, results / "conservation_laws.nc",
                                   study="conservation-laws", quick=quick)
    return written
