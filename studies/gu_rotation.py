"""Głuch & Urbanke Figs. 3–6: GF, ND and NAGF on the rotational toy, with the plane of motion and ℓ.

The toy of the quickstart (its runs and drawing are reused: `studies.quickstart`),
L(w) = (‖w‖² − 1)², w ∈ R³, invariant under every rotation of w. Rotation invariance
gives the angular momentum ℓ = w × ẇ with κ2 ℓ̇ + κ1 ℓ = 0 (Głuch & Urbanke eq. 45):

- GF: ẇ = −∇L ∥ w, so ℓ = 0 and the path is a line segment (Fig. 5);
- ND: ℓ is conserved, so the orbit stays in the plane normal to ℓ(0) = (0, −3/2, 3/2),
  i.e. y = z (Fig. 3; the paper prints (0, 3/2, −3/2), which is ẇ × w);
- NAGF: t³ℓ is conserved (eq. 46), the orbit stays in the same plane and is damped onto
  the sphere ‖w‖ = 1 (Fig. 4).

Figures: `gu_rotation_paths.png` (each path in 3-D with ℓ(0) drawn as an arrow, then
in the plane y = z face-on, in coordinates along an orthonormal basis of it with ℓ(0)
out of the page, and the loss, Fig. 6) and `gu_rotation_momentum.png` (the conserved
μℓ and the distance to the plane, log scale). Results: `gu_rotation.nc` (/gf, /nd,
/nagf: each run's `to_xarray()`).
"""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import quickstart as qs
from ._common import folders, require_x64, save_figures, save_tree

__all__ = ["run"]

NORMAL = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)  # ℓ(0)/‖ℓ(0)‖ for ND and NAGF
# an orthonormal basis of the plane y = z, which every path stays in
IN_PLANE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0] / np.sqrt(2.0)])


def _mu(name: str, t: np.ndarray) -> np.ndarray:
    """exp∫κ1/κ2 up to a constant: 1 for ND, t³ for NAGF (eq. 46)."""
    return t**3 if name == "NAGF" else np.ones_like(t)


def _arrow(ax, ell: np.ndarray, length: float) -> None:
    n = np.linalg.norm(ell)
    if n > 1e-8:  # GF's ℓ is round-off (~1e-17): no direction to draw
        d = length * ell / n
        ax.quiver(0, 0, 0, *d, color="tab:red", linewidth=2, arrow_length_ratio=0.15)
        ax.text(*(1.1 * d), r"$\ell(t_0)$", color="tab:red")


def _face_on(ax, name: str, traj) -> None:
    """The path in the plane y = z, face-on: coordinates along IN_PLANE (a 2-D plot, not a
    rotated 3-D view, whose tick labels crowd and mirror), the unit circle the sphere cuts
    from the plane, ℓ(t0) ∥ e1 × e2 pointing out of the page."""
    w = np.asarray(traj.params)
    a, b = w @ IN_PLANE[0], w @ IN_PLANE[1]
    theta = np.linspace(0.0, 2.0 * np.pi, 361)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1, ls="--")
    ax.plot(a, b, color=qs.COLORS[name], lw=1.5)
    ax.plot(a[0], b[0], "o", color=qs.COLORS[name], mfc="none")
    ax.plot(a[-1], b[-1], "x", color=qs.COLORS[name])
    if name != "GF":  # GF's ℓ is zero
        ax.plot(0, 0, marker="$\\odot$", ms=14, color="tab:red", ls="none")
    ax.set_aspect("equal")
    ax.set_xlabel(r"$\langle w, e_1\rangle$, $e_1 = (1, 0, 0)$")
    ax.set_ylabel(r"$\langle w, e_2\rangle$, $e_2 = (0, 1, 1)/\sqrt{2}$")
    ax.set_title(f"{name} in the plane y = z, face-on")
    ax.grid(True, alpha=0.3)


