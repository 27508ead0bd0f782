"""Discrete optimizers against their flows on a digits MLP: gap orders, modified equations.

Also GD's exact per-neuron charge drift and a run past the edge of stability.

(a) Gap at a fixed flow time T against the step size, log-log, with fitted orders and
    95% confidence intervals (`dyn.gap_order`): GD against gradient flow (order 1) and
    against its modified flow ẇ = −∇(L + (η/4)‖∇L‖²) (order 2); in the full run also
    heavy ball and Nesterov momentum (β = 0.5, started on the slow manifold) against
    their first-order modified flows, NAGD against Nesterov's flow at t = k√s (order ½
    in s) and Leapfrog against Newtonian dynamics (order 2 in √η). Smooth network
    (Tanh), so the flows are smooth and the orders are those of the expansion. The
    full run adds GD on the same network with ReLU against GF and the modified flow,
    their references integrated exactly through the kinks (`nonsmooth=dyn.Filippov()`,
    rtol 1e-10): the kinks cost the modified flow its second order.
(b) Per-neuron rescaling charges Q_i under GD on a ReLU network: measured Q_k − Q_0
    and the exact law Σ η²(‖g_in‖² − ‖g_out‖²) on top of each other, and the drift
    after K steps against η with its fitted slope (η² per step, but ‖g‖ decays over
    flow time Kη, so the slope is below 2). Right: heavy ball (β = 0.9) on the loss
    plus weight decay (λ/2)‖w‖²: the measured charges, the exact closed form
    (`dyn.discrete.charge_closed_form`: a damped oscillator in β^k and cos 2kφ driven by
    the η² forcing recorded by `ChargeForcing`), and its decay-only part (forcing set
    to 0, the discrete form of Kunin et al. 2021's damped-oscillator law).
(c) GD below and past the edge of stability (η·λ_max = 1 and 3 at the start): the loss
    and the distance to gradient flow; past the edge the iterates leave the flow and
    no modified equation describes them.

Writes `out/figures/discrete_gap_{orders,charges,edge}.png` and
`out/results/discrete_gap.nc` (an xarray.DataTree: /orders/<pair> the gap_order
datasets, /charges the drift runs, /decay the weight-decay run, /edge the two runs'
gaps).
"""

import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import dynamics as dyn
from dynamics import datasets, discrete, losses

from ._common import folders

__all__ = ["run"]

WIDTHS = (64, 16, 10)
BETA = 0.5
RTOL, ATOL = 1e-10, 1e-12
# ReLU flows are piecewise smooth: a plain adaptive solve chatters at the kinks (rtol
# 1e-8 was its limit here), so the ReLU references are Filippov solves at the smooth
# runs' tolerances (GF on the 300-digit net to t = 2: 2,811 steps, 935 crossings, 2
# sliding entries, ~30 s per solve on 2 loaded cores).
RELU_MODE = dyn.Filippov()
# Heavy ball with weight decay (panel b, right): a = 1 + β − ηλ = 1.89, a² < 4β, so the
# charge is an underdamped oscillator with period π/φ ≈ 36 steps (cos φ = a/(2√β)).
DECAY = {"eta": 0.05, "beta": 0.9, "weight_decay": 0.2}
FULL = {"examples": 300, "T": 2.0, "etas": [0.2, 0.1, 0.05, 0.025], "all_pairs": True,
        "charge_steps": 200, "edge_steps": 60}
QUICK = {"examples": 32, "T": 1.0, "etas": [0.2, 0.1, 0.05], "all_pairs": False,
         "charge_steps": 40, "edge_steps": 20}
DPI = 120


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _problem(cfg, activation):
    data = datasets.digits(cfg["examples"])
    model = dyn.MLP(WIDTHS, activation, key=jax.random.key(0), init="lecun")
    return model, losses.cross_entropy(data)


