"""Theory III: exponential-loss margin dynamics, weight growth with depth (Fig. 11), and
weight normalization / Lagrange multipliers reaching the same margin.

Banburski, Liao, Miranda, Poggio et al., *Theory III* (secs. 6, 14.2, 21, 22), on two
digit classes of sklearn's digits (3 against 8, labels ±1; separable by a hyperplane
through the origin, which the hard-margin SVM confirms):

(a) A linear model f(x) = wᵀx under gradient flow on the exponential loss: ‖w‖ grows
    like (1/γ) ln t, γ the SVM margin, and the normalized margin min_n y_n wᵀx_n/‖w‖
    rises to the SVM's (scikit-learn `LinearSVC`, hinge loss, no intercept, large C).
    Weight normalization (tangent and standard, `dyn.WeightNormFlow`) and the
    Lagrange-multiplier flow with ‖V‖ = 1 (`dyn.LagrangeMultiplierFlow("unit")`) from
    the same start reach the same margin; gradient descent (η = 0.05, on the flow's time
    axis t = kη) follows gradient flow.
(b) Bias-free ReLU networks of depth K = 1…4 (64-16-…-16-1) under gradient flow: the
    product of the layer norms ρ = Π_k ‖W_k‖ grows faster than ln t for K > 1 while each
    layer grows more slowly (their sec. 22, Fig. 11). Full mode: integrated exactly
    through the ReLU kinks (`nonsmooth=dyn.Filippov()`) at rtol 1e-8; quick mode: plain
    Dopri5 at 1e-4.
(c) The normalized margin of a depth-2 ReLU network under GF (the run of (b)), weight
    normalization and the Lagrange-multiplier flow (plain Dopri5 at 1e-4: the mode reads
    the surfaces of a `dyn.MLP`, not of `NormCoordinates`).

Writes `out/figures/theory3_margin_*.png` and `out/results/theory3_margin.nc` (one group
per run).
"""

import time
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

from ._common import timed

__all__ = ["run"]

CLASSES = (3, 8)
GD_ETA = 0.05  # stable: η·λ_max(∇²L(w0)) = 0.55 (40 examples), 0.38 (all); it falls after
FULL = {"examples": None, "t1_linear": 1e6, "gd_steps": 200_000, "t1_deep": 1e4, "n": 61,
        "hidden": 16, "depths": (1, 2, 3, 4), "relu_normalized": True, "exact": True}
# Quick mode (the test's) compiles each flow once, on the linear model; the ReLU panel
# then shows GF alone (each extra flow there is one more compile, ~4 s).
QUICK = {"examples": 40, "t1_linear": 1e3, "gd_steps": 2_000, "t1_deep": 30.0, "n": 9, "hidden": 4,
         "depths": (1, 2), "relu_normalized": False, "exact": False}
LINEAR_TOL = (1e-9, 1e-12)  # rtol, atol: a smooth vector field
# ReLU: ∇L jumps at every kink and the flow slides along some of them (a Filippov
# system), where adaptive solvers chatter: to t = 100 a depth-4 net took 11,101 Dopri5
# steps at rtol 1e-6 (223,016 on 40 examples) against 197 (1,791) at 1e-4. The norms and
# margins plotted here are smooth and 1e-4 draws them to plot accuracy; Dopri5 rejects
# far fewer steps at kinks than Tsit5 (its error weights are smaller).
RELU_TOL = (1e-4, 1e-7)
# Full mode: gradient flow on the ReLU nets integrated exactly through the kinks
# (`nonsmooth=dyn.Filippov()`), where the tolerance means what it says: depth 2 to
# t = 1e4 on all 357 examples took 6,550 Dopri5 steps, 2,803 switches, 79 s. The
# weight-normalized and Lagrange-multiplier flows of panel (c) run in other coordinates
# (`NormCoordinates`), whose surfaces the mode does not read: they stay plain at RELU_TOL.
EXACT_TOL = (1e-8, 1e-11)
RC = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "legend.fontsize": 9}
DPI = 120
# GF and tangent WN are the same flow in other coordinates, as are standard WN and the
# Lagrange-multiplier flow with ‖V‖ = 1: dashed lines let the pairs show on top of each other.
STYLES = {"GF": dict(color="tab:blue", lw=3.0, alpha=0.6),
          "WN tangent": dict(color="tab:orange", ls="--"),
          "WN standard": dict(color="tab:green", lw=3.0, alpha=0.6),
          "LM (‖V‖ = 1)": dict(color="tab:red", ls="--"),
          "GD": dict(color="k", ls=":", lw=1.5, label=f"GD, η = {GD_ETA:g} (t = kη)")}


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _data(n: int | None) -> tuple[dyn.datasets.Dataset, np.ndarray, np.ndarray]:
    digits = dyn.datasets.digits()
    x, y = np.asarray(digits.x), np.asarray(digits.y)
    keep = np.isin(y, CLASSES)
    x, y = x[keep], np.where(y[keep] == CLASSES[0], 1.0, -1.0)
    if n is not None:
        x, y = x[:n], y[:n]
    return dyn.datasets.Dataset(jnp.asarray(x), jnp.asarray(y)[:, None]), x, y


