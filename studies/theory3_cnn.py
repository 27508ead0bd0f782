"""Theory III Figs. 2–3 on digits images: the 5-layer ReLU conv net without pooling keeps
its test error as training examples or parameters grow, and its norm product stays near
the minimum over its rescaling orbit; per-channel charges follow GD's exact law.

Banburski, Liao, Miranda, Poggio et al., *Theory III*, Figs. 2–3: a 5-layer convolutional
ReLU network (no pooling, 16 channels per hidden layer, ~10,000 parameters) trained on
CIFAR-10 by minimising the cross-entropy, without regularization.

Here the bundled stand-in: sklearn's digits as 1×8×8 images (`dyn.datasets.digits_images`,
1,437 training and 360 test images, of which up to 800 are used: every run of an
architecture computes on all `fit` images, weighting the first n, so that one compiled
run serves every n), the net `dyn.ConvNet(1, (C,) * 5, 3, 10, stride=2,
padding=1, image_size=8, bias=False)` (C = 16: 9,520 parameters; bias-free, so the net is
5-homogeneous in its layers and its product of layer norms is the Theory III ρ), trained
by full-batch GD (η = 0.5, `dyn.discrete.run`; the paper's SGD with batch 100 and 70
epochs is not reproduced) for a fixed number of steps.

(a) Fig. 2: test and training error against the number n of training examples (C = 16),
    with the true labels and with random labels (Fig. 2b: the net fits them, its test
    error is chance).
(b) Fig. 3: test error and test cross-entropy against the number of parameters (C from 2
    to 32, 800 training images; 400 in the quick run), and the product of the layer norms
    ρ = Π_k ‖W_k‖ against its minimum over the rescaling orbit (per-channel rescalings
    leave the function unchanged; log ρ is convex in the channels' log-scales, minimised
    by BFGS): the paper explains Fig. 3 by ρ staying close to that minimum.

Every run monitors the per-channel rescaling charges and `GDChargeDrift`; the largest
departure of their measured per-step change from η²⟨g, g⟩_M (the exact discrete law,
`dynamics.symmetries._laws`) is recorded.

Writes `out/figures/theory3_cnn_{examples,parameters}.png` and
`out/results/theory3_cnn.nc`.
"""

import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics.balance._units import rescale_by_units

from ._common import folders, save_figures, save_tree, say

__all__ = ["run"]

ETA = 0.5
# "fit": the training examples of the parameter sweep (b); its C = 16 run is (a)'s at n = fit
FULL = {"steps": 300, "examples": (50, 100, 200, 400, 800), "random": (50, 100, 200),
        "channels": (2, 4, 8, 16, 32), "fit": 800}
QUICK = {"steps": 120, "examples": (100, 400), "random": (100,), "channels": (4, 16), "fit": 400}


def _net(channels: int, seed: int = 0) -> dyn.ConvNet:
    return dyn.ConvNet(1, (channels,) * 5, 3, 10, stride=2, padding=1, image_size=8,
                       bias=False, key=jax.random.key(seed))


@eqx.filter_jit
def _logits(model, x):
    return jax.vmap(model)(x)


def _error(model, data) -> float:
    logits = _logits(model, jnp.asarray(data.x))
    return float(jnp.mean(jnp.argmax(logits, -1) != jnp.asarray(data.y)))


def _train(label: str, model, loss, steps: int):
    """GD on `loss`; (final model, charge-law residual)."""
    start = time.perf_counter()
    traj = dyn.discrete.run(dyn.discrete.GD(ETA), model, loss, steps,
                            save_every=1, save_params=False, check_stability=False,
                            monitors=(dyn.monitors.RescalingCharges(),
                                      dyn.monitors.GDChargeDrift(ETA)))
    q = np.asarray(traj.monitors["rescaling_charges"])
    law = np.max(np.abs(np.diff(q, axis=0) - np.asarray(traj.monitors["gd_charge_drift"])[:-1]))
    law /= np.max(np.abs(q))
    seconds = time.perf_counter() - start
    say(f"{label:<34}{steps:>6} steps {seconds:6.1f} s, charge law to {law:.1e}")
    return traj.final_params, law


