"""Solvers at equal accuracy: the wall time each library's best method needs to reach a
final-state error of 1e-4, 1e-6, 1e-8, from work-precision curves (`dyn.work_precision`).

Problem: gradient flow w' = -grad L(w) of an MLP 64-128-128-10 (biases, 26122 parameters)
on all 1797 digits with cross-entropy, t in [0, T], float64 on the CPU, `--activation
tanh` (smooth) or `relu` (piecewise smooth: a Filippov system whose kinks cost adaptive
solvers their order, see below).

- `dynamics`: `dyn.simulate` with diffrax's Bosh3, Tsit5, Dopri5 and Dopri8 under
  `PIDController(rtol=tol, atol=tol)`, timed as the whole call (validation, solve,
  Trajectory);
- scipy: `solve_ivp` with RK45, DOP853 and LSODA on the flat parameter vector, the
  right-hand side one jitted JAX gradient, BLAS limited to one thread (on this 2-core
  machine numpy's spinning BLAS threads fight XLA's; see bench_tsit5.py);
- torchdiffeq: `odeint` with dopri5, dopri8 and bosh3 on the same MLP written in torch
  (same weights and data, gradient by `torch.autograd.grad`), with whichever of 1 or all
  threads evaluates the field faster here (`--torch-threads` to fix it): on this shared
  2-core machine, under load, torch's spinning OpenMP threads made 2 threads 5x slower
  than 1.

With `--activation relu`, `dynamics` also runs Dopri5 and Dopri8 in the exact
piecewise-smooth mode (`dyn.NonsmoothMethod(solver, dyn.Filippov())`: the activation
pattern frozen between located crossings, Filippov's sliding field on the kinks), and the
reference is Dopri8 in that mode; `--max-steps` gives every run a step budget (plain
solvers chatter on the kinks at tight tolerances and would run for hours; a run out of
budget has not reached its tolerance). The mode's cost grows with examples × hidden units
(docs/benchmarks.md), so the ReLU comparison uses a smaller net (`--widths 64-16-10
--examples 256`).

Each method runs over the tolerances 10^-3 ... 10^-tmax (`--tmax`); its error is the max
norm of w(T) against a reference (Dopri8 through `simulate` at rtol = atol = `--ref-tol`;
its own accuracy is estimated against the same at a ten times looser tolerance and printed).
The time a method needs for a target error is read off its (error, time) curve by linear
interpolation in log-log between the two tolerances that bracket the target (the first
crossing from the loose end); a method that never gets below the target is "not reached".
Targets: `dynamics`' best >= 1.5x faster than scipy's best and >= 1x torchdiffeq's best at
every accuracy both reach. Each timed run repeats a solve back to back for at least
`--min-time` (0.2 s: runs of 3-15 ms are otherwise inside the noise) and reports the mean
per solve; a setting's time is the minimum over `--wp-repeats` such runs, one method
after another. The whole comparison runs `--runs` times (5) and the speedups are
reported as the median with the spread (min, max) over them.
"""

import os

import diffrax
import jax
import numpy as np
import torch
import xarray as xr
from _common import compare, digits_problem, num_params, parse_args, save, summary
from bench_tsit5 import torch_problem
from threadpoolctl import threadpool_limits

import dynamics as dyn

TARGETS = (1e-4, 1e-6, 1e-8)
FAMILIES = {
    "dynamics": ("Bosh3", "Tsit5", "Dopri5", "Dopri8", "Dopri5 Filippov", "Dopri8 Filippov"),
    "scipy": ("scipy RK45", "scipy DOP853", "scipy LSODA"),
    "torchdiffeq": ("torch dopri5", "torch dopri8", "torch bosh3"),
}


def time_at(errors, times, target):
    """Wall time at `target` error by log-log interpolation between the first pair of
    consecutive tolerances whose errors bracket it (errors ordered loose to tight);
    NaN if the curve never gets there, the first point's time if it starts below."""
    errors, times = np.asarray(errors, float), np.asarray(times, float)
    ok = np.isfinite(errors) & np.isfinite(times) & (errors > 0)
    errors, times = errors[ok], times[ok]
    if errors.size == 0 or errors.min() > target:
        return np.nan
    if errors[0] <= target:
        return float(times[0])  # an upper bound: even the loosest tolerance is that accurate
    for k in range(errors.size - 1):
        if errors[k] > target >= errors[k + 1]:
            x = (np.log(target) - np.log(errors[k])) / (np.log(errors[k + 1]) - np.log(errors[k]))
            return float(np.exp(np.log(times[k]) + x * (np.log(times[k + 1]) - np.log(times[k]))))
    return np.nan


