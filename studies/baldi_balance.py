"""Baldi et al., neural synaptic balance: balancing during and before training.

(a) Toy (their Figs. 1–2): a ReLU net 2-3-2-1 (five hidden neurons) on sklearn's two
    concentric circles, logistic loss + λ(‖w‖² + ‖b‖²) (λ = 1e-3), full-batch GD.
    Every epoch (k GD steps) either one sweep of sequential neuron balancing ("partial")
    or balancing to convergence ("full"), L2, bias counted as an in-weight (Baldi's
    convention). Recorded: each hidden neuron's ‖out‖₂/‖(in, b)‖₂ per epoch after the
    fix (one sweep leaves the last layer balanced, the first converges over epochs);
    both go to 1.
(b) Digits (their Table 2 / Fig. 3 setting; sklearn's 8×8 digits stand in for MNIST):
    ReLU nets with 2, 3 and 5 weight layers (hidden width 32), cross-entropy plain /
    + λΣ|w| / + λΣw² (λ = 1e-2), full-batch GD on 1400 images (test: the other 397), full balance
    (`neuron_balance` for the regularizer's p; p = 2 for plain) before training
    against none; seeds vmapped; test accuracy and training loss per epoch.
(c) Does balance emerge? (their Figs. 18–19, Thm 31) The imbalance
    mean_i |log(‖out_i‖_p^p / ‖in_i‖_p^p)| (p = 1 for L1, else 2; biases not counted, as
    R leaves them out) along GD on E alone and on E + R. Measured (full mode, 5 layers,
    8 seeds, 40 epochs): from the He start (Fig. 18) E alone keeps it (0.50 -> 0.43: GD
    nearly conserves the charges), E + L2 drives it down (0.50 -> 0.25, e^{-4λt} under
    GF); from a fully balanced start (Fig. 19) GD at η = 0.05 moves away from balance
    (E alone 3e-4 -> 3e-3, E + L2 -> 1.6e-2). E + L1 (subgradient GD, weights hopping
    across 0) does not balance in ℓ1 within 40 epochs (0.45 -> 0.70; balanced start -> 0.9).

The GD loop with a projection every k steps is `_gd` below: a plain `lax.scan` over
epochs, each k steps of w ← w − η∇L then `projection(w, None)`; it only needs an
`AbstractProjection`, so it can move to `dyn.discrete` unchanged.

Writes out/figures/baldi_balance_{toy,digits,emergence}.png and
out/results/baldi_balance.nc (a DataTree: /toy, /digits, /emergence).
"""

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

# epochs 40: by then every mean accuracy curve is within 0.7% of its value at epoch 60
# (measured, all 18 settings); the full run then takes 6.6 min CPU, 23 min wall on the
# shared 2-core machine (60 epochs: 8.7 min CPU, 30 min wall).
# toy_lam 1e-3: at 1e-2 the L2 pull wins and the 2-3-2-1 net collapses to w = 0 (loss
# log 2, accuracy 0.5), whose "balance" says nothing; at 1e-3 it separates the circles.
FULL = {"toy_epochs": 200, "toy_k": 20, "toy_lam": 1e-3, "seeds": 8, "epochs": 40, "k": 25,
        "train": 1400, "depths": (2, 3, 5), "lr": 0.05, "lam": 1e-2}
QUICK = {"toy_epochs": 30, "toy_k": 10, "toy_lam": 1e-3, "seeds": 2, "epochs": 8, "k": 10,
         "train": 300, "depths": (2,), "lr": 0.05, "lam": 1e-2}
HIDDEN = 32
REGS = ("plain", "L1", "L2")


def _gd(params, loss, lr, epochs, k, projection=None):
    """Full-batch GD, `projection` applied after every `k` steps; per-epoch params and
    loss. (A `dyn.discrete` optimizer with a projection argument will replace this.)"""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    grad = jax.grad(lambda a: loss(eqx.combine(a, static)))

    def epoch(a, _):
        a = jax.lax.fori_loop(0, k, lambda _, b: jax.tree.map(lambda x, g: x - lr * g, b,
                                                               grad(b)), a)
        if projection is not None:
            m, _ = projection(eqx.combine(a, static), None)
            a = eqx.filter(m, eqx.is_inexact_array)
        return a, (a, loss(eqx.combine(a, static)))

    _, (traj, losses) = jax.lax.scan(epoch, arrays, None, length=epochs)
    return traj, losses


def _ratios(weights, biases=None, p=2.0):
    """‖out_i‖_p/‖in_i‖_p per hidden neuron (weights may carry a leading epoch axis); the
    bias counts as an in-weight when `biases` are given (Baldi's convention)."""
    out = []
    for h in range(len(weights) - 1):
        a = jnp.sum(jnp.abs(weights[h]) ** p, axis=-1)
        if biases is not None:
            a = a + jnp.abs(biases[h]) ** p
        b = jnp.sum(jnp.abs(weights[h + 1]) ** p, axis=-2)
        out.append((b / a) ** (1.0 / p))
    return jnp.concatenate(out, axis=-1)