def _norm_product(model, u=None) -> float:
    families = model.rescaling_units()
    scaled = model if u is None else rescale_by_units(model, model, families, u)
    return float(np.prod([np.linalg.norm(np.asarray(w)) for w in scaled.weights]))


def _min_norm_product(model) -> float:
    """min over per-channel log-scales u of Π_k ‖W_k(u)‖: Σ_k ½ log ‖W_k(u)‖² is a sum of
    log-sum-exps of linear functions of u, convex, so BFGS finds the minimum."""
    families = model.rescaling_units()
    sizes = [f.size for f in families]
    cuts = np.cumsum([0, *sizes])

    def log_rho(v):
        u = tuple(v[cuts[k]:cuts[k + 1]] for k in range(len(sizes)))
        scaled = rescale_by_units(model, model, families, u)
        return sum(0.5 * jnp.log(jnp.sum(w**2)) for w in scaled.weights)

    fg = jax.jit(jax.value_and_grad(log_rho))
    res = scipy.optimize.minimize(lambda v: tuple(np.asarray(a) for a in fg(jnp.asarray(v))),
                                  np.zeros(cuts[-1]), jac=True, method="BFGS",
                                  options={"gtol": 1e-10})
    return float(np.exp(res.fun))


class _FirstN(dyn.losses.AbstractLoss):
    """The mean cross-entropy over the examples of `data` with `weight` 1 (the first n),
    written over all of them: every training-set size then has the same shapes, and all
    runs of one architecture share one compiled run."""

    data: dyn.losses.CrossEntropy
    weight: jax.Array

    def __call__(self, params):
        return jnp.sum(self.weight * self.data.example_losses(params)) / jnp.sum(self.weight)


def _subset(train, size: int, n: int, labels: str) -> tuple[_FirstN, dyn.datasets.Dataset]:
    """(the loss on the first n of a fixed permutation of `size` training images, with
    their labels or uniformly random ones; those n images as a Dataset)."""
    rng = np.random.default_rng(0)
    idx = rng.permutation(train.x.shape[0])[:size]
    y = np.asarray(train.y)[idx]
    if labels == "random":
        y = np.concatenate([rng.integers(0, 10, n), y[n:]])
    data = dyn.datasets.Dataset(np.asarray(train.x)[idx], y, 10)
    weight = jnp.asarray((np.arange(size) < n).astype(data.x.dtype))
    first = dyn.datasets.Dataset(data.x[:n], y[:n], 10)
    return _FirstN(dyn.losses.cross_entropy(data), weight), first


def _examples(cfg, train, test, runs):
    rows = []
    size = min(cfg["fit"], train.x.shape[0])
    for labels in ("true", "random"):
        for n in cfg["examples" if labels == "true" else "random"]:
            n = min(n, size)
            loss, subset = _subset(train, size, n, labels)
            width = cfg.get("width", 16)
            model, law = runs[(labels, n, width)] = _train(f"{labels} labels, n = {n}",
                                                           _net(width), loss, cfg["steps"])
            rows.append((labels, n, _error(model, subset), _error(model, test), law))
    return rows


def _parameters(cfg, train, test, runs):
    rows = []
    n = min(cfg["fit"], train.x.shape[0])
    loss, subset = _subset(train, n, n, "true")
    for c in cfg["channels"]:
        if ("true", n, c) in runs:
            model, law = runs[("true", n, c)]
        else:
            model, law = _train(f"C = {c}, n = {n}", _net(c), loss, cfg["steps"])
        logits = _logits(model, jnp.asarray(test.x))
        ce = float(jnp.mean(jax.nn.logsumexp(logits, -1)
                            - jnp.take_along_axis(logits, jnp.asarray(test.y)[:, None], -1)[:, 0]))
        rho, rho_min = _norm_product(model), _min_norm_product(model)
        params = sum(w.size for w in model.weights)
        rows.append((c, params, _error(model, subset), _error(model, test), ce, rho, rho_min,
                     law))
        say(f"  C = {c}: {params} parameters, rho / rho_min = {rho / rho_min:.4f}")
    return rows


