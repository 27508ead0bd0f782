"""Theory III: norm-minimizing descent (NMGD) and the Halpern flow find the minimum-norm
solution; plain GD keeps its start's null-space part, and drifts under perturbations.

Banburski, Liao, Miranda, Poggio et al., *Theory III* (App. 12, eq. 26; secs. 9, 14.1;
Figs. 5–7):

(a) Under-determined least squares (5 equations, 12 unknowns), three random starts:
    NMGD (γ = 0.2, a = 0.9) from the paper's n0 = 1 (its first step lands at 0) and from
    n0 = 100 (the start is not erased), the Halpern flow, and GD. NMGD and the Halpern
    flow converge to the pseudo-inverse solution X⁺y; GD converges to X⁺y plus the
    start's null-space component, which it never changes.
(b) Polynomial-feature regression as in Figs. 5–6: the target sin(2π·4x) on [−1, 1],
    9 training points on Chebyshev nodes, 100 test points, features of degree 30 and
    39, step 0.2: train and test error and ‖w‖ under GD and NMGD.
(c) Perturb and retrain (Fig. 6, degree 39): Gaussian noise of std 0.45 added to the
    weights every k iterations for the first half of the run. Training error returns to
    zero after each perturbation; under GD the norm and the test error grow, NMGD holds
    the norm.

The paper does not say which polynomial basis it uses. Monomials on 9 Chebyshev nodes
give a Gram matrix of condition number ~5e4, so GD needs ~1e5 iterations to reach zero
training error (they ran 250,000 and 10,000,000); Chebyshev polynomials T_k on the same
nodes have condition number 1.3–1.5, so each retraining takes a few hundred steps. The
behaviour the figures are about (the null-space part of w) is the same in either basis:
both span the same polynomials, and the minimum-norm solution differs only in the norm
used. We use T_k.

Writes `out/figures/theory3_nmgd_*.png` and `out/results/theory3_nmgd.nc`.
"""

import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

__all__ = ["run"]

GAMMA = 0.2
A = 0.9
FULL = {"ls_steps": 20_000, "poly_steps": 50_000, "segments": 20, "segment_steps": 2_000,
        "saves": 100, "degrees": (30, 39)}
QUICK = {"ls_steps": 2_000, "poly_steps": 2_000, "segments": 4, "segment_steps": 200,
         "saves": 20, "degrees": (39,)}
NOISE = 0.45  # Fig. 6's perturbation std
INIT_STD = 0.1
RC = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "legend.fontsize": 9}
DPI = 120
COLORS = {"GD": "tab:blue", "NMGD n0=1": "tab:red", "NMGD n0=100": "tab:orange",
          "NMGD": "tab:red", "Halpern flow": "k"}
# The Halpern flow shares NMGD's λ(t) = (n0 + t/γ)^(-a) but pulls toward 0 at the rate
# λ, where a step of NMGD pulls by λ_n (a rate λ_n/γ): it forgets the start more slowly.
LABELS = {"Halpern flow": r"Halpern flow, $\lambda(t) = (100 + t/\gamma)^{-a}$"}


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _linear(d: int, key) -> dyn.MLP:
    model = dyn.MLP((d, 1), activation=dyn.Identity(), bias=False, key=key)
    return jax.tree.map(lambda w: INIT_STD * w * np.sqrt(d / 2.0), model)  # N(0, INIT_STD²)


def _run(label, alg, model, loss, steps, saves, monitors) -> dyn.Trajectory:
    start = time.perf_counter()
    traj = dyn.discrete.run(alg, model, loss, steps, save_every=max(steps // saves, 1),
                            monitors=monitors)
    _say(f"{label:<34}{steps:>8} steps {time.perf_counter() - start:6.1f} s")
    return traj


# --- (a) least squares ------------------------------------------------------------------


def _least_squares(cfg):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 1))
    loss = dyn.losses.mse(dyn.datasets.Dataset(jnp.asarray(x), jnp.asarray(y)))
    pinv = (np.linalg.pinv(x) @ y).ravel()
    mon = (dyn.monitors.NullSpaceComponent(x),
           dyn.monitors.Function(lambda t, p, v: jnp.linalg.norm(p.weights[0].ravel() - pinv),
                                 "distance_to_pinv"))
    steps = cfg["ls_steps"]
    runs = {}
    for seed in range(3):
        model = _linear(12, jax.random.key(seed))
        for name, alg in (("GD", dyn.discrete.GD(GAMMA)),
                          ("NMGD n0=1", dyn.discrete.NMGD(GAMMA, A)),
                          ("NMGD n0=100", dyn.discrete.NMGD(GAMMA, A, n0=100))):
            runs[(name, seed)] = _run(f"least squares {name} seed {seed}", alg, model, loss,
                                      steps, cfg["saves"], mon)
        flow = dyn.discrete.NMGD(GAMMA, A, n0=100).flow
        start = time.perf_counter()
        t1 = steps * GAMMA
        runs[("Halpern flow", seed)] = dyn.simulate(
            flow, model, loss, t1=t1, ts=jnp.linspace(0.0, t1, cfg["saves"] + 1), monitors=mon,
            save_params=False)
        _say(f"least squares Halpern flow seed {seed:<10}"
             f"{runs[('Halpern flow', seed)].stats['num_steps']:>8} steps "
             f"{time.perf_counter() - start:6.1f} s")
    return runs, float(np.linalg.norm(pinv))