def torch_field(model, data, activation):
    """The GF field in torch on the state as `jax.tree.leaves(model)` orders it (the
    weights, then the biases), as a torchdiffeq user would write it."""
    params, loss = torch_problem(model, data, activation)
    n = len(model.weights)

    def field(t, state):
        # torch_problem's loss takes (W0, b0, W1, b1, ...); the state is (W0..Wn, b0..bn).
        ps = tuple(p for k in range(n) for p in (state[k], state[n + k]))
        with torch.enable_grad():
            ps = tuple(p.detach().requires_grad_() for p in ps)
            grads = torch.autograd.grad(loss(ps), ps)
        return tuple(-grads[2 * k] for k in range(n)) + tuple(-grads[2 * k + 1]
                                                             for k in range(n))

    return field


def main():
    args = parse_args(__doc__, repeat=5, t1=(float, 2.0, "end time T"),
                      activation=(str, "tanh", "hidden activation: tanh or relu"),
                      examples=(int, 1797, "how many digits (the first ones)"),
                      widths=(str, "64-128-128-10", "MLP widths"),
                      max_steps=(int, 0, "step budget per run (0: none)"),
                      tmax=(int, 11, "tightest tolerance 10^-tmax"),
                      ref_tol=(float, 1e-13, "reference Dopri8 rtol = atol"),
                      wp_repeats=(int, 3, "timed runs per tolerance (minimum kept)"),
                      min_time=(float, 0.2, "each timed run repeats a solve for >= this (s)"),
                      runs=(int, 5, "independent comparisons; medians and spread reported"),
                      torch_threads=(int, 0, "torch threads (0: the faster of 1 and all)"))
    torch.set_default_dtype(torch.float64)
    widths = tuple(int(w) for w in args.widths.split("-"))
    relu = args.activation == "relu"
    model, loss, data = digits_problem(widths, activation=args.activation,
                                       examples=args.examples)
    field = torch_field(model, data, args.activation)
    state = tuple(torch.tensor(np.asarray(x)) for x in jax.tree.leaves(model))
    per_eval = {}
    for threads in ([args.torch_threads] if args.torch_threads else [1, os.cpu_count()]):
        torch.set_num_threads(threads)
        per_eval[threads] = compare({"field": lambda: field(0.0, state)}, 7)["field"]["median"]
    torch.set_num_threads(min(per_eval, key=per_eval.get))
    print("torch field per evaluation: " + ", ".join(
        f"{k} threads {v * 1e3:.1f} ms" for k, v in per_eval.items()), flush=True)
    t1, flow = args.t1, dyn.GradientFlow()
    tolerances = [10.0 ** -k for k in range(3, args.tmax + 1)]

    def reference(tol):
        # ReLU: in the Filippov mode (plain adaptive Dopri8 chatters and does not finish)
        traj = dyn.simulate(flow, model, loss, t1=t1, solver=diffrax.Dopri8(),
                            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
                            save_params=False, max_steps=None,
                            nonsmooth=dyn.Filippov() if relu else None)
        leaves = jax.tree.leaves(traj.final_params)
        return np.concatenate([np.ravel(np.asarray(x)) for x in leaves]), traj.stats

    exact, ref_stats = reference(args.ref_tol)
    looser, _ = reference(10 * args.ref_tol)
    ref_error = float(np.max(np.abs(looser - exact)))
    print(f"{num_params(model)} parameters, {args.examples} examples, {args.activation}, "
          f"T = {t1}; reference Dopri8 at {args.ref_tol:.0e} ({ref_stats['num_accepted_steps']} "
          f"steps), against {10 * args.ref_tol:.0e}: {ref_error:.1e}", flush=True)

    common = dict(t1=t1, tolerances=tolerances, reference=lambda _: exact,
                  repeats=args.wp_repeats, min_time=args.min_time,
                  max_steps=args.max_steps or None, progress=False)
    runs = [compare_once(flow, model, loss, field, relu, common, tolerances)
            for _ in range(args.runs)]
    ds, at, evals, best, speedups = runs[-1]
    spread = {key: {f: summary([r[4][key][f] for r in runs]) for f in ("scipy", "torchdiffeq")}
              for key in speedups}
    for key, by in spread.items():
        print(f"error {key}, {args.runs} runs: speedup vs scipy median "
              f"{by['scipy']['median']:.2f}x [{by['scipy']['min']:.2f}, {by['scipy']['max']:.2f}]"
              f", vs torchdiffeq median {by['torchdiffeq']['median']:.2f}x "
              f"[{by['torchdiffeq']['min']:.2f}, {by['torchdiffeq']['max']:.2f}]")
    save(f"equal_accuracy_{args.dtype}_{args.activation}", {
        "activation": args.activation, "examples": args.examples, "t1": t1,
        "widths": args.widths, "max_steps": args.max_steps,
        "num_params": num_params(model), "tolerances": tolerances,
        "reference": {"tol": args.ref_tol, "steps": ref_stats["num_accepted_steps"],
                      "error_vs_10x_looser": ref_error},
        "torch_threads": torch.get_num_threads(), "torch_seconds_per_eval": per_eval,
        "wp_repeats": args.wp_repeats, "min_time": args.min_time, "runs": args.runs,
        "curves": {str(n): {v: ds[v].sel(solver=n).values.tolist()
                            for v in ("error", "wall_time", "grad_evals")}
                   for n in ds.solver.values},
        "compile_time": dict(zip(map(str, ds.solver.values), ds.compile_time.values.tolist(),
                                 strict=True)),
        "time_at_error": at, "evals_at_error": evals, "best": best,
        "speedups_last_run": speedups, "speedups": spread,
    }, args.out)
    ds.to_netcdf(args.out / f"equal_accuracy_{args.dtype}_{args.activation}.nc")


