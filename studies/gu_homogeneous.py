"""Głuch & Urbanke Fig. 1: ‖W2‖² − ‖W3‖² of a ReLU net under GF, ND, NAGF (+ GD, Leapfrog, NAGD).

A ReLU MLP 64-200-200-200-10 without biases (the paper's 784-200-200-200-10 on 1000
KMNIST images; here sklearn's 8×8 digits stand in for KMNIST, 1000 of them), mean
cross-entropy, He initialisation. Per hidden layer h, the rescaling symmetry of all its
neurons (`dyn.symmetries.LayerRescaling(h)`) gives Table 2:

- GF conserves ‖W_h‖² − ‖W_{h+1}‖² (eq. 31, Du et al. 2018);
- every κ-flow obeys ⟨W_h, κ2Ẅ_h + κ1Ẇ_h⟩ − ⟨W_{h+1}, κ2Ẅ_{h+1} + κ1Ẇ_{h+1}⟩ = 0 (eq. 30),
  recorded as a relative residual (`dyn.monitors.SymmetryResidual`), and in integrated
  form μ⟨ẇ, ξ(w)⟩ − ∫ μ⟨ẇ, ξ(ẇ)⟩ is constant (`dyn.monitors.ChargeLaw`, μ = 1 for ND,
  t³ for NAGF), which tests the integration;
- ND: S(t) − S(0) ≤ 4(L(0) − L*) t² with S = Σ_h |‖W_h‖² − ‖W_{h+1}‖²| (eqs. 32–34,
  `dyn.monitors.NDBound`, from rest);
- NAGF: E = ½‖ẇ‖² + L decreases as dE/dt = −(3/t)‖ẇ‖² (eq. 35, `dyn.monitors.EnergyLaw`).

The discrete algorithms of sec. 3 at the paper's learning rate 0.01 run beside the flows
on the flow's time axis (issue 8): GD (t = kη), the ND leapfrog (eq. 21, t = k√η) and
NAGD (eq. 20, t = k√s), from the same initial weights.

Writes `out/figures/gu_homogeneous_{norms,residuals}.png` and
`out/results/gu_homogeneous.nc` (a DataTree: /flow/{gf,nd,nagf} and
/discrete/{gd,leapfrog,nagd}, each a `Trajectory.to_xarray()`).
"""

from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import dynamics as dyn
from dynamics import datasets, discrete, losses

from ._common import folders, require_x64, save_figures, save_tree, timed

__all__ = ["run"]

LAYER = 2  # h = 2: W^(2) and W^(3), as in the paper
ETA = 0.01  # the paper's learning rate
FULL = {"widths": (64, 200, 200, 200, 10), "examples": 1000, "t1": 10.0, "saves": 101}
# Quick: to t = 0.5 (every law and bound the test checks already shows there; GF chatters
# on the kinks, 783 steps against 1,903 to t = 1).
QUICK = {"widths": (64, 16, 16, 16, 10), "examples": 64, "t1": 0.5, "saves": 11}
# rtol, atol. GF on a ReLU net slides along activation kinks (a Filippov system) and an
# adaptive solver chatters there: at 1e-7 the quick GF run to t = 1 took 10,609 steps
# against ND's 1,272. 1e-6 keeps the charge law's drift near 1e-8, far below the effects plotted.
RTOL, ATOL = 1e-6, 1e-8
COLORS = {"GF": "tab:blue", "ND": "tab:orange", "NAGF": "tab:green"}
DISCRETE = {"GF": "GD", "ND": "Leapfrog", "NAGF": "NAGD"}


def _norm_gap(t, m, v):
    return jnp.sum(m.weights[LAYER - 1] ** 2) - jnp.sum(m.weights[LAYER] ** 2)


