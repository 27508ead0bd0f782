"""Saul's weight-balancing flows (Saul 2023, TMLR, sec. 3; arXiv v1 sec. 3.3).

`dynamics run saul-flows --out .`. On a small ReLU regression network (teacher-student,
hidden biases frozen at zero, output bias by gradient flow, Corollary 3.5):

(a) the imbalance Q_i of eq. 17 under `WeightBalancingFlow(Lpq(p, q), λ)` for several
    (p, q): max_i |Q_i(t)| / max_i |Q_i(0)| against e^{−λt} (eq. 20);
(b) loss descent (Theorems 5–6): E(t) and L(t) = E + λR(t);
(c) the p = q = 1 flow Ẇ = −|W| ⊙ ∂L/∂W against exponentiated gradient descent
    W ← W exp(−η sign(W) ∂L/∂W) (Saul eq. 28) at step sizes η, time t = kη: the gap
    at t1 shrinks like O(η);
(d) gradient flow against gradient flow with `dyn.balance.MinNormFix` every Δt
    (loss and ‖W‖_{2,2}) at the study's tolerance, on the same teacher-student problem
    (initial weights ×0.7). Full mode: the ReLU student in the exact mode
    (`nonsmooth=dyn.Filippov()`, the fix applied inside the solve), since GF on it slides
    along kinks (a Filippov system) and a plain adaptive solver chatters there (at 1e-8
    the rebalanced run took over 100,000 Tsit5 steps to t = 3.4; the mode takes 624 steps
    and 220 switches to t = 10). Quick mode: a RePU(2) student (smooth homogeneous, no
    kinks), which keeps the quick run free of the mode's compilation;
(e) the "top-down" route (Tanaka & Kunin 2021): the Bregman Lagrangian flow
    `BregmanLagrangianFlow.mirror_limit(h, ε)` in ω = log|W| with h = R(sign(W) e^ω)
    is d/dt ∇h(ω + ε ω̇) = −∂L/∂ω; its massless limit ε → 0 is Saul's eq. 22, i.e.
    `WeightBalancingFlow`. Max relative gap in W against ε.

Writes `out/figures/saul_flows_*.png` and `out/results/saul_flows.nc`, an
`xarray.DataTree` with groups `/wbf_p{p}_q{q}` (each run's `Trajectory.to_xarray()`),
`/eg` (the EG loss curves and the gap against η), `/minnorm/{gf,gf_fix}` and `/bregman`
(gap against ε).
"""

import time
from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

from ._common import known_kinks

__all__ = ["run"]

LAM = 0.5
RTOL, ATOL = 1e-8, 1e-10
SOLVER_NOTE = f"Tsit5, PID rtol={RTOL:g}, atol={ATOL:g}"
DPI = 150