def compare_once(flow, model, loss, field, relu, common, tolerances):
    """One comparison of the three families: (dataset, time at each target error, gradient
    evaluations there, each family's best, speedups of ours against the others)."""
    # Bosh3 too: at loose accuracy a third-order method needs the fewest gradients (as
    # torchdiffeq's bosh3 and scipy's LSODA do among theirs)
    methods = {"Bosh3": diffrax.Bosh3(), "Tsit5": diffrax.Tsit5(), "Dopri5": diffrax.Dopri5(),
               "Dopri8": diffrax.Dopri8()}
    if relu:
        methods.update({f"{n} Filippov": dyn.NonsmoothMethod(s, dyn.Filippov())
                        for n, s in (("Dopri5", diffrax.Dopri5()), ("Dopri8", diffrax.Dopri8()))})
    ours = dyn.work_precision(flow, model, loss, methods, **common)
    with threadpool_limits(limits=1, user_api="blas"):
        scipy = dyn.work_precision(flow, model, loss, {
            f"scipy {m}": dyn.ScipyMethod(m) for m in ("RK45", "DOP853", "LSODA")}, **common)
    torchdiffeq = dyn.work_precision(flow, model, loss, {
        f"torch {m}": dyn.TorchdiffeqMethod(m, vector_field=field)
        for m in ("dopri5", "dopri8", "bosh3")}, **common)
    ds = xr.concat([ours, scipy, torchdiffeq], dim="solver")

    print(f"{'method':<14} " + " ".join(f"tol {t:.0e}: err / time / evals".ljust(34)
                                         for t in tolerances[:1]))
    for name in ds.solver.values:
        row = ds.sel(solver=name)
        print(f"  {name:<14} " + "  ".join(
            f"{e:.1e}/{w:.2f}s/{int(n) if np.isfinite(n) else -1}" for e, w, n in
            zip(row.error.values, row.wall_time.values, row.grad_evals.values, strict=True)))
    at = {str(name): {f"{t:.0e}": time_at(ds.error.sel(solver=name).values,
                                          ds.wall_time.sel(solver=name).values, t)
                      for t in TARGETS} for name in ds.solver.values}
    # Evaluations at equal error: the same interpolation on (error, gradient evaluations),
    # free of the load from other processes that makes single wall times noisy here.
    evals = {str(name): {f"{t:.0e}": time_at(ds.error.sel(solver=name).values,
                                             ds.grad_evals.sel(solver=name).values, t)
                         for t in TARGETS} for name in ds.solver.values}
    best, speedups = {}, {}
    for target in TARGETS:
        key = f"{target:.0e}"
        best[key] = {}
        for family, names in FAMILIES.items():
            times = {n: at[n][key] for n in names if n in at and np.isfinite(at[n][key])}
            best[key][family] = (min(times.items(), key=lambda kv: kv[1]) if times
                                 else (None, np.nan))
        ours_t = best[key]["dynamics"][1]
        speedups[key] = {f: best[key][f][1] / ours_t for f in ("scipy", "torchdiffeq")}
        line = ", ".join(f"{f} {n} {fmt_t(t)}" for f, (n, t) in best[key].items())
        fewest = {f: min(((n, evals[n][key]) for n in names
                          if n in evals and np.isfinite(evals[n][key])),
                         key=lambda kv: kv[1], default=(None, np.nan))
                  for f, names in FAMILIES.items()}
        print(f"error {key}: fewest evaluations " + ", ".join(
            f"{f} {n} {e:.0f}" for f, (n, e) in fewest.items() if n is not None))
        print(f"error {key}: best {line}; speedup vs scipy {speedups[key]['scipy']:.2f}x "
              f"(target >= 1.5), vs torchdiffeq {speedups[key]['torchdiffeq']:.2f}x "
              "(target >= 1)")
    return ds, at, evals, best, speedups


def fmt_t(t):
    return "not reached" if not np.isfinite(t) else f"{t:.2f} s"


if __name__ == "__main__":
    main()