def _toy(cfg):
    from sklearn.datasets import make_circles

    x, y = make_circles(200, noise=0.05, factor=0.5, random_state=0)
    x, y = jnp.asarray(x), jnp.asarray(y, float)
    model = dyn.MLP((2, 3, 2, 1), dyn.ReLU(), bias=True, key=jax.random.key(0))
    lam = cfg["toy_lam"]

    def loss(m):
        # The biases are in R too: with the bias counted as an in-weight (Baldi's
        # convention, the fix's include_bias=True), a stationary point of E + R is then
        # balanced in the fix's sense; with R on the weights alone GD pulls towards the
        # bias-free balance and partial balancing settles between the two (ratios ~0.9).
        z = jax.vmap(m)(x)[:, 0]
        r = sum(jnp.sum(w**2) for w in m.weights) + sum(jnp.sum(b**2) for b in m.biases)
        return jnp.mean(jax.nn.softplus(z) - y * z) + lam * r

    out = {}
    for name, sweeps in (("partial", 1), ("full", 1000)):
        fix = dyn.balance.NeuronBalance(2, "sequential", include_bias=True, max_sweeps=sweeps)
        traj, losses = _gd(model, loss, 0.5, cfg["toy_epochs"], cfg["toy_k"], fix)
        last = eqx.combine(jax.tree.map(lambda a: a[-1], traj),
                           eqx.partition(model, eqx.is_inexact_array)[1])
        acc = float(jnp.mean((jax.vmap(last)(x)[:, 0] > 0) == (y > 0.5)))
        out[name] = (np.asarray(_ratios(traj.weights, traj.biases)), np.asarray(losses), acc)
    return out


def _digits_runs(cfg):
    data = dyn.datasets.digits()
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    n = cfg["train"]
    xtr, ytr, xte, yte = x[:n], y[:n], x[1400:], y[1400:]
    lam = cfg["lam"]
    # One compiled program per depth: the regularizer enters through traced coefficients
    # (c1 Σ|w| + c2 Σw²) and every (regularizer, balanced, seed) run is vmapped.
    coefs = {"plain": (0.0, 0.0), "L1": (lam, 0.0), "L2": (0.0, lam)}
    results = {}
    for depth in cfg["depths"]:
        widths = (64, *([HIDDEN] * (depth - 1)), 10)
        runs, c1s, c2s, labels = [], [], [], []
        for reg in REGS:
            p = 1.0 if reg == "L1" else 2.0
            for balanced in (False, True):
                for seed in range(cfg["seeds"]):
                    m = dyn.MLP(widths, dyn.ReLU(), bias=True,
                                key=jax.random.fold_in(jax.random.key(depth), seed))
                    if balanced:
                        m, _ = dyn.balance.neuron_balance(m, p, "layer", tol=1e-10)
                    runs.append(eqx.filter(m, eqx.is_inexact_array))
                    c1s.append(coefs[reg][0])
                    c2s.append(coefs[reg][1])
                    labels.append((reg, balanced))
        static = eqx.partition(m, eqx.is_inexact_array)[1]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *runs)

        def one(a, c1, c2, static=static):
            def loss(mm):
                logits = jax.vmap(mm)(xtr)
                ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ytr[:, None],
                                                   axis=1))
                return (ce + c1 * sum(jnp.sum(jnp.abs(w)) for w in mm.weights)
                        + c2 * sum(jnp.sum(w**2) for w in mm.weights))

            traj, losses = _gd(eqx.combine(a, static), loss, cfg["lr"], cfg["epochs"],
                               cfg["k"])

            def acc(b):
                mm = eqx.combine(b, static)
                return jnp.mean(jnp.argmax(jax.vmap(mm)(xte), axis=1) == yte)

            # In the regularizer's own p: E + λ‖w‖_p^p balances ‖out‖_p^p = ‖in‖_p^p.
            imb = jnp.where(c1 > 0,
                            jnp.mean(jnp.abs(jnp.log(_ratios(traj.weights, p=1.0))), axis=-1),
                            jnp.mean(jnp.abs(2 * jnp.log(_ratios(traj.weights))), axis=-1))
            return losses, jax.vmap(acc)(traj), imb

        out = jax.jit(jax.vmap(one))(stacked, jnp.asarray(c1s), jnp.asarray(c2s))
        out = tuple(map(np.asarray, out))
        for reg in REGS:
            for balanced in (False, True):
                idx = [i for i, lab in enumerate(labels) if lab == (reg, balanced)]
                results[(depth, reg, balanced)] = tuple(o[idx] for o in out)
    return results


