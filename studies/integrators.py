"""Integrators compared: work-precision, long-time energy drift, charge drift vs step size.

(a) Work-precision diagrams (`dyn.work_precision`, error of the final state against
    gradient evaluations) for gradient flow on an MLP over digits, Tanh and ReLU:
    explicit Runge–Kutta at fixed steps (Euler, Heun, Midpoint, Ralston) and adaptive
    (Bosh3, Tsit5, Dopri5, Dopri8), implicit Kvaerno5 and GaussLegendre(2) (Tanh only:
    on ReLU their Newton iterations meet a jumping field at a cost no step budget
    bounds), and scipy's RK45, DOP853 and LSODA. The reference is Dopri8 at
    rtol = atol = 1e-12; on ReLU, where plain adaptive Dopri8 chatters on sliding
    surfaces and does not finish, the same in the exact piecewise-smooth mode
    (`dyn.Filippov()`: the activation pattern frozen between located crossings,
    Filippov's field where the flow slides), its own error estimated against the mode
    at 1e-10 and drawn (quick mode: Dopri8 at a fixed step T/8192, which spares the
    mode's compilation). On ReLU the gradient jumps where a pre-activation changes
    sign (a Filippov system): across a kink a method of order p makes a local error
    O(h) instead of O(h^(p+1)), so the slopes of error against evaluations (−p on a
    smooth problem, fixed or adaptive steps) fall towards −1 and the adaptive methods
    spend their steps on the kinks; the fitted slopes are written on the figure. Beside
    them (full mode) Dopri5 and Dopri8 in the Filippov mode, which locate the kinks.
(b) The same for Newtonian flow ẅ = −∇L on the rotational toy L = (‖w‖² − 1)² (Głuch &
    Urbanke 6.1), with the symplectic methods (SemiImplicitEuler, VelocityVerlet,
    Yoshida4, GaussLegendre(1, 2, 3)) beside Runge–Kutta, error of (w, v) at T = 10
    against Dopri8 at 1e-12.
(c) Long-time energy error |H(t) − H(0)|, H = ½‖v‖² + L, on the rotational toy to
    T = 2000 at h = 0.05 (quick: T = 200): bounded for the symplectic methods, growing
    secularly for Runge–Kutta (Heun, Tsit5 at the same fixed step).
(d) Rescaling-charge drift max_t |Q(t) − Q(0)| of gradient flow on a Polynomial(2)
    MLP (Q_i = ‖W_h[i,:]‖² − 2‖W_{h+1}[:,i]‖², conserved by the flow) against the
    fixed step size, for every Runge–Kutta method and GaussLegendre(1, 2, 3), which
    keep quadratic invariants to the stage solve's tolerance (the floor; stage equations
    by fixed-point iteration, and Newton–GMRES on the steps of this net's stiff transient
    where that stalls: GaussLegendre's default), read at step ends.

Writes `out/figures/integrators_{wp_gf,wp_toy,energy,charges}.png` and
`out/results/integrators.nc` (an xarray.DataTree: /wp_gf_tanh, /wp_gf_relu, /wp_toy
the work-precision datasets, /energy, /charges).
"""

from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

from ._common import folders
from ._integrators_runs import (
    FULL,
    QUICK,
    REF_TOL,
    charge_runs,
    energy_runs,
    error_floor,
    wp_gf,
    wp_toy,
)

__all__ = ["run"]

LEGEND_PT = 8
DPI = 120


def _style(name):
    if name.endswith("Filippov"):
        return dict(ls="-", lw=2.2, marker="D", ms=5)
    symplectic = name in ("SemiImplicitEuler", "VelocityVerlet", "Yoshida4") or \
        name.startswith("GaussLegendre")
    return dict(ls="--" if name.startswith("scipy") else (":" if symplectic else "-"),
                marker="s" if symplectic else ("^" if name.startswith("scipy") else "o"),
                ms=4)


