"""Minibatch SGD against its stochastic modified equations (SME) on digits MLPs.

Weak orders, batch sizes, and the charges' noise law.

(a) Weak gaps e(η) = E φ(w_K) − E φ(W(T)) at flow time T = 1 of SGD (batch 16 of 256
    digits, without replacement) on a 64-16-10 Tanh MLP, for φ = the loss L and
    Q = ‖W₁‖² + ‖b₁‖² − ‖W₂‖² (an ordinary quadratic observable: Tanh has no rescaling
    symmetry), against gradient flow, SME-1 and SME-2 (Li, Tai & E, JMLR 2019), from the
    same 10,000 SGD paths per step size (`dyn.weak_order` with a dict of flows: control
    variate along GF, SVAG Richardson references, common random numbers, paired
    bootstrap 95% intervals). Predicted orders 1, 1, 2.
(b) The gap at η = 1/16 against the batch size b = 8 … 64 (2,000 paths each): GF's gap
    is SGD's noise (∝ c_b η) plus GD's O(η); SME-1 and SME-2 absorb the noise.
(c) ReLU 64-16-10 (a rescaling symmetry per hidden neuron, so Q = Σ_i Q_i is a charge):
    E[Q(w_k) − Q(w_0)] under SGD (η = 0.05, T = 2) against the integrated law
    η Σ_k [⟨∇L, A∇L⟩ + c_b tr(AΣ_1)](w_k) (`ChargeGradientRate` + `ChargeNoiseRate`),
    and against its noise part alone, the SME-1 law (η/2) tr(∇²Q Σ_b) that the issue
    proposed for SGD: SGD follows the full law, not the noise part. The exact per-step law
    Q_{k+1} − Q_k = η²⟨ĝ_B, ĝ_B⟩_M with the step's own minibatch gradient, on every path.
(d) ReLU weak gaps against gradient flow integrated exactly through the kinks
    (`nonsmooth=dyn.Filippov()`) and against SME-1 (whose theory assumes smooth losses).

Writes `out/figures/sgd_sme_{orders,batch,noise_law,relu}.png` and
`out/results/sgd_sme.nc` (/orders, /batch/b<k>, /noise_law, /relu).

Measured numbers of the full run: the benchmarks page and the CHANGELOG.
"""

import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import datasets, discrete, losses

from ._common import folders, known_kinks, require_x64, save_figures, save_tree, say

__all__ = ["run"]

WIDTHS = (64, 16, 10)
EXAMPLES, BATCH, T = 256, 16, 1.0
FULL = {"etas": [1 / 8, 1 / 16, 1 / 32, 1 / 64], "paths": 10_000, "batches": [8, 32, 64],
        "batch_paths": 2000, "law_paths": 1000, "law_steps": 40, "relu_etas":
        [1 / 8, 1 / 16, 1 / 32], "relu_paths": 2000, "examples": EXAMPLES, "filippov": True}
QUICK = {"etas": [1 / 4, 1 / 8, 1 / 16], "paths": 200, "batches": [], "batch_paths": 0,
         "law_paths": 50, "law_steps": 8, "relu_etas": [], "relu_paths": 0, "examples": 64,
         "filippov": False}
LAW_ETA = 0.05


def charge(t, p, v):
    """Q = Σ_i Q_i = ‖W₁‖² + ‖b₁‖² − ‖W₂‖² (p = 1)."""
    return jnp.sum(p.weights[0] ** 2) + jnp.sum(p.biases[0] ** 2) - jnp.sum(p.weights[1] ** 2)


OBSERVABLES = (dyn.monitors.Loss(), dyn.monitors.Function(charge, name="Q"))


def _problem(cfg, activation):
    init = "lecun" if isinstance(activation, dyn.Tanh) else "he"
    model = dyn.MLP(WIDTHS, activation, key=jax.random.key(0), init=init)
    return model, losses.cross_entropy(datasets.digits(cfg["examples"]))