def _say(message: str) -> None:
    print(f"[saul-flows {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _problem(widths, key=0, bias=True, n=64, activation=None, scale=1.0):
    """A student (ReLU unless `activation`, initial weights ×`scale`) fitting a ReLU
    teacher (5, 8, 1) on n Gaussian inputs, MSE. Hidden biases zero (Theorem 4), output
    bias 0.1 (it moves by GF)."""
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    x = jax.random.normal(k1, (n, widths[0]))
    teacher = dyn.MLP((widths[0], 8, widths[-1]), dyn.ReLU(), bias=False, key=k2)
    y = jax.vmap(teacher)(x)
    model = dyn.MLP(widths, activation or dyn.ReLU(), bias=bias, key=k3)
    model = eqx.tree_at(lambda m: m.weights, model, tuple(scale * w for w in model.weights))
    if bias:
        biases = tuple(jnp.zeros_like(b) for b in model.biases[:-1]) + (
            jnp.full_like(model.biases[-1], 0.1),)
        model = eqx.tree_at(lambda m: m.biases, model, biases)

    # L = (1/2n) Σ‖f(x_i) − y_i‖², as the package's data loss: the exact mode of (d)
    # reads its switching surfaces from it.
    return model, dyn.losses.mse(dyn.datasets.Dataset(x, y))


def _controller():
    return diffrax.PIDController(rtol=RTOL, atol=ATOL)


# --- (a), (b): decay and descent --------------------------------------------------------


def _wbf_runs(model, loss, pqs, t1, n_save):
    ts = np.linspace(0.0, t1, n_save)
    runs = {}
    for p, q in pqs:
        reg = dyn.regularizers.Lpq(p, q)
        t = time.perf_counter()
        with known_kinks():  # the ReLU student at 1e-8: the figure states it
            runs[(p, q)] = dyn.simulate(
                dyn.WeightBalancingFlow(reg, LAM), model, loss, t1=t1, ts=ts,
                stepsize_controller=_controller(),
                monitors=[dyn.monitors.Loss(), dyn.monitors.Energy(),
                          dyn.monitors.Imbalance(reg), dyn.monitors.LpqNorm(p, q)],
                save_params=False)
        _say(f"WBF p={p:g} q={q:g}: {time.perf_counter() - t:.1f}s, "
             f"{runs[(p, q)].stats.get('num_accepted_steps')} steps")
    return runs


# --- (c): exponentiated gradient ---------------------------------------------------------


def _eg_runner(model, loss, n_max):
    """Saul eq. 28 on L = E + λ Σ|W|, output bias by plain gradient descent, hidden
    biases fixed: `n` steps of size `eta` in a `lax.fori_loop` (both traced, so every η
    shares one compilation), recording L before each step."""
    w0, static = eqx.partition(model, eqx.is_inexact_array)
    reg = dyn.regularizers.Lpq(1.0, 1.0)

    def total(w):
        return loss(eqx.combine(w, static)) + LAM * reg(w.weights)

    @jax.jit
    def eg(eta, n):
        def step(i, carry):
            w, values = carry
            value, g = jax.value_and_grad(total)(w)
            weights = tuple(a * jnp.exp(-eta * jnp.sign(a) * ga)
                            for a, ga in zip(w.weights, g.weights))
            biases = w.biases[:-1] + (w.biases[-1] - eta * g.biases[-1],)
            w = eqx.tree_at(lambda m: (m.weights, m.biases), w, (weights, biases))
            return w, values.at[i].set(value)

        return jax.lax.fori_loop(0, n, step, (w0, jnp.full(n_max, jnp.nan)))

    def run(eta, n):
        w, values = eg(jnp.asarray(eta), jnp.asarray(n))
        return eqx.combine(w, static), np.asarray(values)[:n]

    return run


def _eg_study(model, loss, flow, t1, etas):
    """EG at each η against the p = q = 1 flow `flow` (a trajectory) at t1."""
    ref = np.concatenate([np.ravel(a) for a in flow.final_params.weights])
    steps = [int(round(t1 / eta)) for eta in etas]
    eg = _eg_runner(model, loss, max(steps))
    curves, gaps = {}, []
    for eta, n in zip(etas, steps):
        final, values = eg(eta, n)
        got = np.concatenate([np.ravel(np.asarray(a)) for a in final.weights])
        gaps.append(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        curves[eta] = (eta * np.arange(n), values)
        _say(f"EG eta={eta:g}: {n} steps, gap to the flow at t1 {gaps[-1]:.2e}")
    return curves, np.asarray(gaps)


# --- (d): GF against GF with MinNormFix every Δt -----------------------------------------


def _minnorm_study(widths, t1, dt, exact: bool):
    """GF and GF with MinNormFix(2, 2) every Δt (see (d) above): the ReLU student in the
    exact mode with the fix inside the solve (`exact`), or the RePU(2) student, where at
    rtol 1e-8 both runs take ~130 Tsit5 steps to t = 10."""
    model, loss = _problem(widths, activation=None if exact else dyn.RePU(2), scale=0.7)
    kw = dict(t1=t1, ts=np.linspace(0.0, t1, 101), solver=diffrax.Tsit5(), save_params=False,
              stepsize_controller=_controller(),
              monitors=[dyn.monitors.Loss(), dyn.monitors.LpqNorm(2, 2)])
    if exact:
        kw["nonsmooth"] = dyn.Filippov()
    fixed = dyn.simulate(dyn.GradientFlow(), model, loss,
                         projection=dyn.Every(dyn.balance.MinNormFix(2, 2), time=dt), **kw)
    plain = dyn.simulate(dyn.GradientFlow(), model, loss, **kw)
    return {"gf": plain, "gf_fix": fixed}


# --- (e): Bregman Lagrangian, massless limit ---------------------------------------------


def _bregman_study(p, q, t1, epsilons):
    model, loss = _problem((5, 4, 1), key=1, bias=False, n=32)
    reg = dyn.regularizers.Lpq(p, q)
    flow_wbf = dyn.WeightBalancingFlow(reg, LAM)
    ts = np.linspace(0.0, t1, 21)
    with known_kinks():  # ReLU student; the gap plotted is far above its tolerance
        wbf = dyn.simulate(flow_wbf, model, loss, t1=t1, ts=ts,
                           stepsize_controller=_controller())
    signs = tuple(jnp.sign(a) for a in model.weights)

    def weights(omega):
        return tuple(s * jnp.exp(o) for s, o in zip(signs, omega))

    def h(omega):  # the regularizer in ω = log|W|: its Hessian is Saul's H(ω)
        return reg(weights(omega))

    def loss_omega(omega):  # L = E + λR as a function of ω
        return loss(eqx.tree_at(lambda m: m.weights, model, weights(omega))) + LAM * h(omega)

    omega0 = tuple(jnp.log(jnp.abs(a)) for a in model.weights)
    # Start on the slow manifold: ω̇(0) of the weight-balancing flow (eq. 24).
    w0, static = eqx.partition(model, eqx.is_inexact_array)
    wdot0 = flow_wbf.vector_field(0.0, w0, lambda w: loss(eqx.combine(w, static)))
    v0 = tuple(d / a for d, a in zip(wdot0.weights, model.weights))
    ref = np.stack([np.concatenate([np.ravel(a[i]) for a in wbf.params.weights])
                    for i in range(len(ts))])
    gaps = []
    for eps in epsilons:
        traj = dyn.simulate(dyn.BregmanLagrangianFlow.mirror_limit(h, eps), omega0,
                            loss_omega, t1=t1, ts=ts, v0=v0, stepsize_controller=_controller())
        got = np.stack([np.concatenate([np.ravel(s * np.exp(o[i])) for s, o in
                                        zip(signs, traj.params)]) for i in range(len(ts))])
        gaps.append(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        _say(f"Bregman eps={eps:g}: max relative gap to WBF {gaps[-1]:.2e}")
    return np.asarray(gaps)


# --- figures -----------------------------------------------------------------------------


def _savefig(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _fig_decay(runs) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for (p, q), tr in runs.items():
        qt = np.max(np.abs(tr.monitors["imbalance"]), axis=1)
        line, = ax1.semilogy(tr.ts, qt / qt[0], label=f"p={p:g}, q={q:g}")
        ax2.plot(tr.ts, tr.monitors["energy"], color=line.get_color(),
                 label=f"L = E + λR, p={p:g}, q={q:g}")
        ax2.plot(tr.ts, tr.monitors["loss"], color=line.get_color(), ls=":")
    t = next(iter(runs.values())).ts
    ax1.semilogy(t, np.exp(-LAM * t), "k--", lw=1, label=r"$e^{-\lambda t}$ (eq. 20)")
    ax1.set(xlabel="time t (flow units)", ylabel=r"$\max_i|Q_i(t)| / \max_i|Q_i(0)|$",
            title=f"(a) imbalance decay, λ = {LAM:g}")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set(xlabel="time t (flow units)", ylabel="loss (MSE, dimensionless)",
            title="(b) descent: L solid, E dotted")
    ax2.legend(fontsize=8)
    fig.suptitle(f"WeightBalancingFlow(Lpq(p, q), λ) on a ReLU 5-12-12-1 net; {SOLVER_NOTE}",
                 fontsize=9)
    return fig


def _fig_eg(flow, curves, etas, gaps) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(flow.ts, flow.monitors["energy"], "k", lw=2, label="flow Ẇ = −|W|⊙∂L/∂W")
    for eta, (t, values) in curves.items():
        ax1.plot(t, values, ls="--", label=f"EG, η = {eta:g}")
    ax1.set_yscale("log")
    ax1.set(xlabel="time t = kη", ylabel="L = E + λ‖W‖₁,₁",
            title="(c) p = q = 1 flow vs exponentiated gradient (eq. 28)")
    ax1.legend(fontsize=8)
    ax2.loglog(etas, gaps, "o-", label="max |W_EG − W_flow| / max |W_flow| at t1")
    ax2.loglog(etas, gaps[0] * np.asarray(etas) / etas[0], "k--", lw=1, label="slope 1")
    ax2.set(xlabel="step size η", ylabel="relative gap at t1",
            title="EG converges to the flow at first order")
    ax2.legend(fontsize=8)
    fig.suptitle(f"λ = {LAM:g}; flow by {SOLVER_NOTE}", fontsize=9)
    return fig


def _fig_minnorm(runs, dt, widths, exact: bool) -> Figure:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, label in (("gf", "GF"), ("gf_fix", f"GF + MinNormFix(2,2) every Δt={dt:g}")):
        tr = runs[name]
        ax1.plot(tr.ts, tr.monitors["loss"], label=label)
        ax2.plot(tr.ts, tr.monitors["lpq_norm"], label=label)
    ax1.set_yscale("log")
    ax1.set(xlabel="time t", ylabel="loss E (MSE)", title="(d) loss")
    ax2.set(xlabel="time t", ylabel="‖W‖₂,₂", title="(d) weight norm")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    net = "-".join(map(str, widths))
    student = (f"ReLU {net} student, exact (Filippov) mode, the fix inside the solve"
               if exact else f"RePU(2) {net} student (quick mode: smooth, no kinks)")
    fig.suptitle(f"gradient flow with and without the min-norm fix; {student}; "
                 f"{SOLVER_NOTE}", fontsize=9)
    return fig


def _fig_bregman(p, q, epsilons, gaps) -> Figure:
    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.loglog(epsilons, gaps, "o-", label="Bregman (mirror_limit) vs WBF")
    ax.loglog(epsilons, gaps[0] * np.asarray(epsilons) / epsilons[0], "k--", lw=1,
              label="slope 1")
    ax.set(xlabel=r"mass ε = $e^{-\alpha}$", ylabel="max relative gap in W over t ∈ [0, t1]",
           title=f"(e) massless limit → WeightBalancingFlow, p={p:g}, q={q:g}")
    ax.legend(fontsize=8)
    fig.suptitle(f"ReLU 5-4-1 net, λ = {LAM:g}; {SOLVER_NOTE}", fontsize=9)
    return fig


# --- the study ---------------------------------------------------------------------------


def run(out: Path, quick: bool = False) -> dict:
    """Run the study; figures to out/figures, results to out/results/saul_flows.nc."""
    matplotlib.use("Agg")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    widths = (5, 12, 12, 1)
    model, loss = _problem(widths)
    pqs = [(2.0, 2.0), (1.0, 1.0)] if quick else [(2.0, 2.0), (1.0, 1.0), (2.0, 1.0),
                                                   (1.0, 2.0)]
    t1 = 4.0 if quick else 10.0
    runs = _wbf_runs(model, loss, pqs, t1, 21 if quick else 101)
    etas = [0.1, 0.05] if quick else [0.1, 0.05, 0.025, 0.0125]
    eg_flow = runs[(1.0, 1.0)]
    curves, gaps = _eg_study(model, loss, eg_flow, t1, etas)
    dt = 1.0
    mn_runs = _minnorm_study(widths, t1, dt, exact=not quick)
    epsilons = [0.2, 0.1] if quick else [0.2, 0.1, 0.05]
    bp, bq = 1.0, 2.0
    # t1 = 1 in both modes: with t1 = 3 the WBF reference solve on this tiny ReLU net
    # exceeded max_steps (not investigated; a ReLU kink is the likely cause).
    bgaps = _bregman_study(bp, bq, 1.0, epsilons)

    figures = out / "figures"
    paths = [
        _savefig(_fig_decay(runs), figures / "saul_flows_decay.png"),
        _savefig(_fig_eg(eg_flow, curves, etas, gaps), figures / "saul_flows_eg.png"),
        _savefig(_fig_minnorm(mn_runs, dt, widths, exact=not quick),
                 figures / "saul_flows_minnorm.png"),
        _savefig(_fig_bregman(bp, bq, epsilons, bgaps), figures / "saul_flows_bregman.png"),
    ]

    nodes = {"/": xr.Dataset(attrs={"study": "saul-flows", "quick": int(quick), "lam": LAM,
                                    "widths": list(widths), "solver": SOLVER_NOTE,
                                    "minnorm_activation": "RePU(2)" if quick else
                                    "ReLU, nonsmooth=dyn.Filippov()"})}
    for (p, q), tr in runs.items():
        nodes[f"/wbf_p{p:g}_q{q:g}".replace(".", "_")] = tr.to_xarray()
    eg = xr.Dataset({"gap": ("eta", gaps)}, coords={"eta": etas})
    for eta, (t, values) in curves.items():
        eg[f"loss_eta_{eta:g}".replace(".", "_")] = (f"step_{eta:g}".replace(".", "_"), values)
    nodes["/eg"] = eg
    for name, tr in mn_runs.items():
        nodes[f"/minnorm/{name}"] = tr.to_xarray()
    nodes["/bregman"] = xr.Dataset({"gap": ("eps", bgaps)}, coords={"eps": epsilons},
                                   attrs={"p": bp, "q": bq})
    results = dyn.save(xr.DataTree.from_dict(nodes), out / "results" / "saul_flows.nc")
    decay = {f"p{p:g}_q{q:g}": float(
        np.max(np.abs(tr.monitors["imbalance"][-1] - tr.monitors["imbalance"][0]
                      * np.exp(-LAM * tr.ts[-1]))) / np.max(np.abs(tr.monitors["imbalance"][0])))
        for (p, q), tr in runs.items()}
    _say(f"decay-law error (relative, at t1): {decay}")
    return {"figures": paths, "results": results, "decay_error": decay,
            "eg_gaps": dict(zip(etas, gaps.tolist())),
            "bregman_gaps": dict(zip(epsilons, bgaps.tolist()))}
