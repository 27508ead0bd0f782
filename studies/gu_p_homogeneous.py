"""Głuch & Urbanke Fig. 2: p-homogeneous units make deep layers move p^k times slower under GF.

An MLP 64-200-200-200-200-10 without biases whose hidden activations are ReLU,
RePU(2), RePU(2), ReLU (the paper's 784-…-10 on 1000 KMNIST images; sklearn's 8×8
digits stand in for KMNIST, 1000 of them), mean cross-entropy, gradient flow to t = 3
(the loss falls from 3.28 to 0.06; quick: t = 1 on a 16-wide net). Each hidden
unit of layer h with a p_h-homogeneous activation gives the charge
‖W_h[i,:]‖² − p_h‖W_{h+1}[:,i]‖² (Table 2), so per layer ‖W_h‖² − p_h‖W_{h+1}‖² is conserved
and, chaining h = 2, 3 (p = 2 twice, k = 2),

    ‖W2(0)‖² − ‖W2(t)‖² = p^k (‖W4(0)‖² − ‖W4(t)‖²),   p^k = 4   (sec. 4.2).

The model is a study-local `LayerwiseMLP` (one activation per hidden layer; `dyn.MLP` has
one for all). Writes `out/figures/gu_p_homogeneous.png` and
`out/results/gu_p_homogeneous.nc` (/gf: the run, with `sq_norms` (time, layer) = ‖W_k‖²).
"""

from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import datasets, losses

from ._common import folders, require_x64, save_figures, save_tree, timed

__all__ = ["LayerwiseMLP", "run"]

ACTIVATIONS = (dyn.ReLU(), dyn.RePU(2), dyn.RePU(2), dyn.ReLU())
# t ≤ 3: the loss falls from 3.28 to 0.06 and ‖W2‖² by 4.3, the whole phase in which
# the norms move; GF chatters on the ReLU layers' kinks, and the steps grow as it trains
# (measured: 7,793 Dopri5 steps, 34% rejected, 10.4 min to t = 3; 1,225 to t = 1).
FULL = {"widths": (64, 200, 200, 200, 200, 10), "examples": 1000, "t1": 3.0, "saves": 61}
QUICK = {"widths": (64, 16, 16, 16, 16, 10), "examples": 64, "t1": 1.0, "saves": 11}
# ReLU layers make GF a Filippov system on which an adaptive solver chatters (see
# gu-homogeneous); 1e-6 keeps the conserved combinations to ~1e-8 relative.
RTOL, ATOL = 1e-6, 1e-8


class LayerwiseMLP(eqx.Module):
    """x ↦ W_K σ_{K−1}(… σ_1(W_1 x)): an MLP without biases and one activation per
    hidden layer (Głuch & Urbanke sec. 4.2's mixed ReLU / RePU(2) network)."""

    weights: tuple
    activations: tuple = eqx.field(static=True)

    def __init__(self, widths, activations, *, key):
        if len(activations) != len(widths) - 2:
            raise ValueError(f"LayerwiseMLP: {len(widths) - 2} hidden layers need as many "
                             f"`activations`, got {len(activations)}.")
        keys = jax.random.split(key, len(widths) - 1)
        # LeCun N(0, 1/fan_in): keeps the RePU(2) layers' outputs O(1) at the start.
        self.weights = tuple(jax.random.normal(k, (o, i)) / np.sqrt(i)
                             for k, i, o in zip(keys, widths[:-1], widths[1:]))
        self.activations = tuple(activations)

    def __call__(self, x):
        for w, act in zip(self.weights[:-1], self.activations):
            x = act(w @ x)
        return self.weights[-1] @ x


def _sq_norms(t, m, v):
    return jnp.stack([jnp.sum(w**2) for w in m.weights])


def _run(cfg) -> dyn.Trajectory:
    data = datasets.digits(cfg["examples"], key=jax.random.key(0))
    model = LayerwiseMLP(cfg["widths"], ACTIVATIONS, key=jax.random.key(1))
    t1 = cfg["t1"]
    return timed(f"GF (Dopri5, rtol {RTOL:g})", dyn.simulate, dyn.GradientFlow(), model,
                 losses.cross_entropy(data), t1=t1, ts=jnp.linspace(0.0, t1, cfg["saves"]),
                 solver=diffrax.Dopri5(),
                 stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                 monitors=(dyn.monitors.Loss(), dyn.monitors.Function(_sq_norms, "sq_norms")),
                 max_steps=200_000, save_params=False)