def _references(b):
    return lambda a: {"GF": dyn.GradientFlow(), "SME-1": dyn.SME(a.eta, b),
                      "SME-2": dyn.SME(a.eta, b, order=2)}


def _orders(cfg) -> xr.Dataset:
    model, loss = _problem(cfg, dyn.Tanh())
    start = time.perf_counter()
    ds = dyn.weak_order(lambda eta: discrete.SGD(eta, BATCH), model, loss, cfg["etas"], T,
                        flow=_references(BATCH), observables=OBSERVABLES, paths=cfg["paths"],
                        key=0, check_stability=False)
    ds.attrs["examples"] = cfg["examples"]
    for a in ds["against"].values:
        for o in ds["observable"].values:
            f = ds.sel(against=a, observable=o)
            say(f"orders: SGD vs {a:<5} E[{o}]: {float(f['order']):.3f} "
                f"[{float(f['order_low']):.3f}, {float(f['order_high']):.3f}] "
                f"({f['model'].item()}, {int(f['flips'])} flips)")
    say(f"orders: {cfg['paths']} paths x {len(cfg['etas'])} step sizes "
        f"{time.perf_counter() - start:6.1f} s")
    return ds


def _batch(cfg) -> dict[str, xr.Dataset]:
    model, loss = _problem(cfg, dyn.Tanh())
    out = {}
    for b in cfg["batches"]:
        start = time.perf_counter()
        out[f"b{b}"] = dyn.weak_gap(discrete.SGD(1 / 16, b), model, loss, T,
                                    flow=_references(b)(discrete.SGD(1 / 16, b)),
                                    observables=OBSERVABLES, paths=cfg["batch_paths"], key=0,
                                    check_stability=False).drop_vars("estimate")
        say(f"batch {b:>3}: {time.perf_counter() - start:6.1f} s")
    return out


def _noise_law(cfg) -> xr.Dataset:
    model, loss = _problem(cfg, dyn.ReLU())
    steps, paths = cfg["law_steps"], cfg["law_paths"]
    start = time.perf_counter()
    run = discrete.run(
        discrete.SGD(LAW_ETA, BATCH), model, loss, steps,
        key=jax.random.split(jax.random.key(1), paths), save_params=False,
        monitors=(dyn.monitors.RescalingCharges(), dyn.monitors.SGDChargeDrift(LAW_ETA),
                  dyn.monitors.ChargeNoiseRate(LAW_ETA, BATCH),
                  dyn.monitors.ChargeGradientRate(LAW_ETA)), check_stability=False)
    q = run.monitors["rescaling_charges"]  # (paths, steps + 1, neurons)
    drift = run.monitors["sgd_charge_drift"]
    exact = float(np.max(np.abs(q[:, 1:] - q[:, :-1] - drift[:, :-1])))
    # The expected change of step k given w_k is η·(rate at w_k): left Riemann sums.
    noise, grad = run.monitors["charge_noise_rate"], run.monitors["charge_gradient_rate"]

    def cumulative(rate):
        return np.concatenate([np.zeros_like(rate[:, :1]),
                               LAW_ETA * np.cumsum(rate[:, :-1], axis=1)], axis=1)

    measured = q - q[:, :1]
    law_full, law_noise = cumulative(noise + grad), cumulative(noise)

    def z(residual):  # per neuron, at the end: mean / (sd / √M)
        r = residual[:, -1]
        return r.mean(0) / (r.std(0, ddof=1) / np.sqrt(paths))

    z_full, z_noise = z(measured - law_full), z(measured - law_noise)
    say(f"noise law: exact per-step law max error {exact:.1e}; per-neuron |z| of SGD − "
        f"full law ≤ {np.abs(z_full).max():.1f}, of SGD − noise-only law ≤ "
        f"{np.abs(z_noise).max():.0f}  {time.perf_counter() - start:6.1f} s")
    total = {"measured": measured.sum(-1), "law_full": law_full.sum(-1),
             "law_noise": law_noise.sum(-1)}
    data = {k: (("step",), v.mean(0)) for k, v in total.items()}
    data.update({f"{k}_se": (("step",), v.std(0, ddof=1) / np.sqrt(paths))
                 for k, v in total.items()})
    data.update(residual_full_se=(("step",), (total["measured"] - total["law_full"]).std(
        0, ddof=1) / np.sqrt(paths)), z_full=(("neuron",), z_full),
        z_noise=(("neuron",), z_noise))
    return xr.Dataset(data, coords={"step": np.arange(steps + 1), "time": (
        "step", np.arange(steps + 1) * LAW_ETA)},
        attrs={"eta": LAW_ETA, "batch_size": BATCH, "paths": paths,
               "exact_law_max_error": exact, "activation": "ReLU",
               "law": "E[Q_{k+1}-Q_k|w_k] = eta^2 (<grad L, A grad L> + c_b tr(A Sigma_1))"})