# --- (b), (c) polynomial regression -----------------------------------------------------


def _features(x: np.ndarray, degree: int) -> np.ndarray:
    return np.polynomial.chebyshev.chebvander(x, degree)


def _poly_problem(degree: int):
    n = 9
    nodes = np.cos((2 * np.arange(1, n + 1) - 1) * np.pi / (2 * n))  # Chebyshev nodes
    x_test = np.linspace(-1.0, 1.0, 100)
    target = lambda x: np.sin(2 * np.pi * 4 * x)  # noqa: E731 - the paper's f(x), f = 4
    phi, phi_test = _features(nodes, degree), _features(x_test, degree)
    gram = phi @ phi.T / n
    assert GAMMA * np.linalg.eigvalsh(gram).max() < 2  # GD is stable at the paper's step
    data = dyn.datasets.Dataset(jnp.asarray(phi), jnp.asarray(target(nodes))[:, None])
    loss = dyn.losses.mse(data)
    test = dyn.losses.mse(dyn.datasets.Dataset(jnp.asarray(phi_test),
                                               jnp.asarray(target(x_test))[:, None]))
    monitors = (dyn.monitors.Loss(),
                dyn.monitors.Function(lambda t, p, v: test(p), "test_loss"),
                dyn.monitors.LayerNorms())
    return loss, monitors


def _polynomial(cfg):
    runs = {}
    for degree in cfg["degrees"]:
        loss, monitors = _poly_problem(degree)
        model = _linear(degree + 1, jax.random.key(7))
        for name, alg in (("GD", dyn.discrete.GD(GAMMA)), ("NMGD", dyn.discrete.NMGD(GAMMA, A))):
            runs[(name, degree)] = _run(f"degree {degree} {name}", alg, model, loss,
                                        cfg["poly_steps"], cfg["saves"], monitors)
    return runs


def _perturbed(cfg) -> dict[str, dict[str, np.ndarray]]:
    """Train in segments of k steps; add N(0, NOISE²) to every weight between segments
    during the first half. NMGD's step counter runs on across segments (n0 = n)."""
    degree, k, segments = 39, cfg["segment_steps"], cfg["segments"]
    loss, monitors = _poly_problem(degree)
    out = {}
    for name in ("GD", "NMGD"):
        model = _linear(degree + 1, jax.random.key(7))
        key = jax.random.key(11)
        pieces: dict[str, list] = {"step": [], "loss": [], "test_loss": [], "norm": []}
        start = time.perf_counter()
        for s in range(segments):
            if 0 < s <= segments // 2:
                key, sub = jax.random.split(key)
                noise = NOISE * jax.random.normal(sub, model.weights[0].shape)
                model = eqx.tree_at(lambda m: m.weights, model, (model.weights[0] + noise,))
            alg = dyn.discrete.GD(GAMMA) if name == "GD" else dyn.discrete.NMGD(
                GAMMA, A, n0=1 + s * k)
            traj = dyn.discrete.run(alg, model, loss, k, save_every=max(k // 10, 1),
                                    monitors=monitors)
            steps = s * k + np.asarray(traj.ts) / GAMMA
            pieces["step"].append(steps)
            pieces["loss"].append(traj.monitors["loss"])
            pieces["test_loss"].append(traj.monitors["test_loss"])
            pieces["norm"].append(traj.monitors["layer_norms"][:, 0])
            model = traj.final_params
        _say(f"perturb-and-retrain {name:<15}{segments * k:>8} steps "
             f"{time.perf_counter() - start:6.1f} s")
        out[name] = {key_: np.concatenate(v) for key_, v in pieces.items()}
    return out


# --- figures ------------------------------------------------------------------------------


def _fig_least_squares(runs, pinv_norm) -> Figure:
    fig = Figure(figsize=(12.0, 4.3), layout="constrained")
    ax_d, ax_n = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for (name, seed), traj in runs.items():
        it = np.asarray(traj.ts) / GAMMA
        kw = dict(color=COLORS[name], alpha=0.8,
                  label=LABELS.get(name, name) if seed == 0 else None,
                  ls="--" if name == "Halpern flow" else "-")
        ax_d.plot(it[1:], traj.monitors["distance_to_pinv"][1:] / pinv_norm, **kw)
        ax_n.plot(it[1:], np.maximum(traj.monitors["null_space_component"][1:], 1e-17), **kw)
    for ax in (ax_d, ax_n):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"iteration n (flow time t = {GAMMA:g} n)")
        ax.grid(True, alpha=0.3, which="both")
    ax_d.set_ylabel(r"$\|w_n - X^+ y\| / \|X^+ y\|$")
    ax_d.set_title("Distance to the minimum-norm solution")
    ax_d.legend(frameon=False)
    ax_n.set_ylabel(r"null-space part $\|(I - X^+X) w_n\|$")
    ax_n.set_title("GD keeps it; NMGD and the Halpern flow remove it")
    fig.suptitle(f"Under-determined least squares (5 × 12), three random starts; "
                 f"γ = {GAMMA:g}, a = {A:g} (Theory III eq. 26)")
    return fig