def _svm_margin(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=1e5, loss="hinge", fit_intercept=False, tol=1e-10, max_iter=200_000)
    svm.fit(x, y)
    w = svm.coef_.ravel()
    margins = y * (x @ w)
    if np.any(margins <= 0):
        raise RuntimeError("the two digit classes are not linearly separable through 0")
    return float(np.min(margins) / np.linalg.norm(w))


def _unit_layers(model: dyn.MLP) -> dyn.MLP:
    # ‖W_k‖ = 1 for every layer: the function only scales (bias-free ReLU), every depth
    # starts from ρ = 1, and the layers stay balanced under GF (‖W_k‖² − ‖W_{k+1}‖² is
    # conserved), the ρ_1 = … = ρ_K case of Theory III eq. 101.
    return eqx.tree_at(lambda m: m.weights, model,
                       tuple(w / jnp.linalg.norm(w) for w in model.weights))


def _simulate(label: str, flow, params, loss, t1, n, tol, monitors,
              solver=None, nonsmooth=None) -> dyn.Trajectory:
    ts = jnp.logspace(-1, np.log10(t1), n)
    return timed(label, dyn.simulate, flow, params, loss, t1=float(t1), ts=ts,
                 monitors=monitors, solver=solver, nonsmooth=nonsmooth,
                 stepsize_controller=diffrax.PIDController(rtol=tol[0], atol=tol[1]),
                 save_params=False, max_steps=200_000)


def _normalized_runs(model, loss, data, t1, n, tol, prefix, solver=None, gf=None,
                     others=True):
    monitors = (dyn.monitors.Loss(), dyn.monitors.Margin(data), dyn.monitors.LayerNorms(),
                dyn.monitors.NormProduct())
    runs = {"WN tangent": (dyn.WeightNormFlow(), dyn.NormCoordinates.from_mlp(model)),
            "WN standard": (dyn.WeightNormFlow(parametrization="standard"),
                            dyn.NormCoordinates.from_mlp(model)),
            "LM (‖V‖ = 1)": (dyn.LagrangeMultiplierFlow("unit"),
                             dyn.NormCoordinates.from_mlp(model, normalize=False))}
    if gf is None:
        gf = _simulate(f"{prefix} GF", dyn.GradientFlow(), model, loss, t1, n, tol, monitors,
                       solver)
    if not others:
        return {"GF": gf}
    return {"GF": gf} | {
        name: _simulate(f"{prefix} {name}", flow, params, loss, t1, n, tol, monitors, solver)
        for name, (flow, params) in runs.items()
    }


def _relu_net(depth: int, hidden: int) -> dyn.MLP:
    widths = (64,) + (hidden,) * (depth - 1) + (1,)
    return _unit_layers(dyn.MLP(widths, activation=dyn.ReLU(), bias=False,
                                key=jax.random.key(depth)))