def _wp_axes(ax, ds, title):
    floor = error_floor(ds)
    below_any = 0
    for name in ds.solver.values:
        row = ds.sel(solver=name)
        e, n = np.asarray(row["error"]), np.asarray(row["grad_evals"])
        # Below the reference's own error nothing is measured: such points are not drawn
        # (a ReLU point once sat under the reference's error line).
        ok = np.isfinite(e) & (e >= floor)
        below = int(np.sum(np.isfinite(e) & (e < floor)))
        below_any += below
        ran = np.isfinite(np.asarray(row["tolerance"])) | np.isfinite(np.asarray(row["dt"]))
        unfinished = int(np.sum(ran & ~np.asarray(row["finished"], bool)))
        slope = float(row["slope"])
        tag = "" if not np.isfinite(slope) else f" (slope {slope:.1f})"
        if unfinished:
            tag += f", {unfinished} not finished"
        if below:
            tag += f", {below} at the reference's error"
        if not ok.any():
            if tag:  # say so in the legend all the same
                ax.plot([], [], label=f"{name}{tag}", **_style(str(name)))
            continue
        ax.loglog(e[ok], n[ok], label=f"{name}{tag}", **_style(str(name)))
    ax.set_xlabel("final-state error ‖w(T) − w_ref(T)‖_∞")
    ax.set_ylabel("gradient evaluations")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # Beneath the axes, at a legible size: inside, 13 entries covered the data.
    ax.legend(fontsize=LEGEND_PT, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return below_any


def _fig_wp_gf(tanh, relu) -> Figure:
    fig = Figure(figsize=(12, 8), layout="constrained")
    (ax, bx), (note_a, note_b) = fig.subplots(2, 2, height_ratios=[5, 0.8])
    for a, ds in ((ax, tanh), (bx, relu)):
        _wp_axes(a, ds, f"GF, MLP {ds.attrs['widths']} ({ds.attrs['activation']}) on "
                        f"{ds.attrs['examples']} digits, T = {ds.attrs['t1']:g}")
    fitted = [n for n in relu.solver.values if n in tanh.solver.values
              and np.isfinite(float(relu["slope"].sel(solver=n)))][:5]
    slopes = [f"{n} {float(relu['slope'].sel(solver=n)):.1f} "
              f"(Tanh {float(tanh['slope'].sel(solver=n)):.1f})" for n in fitted]
    slopes = ",\n".join(", ".join(slopes[k:k + 3]) for k in range(0, len(slopes), 3))
    mode = [str(n) for n in relu.solver.values if str(n).endswith("Filippov")]
    remedy = ("\n" + ", ".join(mode) + ": kinks located, sliding by Filippov's rule;\n"
              "no step straddles a jump, so the error sits at rounding level at every\n"
              "tolerance and the cost is set by the crossings") if mode else ""
    for note in (note_a, note_b):
        note.axis("off")
    # Notes in a strip of their own under the panels: over the data they hid points.
    note_b.text(0.0, 1.0, "ReLU: the gradient jumps at activation kinks (Filippov system);\n"
                "a step across a kink errs O(h), so high orders are lost.\n"
                f"slopes (−order, asymptotic points only): {slopes or 'none'}" + remedy,
                transform=note_b.transAxes, fontsize=LEGEND_PT, va="top")
    note_a.text(0.0, 1.0, "Slopes are fitted over the asymptotic points only (three or more,\n"
                "above the reference's error, each setting better by √2 or more);\n"
                "none is given where there are fewer.", transform=note_a.transAxes,
                fontsize=LEGEND_PT, va="top")
    err = relu.attrs["reference_error"]
    errors = np.asarray(relu["error"])
    if np.isfinite(errors).any() and err > 1e-2 * np.nanmin(errors):
        # the reference's own error, where it is near the data (else only in the caption)
        bx.axvline(err, color="k", lw=0.8, ls="-.")
        bx.text(err, bx.get_ylim()[1], " reference's own error", fontsize=LEGEND_PT,
                va="top", rotation=90)
    fig.supxlabel(f"reference: Dopri8 rtol = atol = {REF_TOL:g} (error "
                  f"~{tanh.attrs['reference_error']:.0e}; ReLU: "
                  f"{relu.attrs['reference']}, error ~{err:.0e});\n"
                  "adaptive methods over rtol = atol, fixed-step methods over dt"
                  + (f"; budget {relu.attrs['max_steps']} steps per run"
                     if relu.attrs.get("max_steps") else ""), fontsize=8)
    return fig


def _fig_wp_toy(ds) -> Figure:
    fig = Figure(figsize=(12, 7), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    _wp_axes(ax, ds, f"Newtonian flow, rotational toy, T = {ds.attrs['t1']:g}")
    for name in ds.solver.values:
        row = ds.sel(solver=name)
        d, n = np.asarray(row["drift_energy"]), np.asarray(row["grad_evals"])
        ok = np.isfinite(d) & (d > 0)
        if ok.any():
            bx.loglog(d[ok], n[ok], label=str(name), **_style(str(name)))
    bx.set_xlabel("energy drift max_t |H(t) − H(0)|, H = ½‖v‖² + L")
    bx.set_ylabel("gradient evaluations")
    bx.set_title("energy drift (dotted, squares: symplectic)", fontsize=10)
    bx.grid(True, which="major", alpha=0.3)
    bx.legend(fontsize=LEGEND_PT, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    return fig


def _fig_energy(ds) -> Figure:
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for name in ds.solver.values:
        e = ds["energy_error"].sel(solver=name)
        ok = np.isfinite(np.asarray(e)) & (np.asarray(e) > 0)
        stop = float(ds["t_final"].sel(solver=name))
        growth = float(ds["growth"].sel(solver=name))
        tag = (f"energy blew up, stopped at t = {stop:.0f}" if stop < ds.attrs["T"]
               else f"2nd half / 1st half: {growth:.2g}")
        ax.loglog(ds["time"][ok], e[ok], label=f"{name} ({tag})", **_style(str(name)) | {
                      "marker": None})
    ax.set_xlabel("time t")
    ax.set_ylabel("|H(t) − H(0)|")
    ax.set_title(f"Newtonian flow on the rotational toy, fixed h = {ds.attrs['h']:g}",
                 fontsize=10)
    ax.text(0.02, 0.95, "symplectic: bounded; Runge–Kutta: secular drift",
            transform=ax.transAxes, fontsize=LEGEND_PT, va="top")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=LEGEND_PT, loc="lower right")
    return fig


def _fig_charges(ds) -> Figure:
    fig = Figure(figsize=(7.6, 5.6), layout="constrained")
    ax, note = fig.subplots(2, 1, height_ratios=[4, 0.7])
    note.axis("off")
    floor = 1e-16
    for name in ds.solver.values:
        d = np.maximum(np.asarray(ds["charge_drift"].sel(solver=name)), floor)
        ax.loglog(ds["dt"], d, label=str(name), **_style(str(name)))
    ax.set_xlabel("fixed step size h")
    ax.set_ylabel("max_t |Q(t) − Q(0)| (rescaling charges)")
    ax.set_title(f"GF, MLP {ds.attrs['widths']} (Polynomial(2)), t ∈ [0, {ds.attrs['t1']:g}]",
                 fontsize=10)
    failed = [f"{n} at h = {', '.join(f'{h:g}' for h in ds.dt.values[~np.isfinite(row)])}"
              for n in ds.solver.values if str(n).startswith("GaussLegendre")
              for row in [np.asarray(ds["charge_drift"].sel(solver=n))]
              if not np.isfinite(row).all()]
    # Under the axes: inside, the box floated mid-plot over the data.
    note.text(0.0, 1.0, "Gauss–Legendre keeps quadratic invariants: at the floor (stage "
              "equations:\nfixed point, Newton–GMRES where it stalls, to 2e-12; drift "
              "floored at 1e-16;\nQ read at step ends: the dense output between steps is "
              "not symplectic)"
              + ("\nstage solve did not converge (run stopped): " + "; ".join(failed)
                 if failed else ""),
              transform=note.transAxes, fontsize=LEGEND_PT, va="top")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=LEGEND_PT, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    tanh = wp_gf(cfg, dyn.Tanh())
    relu = wp_gf(cfg, dyn.ReLU())
    toy = wp_toy(cfg)
    energy = energy_runs(cfg)
    charges = charge_runs(cfg)
    written = {}
    for key, fig in (("wp_gf", _fig_wp_gf(tanh, relu)), ("wp_toy", _fig_wp_toy(toy)),
                     ("energy", _fig_energy(energy)), ("charges", _fig_charges(charges))):
        path = figures / f"integrators_{key}.png"
        fig.savefig(path, dpi=DPI)
        written[key] = path
    nodes = {"/": xr.Dataset(attrs={"study": "integrators", "quick": int(quick)}),
             "/wp_gf_tanh": tanh, "/wp_gf_relu": relu, "/wp_toy": toy, "/energy": energy,
             "/charges": charges}
    written["results"] = dyn.save(xr.DataTree.from_dict(nodes), results / "integrators.nc")
    return written