def _orders(cfg) -> dict[str, xr.Dataset]:
    model, loss = _problem(cfg, dyn.Tanh())
    T, etas = cfg["T"], cfg["etas"]
    out = {}

    def go(name, *args, **kwargs):
        start = time.perf_counter()
        ds = dyn.gap_order(*args, **{"rtol": RTOL, "atol": ATOL, **kwargs})
        out[name] = ds
        _say(f"{name:<32} order {ds.attrs['order']:.3f} "
             f"[{ds.attrs['order_ci_low']:.3f}, {ds.attrs['order_ci_high']:.3f}]  "
             f"{time.perf_counter() - start:5.1f} s")

    if cfg["all_pairs"]:  # quick mode: one flow to compile
        go("GD vs GF", discrete.GD, model, loss, etas, T)
    go("GD vs modified flow", discrete.GD, model, loss, etas, T,
       flow=lambda a: dyn.ModifiedGradientFlow(a.eta), check_stability=False)
    if cfg["all_pairs"]:
        w, static = eqx.partition(model, eqx.is_inexact_array)
        grad = jax.grad(lambda x: loss(eqx.combine(x, static)))(w)
        v_slow = eqx.combine(jax.tree.map(lambda g: -g / (1 - BETA), grad), static)
        go("heavy ball vs modified flow", lambda e: discrete.HeavyBall(e, BETA), model, loss,
           etas, T, flow=lambda a: dyn.ModifiedHeavyBallFlow(a.eta, a.beta), v0=v_slow,
           check_stability=False)
        go("Nesterov momentum vs modified flow", lambda e: discrete.NesterovMomentum(e, BETA),
           model, loss, etas, T, v0=v_slow, check_stability=False)
        hs = [0.1, 0.05, 0.025, 0.0125]
        go("NAGD vs NAGF", discrete.NAGD, model, loss, [h**2 for h in hs], T,
           check_stability=False)
        go("Leapfrog vs ND", discrete.Leapfrog, model, loss, [h**2 for h in hs], T,
           against="time_step", check_stability=False)
        relu, relu_loss = _problem(cfg, dyn.ReLU())
        go("GD vs GF (ReLU)", discrete.GD, relu, relu_loss, etas, T, nonsmooth=RELU_MODE,
           check_stability=False)
        go("GD vs modified flow (ReLU)", discrete.GD, relu, relu_loss, etas, T,
           flow=lambda a: dyn.ModifiedGradientFlow(a.eta), nonsmooth=RELU_MODE,
           check_stability=False)
    return out


def _charges(cfg) -> xr.Dataset:
    model, loss = _problem(cfg, dyn.ReLU())
    steps = cfg["charge_steps"]
    etas = np.asarray([0.4, 0.2, 0.1, 0.05])
    measured, predicted, finals = [], [], []
    for eta in etas:
        traj = discrete.run(discrete.GD(float(eta)), model, loss, steps,
                            monitors=(dyn.monitors.RescalingCharges(),
                                      dyn.monitors.GDChargeDrift(float(eta))),
                            save_params=False, check_stability=False)
        q = traj.monitors["rescaling_charges"]
        drift = traj.monitors["gd_charge_drift"]
        measured.append(q - q[0])
        predicted.append(np.concatenate([np.zeros_like(drift[:1]),
                                         np.cumsum(drift[:-1], axis=0)]))
        finals.append(np.max(np.abs(q[-1] - q[0])))
    return xr.Dataset(
        {"measured": (("eta", "step", "neuron"), np.stack(measured)),
         "predicted": (("eta", "step", "neuron"), np.stack(predicted)),
         "max_final_drift": ("eta", np.asarray(finals))},
        coords={"eta": etas, "step": np.arange(steps + 1)},
        attrs={"law": "Q_{k+1} - Q_k = eta^2 (|g_in|^2 - |g_out|^2) (exact for GD)",
               "activation": "ReLU", "widths": str(WIDTHS)},
    )


