"""GF, ND and NAGF on the rotational toy of Głuch & Urbanke (sec. 6.1) and on an MLP over digits.

The default study (`make demo`, i.e. `dynamics run quickstart --out .`).

(a) The rotational toy L(w) = (‖w‖² − 1)², w ∈ R³ (Głuch & Urbanke sec. 6.1, Figs 3–6):
    GF from w = (0.1, 0.1, 0.1); ND and NAGF from w = (0.5, 0.5, 0.5), ẇ = (−2, 1, 1),
    NAGF at t0 = δ > 0 because its damping 3/t is singular at 0 (their footnote 2).
    The angular momentum ℓ = w × ẇ obeys κ2 ℓ̇ + κ1 ℓ = 0 (their eq. 45): constant
    under ND, ℓ(t) = ℓ(δ)(δ/t)³ under NAGF (eq. 46), zero under GF (ẇ ∥ w); so the ND
    and NAGF orbits stay in the plane normal to ℓ(0) ∝ (0, 1, −1), i.e. y = z.
(b) An MLP (64, 32, 10) with ReLU on a few hundred digits, cross-entropy, from the same
    initial weights under all three flows (ND and NAGF from rest, NAGF from t0 = 0).

Writes `out/figures/quickstart_*.png` and `out/results/quickstart.nc`.

Layout of `quickstart.nc`: an `xarray.DataTree`, one netCDF group per (problem, flow),

    /                       attrs: study, quick, description
    /rotational_toy         attrs: the problem
    /rotational_toy/{gf,nd,nagf}
    /digits_mlp             attrs: the problem
    /digits_mlp/{gf,nd,nagf}

each leaf group being that run's `Trajectory.to_xarray()`: its own `time` coordinate
(the runs have different start times and lengths, so no common grid is forced on
them), one variable per monitor (`loss`, `energy`, and `angular_momentum` (time, axis)
for the toy, `grad_norm` and `layer_norms` (time, layer) for the MLP), the toy's
parameters `param` and `velocity` (time, axis), and the provenance and outcome of the
run as attributes. Read it with `xarray.open_datatree(path)`, e.g.
`tree["rotational_toy/nd"]["energy"]`, or one run with
`xarray.open_dataset(path, group="rotational_toy/nd")`.
"""

from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import datasets, losses, plot as dplot

from ._common import timed

__all__ = ["run"]

COLORS = {"GF": "tab:blue", "ND": "tab:orange", "NAGF": "tab:green"}

# The toy: Głuch & Urbanke sec. 6.1. δ is "a small positive δ" in their footnote 2,
# value not given. While the damping 3/t dominates, ‖ẇ‖ decays like (δ/t)³ and w coasts
# about ‖ẇ(δ)‖·δ/2 before the gradient takes over: δ = 0.1 moves it 0.12 and the swing
# around the origin that their Fig. 4 shows is barely visible; δ = 0.5 (small against
# the horizon t1 = 10) shows it, and the damped loss oscillations of their Fig. 6.
TOY_W0_GF = (0.1, 0.1, 0.1)
TOY_W0 = (0.5, 0.5, 0.5)
TOY_V0 = (-2.0, 1.0, 1.0)
TOY_DELTA = 0.5
TOY_TOL = 1e-10  # rtol = atol, "rtol=atol=1e-10 style accuracy"

MLP_WIDTHS = (64, 32, 10)
# rtol, atol. Every ReLU kink a pre-activation crosses makes the error estimate reject
# steps: GF needs ~8x more steps at rtol = 1e-6 for a loss curve that agrees to 1e-4.
MLP_TOL = (1e-5, 1e-7)

FULL = {"toy_t1": 10.0, "toy_n": 1001, "mlp_examples": 300, "mlp_t1": 20.0, "mlp_n": 201}
QUICK = {"toy_t1": 4.0, "toy_n": 201, "mlp_examples": 64, "mlp_t1": 2.0, "mlp_n": 21}

RC = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}
DPI = 120


def _flows() -> dict[str, dyn.AbstractFlow]:
    return {"GF": dyn.GradientFlow(), "ND": dyn.NewtonianFlow(), "NAGF": dyn.NesterovFlow()}


# ℓ = w × ẇ (for GF the monitor's velocity is the vector field −∇L(w)).
ANGULAR_MOMENTUM = dyn.monitors.Function(lambda t, w, v: jnp.cross(w, v), "angular_momentum")


def _simulate(problem: str, name: str, *args, **kwargs) -> dyn.Trajectory:
    # the digits MLP is ReLU at a loss-curve tolerance on purpose (see MLP_TOL)
    return timed(f"{problem:<15}{name}", dyn.simulate, *args, **kwargs)


def _toy_tol() -> float:
    # float32 resolves ~1.2e-7: the quick smoke test in float32 (tests/test_float32.py)
    # runs the toy at 1e-5; the real figures need float64 (`run` insists on it).
    return TOY_TOL if jax.config.read("jax_enable_x64") else 1e-5


