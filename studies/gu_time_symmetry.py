"""Głuch & Urbanke sec. 7: ND's energy bounds the mean speed by √(2L(0)/m); wide nets move little.

Newtonian dynamics ẅ = −∇L has a time-independent Lagrangian, so H = ½‖ẇ‖² + L is
conserved (Noether for time translation, `dyn.symmetries.TimeTranslation`). From rest,
‖ẇ(t)‖² ≤ 2L(w(0)), and by the mean inequality over the m parameters

    (1/m) Σ_i |ẇ_i(t)| ≤ √(2L(w(0))/m)     (eq. 49),

the key step towards NTK-like behaviour: the wider the net, the slower each weight.

Here: two-layer ReLU nets 8-n-1 without biases (m = 9n parameters), LeCun initialisation
(so L(0) does not grow with n), quadratic loss on 64 examples of a fixed teacher
8-32-1, ND from rest to t = 5, hidden widths n = 2⁴ … 2¹² (quick: 2⁴, 2⁶, 2⁸). Each run
records the mean speed (1/m)Σ|ẇ_i| and H at every save; the figure draws
max_t of the mean speed against n beside the bound, and H's drift (the solver's).

Writes `out/figures/gu_time_symmetry.png` and `out/results/gu_time_symmetry.nc`
(a Dataset over `width` × `time`: `mean_speed`, `energy`, `loss`, and `bound`).
"""

from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.flatten_util import ravel_pytree
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import datasets, losses

from ._common import folders, require_x64, save_figures, save_tree, timed

__all__ = ["run"]

D_IN, EXAMPLES, T1, SAVES = 8, 64, 5.0, 51
FULL = {"log2_widths": list(range(4, 13))}
QUICK = {"log2_widths": [4, 6, 8]}
TOL = 1e-9  # rtol = atol; ND on ReLU has no sliding modes, kinks only cost rejected steps


def _run(n: int, data) -> dyn.Trajectory:
    model = dyn.MLP((D_IN, n, 1), activation=dyn.ReLU(), bias=False, key=jax.random.key(n),
                    init="lecun")
    # One flat vector: diffrax compiles faster for one leaf than for a pytree of arrays.
    w, static = eqx.partition(model, eqx.is_inexact_array)
    theta, unravel = ravel_pytree(w)
    mse = losses.mse(data)

    def loss(th):
        return mse(eqx.combine(unravel(th), static))

    speed = dyn.monitors.Function(lambda t, th, v: jnp.mean(jnp.abs(v)), "mean_speed")
    return timed(f"ND, width {n} ({theta.size} parameters)", dyn.simulate, dyn.NewtonianFlow(),
                 theta, loss, t1=T1, v0=jnp.zeros_like(theta), ts=jnp.linspace(0.0, T1, SAVES),
                 stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
                 monitors=(dyn.monitors.Loss(), dyn.monitors.Energy(), speed),
                 max_steps=100_000, save_params=False)


def _dataset(cfg) -> xr.Dataset:
    data = datasets.teacher_student(EXAMPLES, (D_IN, 32, 1), key=jax.random.key(0))
    widths = [2**k for k in cfg["log2_widths"]]
    runs = [_run(n, data) for n in widths]
    stack = {k: np.stack([np.asarray(r.monitors[k]) for r in runs])
             for k in ("mean_speed", "energy", "loss")}
    m = np.asarray(widths) * (D_IN + 1)
    l0 = stack["loss"][:, 0]
    return xr.Dataset(
        {"mean_speed": (("width", "time"), stack["mean_speed"]),
         "energy": (("width", "time"), stack["energy"]),
         "loss": (("width", "time"), stack["loss"]),
         "bound": ("width", np.sqrt(2 * l0 / m)),
         "num_params": ("width", m)},
        coords={"width": widths, "time": np.asarray(runs[0].ts)},
        attrs={"law": "(1/m) sum_i |dw_i/dt| <= sqrt(2 L(0) / m) (Gluch & Urbanke eq. 49)",
               "network": f"ReLU {D_IN}-n-1, no biases, LeCun init; quadratic loss on "
                          f"{EXAMPLES} teacher (8-32-1) examples; ND from rest",
               "rtol": TOL, "atol": TOL})


def _figure(ds: xr.Dataset) -> Figure:
    fig = Figure(figsize=(12.0, 4.4), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    n = ds["width"].values
    peak = ds["mean_speed"].max("time").values
    avg = ds["mean_speed"].mean("time").values
    ax.loglog(n, ds["bound"], "k--", marker="s", label=r"bound $\sqrt{2L(0)/m}$ (eq. 49)")
    ax.loglog(n, peak, "o-", color="tab:orange", label=r"$\max_t \frac{1}{m}\sum_i|\dot w_i|$")
    ax.loglog(n, avg, "^-", color="tab:green",
              label=r"time average of $\frac{1}{m}\sum_i|\dot w_i|$")
    slope = np.polyfit(np.log(n), np.log(peak), 1)[0]
    ax.set_title(f"ND from rest, t ∈ [0, {T1:g}]: mean speed vs width (fitted slope "
                 f"{slope:.2f}; bound ∝ n^-1/2)")
    ax.set_xlabel("hidden width n  (m = 9n parameters)")
    ax.set_ylabel("mean parameter speed (1/time)")
    ax.set_xticks(n, [str(int(k)) for k in n])
    ax.minorticks_off()
    for k, w in enumerate(n):
        e = ds["energy"].sel(width=w).values
        drift = np.abs(e - e[0]) / e[0]
        bx.semilogy(ds["time"][1:], np.maximum(drift[1:], 1e-18),
                    color=matplotlib_color(k, len(n)), label=f"n = {int(w)}")
    bx.set_title(r"conserved energy $H = \frac{1}{2}\|\dot w\|^2 + L$: relative drift")
    bx.set_xlabel("time $t$")
    bx.set_ylabel(r"$|H(t) - H(0)| / H(0)$")
    bx.legend(fontsize=8, ncol=3)
    for a in (ax, bx):
        a.grid(True, which="both", alpha=0.3)
        a.text(0.02, 0.02, f"Tsit5, rtol = atol = {TOL:g}", transform=a.transAxes, fontsize=8)
    ax.legend(loc="upper right")
    fig.suptitle("Głuch & Urbanke sec. 7: energy conservation bounds the mean speed\n"
                 "ReLU 8-n-1, quadratic loss on a teacher's 64 examples (H drifts ~1e-6: every "
                 "ReLU kink is a jump in ẅ that the error estimate sees)")
    return fig


def matplotlib_color(k: int, n: int):
    """The k-th of n colours along viridis (light = wide)."""
    from matplotlib import colormaps
    return colormaps["viridis"](k / max(n - 1, 1))


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("gu-time-symmetry", quick)
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    ds = _dataset(cfg)
    written = save_figures(figures, "gu_time_symmetry", {"speed": lambda: _figure(ds)})
    written["results"] = save_tree({"/nd": ds}, results / "gu_time_symmetry.nc",
                                   study="gu-time-symmetry", quick=quick)
    return written