def laws(sq: np.ndarray) -> np.ndarray:
    """The per-layer charges ‖W_h‖² − p_h‖W_{h+1}‖², h = 1..4, from ‖W_k‖² (time, layer)."""
    p = np.array([a.degree for a in ACTIVATIONS], dtype=float)
    return sq[:, :-1] - p * sq[:, 1:]


def _figure(traj, cfg) -> Figure:
    t, sq = traj.ts, np.asarray(traj.monitors["sq_norms"])
    lhs = sq[0, 1] - sq[:, 1]  # ‖W2(0)‖² − ‖W2(t)‖²
    rhs = 4.0 * (sq[0, 3] - sq[:, 3])  # p^k (‖W4(0)‖² − ‖W4(t)‖²)
    fig = Figure(figsize=(14.0, 4.4), layout="constrained")
    ax, bx, cx = fig.subplots(1, 3)
    ax.plot(t, lhs, color="tab:blue", lw=3, alpha=0.6,
            label=r"$\|W_2(0)\|_F^2 - \|W_2(t)\|_F^2$")
    ax.plot(t, rhs, "k--", label=r"$p^k(\|W_4(0)\|_F^2 - \|W_4(t)\|_F^2)$, $p^k = 4$")
    ax.plot(t, sq[0, 3] - sq[:, 3], color="tab:red", lw=1,
            label=r"$\|W_4(0)\|_F^2 - \|W_4(t)\|_F^2$ (moves 4× less)")
    ax.set_ylabel("change of squared Frobenius norm")
    ax.set_title("Fig. 2: GF, activations ReLU, RePU(2), RePU(2), ReLU")
    scale = np.abs(lhs).max()
    tiny = 1e-18  # log-axis floor (the t = 0 value is exactly 0)
    bx.semilogy(t[1:], np.maximum(np.abs(lhs - rhs)[1:] / scale, tiny), color="k",
                label="|left − right| / max|left|")
    q = laws(sq)
    names = [f"h = {h}: $\\|W_{{{h}}}\\|^2 - {a.degree:g}\\|W_{{{h + 1}}}\\|^2$"
             for h, a in enumerate(ACTIVATIONS, start=1)]
    for h in range(q.shape[1]):
        drift = np.abs(q[1:, h] - q[0, h]) / (sq[0, h] + sq[0, h + 1])
        cx.semilogy(t[1:], np.maximum(drift, tiny), label=names[h])
    bx.set_ylabel("relative violation of the p^k law")
    bx.set_title("Fig. 2's identity, relative")
    cx.set_ylabel(r"$|Q_h(t) - Q_h(0)|\,/\,(\|W_h\|^2 + \|W_{h+1}\|^2)$ at $t = 0$")
    cx.set_title("per-layer GF charges (Table 2)")
    for a, where in ((ax, "lower center"), (bx, "upper left"), (cx, "best")):
        a.set_xlabel("flow time $t$")
        a.grid(True, which="both", alpha=0.3)
        a.legend(loc=where, fontsize=8)
    for a in (bx, cx):
        a.text(0.02, 0.02, f"Dopri5, rtol = {RTOL:g}, atol = {ATOL:g}", transform=a.transAxes,
               fontsize=8)
    widths = "-".join(map(str, cfg["widths"]))
    fig.suptitle(f"p-homogeneous units (Głuch & Urbanke sec. 4.2): MLP {widths}, no biases, "
                 f"on {cfg['examples']} sklearn digits (stand-in for KMNIST)")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("gu-p-homogeneous", quick)
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    traj = _run(cfg)
    written = save_figures(figures, "gu_p_homogeneous", {"gf": lambda: _figure(traj, cfg)})
    ds = traj.to_xarray().rename_dims({"sq_norms_dim1": "layer"})
    ds = ds.assign_coords(layer=np.arange(1, len(cfg["widths"])))
    written["results"] = save_tree(
        {"/gf": ds}, results / "gu_p_homogeneous.nc", study="gu-p-homogeneous", quick=quick,
        widths=list(cfg["widths"]), activations="ReLU, RePU(2), RePU(2), ReLU", p_k=4.0,
        rtol=RTOL, atol=ATOL, data="sklearn digits (stand-in for KMNIST)")
    return written