def toy_runs(cfg) -> dict[str, dyn.Trajectory]:
    loss = losses.rotational_toy()
    controller = diffrax.PIDController(rtol=_toy_tol(), atol=_toy_tol())
    monitors = (dyn.monitors.Loss(), dyn.monitors.Energy(), ANGULAR_MOMENTUM)
    t1, n = cfg["toy_t1"], cfg["toy_n"]
    starts = {
        "GF": dict(params=jnp.asarray(TOY_W0_GF), t0=0.0, v0=None),
        "ND": dict(params=jnp.asarray(TOY_W0), t0=0.0, v0=jnp.asarray(TOY_V0)),
        "NAGF": dict(params=jnp.asarray(TOY_W0), t0=TOY_DELTA, v0=jnp.asarray(TOY_V0)),
    }
    runs = {}
    for name, flow in _flows().items():
        s = starts[name]
        runs[name] = _simulate(
            "rotational toy", name, flow, s["params"], loss, t0=s["t0"], t1=t1, v0=s["v0"],
            ts=jnp.linspace(s["t0"], t1, n), stepsize_controller=controller,
            monitors=monitors, max_steps=100_000,
        )
    return runs


def _mlp_runs(cfg) -> dict[str, dyn.Trajectory]:
    data = datasets.digits(cfg["mlp_examples"], key=jax.random.key(0))
    loss = losses.cross_entropy(data)
    model = dyn.MLP(MLP_WIDTHS, activation=dyn.ReLU(), key=jax.random.key(1))
    rtol, atol = MLP_TOL
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    monitors = (dyn.monitors.Loss(), dyn.monitors.Energy(), dyn.monitors.GradNorm(),
                dyn.monitors.LayerNorms())
    t1, n = cfg["mlp_t1"], cfg["mlp_n"]
    return {
        name: _simulate(
            "digits MLP", name, flow, model, loss, t1=t1, ts=jnp.linspace(0.0, t1, n),
            stepsize_controller=controller, monitors=monitors, max_steps=100_000,
            save_params=False,  # thousands of weights per save time; the monitors suffice
        )
        for name, flow in _flows().items()
    }


def _dataset(traj: dyn.Trajectory, rename: dict[str, str], coords: dict) -> xr.Dataset:
    ds = traj.to_xarray()
    ds = ds.rename_dims({k: v for k, v in rename.items() if k in ds.dims})
    return ds.assign_coords({k: v for k, v in coords.items() if k in ds.dims})


def _tree(toy, mlp, cfg, quick: bool) -> xr.DataTree:
    axis = {"param_dim1": "axis", "velocity_dim1": "axis", "angular_momentum_dim1": "axis"}
    nodes = {
        "/": xr.Dataset(attrs={
            "study": "quickstart",
            "quick": int(quick),
            "description": __doc__.strip().splitlines()[0],
            "layout": "one group per (problem, flow): /<problem>/<flow>, each a "
                      "Trajectory.to_xarray() dataset on its own time coordinate",
        }),
        "rotational_toy": xr.Dataset(attrs={
            "loss": "L(w) = (|w|^2 - 1)^2, w in R^3 (Gluch & Urbanke sec. 6.1)",
            "w0_gf": list(TOY_W0_GF), "w0": list(TOY_W0), "v0": list(TOY_V0),
            "nagf_t0": TOY_DELTA,
        }),
        "digits_mlp": xr.Dataset(attrs={
            "loss": "mean softmax cross-entropy on sklearn digits (standardized)",
            "widths": list(MLP_WIDTHS), "activation": "ReLU", "init_key": 1,
            "examples": cfg["mlp_examples"], "data_key": 0,
        }),
    }
    for name, traj in toy.items():
        nodes[f"rotational_toy/{name.lower()}"] = _dataset(traj, axis, {"axis": ["x", "y", "z"]})
    for name, traj in mlp.items():
        k = len(MLP_WIDTHS) - 1
        nodes[f"digits_mlp/{name.lower()}"] = _dataset(
            traj, {"layer_norms_dim1": "layer"}, {"layer": np.arange(1, k + 1)}
        )
    return xr.DataTree.from_dict(nodes)


