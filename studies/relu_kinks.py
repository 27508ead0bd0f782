"""ReLU kinks: gradient flow through crossings and sliding modes, with and without Filippov.

Gradient flow on a ReLU network is a Filippov system: the gradient jumps across the
surfaces z_{n,i} = 0 and the solution may slide along them. A plain adaptive solve
chatters there; `simulate(..., nonsmooth=dyn.Filippov())` freezes the activation
pattern between events, root-finds the crossings and slides exactly.

(a) Work-precision: final-state error against wall time, for Tsit5, Dopri5 and Dopri8
    with the mode (solid) and without it (dashed), over rtol = atol = 1e-6 … 1e-12
    (a run without the mode that exceeds its step budget is marked as not finished).
    The reference is the tightest run with the mode (Dopri8 at 1e-12).
(b) Steps and rejected steps against the tolerance.
(c) The time line of the reference run: which pairs slide when, and the cumulative
    crossings.
(d) Drift of the per-neuron rescaling charges against the tolerance: with the mode they
    follow the tolerance (exact invariants of every piece and of the sliding field).

Networks: the 5-7-6-3 ReLU network with biases on 40 Gaussian inputs with a teacher's
labels (t ≤ 3), and in the full run a 64-32-32-10 MLP on 256 digits (t ≤ 1).
Writes `out/figures/relu_kinks_{work_precision,steps,timeline,charges}.png` and
`out/results/relu_kinks.nc`.
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

from ._common import folders

__all__ = ["run"]

SOLVERS = {"Tsit5": diffrax.Tsit5, "Dopri5": diffrax.Dopri5, "Dopri8": diffrax.Dopri8}
FULL = {"problems": ("5-7-6-3", "digits"), "solvers": ("Tsit5", "Dopri5", "Dopri8"),
        "tols": (1e-6, 1e-8, 1e-10, 1e-12), "plain_tols": (1e-6, 1e-8),
        "max_steps": 30_000, "warmup": True}
# Quick: no separate compile call, so its wall times include compilation (said on
# the figure); the counts, errors and drifts are those of the full run's cases.
QUICK = {"problems": ("5-7-6-3",), "solvers": ("Dopri5",), "tols": (1e-6, 1e-8),
         "plain_tols": (1e-6,), "max_steps": 5_000, "warmup": False}
T1 = {"5-7-6-3": 3.0, "digits": 1.0}
DPI = 120


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _problem(name: str):
    if name == "5-7-6-3":
        kx, km = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (40, 5))
        teacher = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), key=jax.random.key(7))
        model = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), key=km)
        return model, dyn.losses.mse(dyn.datasets.Dataset(x, jax.vmap(teacher)(x)))
    data = dyn.datasets.digits(256)
    model = dyn.MLP((64, 32, 32, 10), activation=dyn.ReLU(), key=jax.random.key(0))
    return model, dyn.losses.cross_entropy(data)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def _solve(model, loss, t1, solver, tol, exact, max_steps):
    ts = jnp.linspace(0.0, t1, 61)
    kw = dict(t1=t1, solver=SOLVERS[solver](), ts=ts, max_steps=max_steps, throw=False,
              stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
              monitors=dyn.monitors.RescalingCharges())
    if exact:
        kw["nonsmooth"] = dyn.Filippov()
    import warnings
    with warnings.catch_warnings():  # the chattering warning is what (a) shows
        warnings.simplefilter("ignore", dyn.ChatteringWarning)
        start = time.perf_counter()
        traj = dyn.simulate(dyn.GradientFlow(), model, loss, **kw)
        wall = time.perf_counter() - start
    return traj, wall


def _runs(name: str, cfg) -> tuple[xr.Dataset, dyn.Trajectory]:
    model, loss = _problem(name)
    t1 = T1[name]
    plan = [(s, tol, True) for s in cfg["solvers"] for tol in cfg["tols"]
            if not (tol < 1e-10 and s != "Dopri8")]
    plan += [(s, tol, False) for s in cfg["solvers"] for tol in cfg["plain_tols"]]
    rows, trajs = [], {}
    for solver, tol, exact in plan:
        # The first call of each (solver, mode) compiles; tolerances and t1 are traced,
        # so a call over 1% of the horizon compiles what the timed call below reuses
        # (a warm-up over the whole horizon cost a full solve: 5.7 min on the digits).
        if cfg["warmup"] and (solver, exact) not in trajs:
            _solve(model, loss, 0.01 * t1, solver, cfg["tols"][0], exact, cfg["max_steps"])
        traj, wall = _solve(model, loss, t1, solver, tol, exact, cfg["max_steps"])
        trajs[(solver, exact)] = traj
        trajs[(solver, tol, exact)] = traj
        q = np.asarray(traj.monitors["rescaling_charges"])
        done = traj.success and traj.t_final >= t1
        rows.append(dict(solver=solver, tol=tol, exact=int(exact), finished=int(done),
                         wall=wall, steps=traj.stats["num_steps"],
                         rejected=traj.stats["num_rejected_steps"],
                         crossings=int(traj.monitors["crossings"][-1]) if exact else -1,
                         charge_drift=float(np.max(np.abs(q - q[0])) / np.max(np.abs(q[0]))),
                         final=_flat(traj.final_params)))
        _say(f"{name} {solver} tol={tol:g} {'filippov' if exact else 'plain'}: "
             f"{rows[-1]['steps']} steps ({rows[-1]['rejected']} rejected), {wall:.2f} s"
             + ("" if done else " (did not finish)"))
    best = min((r for r in rows if r["exact"]), key=lambda r: (r["tol"], r["solver"] != "Dopri8"))
    ref_traj = trajs[(best["solver"], best["tol"], True)]
    ds = xr.Dataset(
        {k: ("run", np.asarray([r[k] for r in rows])) for k in
         ("solver", "tol", "exact", "finished", "wall", "steps", "rejected", "crossings",
          "charge_drift")},
        attrs={"problem": name, "t1": t1, "reference": f"{best['solver']} at {best['tol']:g}",
               "max_steps": cfg["max_steps"],
               "timing": "compile excluded" if cfg["warmup"] else
               "quick mode: the first run of each solver includes compilation"},
    )
    err = [np.max(np.abs(r["final"] - best["final"])) if r["finished"] else np.nan
           for r in rows]
    ds["error"] = ("run", np.asarray(err))
    return ds, ref_traj


def _figure(items: dict, path, draw, width: float = 5.2) -> None:
    """One panel per item, side by side: draw(ax, name, item)."""
    fig = Figure(figsize=(width * len(items), 4.2))
    for ax, (name, item) in zip(fig.subplots(1, len(items), squeeze=False)[0],
                                items.items(), strict=True):
        draw(ax, name, item)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def _series(ds, keep=True):
    """(runs, line style, colour, label) for each solver with and without the mode."""
    for j, solver in enumerate(dict.fromkeys(ds.solver.values)):
        for exact, style in ((1, "-o"), (0, "--x")):
            sel = (ds.solver == solver) & (ds.exact == exact) & keep
            if int(sel.sum()):
                yield sel, style, f"C{j}", f"{solver} {'Filippov' if exact else 'plain'}"


def _draw_work_precision(ax, name, ds):
    for sel, style, color, label in _series(ds, (ds.finished == 1) & (ds.error > 0)):
        ax.loglog(ds.wall[sel], ds.error[sel], style, color=color, label=label)
    # Runs that hit the step budget have no final state: drawn at the top edge, at the
    # wall time they spent before giving up.
    for sel, _, color, label in _series(ds, ds.finished == 0):
        ax.plot(ds.wall[sel], np.full(int(sel.sum()), 0.97), "^", mfc="none", color=color,
                transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{label}: not finished (tol " + ", ".join(
                    f"{t:g}" for t in ds.tol[sel].values) + ")")
    ax.set_xlabel(f"wall time of the solve [s]\n({ds.attrs['timing']})", fontsize=9)
    ax.set_ylabel("final-state error, max |w − w_ref|")
    tols = ", ".join(f"{t:g}" for t in sorted(set(ds.tol.values.tolist()), reverse=True))
    ax.set_title(f"{name}: GF, reference {ds.attrs['reference']}\nrtol = atol = {tols}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no room inside


def _tolerance_axis(ax, ylabel: str, title: str) -> None:
    """Finish a panel against the tolerance (tightest on the right)."""
    ax.invert_xaxis()
    ax.set_xlabel("rtol = atol")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _draw_steps(ax, name, ds):
    for sel, style, color, label in _series(ds):
        ax.loglog(ds.tol[sel], ds.steps[sel], style, color=color, label=label)
        ax.loglog(ds.tol[sel], np.maximum(ds.rejected[sel], 1), style, color=color,
                  alpha=0.35)
    _tolerance_axis(ax, "steps (faint: rejected steps)",
                    f"{name}: steps to t = {ds.attrs['t1']:g} "
                    f"(budget {int(ds.attrs.get('max_steps', 0)):,})")


def _timeline(traj, run: str) -> xr.Dataset:
    pairs = np.asarray(traj.monitors["sliding_pairs"])
    return xr.Dataset({"sliding_pairs": (("time", "slot"), pairs),
                       "crossings": ("time", np.asarray(traj.monitors["crossings"]))},
                      coords={"time": traj.ts}, attrs={"run": run})


def _draw_timeline(ax, name, tl):
    t, pairs = tl.time.values, tl.sliding_pairs.values
    ids = sorted({int(p) for p in pairs.ravel() if p >= 0})
    for row, p in enumerate(ids):
        on = (pairs == p).any(axis=1)
        ax.plot(t[on], np.full(on.sum(), row), "s", ms=3, color="C3")
    ax.set_yticks(range(len(ids)), [str(p) for p in ids], fontsize=6)
    ax.set_xlabel("time t of gradient flow (dimensionless)")
    ax.set_ylabel("sliding pair (flat index)")
    ax.text(0.02, 0.98, f"{tl.attrs['run']}, Filippov mode", transform=ax.transAxes,
            fontsize=7, va="top")
    ax.set_title(f"{name}: sliding pairs at the saves; crossings (right)", fontsize=9)
    twin = ax.twinx()
    twin.plot(t, tl.crossings.values, color="C0", label="cumulative crossings")
    twin.set_ylabel("crossings so far")
    twin.legend(fontsize=8, loc="lower right")


def _draw_charges(ax, name, ds):
    for sel, style, color, label in _series(ds, ds.finished == 1):
        ax.loglog(ds.tol[sel], ds.charge_drift[sel], style, color=color, label=label)
    tols = np.sort(np.unique(ds.tol.values))
    ax.loglog(tols, tols, ":", color="gray", label="drift = tolerance")
    _tolerance_axis(ax, "max |Q_i(t) − Q_i(0)| / max |Q_i(0)|",
                    f"{name}: per-neuron charge drift of GF")


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    tables, timelines = {}, {}
    for name in cfg["problems"]:
        tables[name], ref = _runs(name, cfg)
        timelines[name] = _timeline(ref, tables[name].attrs["reference"].replace(
            " at ", ", rtol = atol = "))
    written = {}
    for key, draw, items, width in (("work_precision", _draw_work_precision, tables, 7.6),
                                    ("steps", _draw_steps, tables, 5.2),
                                    ("timeline", _draw_timeline, timelines, 5.2),
                                    ("charges", _draw_charges, tables, 5.2)):
        path = figures / f"relu_kinks_{key}.png"
        _figure(items, path, draw, width)
        written[key] = path
    nodes = {"/": xr.Dataset(attrs={"study": "relu-kinks", "quick": int(quick)})}
    for name in tables:
        nodes[f"/{name}/runs"] = tables[name]
        nodes[f"/{name}/timeline"] = timelines[name]
    written["results"] = dyn.save(xr.DataTree.from_dict(nodes), results / "relu_kinks.nc")
    return written