def _deep_runs(loss, data, cfg) -> dict[int, dyn.Trajectory]:
    # The same monitors as `_normalized_runs`, so the depth-2 run serves both parts.
    monitors = (dyn.monitors.Loss(), dyn.monitors.Margin(data), dyn.monitors.LayerNorms(),
                dyn.monitors.NormProduct())
    runs = {}
    for depth in cfg["depths"]:
        # depth 1 is the linear model 64-1 (no hidden unit, no kink): plain at EXACT_TOL
        exact = cfg["exact"] and depth > 1
        runs[depth] = _simulate(f"ReLU depth {depth}", dyn.GradientFlow(),
                                _relu_net(depth, cfg["hidden"]), loss, cfg["t1_deep"],
                                cfg["n"], EXACT_TOL if cfg["exact"] else RELU_TOL, monitors,
                                diffrax.Dopri5(), dyn.Filippov() if exact else None)
    return runs


def _gf_note(exact: bool) -> str:
    if exact:
        return (f"exact through the kinks (Filippov mode), Dopri5, rtol = {EXACT_TOL[0]:.0e}, "
                f"atol = {EXACT_TOL[1]:.0e}")
    return f"Dopri5, rtol = {RELU_TOL[0]:.0e}"


def _fig_linear(runs, svm_margin) -> Figure:
    fig = Figure(figsize=(12.0, 4.3), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    gf = runs["GF"]
    t, norm = np.asarray(gf.ts), np.asarray(gf.monitors["layer_norms"])[:, 0]
    ax.plot(t, norm, color="tab:blue", label=r"GF: $\|w(t)\|$")
    late = t >= t[len(t) // 2]
    offset = np.mean(norm[late] - np.log(t[late]) / svm_margin)
    ax.plot(t, offset + np.log(t) / svm_margin, "k:",
            label=rf"$\ln t/\gamma_{{SVM}}$ + c,  $\gamma_{{SVM}}$ = {svm_margin:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("time $t$ (gradient-flow units)")
    ax.set_ylabel(r"$\|w\|$")
    ax.set_title(r"Linear model: $\|w\|$ grows like $\ln t$")
    ax.legend(frameon=False)
    ax.grid(True, alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    for name, traj in runs.items():
        ax.plot(traj.ts[1:], traj.monitors["margin"][1:], **({"label": name} | STYLES[name]))
    ax.axhline(svm_margin, color="k", ls="--", lw=1, label="hard-margin SVM (sklearn)")
    ax.set_xscale("log")
    ax.set_xlabel("time $t$")
    ax.set_ylabel(r"normalized margin $\min_n y_n w^\top x_n / \|w\|$")
    ax.set_title("Normalized margin → the SVM's (the gap closes like 1/ln t)")
    ax.legend(frameon=False, loc="lower right")
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"Exponential loss, digits {CLASSES[0]} vs {CLASSES[1]} "
                 f"(rtol = {LINEAR_TOL[0]:g}, Tsit5)")
    return fig


def _fig_depth(deep, exact: bool) -> Figure:
    fig = Figure(figsize=(12.0, 4.3), layout="constrained")
    ax_p, ax_l = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    cmap = matplotlib.colormaps["viridis"]
    for i, (depth, traj) in enumerate(deep.items()):
        color = cmap(i / max(len(deep) - 1, 1))
        t = np.asarray(traj.ts)
        ax_p.plot(t, traj.monitors["norm_product"], color=color, label=f"K = {depth}")
        norms = np.asarray(traj.monitors["layer_norms"])
        ax_l.plot(t, np.exp(np.mean(np.log(norms), axis=1)), color=color, label=f"K = {depth}")
    for ax in (ax_p, ax_l):
        # A linear y over a log t axis: ln t growth is a straight line, faster is convex.
        ax.set_xscale("log")
        ax.set_xlabel("time $t$")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(frameon=False)
    ax_p.set_ylabel(r"$\rho = \prod_k \|W_k\|$")
    ax_p.set_title("Product of layer norms (ln t is a straight line here)")
    ax_l.set_ylabel(r"geometric mean of $\|W_k\|$")
    ax_l.set_title("Per-layer norm (slower than the 1-layer case)")
    fig.suptitle("Bias-free ReLU networks 64-…-1 from every ‖W_k‖ = 1, GF on the exponential "
                 f"loss\n(cf. Theory III Fig. 11; GF {_gf_note(exact)})")
    return fig


def _fig_relu_margin(runs, exact: bool) -> Figure:
    fig = Figure(figsize=(6.5, 4.3), layout="constrained")
    ax = fig.add_subplot()
    for name, traj in runs.items():
        ax.plot(traj.ts, traj.monitors["margin"], label=name, **STYLES[name])
    ax.set_xscale("log")
    ax.set_xlabel("time $t$")
    ax.set_ylabel(r"$\min_n y_n f(x_n) / \prod_k \|W_k\|$")
    ax.set_title("Depth-2 ReLU network: normalized margin")
    note = (f"GF: {_gf_note(exact)};\nother flows: plain Dopri5, rtol = {RELU_TOL[0]:.0e}"
            if exact and len(runs) > 1 else _gf_note(exact))
    ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=8, va="bottom")
    ax.legend(frameon=False)
    ax.grid(True, alpha=0.3)
    return fig


def _tree(linear, deep, relu, svm_margin, cfg, quick) -> xr.DataTree:
    nodes = {"/": xr.Dataset(attrs={
        "study": "theory3-margin", "quick": int(quick),
        "description": __doc__.strip().splitlines()[0],
        "classes": list(CLASSES), "svm_margin": svm_margin,
        "examples": -1 if cfg["examples"] is None else cfg["examples"],
        "relu_gf": _gf_note(cfg["exact"]),
    })}
    for name, traj in linear.items():
        nodes[f"linear/{_slug(name)}"] = traj.to_xarray()
    for depth, traj in deep.items():
        nodes[f"depth/K{depth}"] = traj.to_xarray()
    for name, traj in relu.items():
        nodes[f"relu_margin/{_slug(name)}"] = traj.to_xarray()
    return xr.DataTree.from_dict(nodes)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("(‖v‖_=_1)", "unit").replace("(", "")


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("theory3-margin needs float64: jax.config.update('jax_enable_x64', "
                           "True) (the `dynamics` CLI does).")
    cfg = QUICK if quick else FULL
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    data, x, y = _data(cfg["examples"])
    loss = dyn.losses.exponential(data)
    svm_margin = _svm_margin(x, y)
    linear_model = dyn.MLP((64, 1), activation=dyn.Identity(), bias=False,
                           key=jax.random.key(0))
    linear = _normalized_runs(linear_model, loss, data, cfg["t1_linear"], cfg["n"],
                              LINEAR_TOL, "linear")
    start = time.perf_counter()
    linear["GD"] = dyn.discrete.run(  # the discrete algorithm, on the flow's time axis
        dyn.discrete.GD(GD_ETA), linear_model, loss, cfg["gd_steps"],
        save_every=cfg["gd_steps"] // 50,
        monitors=(dyn.monitors.Loss(), dyn.monitors.Margin(data), dyn.monitors.LayerNorms(),
                  dyn.monitors.NormProduct()))
    _say(f"{'linear GD':<28}{cfg['gd_steps']:>7} steps {time.perf_counter() - start:6.1f} s")
    deep = _deep_runs(loss, data, cfg)
    relu = _normalized_runs(_relu_net(2, cfg["hidden"]), loss, data, cfg["t1_deep"],
                            cfg["n"], RELU_TOL, "ReLU depth 2", diffrax.Dopri5(), gf=deep[2],
                            others=cfg["relu_normalized"])
    written = {}
    with matplotlib.rc_context(RC):
        for key, fig in (("linear", _fig_linear(linear, svm_margin)),
                         ("depth", _fig_depth(deep, cfg["exact"])),
                         ("relu", _fig_relu_margin(relu, cfg["exact"]))):
            path = out / "figures" / f"theory3_margin_{key}.png"
            fig.savefig(path, dpi=DPI)
            written[key] = path
    written["results"] = dyn.save(_tree(linear, deep, relu, svm_margin, cfg, quick),
                                  out / "results" / "theory3_margin.nc")
    return written