def _pairing(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _problem(cfg):
    data = datasets.digits(cfg["examples"], key=jax.random.key(0))
    model = dyn.MLP(cfg["widths"], activation=dyn.ReLU(), bias=False, key=jax.random.key(1))
    return model, losses.cross_entropy(data)


def _flows(model, loss, cfg) -> dict[str, dyn.Trajectory]:
    gen = dyn.symmetries.LayerRescaling(LAYER)
    common = (dyn.monitors.Loss(), dyn.monitors.Function(_norm_gap, "norm_gap"),
              dyn.monitors.SymmetryResidual(gen, name="residual"),
              dyn.monitors.ChargeLaw(gen, name="charge_law"),
              # ⟨ẇ, ξ(w)⟩: the size of the charge law's terms, to read its drift relatively
              dyn.monitors.Function(lambda t, m, v: _pairing(v, gen(m)), "pairing"))
    extra = {"GF": (), "ND": (dyn.monitors.NDBound(),), "NAGF": (dyn.monitors.EnergyLaw(),)}
    flows = {"GF": dyn.GradientFlow(), "ND": dyn.NewtonianFlow(), "NAGF": dyn.NesterovFlow()}
    t1 = cfg["t1"]
    controller = diffrax.PIDController(rtol=RTOL, atol=ATOL)
    return {
        name: timed(f"{name} (Dopri5, rtol {RTOL:g})", dyn.simulate, flow, model, loss, t1=t1,
                    ts=jnp.linspace(0.0, t1, cfg["saves"]), solver=diffrax.Dopri5(),
                    stepsize_controller=controller, monitors=common + extra[name],
                    max_steps=200_000, save_params=False)
        for name, flow in flows.items()
    }


def _discrete(model, loss, cfg) -> dict[str, dyn.Trajectory]:
    monitors = (dyn.monitors.Loss(), dyn.monitors.Function(_norm_gap, "norm_gap"))
    out = {}
    for name, alg in (("GD", discrete.GD(ETA)), ("Leapfrog", discrete.Leapfrog(ETA)),
                      ("NAGD", discrete.NAGD(ETA))):
        steps = int(round(cfg["t1"] / float(alg.time_step)))
        every = max(1, steps // (cfg["saves"] - 1))
        out[name] = timed(f"{name} (eta {ETA:g}, {steps} steps)", discrete.run, alg, model,
                          loss, steps, monitors=monitors, save_every=every, save_params=False,
                          check_stability=False)
    return out


def _fig_norms(flows, algs, cfg) -> Figure:
    fig = Figure(figsize=(14.0, 8.0), layout="constrained")
    axes = fig.subplots(2, 3)
    for j, (name, traj) in enumerate(flows.items()):
        ax = axes[0, j]
        t, gap = traj.ts, np.asarray(traj.monitors["norm_gap"])
        ax.plot(t, gap - gap[0], color=COLORS[name], lw=2, label=f"{name} (flow)")
        d = algs[DISCRETE[name]]
        dg = np.asarray(d.monitors["norm_gap"])
        ax.plot(d.ts, dg - dg[0], color="k", ls="--", lw=1.2,
                label=f"{DISCRETE[name]}, learning rate {ETA:g}")
        ax.set_xlabel("flow time $t$ (GD: $k\\eta$; Leapfrog, NAGD: $k\\sqrt{\\eta}$)")
        ax.set_ylabel(r"$\Delta(\|W_2\|_F^2 - \|W_3\|_F^2)$ since $t = 0$")
        ax.set_title(f"{name}: change of the norm gap (gap(0) = {gap[0]:.3g})")
        ax.legend(loc="best")
        ax.grid(True, alpha=0.3)
        ax = axes[1, j]
        loss = np.asarray(traj.monitors["loss"])
        ax.plot(t, loss, color=COLORS[name], lw=2, label=f"{name} (flow)")
        ax.plot(d.ts, np.asarray(d.monitors["loss"]), color="k", ls="--", lw=1.2,
                label=DISCRETE[name])
        ax.set_yscale("log")
        ax.set_xlabel("flow time $t$")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(True, which="both", alpha=0.3)
        if name == "ND":  # eqs. 32–34: S(t) − S(0) ≤ 4(L(0) − L*) t²
            bound = np.asarray(traj.monitors["nd_bound"])
            inset = ax.inset_axes((0.52, 0.55, 0.45, 0.4))
            s = bound[:, 0] - bound[0, 0]
            inset.plot(t[1:], np.abs(s[1:]), color=COLORS[name], label="$|S(t) - S(0)|$")
            inset.plot(t[1:], bound[1:, 1], "k:", label="$4(L(0) - L^*)\\,t^2$")
            inset.set_xscale("log")
            inset.set_yscale("log")
            # under a decade of t (the quick run): minor tick labels would overlap
            inset.xaxis.set_minor_formatter(NullFormatter())
            inset.set_title("eq. 34 (S: all layers)", fontsize=8)
            inset.tick_params(labelsize=7)
            inset.legend(fontsize=8, loc="lower right")
        ax.legend(loc="lower left")
    widths = "-".join(map(str, cfg["widths"]))
    fig.suptitle(f"Głuch & Urbanke Fig. 1 (1-homogeneous): ReLU MLP {widths}, no biases, on "
                 f"{cfg['examples']} sklearn digits (stand-in for KMNIST)\n"
                 f"flows: Dopri5, rtol = {RTOL:g}, atol = {ATOL:g}; discrete algorithms at "
                 f"learning rate {ETA:g} on the flow's time axis")
    return fig


def _fig_residuals(flows, cfg) -> Figure:
    fig = Figure(figsize=(13.0, 4.6), layout="constrained")
    ax, bx, cx = fig.subplots(1, 3)
    tiny = 1e-18  # floor for log axes: an exact zero at t = 0 would vanish
    for name, traj in flows.items():
        t = traj.ts
        r = np.abs(np.asarray(traj.monitors["residual"]))
        ax.semilogy(t, np.maximum(r, tiny), color=COLORS[name], label=name)
        c = np.asarray(traj.monitors["charge_law"])
        if name == "GF":  # C = ½(‖W2‖² − ‖W3‖²): relative to its size
            scale = np.abs(np.asarray(traj.monitors["norm_gap"])).max()
        else:  # relative to the largest term μ⟨ẇ, ξ(w)⟩ of the law
            mu = np.ones_like(t) if name == "ND" else t**3
            scale = np.abs(mu * np.asarray(traj.monitors["pairing"])).max()
        bx.semilogy(t[1:], np.maximum(np.abs(c[1:] - c[0]) / scale, tiny), color=COLORS[name],
                    label=name)
    nagf = np.asarray(flows["NAGF"].monitors["energy_law"])
    cx.plot(flows["NAGF"].ts, nagf[:, 0], color=COLORS["NAGF"],
            label=r"$E = \frac{1}{2}\|\dot w\|^2 + L$")
    cx.plot(flows["NAGF"].ts, nagf[:, 1], "k:",
            label=r"$E(t) + \int_0^t \frac{3}{s}\|\dot w\|^2 ds$ (= E(0))")
    ax.set_ylabel(r"$|\langle\kappa_2\ddot w + \kappa_1\dot w, \xi\rangle| / "
                  r"(\|\kappa_2\ddot w + \kappa_1 \dot w\|\,\|\xi\|)$")
    ax.set_title("eq. 30 residual, layer h = 2 (relative)")
    bx.set_ylabel("relative drift of the charge law")
    bx.set_title(r"GF: $\|W_2\|^2 - \|W_3\|^2$; ND, NAGF: $\mu\langle\dot w, \xi\rangle - "
                 r"\int\mu\langle\dot w, \xi(\dot w)\rangle$")
    cx.set_ylabel("energy")
    cx.set_title("NAGF energy law (eq. 35)")
    for a in (ax, bx, cx):
        a.set_xlabel("flow time $t$")
        a.grid(True, which="both", alpha=0.3)
        a.legend(loc="best")
    bx.text(0.02, 0.02, f"Dopri5, rtol = {RTOL:g}, atol = {ATOL:g}", transform=bx.transAxes,
            fontsize=9)
    fig.suptitle("Table 2 along each flow: residual of the symmetry identity (zero by "
                 "construction) and drift of the integrated law (the integration error)")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("gu-homogeneous", quick)
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    model, loss = _problem(cfg)
    flows = _flows(model, loss, cfg)
    algs = _discrete(model, loss, cfg)
    written = save_figures(figures, "gu_homogeneous", {
        "norms": lambda: _fig_norms(flows, algs, cfg),
        "residuals": lambda: _fig_residuals(flows, cfg),
    })
    nodes = {f"/flow/{k.lower()}": v.to_xarray() for k, v in flows.items()}
    nodes |= {f"/discrete/{k.lower()}": v.to_xarray() for k, v in algs.items()}
    written["results"] = save_tree(
        nodes, results / "gu_homogeneous.nc", study="gu-homogeneous", quick=quick,
        widths=list(cfg["widths"]), examples=cfg["examples"], layer=LAYER, eta=ETA,
        rtol=RTOL, atol=ATOL, data="sklearn digits (stand-in for KMNIST)")
    return written