def _setting(steps: int) -> str:
    return f"full-batch GD, η = {ETA:g}, {steps} steps, mean cross-entropy, no biases"


def _fig_examples(rows, steps: int) -> Figure:
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for labels, marker in (("true", "o"), ("random", "s")):
        sel = [r for r in rows if r[0] == labels]
        n = [r[1] for r in sel]
        ax.plot(n, [r[3] for r in sel], marker=marker, label=f"test error, {labels} labels")
        ax.plot(n, [r[2] for r in sel], marker=marker, ls="--",
                label=f"training error, {labels} labels")
    ax.axhline(0.9, color="gray", lw=0.8, ls=":", label="chance")
    ax.set(xscale="log", xlabel="training examples n", ylabel="classification error")
    ax.set_title(f"5-layer conv net (C = 16), digits 1×8×8\n{_setting(steps)}", fontsize=9)
    ns = sorted({r[1] for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    return fig


def _fig_parameters(rows, n: int, steps: int) -> Figure:
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    params = [r[1] for r in rows]
    ax1.plot(params, [r[3] for r in rows], "o-", label="test error")
    ax1.plot(params, [r[2] for r in rows], "o--", label="training error")
    ax1b = ax1.twinx()
    ax1b.plot(params, [r[4] for r in rows], "s-", color="tab:red", label="test cross-entropy")
    ax1b.set_ylabel("test cross-entropy", color="tab:red")
    ax1.set(xscale="log", xlabel="parameters", ylabel="classification error",
            title=f"error against parameters ({n} training images)")
    lines = ax1.get_lines() + ax1b.get_lines()
    ax1.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    fig.suptitle(f"5-layer conv net, digits 1×8×8; {_setting(steps)}", fontsize=9)
    ax2.plot(params, [r[5] / r[6] for r in rows], "o-")
    ax2.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax2.set(xscale="log", xlabel="parameters", ylabel=r"$\rho / \min_{\mathrm{orbit}} \rho$",
            title=r"norm product $\rho = \prod_k \|W_k\|$ against its minimum")
    return fig


def _tree(ex, par, cfg, quick):
    ex_ds = xr.Dataset(
        {"train_error": ("run", [r[2] for r in ex]), "test_error": ("run", [r[3] for r in ex]),
         "charge_law_residual": ("run", [r[4] for r in ex])},
        coords={"labels": ("run", [r[0] for r in ex]), "examples": ("run", [r[1] for r in ex])})
    par_ds = xr.Dataset(
        {name: ("channels", [r[k] for r in par]) for k, name in enumerate(
            ("channels_", "parameters", "train_error", "test_error", "test_cross_entropy",
             "norm_product", "min_norm_product", "charge_law_residual")) if k > 0},
        coords={"channels": [r[0] for r in par]})
    return {"examples": ex_ds, "parameters": par_ds}


def run(out: Path, quick: bool = False, config: dict | None = None) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written.
    `config` replaces the FULL/QUICK settings (the tests run a tiny one)."""
    cfg = config or (QUICK if quick else FULL)
    figures, results = folders(out)
    dtype = np.float64 if jax.config.read("jax_enable_x64") else np.float32
    train = dyn.datasets.digits_images("train", dtype=dtype)
    test = dyn.datasets.digits_images("test", dtype=dtype)
    runs = {}  # (labels, n, C) -> (trained model, charge-law residual)
    ex = _examples(cfg, train, test, runs)
    par = _parameters(cfg, train, test, runs)
    fit = min(cfg["fit"], train.x.shape[0])
    written = save_figures(figures, "theory3_cnn", {
        "examples": lambda: _fig_examples(ex, cfg["steps"]),
        "parameters": lambda: _fig_parameters(par, fit, cfg["steps"])})
    written["results"] = save_tree(_tree(ex, par, cfg, quick), results / "theory3_cnn.nc",
                                   study="theory3-cnn", quick=quick, eta=ETA,
                                   steps=cfg["steps"])
    return written