def _relu(cfg) -> xr.Dataset | None:
    if not cfg["relu_etas"]:
        return None
    model, loss = _problem(cfg, dyn.ReLU())
    start = time.perf_counter()
    # The exact mode holds rtol 1e-10 through the kinks; a plain solve chatters there,
    # so without it (a smoke run) Dopri5 at 1e-6 (the integrators study's finding).
    solve = (dict(nonsmooth=dyn.Filippov()) if cfg["filippov"] else
             dict(solver=diffrax.Dopri5(), rtol=1e-6, atol=1e-8))
    with known_kinks():
        ds = dyn.weak_order(
            lambda eta: discrete.SGD(eta, BATCH), model, loss, cfg["relu_etas"], T,
            flow=lambda a: {"GF": dyn.GradientFlow(), "SME-1": dyn.SME(a.eta, BATCH)},
            observables=OBSERVABLES, paths=cfg["relu_paths"], key=0, check_stability=False,
            **solve)
    ds.attrs.update(examples=cfg["examples"], filippov=int(cfg["filippov"]))
    for a in ds["against"].values:
        for o in ds["observable"].values:
            f = ds.sel(against=a, observable=o)
            say(f"relu: SGD vs {a:<5} E[{o}]: {float(f['order']):.3f} "
                f"[{float(f['order_low']):.3f}, {float(f['order_high']):.3f}]")
    say(f"relu: {time.perf_counter() - start:6.1f} s")
    return ds


MARKERS = {"GF": "o", "SME-1": "s", "SME-2": "D"}
NAMES = {"loss": "E[L]", "Q": "E[Q]"}
UNITS = {"loss": "nats; "}  # L: cross-entropy; Q: squared weights, no unit
GF_SOLVE = "Tsit5 (rtol 1e-10, atol 1e-12)"  # weak_order's default for a flow
SME_SOLVE = "SVAG Richardson (steps η and η/2)"


def _order_label(f, resamples) -> str:
    if not bool(f["resolved"]):
        return f"not resolved ({int(f['flips'])} sign flips in {resamples} resamples)"
    fit = " (fit with cη)" if f["model"].item() == "power+linear" else ""
    return (f"order {float(f['order']):.3f} [{float(f['order_low']):.3f}, "
            f"{float(f['order_high']):.3f}]{fit}")