def _decay(cfg) -> xr.Dataset:
    model, fit = _problem(cfg, dyn.ReLU())
    eta, beta, lam = DECAY["eta"], DECAY["beta"], DECAY["weight_decay"]

    def loss(m):
        leaves = jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
        return fit(m) + 0.5 * lam * sum(jax.numpy.sum(x**2) for x in leaves)

    steps = cfg["charge_steps"]
    traj = discrete.run(discrete.HeavyBall(eta, beta), model, loss, steps,
                        monitors=(dyn.monitors.RescalingCharges(),
                                  dyn.monitors.ChargeForcing(eta, beta, lam)),
                        save_params=False, check_stability=False)
    q, forcing = traj.monitors["rescaling_charges"], traj.monitors["charge_forcing"][:-1]
    start = discrete.charge_start(model, None, eta)  # from rest: v_0 = 0
    closed = discrete.charge_closed_form(start[0], forcing, eta, beta, lam, *start[1:])
    decay_only = discrete.charge_closed_form(start[0], np.zeros_like(forcing), eta, beta,
                                             lam, *start[1:])
    err = float(np.max(np.abs(closed - q)) / np.max(np.abs(q)))
    _say(f"decay: heavy ball + weight decay, closed form vs measured: {err:.1e} of max |Q|")
    return xr.Dataset(
        {"measured": (("step", "neuron"), q), "closed_form": (("step", "neuron"), closed),
         "decay_only": (("step", "neuron"), decay_only)},
        coords={"step": np.arange(steps + 1)},
        attrs={**DECAY, "activation": "ReLU", "max_relative_error": err,
               "law": "Q_{k+1} = a^2 Q_k + beta^2 Q_{k-1} - 2 a beta S_{k-1} + F_k, "
                      "a = 1 + beta - eta*lambda (exact; see dynamics/symmetries/_laws.py)"},
    )


def _edge(cfg) -> dict[str, xr.Dataset]:
    model, loss = _problem(cfg, dyn.Tanh())
    w, static = eqx.partition(model, eqx.is_inexact_array)
    problem = dyn._problem.Problem(dyn.GradientFlow(), loss, static)
    lam = dyn.discrete.edge_of_stability(discrete.GD(1.0), problem, w, warn=False)
    out = {}
    for label, factor in (("below", 1.0), ("past", 3.0)):
        eta = factor / lam
        traj = discrete.run(discrete.GD(eta), model, loss, cfg["edge_steps"],
                            monitors=(dyn.monitors.Loss(),), check_stability=False)
        ds = dyn.gap(traj, dyn.GradientFlow(), loss, monitors=(dyn.monitors.Loss(),),
                     rtol=RTOL, atol=ATOL, check_stability=False)
        ds.attrs.update(eta=eta, eta_lambda_max=factor, lambda_max=lam)
        out[label] = ds
        _say(f"edge: eta*lambda_max = {factor}: final gap {float(ds['distance'][-1]):.3g}")
    return out


