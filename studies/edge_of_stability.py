"""Gradient descent at the edge of stability against its flows: progressive sharpening, the
hover at 2/η, and which continuous model tracks GD there (gradient flow, the modified
flow, the central flow).

A Tanh MLP on digits (MSE; the last layer's initial weights halved, so that the initial
sharpness sits below 2/η and GD sharpens into the edge rather than starting past it),
full-batch GD at several η. For each η:

(a) loss against the GD step: GD's raw loss, its running average over `window` steps
    (the time average the central flow predicts), gradient flow and the modified flow
    ẇ = −∇(L + (η/4)‖∇L‖²) at t = kη, and the central flow's prediction
    L(w) + ½⟨H, Σ⟩ (`dyn.CentralFlow.time_averaged_loss`). A marker shows where each
    flow stops tracking GD (its loss leaves a ±`TRACK` band around GD's average).
(b) sharpness λ_1 against the step: GD sharpens to 2/η and hovers; GF and the modified
    flow keep sharpening; the central flow holds λ_1 at 2/η.

Over the edge-of-stability phase (from the first step where GD's sharpness reaches
2/η to the end) the figure states each flow's error in the time-averaged loss and
the mean sharpness against GD's, and the wall times.

Writes `out/figures/edge_of_stability.png` and `out/results/edge_of_stability.nc`
(one group per η with the GD and flow curves, errors and timings as attributes).
"""

import time
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import datasets, discrete, losses

from ._common import folders, require_x64, save_figures, save_tree, say, step_note

__all__ = ["run"]

WIDTHS = (64, 32, 10)
RTOL, ATOL = 1e-5, 1e-7
TRACK = 0.05      # a flow "tracks" GD while its loss is within 5% of GD's average
# k: eigenpairs the central flow watches. On these nets a second eigenvalue reaches 2/η
# within a few hundred steps of the first; with k = 1 it then climbs past 2/η unchecked
# (and the field switches eigenvector back and forth: 763 solver steps against 128 with
# k = 2 on the quick net).
FULL = {"examples": 300, "widths": WIDTHS, "scale": 0.5, "etas": [0.5, 0.4],
        "steps": 1600, "save_every": 10, "flows": ("gradient", "modified", "central"),
        "k": 3, "window": 50}
# Quick: a smaller net (last layer ×0.3) that sharpens to 2/η = 2.2 within ~30 steps;
# no modified flow (its compilation is 8 s).
QUICK = {"examples": 48, "widths": (64, 8, 10), "scale": 0.3, "etas": [0.9], "steps": 100,
         "save_every": 5, "flows": ("gradient", "central"), "k": 2,
         "window": 20}


def _problem(cfg):
    data = datasets.digits(cfg["examples"])
    model = dyn.MLP(cfg["widths"], dyn.Tanh(), key=jax.random.key(0), init="lecun")
    model = eqx.tree_at(lambda m: m.weights[-1], model, model.weights[-1] * cfg["scale"])
    return model, losses.mse(data)