def _gap_panels(fig, ds, title, note):
    axes = fig.subplots(1, ds.sizes["observable"])
    eta = ds["step_size"].values
    for ax, obs in zip(np.atleast_1d(axes), ds["observable"].values, strict=True):
        for i, a in enumerate(ds["against"].values):
            f = ds.sel(against=a, observable=obs)
            gap, se = np.abs(f["gap"].values), f["se"].values
            color, marker = f"C{i}", MARKERS.get(str(a), "^")
            ax.errorbar(eta, gap, yerr=2 * se, color=color, capsize=3,
                        label=f"vs {a}: {_order_label(f, ds.attrs['resamples'])}")
            faint = gap < 2 * se  # within the noise: hollow
            ax.plot(eta[~faint], gap[~faint], marker, color=color)
            ax.plot(eta[faint], gap[faint], marker, color=color, mfc="white")
        top = np.nanmax(np.abs(ds.sel(observable=obs)["gap"].values))
        for p, style, sym in ((1, "--", "η"), (2, ":", "η²")):
            ax.loglog(eta, top * (eta / eta[0]) ** p, color="0.5", ls=style, lw=1,
                      label=f"∝ {sym}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(eta, [f"1/{round(1 / e)}" for e in eta])
        ax.minorticks_off()
        ax.set_xlabel(f"learning rate η (t = kη, T = {ds.attrs['t1']:g})")
        ax.set_ylabel(f"|weak gap| of {NAMES.get(str(obs), obs)} "
                      f"({UNITS.get(str(obs), '')}± 2 s.e.)")
        ax.set_title(f"{title}: {NAMES.get(str(obs), obs)}")
        # Below the axes: error bars reach down to the axis at every η.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13))
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(note, fontsize=9)
    return fig


def _fig_orders(ds) -> Figure:
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    note = (f"SGD (batch {ds.attrs['batch_size']}, without replacement) on a 64-16-10 Tanh "
            f"MLP over {ds.attrs['examples']} digits, {ds.attrs['paths']:,} paths per η; 95% "
            f"paired-bootstrap intervals\nreferences: GF by {GF_SOLVE}, SME-1/2 by {SME_SOLVE}; "
            "control variate along GF; hollow markers: |gap| < 2 s.e.")
    return _gap_panels(fig, ds, "SGD vs GF, SME-1, SME-2", note)


def _fig_relu(ds) -> Figure:
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    how = (f"by {GF_SOLVE} with dyn.Filippov() (exact through the kinks)"
           if ds.attrs["filippov"]
           else "by Dopri5 (rtol 1e-6, atol 1e-8) through the kinks (not the exact mode)")
    note = (f"SGD (batch {ds.attrs['batch_size']}) on a 64-16-10 ReLU MLP over "
            f"{ds.attrs['examples']} digits, {ds.attrs['paths']:,} paths per η; 95% "
            f"paired-bootstrap intervals\nGF {how}; SME-1 by {SME_SOLVE}\n"
            "SME-1's theory assumes smooth per-example losses, which ReLU's are not")
    mode = "exact mode" if ds.attrs["filippov"] else "Dopri5"
    return _gap_panels(fig, ds, f"ReLU: SGD vs GF ({mode}), SME-1", note)


def _fig_batch(batch, orders) -> Figure:
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, orders.sizes["observable"])
    both = {16: orders.sel(step_size=1 / 16)} if 1 / 16 in orders["step_size"] else {}
    both.update({int(k[1:]): ds for k, ds in batch.items()})
    bs = np.asarray(sorted(both))
    for ax, obs in zip(axes, orders["observable"].values, strict=True):
        for i, a in enumerate(orders["against"].values):
            gap = np.asarray([abs(float(both[b]["gap"].sel(against=a, observable=obs)))
                              for b in bs])
            se = np.asarray([float(both[b]["se"].sel(against=a, observable=obs)) for b in bs])
            color, marker = f"C{i}", MARKERS.get(str(a), "^")
            ax.errorbar(bs, gap, yerr=2 * se, color=color, capsize=3, label=f"vs {a}")
            faint = gap < 2 * se  # within the noise: hollow
            ax.plot(bs[~faint], gap[~faint], marker, color=color)
            ax.plot(bs[faint], gap[faint], marker, color=color, mfc="white")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        ax.set_xlabel(f"batch size b (of {orders.attrs['examples']} examples)")
        ax.set_ylabel(f"|weak gap| of {NAMES.get(str(obs), obs)} at η = 1/16 "
                      f"({UNITS.get(str(obs), '')}± 2 s.e.)")
        ax.set_title(f"SGD at η = 1/16, T = 1: {NAMES.get(str(obs), obs)}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    paths = next(iter(batch.values())).attrs["paths"]
    fig.suptitle(f"Tanh 64-16-10; b = 16 from the orders run ({orders.attrs['paths']:,} "
                 f"paths), the others {paths:,} paths each; hollow markers: |gap| < 2 s.e.\n"
                 f"references: GF by {GF_SOLVE}, SME-1/2 by {SME_SOLVE}", fontsize=9)
    return fig


def _fig_noise_law(ds) -> Figure:
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    t = ds["time"].values
    m, se = ds["measured"].values, ds["measured_se"].values
    ax.fill_between(t, m - 2 * se, m + 2 * se, color="C0", alpha=0.3)
    ax.plot(t, m, color="C0", lw=2, label="SGD, measured mean (± 2 s.e.)")
    ax.plot(t, ds["law_full"], "k:", lw=2,
            label="law η Σ_k [⟨∇L, A∇L⟩ + c_b tr(AΣ₁)] (SME-2, SGD)")
    ax.plot(t, ds["law_noise"], "C3--", label="noise part η Σ_k c_b tr(AΣ₁) (SME-1 law)")
    ax.set_xlabel("flow time t = kη")
    ax.set_ylabel("E[Q(w_k) − Q(w_0)], Q = Σ_i Q_i")
    ax.set_title(f"ReLU 64-16-10, SGD η = {ds.attrs['eta']:g}, batch "
                 f"{ds.attrs['batch_size']}, {ds.attrs['paths']} paths")
    ax.text(0.02, 0.98, "exact per-step law on every path:\n|Q_{k+1} − Q_k − η²⟨ĝ_B, ĝ_B⟩_M| ≤ "
            f"{ds.attrs['exact_law_max_error']:.0e}", transform=ax.transAxes, va="top",
            fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    n = np.arange(ds.sizes["neuron"])
    bx.bar(n - 0.2, np.abs(ds["z_full"]), width=0.4, label="SGD − full law")
    bx.bar(n + 0.2, np.abs(ds["z_noise"]), width=0.4, color="C3", label="SGD − noise-only law")
    bx.axhline(1.96, color="k", lw=1, ls="--", label="95% (|z| = 1.96)")
    bx.set_yscale("log")
    bx.set_ylim(top=30 * float(np.max(np.abs(ds["z_noise"]))))  # room for the legend
    bx.set_xlabel("hidden neuron i")
    bx.set_ylabel("|z| of E[Q_i(w_K) − Q_i(w_0)] − law (Monte Carlo s.e.)")
    bx.set_title(f"per neuron at t = {t[-1]:g}")
    bx.legend(fontsize=8, loc="upper center", ncols=3)
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    require_x64("sgd-sme", quick, "weak gaps of 1e-4 over 10,000 paths")
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    start = time.perf_counter()
    orders = _orders(cfg)
    batch = _batch(cfg)
    law = _noise_law(cfg)
    relu = _relu(cfg)
    builders = {"orders": lambda: _fig_orders(orders), "noise_law": lambda: _fig_noise_law(law)}
    if batch:
        builders["batch"] = lambda: _fig_batch(batch, orders)
    if relu is not None:
        builders["relu"] = lambda: _fig_relu(relu)
    written = save_figures(figures, "sgd_sme", builders)
    nodes = {"/orders": orders, "/noise_law": law}
    nodes.update({f"/batch/{k}": ds for k, ds in batch.items()})
    if relu is not None:
        nodes["/relu"] = relu
    elapsed = time.perf_counter() - start
    say(f"sgd-sme: {elapsed:.0f} s")
    written["results"] = save_tree(nodes, results / "sgd_sme.nc", study="sgd-sme",
                                   quick=quick, seconds=elapsed)
    return written