def _fig_orders(orders) -> Figure:
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^vx<>"
    for (name, ds), m in zip(orders.items(), markers, strict=False):
        x = ds["time_step"] if ds.attrs["against"] == "time_step" else ds["step_size"]
        label = (f"{name}: order {ds.attrs['order']:.2f} "
                 f"[{ds.attrs['order_ci_low']:.2f}, {ds.attrs['order_ci_high']:.2f}]"
                 + (" in √η" if ds.attrs["against"] == "time_step" else ""))
        ax.loglog(x, ds["gap"], marker=m, ls="--" if "ReLU" in name else "-", label=label)
    ax.set_xlabel("step size η (s for NAGD; √η for Leapfrog)")
    ax.set_ylabel("gap ‖w_K − w(T)‖ at flow time T")
    ax.set_title("Discrete vs continuous (Tanh MLP on digits; dashed: ReLU)")
    note = f"flows: Tsit5, rtol={RTOL:g}, atol={ATOL:g}; 95% CI"
    if any("ReLU" in name for name in orders):
        note += ("\nReLU (dashed): flows by the Filippov mode (exact at the kinks). GD\n"
                 "crosses the kinks at other times than the flow, an O(η) error per\n"
                 "crossing, so the modified flow gains no order there (∇²L jumps)")
    ax.text(0.02, 0.98, note, transform=ax.transAxes, fontsize=7, va="top")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _fig_charges(ds, decay) -> Figure:
    fig = Figure(figsize=(15, 4), layout="constrained")
    ax, bx, cx = fig.subplots(1, 3)
    i = 1  # η = 0.2
    for n, c in zip(range(4), ("C0", "C1", "C2", "C3"), strict=True):
        ax.plot(ds["step"], ds["measured"][i, :, n], color=c, lw=2, alpha=0.5,
                label="measured" if n == 0 else None)
        ax.plot(ds["step"], ds["predicted"][i, :, n], color="k", ls=":",
                label="exact law" if n == 0 else None)
    ax.set_xlabel("GD step k")
    ax.set_ylabel("Q_i(w_k) − Q_i(w_0)")
    ax.set_title(f"four neurons, η = {float(ds['eta'][i]):g} (ReLU)")
    ax.legend()
    eta = ds["eta"].values
    bx.loglog(eta, ds["max_final_drift"], "o-", label="measured max_i |Q_i(w_K) − Q_i(w_0)|")
    slope = np.polyfit(np.log(eta), np.log(ds["max_final_drift"].values), 1)[0]
    bx.lines[-1].set_label(f"{bx.lines[-1].get_label()}, slope {slope:.2f}")
    ref = ds["max_final_drift"].values[-1] * (eta / eta[-1]) ** 2
    bx.loglog(eta, ref, "k--", label="∝ η² (drift of one step)")
    bx.xaxis.set_minor_formatter(NullFormatter())  # the minor labels overlap
    bx.set_xticks(eta, [f"{e:g}" for e in eta])
    bx.set_xlabel("learning rate η")
    bx.set_ylabel(f"charge drift after {ds.sizes['step'] - 1} steps")
    bx.legend(fontsize=8)
    bx.grid(True, which="both", alpha=0.3)
    for n, c in zip(range(3), ("C0", "C1", "C2"), strict=True):
        cx.plot(decay["step"], decay["measured"][:, n], color=c, lw=2, alpha=0.5,
                label="measured" if n == 0 else None)
        cx.plot(decay["step"], decay["closed_form"][:, n], color="k", ls=":",
                label="closed form (exact)" if n == 0 else None)
        cx.plot(decay["step"], decay["decay_only"][:, n], color=c, ls="--", lw=1,
                label="decay only (no η² forcing)" if n == 0 else None)
    cx.axhline(0.0, color="0.6", lw=0.5)
    cx.set_xlabel("heavy-ball step k")
    cx.set_ylabel("Q_i(w_k)")
    cx.set_title(f"heavy ball β = {decay.attrs['beta']:g}, η = {decay.attrs['eta']:g}, "
                 f"weight decay λ = {decay.attrs['weight_decay']:g}")
    cx.text(0.98, 0.02, f"closed form − measured: {decay.attrs['max_relative_error']:.0e}"
            " of max |Q|", transform=cx.transAxes, fontsize=8, ha="right")
    cx.legend(fontsize=8)
    return fig


def _fig_edge(edge) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for label, ds in edge.items():
        name = f"η·λ_max = {ds.attrs['eta_lambda_max']:g} ({label} the edge)"
        ax.semilogy(ds["time"], ds["loss_discrete"], label=f"GD, {name}")
        ax.semilogy(ds["time"], ds["loss_flow"], ls=":", label="GF, same times")
        bx.semilogy(ds["time"][1:], ds["distance"][1:], label=name)
    ax.set_xlabel("flow time t = kη")
    ax.set_ylabel("loss (cross-entropy)")
    ax.set_title("GD past the edge still trains, off the flow")
    ax.legend(fontsize=8)
    bx.set_xlabel("flow time t = kη")
    bx.set_ylabel("‖w_k − w_GF(kη)‖")
    bx.set_title(f"GF: Tsit5 rtol={RTOL:g}")
    bx.legend(fontsize=8)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    orders = _orders(cfg)
    charges = _charges(cfg)
    decay = _decay(cfg)
    edge = _edge(cfg)
    written = {}
    for key, fig in (("orders", _fig_orders(orders)), ("charges", _fig_charges(charges, decay)),
                     ("edge", _fig_edge(edge))):
        path = figures / f"discrete_gap_{key}.png"
        fig.savefig(path, dpi=DPI)
        written[key] = path
    nodes = {"/": xr.Dataset(attrs={"study": "discrete-gap", "quick": int(quick)}),
             "/charges": charges, "/decay": decay}
    for name, ds in orders.items():
        nodes["/orders/" + name.replace(" ", "_")] = ds
    for name, ds in edge.items():
        nodes[f"/edge/{name}"] = ds
    written["results"] = dyn.save(xr.DataTree.from_dict(nodes), results / "discrete_gap.nc")
    return written