def _running_mean(x, window):
    # Centred where possible, one-sided at the ends (same length as x).
    c = np.cumsum(np.concatenate([[0.0], x]))
    idx = np.arange(len(x))
    lo = np.clip(idx - window // 2, 0, len(x))
    hi = np.clip(idx + window // 2 + 1, 0, len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def _gd(model, loss, eta, cfg):
    steps, every = cfg["steps"], cfg["save_every"]
    gd = discrete.GD(eta)
    discrete.run(gd, model, loss, 2, monitors=(dyn.monitors.Loss(),),
                 save_params=False, check_stability=False)  # compile
    walls = []
    for _ in range(3):  # the fastest of three: the machine is shared
        start = time.perf_counter()
        per_step = discrete.run(gd, model, loss, steps, monitors=(dyn.monitors.Loss(),),
                                save_params=False, check_stability=False)
        walls.append(time.perf_counter() - start)
    wall = min(walls)
    sharp = discrete.run(gd, model, loss, steps, monitors=(dyn.monitors.Sharpness(),),
                         save_every=every, save_params=False, check_stability=False)
    return per_step.monitors["loss"], sharp.monitors["sharpness"], wall


def _flow(label, flow, model, loss, cfg, eta, solver):
    steps, every = cfg["steps"], cfg["save_every"]
    ts = np.arange(0, steps + 1, every) * eta
    start = time.perf_counter()
    traj = dyn.simulate(flow, model, loss, t1=float(ts[-1]), ts=ts, solver=solver,
                        stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                        monitors=(dyn.monitors.Loss(), dyn.monitors.Sharpness()),
                        save_params=isinstance(flow, dyn.CentralFlow))
    wall = time.perf_counter() - start
    say(f"η = {eta:g}  {label:<16}{step_note(traj)}  {wall:6.1f} s")
    out = {"loss": np.asarray(traj.monitors["loss"]),
           "sharpness": np.asarray(traj.monitors["sharpness"]), "wall": wall,
           "steps": int(traj.stats.get("num_steps", 0))}
    if isinstance(flow, dyn.CentralFlow):
        w, static = eqx.partition(traj.params, eqx.is_inexact_array)

        def fl(x):
            return loss(eqx.combine(x, static))

        def one(x):
            st = flow.state(0.0, x, fl)
            return st.time_averaged_loss(), st.hvps

        predicted, hvps = jax.jit(lambda ws: jax.lax.map(one, ws))(w)
        out["predicted"], out["hvps"] = np.asarray(predicted), np.asarray(hvps)
    return out


def _one_eta(eta, cfg):
    model, loss = _problem(cfg)
    every = cfg["save_every"]
    gd_loss, gd_sharp, gd_wall = _gd(model, loss, eta, cfg)
    say(f"η = {eta:g}  GD {cfg['steps']} steps{'':<14}{gd_wall:6.1f} s")
    # GD's running mean over `window` steps (many oscillation periods): the time average
    # the central flow predicts.
    avg = _running_mean(np.asarray(gd_loss), cfg["window"])
    saved = np.arange(0, cfg["steps"] + 1, every)
    flows = {"gradient flow": (dyn.GradientFlow(), diffrax.Tsit5()),
             "modified flow": (dyn.ModifiedGradientFlow(eta), diffrax.Tsit5()),
             "central flow": (dyn.CentralFlow(eta, k=cfg["k"]), diffrax.Bosh3())}
    flows = {k: v for k, v in flows.items() if k.split()[0] in cfg["flows"]}
    runs = {name: _flow(name, f, model, loss, cfg, eta, s) for name, (f, s) in flows.items()}
    edge = 2.0 / eta
    # Onset: the first save where GD's sharpness, having been below the edge, reaches
    # 0.99·2/η (a start above the edge is a catapult, not the edge of stability).
    at_edge = np.asarray(gd_sharp) >= edge * (1 - 0.01)
    been_below = np.cumsum(~at_edge) > 0
    reached = np.nonzero(at_edge & been_below)[0]
    onset = int(saved[reached[0]]) if len(reached) else int(saved[-1])
    window = saved >= onset
    gd_avg_eos = float(np.mean(avg[saved][window]))
    gd_sharp_eos = float(np.mean(np.asarray(gd_sharp)[window]))
    data = {"gd_loss": (("step",), np.asarray(gd_loss)),
            "gd_loss_average": (("step",), avg),
            "gd_sharpness": (("save",), np.asarray(gd_sharp))}
    attrs = {"eta": eta, "edge": edge, "onset_step": onset, "gd_wall_s": gd_wall,
             "eos_steps": int(cfg["steps"] - onset),
             "gd_mean_loss_eos": gd_avg_eos, "gd_mean_sharpness_eos": gd_sharp_eos,
             "gd_sharpness_error_vs_edge": abs(gd_sharp_eos - edge) / edge}
    for name, r in runs.items():
        key = name.split()[0]
        pred = r.get("predicted", r["loss"])
        # Tracking is judged after the first `window` steps, where GD's running mean is
        # biased by the initial fast fall of the loss.
        lost = np.nonzero(np.abs(pred - avg[saved]) > TRACK * avg[saved])[0]
        lost = lost[saved[lost] > cfg["window"]]
        attrs[f"{key}_loss_error_eos"] = abs(float(np.mean(pred[window])) - gd_avg_eos) \
            / gd_avg_eos
        attrs[f"{key}_loss_error_final"] = abs(float(pred[-1]) - avg[-1]) / avg[-1]
        attrs[f"{key}_sharpness_error_eos"] = abs(
            float(np.mean(r["sharpness"][window])) - gd_sharp_eos) / gd_sharp_eos
        attrs[f"{key}_sharpness_error_vs_edge"] = abs(
            float(np.mean(r["sharpness"][window])) - edge) / edge
        attrs[f"{key}_tracks_until_step"] = int(saved[lost[0]]) if len(lost) else -1
        attrs[f"{key}_wall_s"] = r["wall"]
        attrs[f"{key}_solver_steps"] = r["steps"]
        data[f"{key}_loss"] = (("save",), r["loss"])
        data[f"{key}_sharpness"] = (("save",), r["sharpness"])
        if "predicted" in r:
            data[f"{key}_predicted_loss"] = (("save",), r["predicted"])
            data[f"{key}_hvps"] = (("save",), r["hvps"])
            attrs[f"{key}_mean_hvps_per_evaluation"] = float(np.mean(r["hvps"]))
    say(f"η = {eta:g}  EoS from step {onset}: time-averaged loss error "
        + ", ".join(f"{k} {attrs[f'{k}_loss_error_eos']:.1%}" for k in cfg["flows"])
        + "; mean sharpness vs GD's " + ", ".join(
            f"{k} {attrs[f'{k}_sharpness_error_eos']:.1%}" for k in cfg["flows"]))
    return xr.Dataset(data, coords={"step": np.arange(cfg["steps"] + 1), "save": saved},
                      attrs=attrs)


_STYLE = {"gradient": ("C0", "gradient flow"), "modified": ("C2", "modified flow (≈ GF)"),
          "central": ("C3", "central flow")}


def _figure(results, cfg) -> Figure:
    n = len(results)
    fig = Figure(figsize=(6.2 * n, 8.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for col, ds in enumerate(results.values()):
        a, b = axes[0, col], axes[1, col]
        eta, edge, onset = ds.attrs["eta"], ds.attrs["edge"], ds.attrs["onset_step"]
        a.semilogy(ds["step"], ds["gd_loss"], color="0.75", lw=0.6, label="GD (raw)")
        a.semilogy(ds["step"], ds["gd_loss_average"], color="k", lw=1.5,
                   label=f"GD, mean over {cfg['window']} steps")
        b.plot(ds["save"], ds["gd_sharpness"], color="k", lw=1.5, label="GD")
        for key, (color, name) in _STYLE.items():
            if key not in cfg["flows"]:
                continue
            err = ds.attrs[f"{key}_loss_error_eos"]
            if f"{key}_predicted_loss" in ds:
                a.semilogy(ds["save"], ds[f"{key}_predicted_loss"], color=color,
                           label=f"{name}: L + ½⟨H,Σ⟩ (EoS error {err:.1%})")
                a.semilogy(ds["save"], ds[f"{key}_loss"], color=color, ls=":", lw=1,
                           label=f"{name}: L(w)")
            else:
                a.semilogy(ds["save"], ds[f"{key}_loss"], color=color,
                           label=f"{name} (EoS error {err:.1%})")
            until = ds.attrs[f"{key}_tracks_until_step"]
            if until >= 0:
                a.axvline(until, color=color, ls="--", lw=0.8)
            serr = ds.attrs[f"{key}_sharpness_error_eos"]
            b.plot(ds["save"], ds[f"{key}_sharpness"], color=color,
                   label=f"{name} (EoS mean off GD's by {serr:.1%})")
        for ax in (a, b):
            ax.axvspan(onset, ds["step"][-1], color="0.93", zorder=0)
            ax.set_xlabel("GD step k (flow time t = kη)")
            ax.grid(True, alpha=0.3)
        b.axhline(edge, color="0.4", ls="--", lw=1, label="2/η")
        a.set_ylabel("training loss (MSE)")
        b.set_ylabel("sharpness λ₁(∇²L)")
        a.set_title(f"η = {eta:g}: loss (dashed: flow leaves ±{TRACK:.0%} of GD's mean)")
        b.set_title(f"η = {eta:g}: sharpness; GD's EoS mean is "
                    f"{ds.attrs['gd_sharpness_error_vs_edge']:.1%} off 2/η")
        a.legend(fontsize=8, loc="upper right")
        b.legend(fontsize=8, loc="upper left")
        a.text(0.02, 0.03,
               f"shaded: EoS phase (GD's λ₁ ≥ 0.99·2/η), {ds.attrs['eos_steps']} steps\n"
               f"wall: GD {ds.attrs['gd_wall_s']:.2f} s, GF {ds.attrs['gradient_wall_s']:.0f} s,"
               f" central flow {ds.attrs['central_wall_s']:.0f} s "
               f"({ds.attrs['central_solver_steps']} steps, "
               f"{ds.attrs['central_wall_s'] / ds.attrs['gd_wall_s']:.0f}× GD)",
               transform=a.transAxes, fontsize=8, va="bottom")
    fig.suptitle(f"Tanh MLP {'-'.join(map(str, cfg['widths']))} on {cfg['examples']} digits,"
                 f" full-batch GD.\nFlows: PID rtol={RTOL:g}, atol={ATOL:g}; GF and modified"
                 f" flow Tsit5; central flow Bosh3,\ntop-{cfg['k']} Hessian eigenpairs by "
                 "Lanczos at every evaluation, τ = 1 step", fontsize=10)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    require_x64("edge-of-stability", quick)
    cfg = QUICK if quick else FULL
    figures, results_dir = folders(out)
    results = {f"eta_{eta:g}": _one_eta(eta, cfg) for eta in cfg["etas"]}
    written = save_figures(figures, "edge_of_stability",
                           {"loss_sharpness": lambda: _figure(results, cfg)})
    written["results"] = save_tree({f"/{k}": v for k, v in results.items()},
                                   results_dir / "edge_of_stability.nc",
                                   study="edge-of-stability", quick=quick,
                                   widths=str(cfg["widths"]), rtol=RTOL, atol=ATOL)
    return written