def _fig_polynomial(runs, degrees) -> Figure:
    fig = Figure(figsize=(13.0, 3.8 * len(degrees)), layout="constrained")
    for row, degree in enumerate(degrees):
        axes = [fig.add_subplot(len(degrees), 3, 3 * row + i + 1) for i in range(3)]
        for name in ("GD", "NMGD"):
            traj = runs[(name, degree)]
            it = np.asarray(traj.ts) / GAMMA
            axes[0].plot(it[1:], traj.monitors["loss"][1:], color=COLORS[name], label=name)
            axes[1].plot(it[1:], traj.monitors["test_loss"][1:], color=COLORS[name], label=name)
            axes[2].plot(it, traj.monitors["layer_norms"][:, 0], color=COLORS[name], label=name)
        titles = ("training loss", "test loss (100 points)", r"$\|w\|$")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("iteration n")
            ax.set_title(f"degree {degree}: {title}")
            ax.grid(True, alpha=0.3, which="both")
            ax.legend(frameon=False)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[0].set_ylabel(r"$\frac{1}{2n}\sum (f(x_i) - y_i)^2$")
    fig.suptitle(r"Polynomial regression of $\sin(2\pi \cdot 4x)$, 9 Chebyshev nodes, "
                 f"Chebyshev features; GD and NMGD at γ = {GAMMA:g} (cf. Theory III Figs. 5–6)")
    return fig


def _fig_perturbed(pert, cfg) -> Figure:
    fig = Figure(figsize=(13.0, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    stop = (cfg["segments"] // 2 + 1) * cfg["segment_steps"]
    for name, series in pert.items():
        axes[0].plot(series["step"], np.maximum(series["loss"], 1e-32), color=COLORS[name],
                     label=name)
        axes[1].plot(series["step"], series["test_loss"], color=COLORS[name], label=name)
        axes[2].plot(series["step"], series["norm"], color=COLORS[name], label=name)
    for ax, title in zip(axes, ("training loss", "test loss", r"$\|w\|$"), strict=True):
        ax.axvline(stop, color="gray", ls=":", lw=1)
        ax.set_xlabel("iteration n")
        ax.set_title(title)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(frameon=False)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(f"Perturb and retrain (degree 39): N(0, {NOISE:g}²) added to w every "
                 f"{cfg['segment_steps']} iterations until the dotted line (cf. Theory III "
                 "Fig. 6)")
    return fig


def _tree(ls, poly, pert, cfg, quick) -> xr.DataTree:
    nodes = {"/": xr.Dataset(attrs={"study": "theory3-nmgd", "quick": int(quick),
                                    "description": __doc__.strip().splitlines()[0],
                                    "gamma": GAMMA, "a": A, "noise": NOISE})}
    for (name, seed), traj in ls.items():
        nodes[f"least_squares/{_slug(name)}_seed{seed}"] = traj.to_xarray()
    for (name, degree), traj in poly.items():
        nodes[f"polynomial/degree{degree}_{_slug(name)}"] = traj.to_xarray()
    for name, series in pert.items():
        nodes[f"perturbed/{_slug(name)}"] = xr.Dataset(
            {k: ("sample", v) for k, v in series.items()})
    return xr.DataTree.from_dict(nodes)


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("=", "")


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("theory3-nmgd needs float64: jax.config.update('jax_enable_x64', "
                           "True) (the `dynamics` CLI does).")
    cfg = QUICK if quick else FULL
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    ls, pinv_norm = _least_squares(cfg)
    poly = _polynomial(cfg)
    pert = _perturbed(cfg)
    written = {}
    with matplotlib.rc_context(RC):
        for key, fig in (("least_squares", _fig_least_squares(ls, pinv_norm)),
                         ("polynomial", _fig_polynomial(poly, cfg["degrees"])),
                         ("perturbed", _fig_perturbed(pert, cfg))):
            path = out / "figures" / f"theory3_nmgd_{key}.png"
            fig.savefig(path, dpi=DPI)
            written[key] = path
    written["results"] = dyn.save(_tree(ls, poly, pert, cfg, quick),
                                  out / "results" / "theory3_nmgd.nc")
    return written