def _fig_toy(toy, cfg) -> Figure:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    ep = np.arange(1, cfg["toy_epochs"] + 1)
    for ax, name in zip(axes, ("partial", "full")):
        r = toy[name][0]
        for i in range(r.shape[1]):
            ax.plot(ep, r[:, i], label=f"neuron {i + 1}")
        ax.axhline(1.0, color="k", lw=0.7, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"epoch ({cfg['toy_k']} GD steps, η = 0.5)")
        ax.set_title(f"{name} balancing every epoch (L2, bias as in-weight)")
    axes[0].set_ylabel(r"$\|w_{out}\|_2 / \|(w_{in}, b)\|_2$ after the fix")
    axes[1].legend(fontsize=8)
    accs = ", ".join(f"{name} {toy[name][2]:.0%}" for name in ("partial", "full"))
    fig.suptitle("Baldi et al. Figs. 1–2: 2-3-2-1 ReLU net on concentric circles\n"
                 f"logistic loss + {cfg['toy_lam']:g}·(‖w‖² + ‖b‖²); training accuracy at "
                 f"the end: {accs}", fontsize=10)
    return fig


def _fig_digits(res, cfg) -> Figure:
    depths = cfg["depths"]
    fig = Figure(figsize=(4 * len(REGS), 3.3 * len(depths)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(depths), len(REGS), sharex=True))
    ep = np.arange(1, cfg["epochs"] + 1)
    for i, depth in enumerate(depths):
        for j, reg in enumerate(REGS):
            ax = axes[i, j]
            for balanced, color in ((False, "tab:blue"), (True, "tab:red")):
                acc = res[(depth, reg, balanced)][1]
                m, s = acc.mean(0), acc.std(0)
                ax.plot(ep, m, color=color,
                        label="balanced before training" if balanced else "not balanced")
                ax.fill_between(ep, m - s, m + s, color=color, alpha=0.2)
            ax.set_title(f"{depth} layers, {reg}")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            if i == len(depths) - 1:
                ax.set_xlabel(f"epoch ({cfg['k']} full-batch GD steps, η = {cfg['lr']})")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Digits (standing in for MNIST), {cfg['seeds']} seeds, mean ± std, "
                 f"λ = {cfg['lam']:g}")
    return fig


def _fig_emergence(res, cfg) -> Figure:
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    ep = np.arange(1, cfg["epochs"] + 1)
    depth = cfg["depths"][-1]
    for ax, balanced in zip(axes, (False, True)):
        for reg, color in (("plain", "tab:blue"), ("L2", "tab:green"), ("L1", "tab:purple")):
            imb = res[(depth, reg, balanced)][2]
            label = "GD on E" + ("" if reg == "plain" else f" + {reg}")
            ax.plot(ep, imb.mean(0), color=color, label=label)
            ax.fill_between(ep, imb.min(0), imb.max(0), color=color, alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel(f"epoch ({cfg['k']} full-batch GD steps, η = {cfg['lr']})")
        ax.set_title("He start (their Fig. 18)" if not balanced
                     else "fully balanced start (their Fig. 19)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"mean$_i\,|\log(\|out_i\|_p^p/\|in_i\|_p^p)|$, p of R (2 for E)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Does balance emerge? {depth}-layer ReLU net on digits, no balancing "
                 f"step during training, λ = {cfg['lam']:g}; {cfg['seeds']} seeds "
                 "(mean, band min–max)")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("baldi-balance needs float64: jax.config.update("
                           "'jax_enable_x64', True) first (the CLI does).")
    cfg = QUICK if quick else FULL
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    toy = _toy(cfg)
    res = _digits_runs(cfg)
    written = {}
    with matplotlib.rc_context({"font.size": 10}):
        for key, fig in (("toy", _fig_toy(toy, cfg)), ("digits", _fig_digits(res, cfg)),
                         ("emergence", _fig_emergence(res, cfg))):
            path = out / "figures" / f"baldi_balance_{key}.png"
            fig.savefig(path, dpi=110)
            written[key] = path
    toy_ds = xr.Dataset(
        {f"ratio_{k}": (("epoch", "neuron"), v[0]) for k, v in toy.items()}
        | {f"loss_{k}": (("epoch",), v[1]) for k, v in toy.items()},
        attrs={"widths": "2-3-2-1", "activation": "relu", "lam_L2": cfg["toy_lam"],
               **{f"train_accuracy_{k}": v[2] for k, v in toy.items()}})
    dims = ("depth", "reg", "balanced", "seed", "epoch")
    stack = {name: np.stack([np.stack([np.stack([res[(d, r, b)][i] for b in (False, True)])
                                       for r in REGS]) for d in cfg["depths"]])
             for i, name in enumerate(("loss", "test_accuracy", "imbalance"))}
    dig_ds = xr.Dataset({k: (dims, v) for k, v in stack.items()},
                        coords={"depth": list(cfg["depths"]), "reg": list(REGS),
                                "balanced": [0, 1]},
                        attrs={"dataset": "sklearn digits (stands in for MNIST)",
                               "train_examples": cfg["train"], "lr": cfg["lr"],
                               "steps_per_epoch": cfg["k"], "lam": cfg["lam"]})
    tree = xr.DataTree.from_dict({"/toy": toy_ds, "/digits": dig_ds})
    tree.attrs = {"study": "baldi-balance", "quick": int(quick)}
    written["results"] = dyn.save(tree, out / "results" / "baldi_balance.nc")
    return written