def _savefig(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def draw_toy_path(ax, name: str, traj: dyn.Trajectory) -> None:
    """One flow's path on the rotational toy on a 3-D axis: unit sphere, the plane y = z
    normal to ℓ(0) ∝ (0, 1, −1), and how far the path leaves it (shared with gu-rotation)."""
    w = np.asarray(traj.params)
    off_plane = float(np.max(np.abs(w[:, 1] - w[:, 2])))
    dplot.plot_trajectory_3d(traj, ax, color=COLORS[name], plane_normal=(0.0, 1.0, -1.0))
    ax.set_title(f"{name}:  max$_t\\,|y - z|$ = {off_plane:.1g}")
    ax.view_init(elev=20, azim=-35)


def draw_toy_loss(ax, name: str, traj: dyn.Trajectory) -> None:
    """One flow's loss on the rotational toy (Głuch & Urbanke Fig. 6; shared with gu-rotation)."""
    dplot.plot_loss({name: traj}, ax, colors=COLORS, title=name)


TOY_PATHS_TITLE = (r"Rotational toy $L(w) = (\|w\|^2 - 1)^2$: paths $w(t)$" "\n"
                   r"(○ start, × end; wireframe: unit sphere $\|w\| = 1$; shaded: plane $y = z$)")
TOY_LOSS_TITLE = ("Rotational toy: loss along each flow (cf. Głuch & Urbanke Fig. 6)\n"
                  r"GF from $w_0 = (0.1, 0.1, 0.1)$;  ND and NAGF from $w_0 = (0.5, 0.5, 0.5)$, "
                  rf"$\dot w_0 = (-2, 1, 1)$, NAGF at $t_0 = \delta = {TOY_DELTA:g}$")


def _fig_toy_trajectories(toy) -> Figure:
    fig = Figure(figsize=(15.0, 5.2), layout="constrained")
    for i, (name, traj) in enumerate(toy.items()):
        draw_toy_path(fig.add_subplot(1, 3, i + 1, projection="3d"), name, traj)
    fig.suptitle(TOY_PATHS_TITLE)
    return fig


def _fig_toy_loss(toy) -> Figure:
    fig = Figure(figsize=(13.0, 3.8), layout="constrained")
    for i, (name, traj) in enumerate(toy.items()):
        draw_toy_loss(fig.add_subplot(1, 3, i + 1), name, traj)
    fig.suptitle(TOY_LOSS_TITLE)
    return fig


def _fig_conservation(toy, mlp) -> Figure:
    fig = Figure(figsize=(12.0, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    dplot.plot_drift({f"toy (rtol = atol = {_toy_tol():g})": toy["ND"],
                      f"digits MLP (rtol = {MLP_TOL[0]:g})": mlp["ND"]}, ax,
                     title=r"ND: drift of the conserved $H = \frac{1}{2}\|\dot w\|^2 + L$")
    ax = fig.add_subplot(1, 2, 2)
    for name in ("ND", "NAGF"):
        t, ell = dplot.series(toy[name], "angular_momentum")
        ax.plot(t, np.linalg.norm(ell, axis=1), color=COLORS[name], label=name)
    t, ell = dplot.series(toy["NAGF"], "angular_momentum")
    ax.plot(t, np.linalg.norm(ell[0]) * (t[0] / t) ** 3, "k:",
            label=r"$\|\ell(\delta)\|(\delta/t)^3$")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time $t$")
    ax.set_ylabel(r"angular momentum $\|w \times \dot w\|$")
    ax.set_title(r"Toy: angular momentum $\ell = w \times \dot w$ (GF: $\ell = 0$)")
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.legend(frameon=False)
    return fig


def _fig_mlp_loss(mlp, examples: int) -> Figure:
    fig = Figure(figsize=(6.5, 4.3), layout="constrained")
    dplot.plot_loss(mlp, fig.add_subplot(), logy=True, colors=COLORS,
                    title=f"MLP {MLP_WIDTHS}, ReLU, on {examples} digits: cross-entropy")
    return fig


def _fig_mlp_norms(mlp) -> Figure:
    fig = Figure(figsize=(12.0, 4.3), layout="constrained")
    dplot.plot_monitor(mlp, "grad_norm", fig.add_subplot(1, 2, 1), logy=True, colors=COLORS,
                       ylabel=r"gradient norm $\|\nabla L(w(t))\|$", title="Gradient norm")
    dplot.plot_layer_norms(mlp, fig.add_subplot(1, 2, 2), colors=COLORS,
                           title="Weight norms per layer")
    fig.suptitle(f"MLP {MLP_WIDTHS} on digits")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    if not jax.config.read("jax_enable_x64") and not quick:
        raise RuntimeError(
            "quickstart integrates to rtol = 1e-10 and needs float64: call "
            "jax.config.update('jax_enable_x64', True) first (the `dynamics` CLI does); "
            "in float32 only the quick smoke test runs (quick=True)."
        )
    cfg = QUICK if quick else FULL
    out = Path(out)
    figures, results = out / "figures", out / "results"
    figures.mkdir(parents=True, exist_ok=True)

    toy = toy_runs(cfg)
    mlp = _mlp_runs(cfg)

    written = {}
    with matplotlib.rc_context(RC):
        for key, fig in (
            ("toy_trajectories", _fig_toy_trajectories(toy)),
            ("toy_loss", _fig_toy_loss(toy)),
            ("conservation", _fig_conservation(toy, mlp)),
            ("mlp_loss", _fig_mlp_loss(mlp, cfg["mlp_examples"])),
            ("mlp_norms", _fig_mlp_norms(mlp)),
        ):
            written[key] = _savefig(fig, figures / f"quickstart_{key}.png")
    written["results"] = dyn.save(_tree(toy, mlp, cfg, quick), results / "quickstart.nc")
    return written