def _fig_paths(toy) -> Figure:
    fig = Figure(figsize=(15.0, 13.0), layout="constrained")
    for i, (name, traj) in enumerate(toy.items()):
        ell = np.asarray(traj.monitors["angular_momentum"])[0]
        ax = fig.add_subplot(3, 3, i + 1, projection="3d")
        qs.draw_toy_path(ax, name, traj)
        _arrow(ax, ell, 1.2)
        _face_on(fig.add_subplot(3, 3, 4 + i), name, traj)
        qs.draw_toy_loss(fig.add_subplot(3, 3, 7 + i), name, traj)
    fig.suptitle(qs.TOY_PATHS_TITLE + r"; red: angular momentum $\ell = w\times\dot w$ at the "
                 "start (GF: ℓ = 0)\nmiddle: the plane y = z face-on (dashed: the unit circle "
                 r"$\|w\| = 1$ in it; red $\odot$: $\ell(t_0)$, out of the page); "
                 f"bottom: the loss (Fig. 6); solver Tsit5, rtol = atol = {qs._toy_tol():g}")
    return fig


def _fig_momentum(toy) -> Figure:
    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    tiny = 1e-18  # log-axis floor: ND starts exactly on the plane
    for name, traj in toy.items():
        t = np.asarray(traj.ts)
        ell = np.asarray(traj.monitors["angular_momentum"])
        w = np.asarray(traj.params)
        if name == "GF":  # ℓ = w × (−∇L) with ∇L ∥ w: zero up to round-off
            rel = np.linalg.norm(ell, axis=1)
            label = r"GF: $\|\ell\|$ (ℓ = 0 exactly)"
        else:
            q = _mu(name, t)[:, None] * ell
            rel = np.linalg.norm(q - q[0], axis=1) / np.linalg.norm(q[0])
            label = (r"ND: $\|\ell(t) - \ell(0)\| / \|\ell(0)\|$" if name == "ND" else
                     r"NAGF: $\|t^3\ell(t) - t_0^3\ell(t_0)\| / \|t_0^3\ell(t_0)\|$")
        ax.semilogy(t[1:], np.maximum(rel[1:], tiny), color=qs.COLORS[name], label=label)
        dist = np.abs(w @ NORMAL)
        bx.semilogy(t, np.maximum(dist, tiny), color=qs.COLORS[name], label=name)
    ax.set_title(r"Noether charge of rotations: $\mu(t)\,\ell(t)$ conserved (eqs. 45–46)")
    ax.set_ylabel("relative drift (GF: absolute)")
    bx.set_title("distance of $w(t)$ to the plane $y = z$ (normal to $\\ell(0)$)")
    bx.set_ylabel(r"$|\langle w, (0, 1, -1)\rangle| / \sqrt{2}$")
    for a in (ax, bx):
        a.set_xlabel("time $t$")
        a.grid(True, which="both", alpha=0.3)
        a.legend(loc="best", fontsize=8)
        a.text(0.02, 0.02, f"Tsit5, rtol = atol = {qs._toy_tol():g}", transform=a.transAxes,
               fontsize=8)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("gu-rotation", quick)
    cfg = qs.QUICK if quick else qs.FULL
    figures, results = folders(out)
    toy = qs.toy_runs(cfg)
    written = save_figures(figures, "gu_rotation", {"paths": lambda: _fig_paths(toy),
                                                    "momentum": lambda: _fig_momentum(toy)})
    axis = {"param_dim1": "axis", "velocity_dim1": "axis", "angular_momentum_dim1": "axis"}
    nodes = {f"/{name.lower()}": qs._dataset(traj, axis, {"axis": ["x", "y", "z"]})
             for name, traj in toy.items()}
    written["results"] = save_tree(
        nodes, results / "gu_rotation.nc", study="gu-rotation", quick=quick,
        loss="L(w) = (|w|^2 - 1)^2, w in R^3 (Gluch & Urbanke sec. 6.1)",
        w0_gf=list(qs.TOY_W0_GF), w0=list(qs.TOY_W0), v0=list(qs.TOY_V0),
        nagf_t0=qs.TOY_DELTA, tol=qs._toy_tol())
    return written
