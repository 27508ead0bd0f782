"""Adaptive Tsit5 through `dyn.simulate` versus scipy's RK45 and torchdiffeq's dopri5.

Problem: gradient flow w' = -grad L(w) of an MLP 64-128-128-10 (ReLU, biases, 26122
parameters) on all 1797 digits with cross-entropy, t in [0, 5], rtol = atol = 1e-6,
initial step chosen by each library (Hairer's rule in all three), float64 on the CPU.

- `simulate`: `diffrax.Tsit5()` + `PIDController(rtol, atol)`, `save_params=False`, the
  Loss monitor at [t0, t1]; timed as the whole `simulate` call.
- `scipy`: `solve_ivp(method="RK45")` on the flattened parameter vector
  (`ravel_pytree`), right-hand side a `jax.jit`-compiled gradient. Target: >= 1.5x faster.
- `torchdiffeq`: `odeint(method="dopri5")` on the same MLP written in torch, same weights
  and data, gradient by `torch.autograd.grad`, `torch.set_num_threads(os.cpu_count())`.
  Target: >= 2x faster.

Options: `--activation tanh` (a smooth network; `tsit5_float64_tanh.json`) and
`--examples N` (the first N digits; a smaller N makes each evaluation cheaper, so
per-step overhead weighs more; `tsit5_float64_nN.json`).

All three are 7-stage FSAL pairs of order 5(4) (6 new evaluations per step) with the same
RMS error norm, so step counts should be close; the script counts the evaluations of each
and prints the relative differences of the three final losses. On this ReLU network they
are not close (Tsit5's error estimate asks for ~2.5x more steps than Dopri5's), so we also
time `simulate` with `diffrax.Dopri5()`, the very tableau of RK45 and dopri5, and one bare
evaluation of the jitted gradient (`rhs`), to split time into evaluations and overhead.

scipy's RK45 combines its stages with `np.dot`, which runs on numpy's OpenBLAS thread
pool; on this 2-core machine those threads, spinning after each call, fight XLA's threads
for the cores and up to double scipy's time per evaluation. So `scipy` runs with BLAS limited to
one thread (`threadpoolctl`), the fair baseline; `scipy_default_blas` is what one gets
without that.
"""

import os

import diffrax
import equinox as eqx
import jax
import numpy as np
import scipy.integrate
import torch
import torchdiffeq
from _common import compare, digits_problem, num_params, parse_args, print_stats, ratio, save
from jax.flatten_util import ravel_pytree
from threadpoolctl import threadpool_limits

import dynamics as dyn


class Counted(eqx.Module):
    """The loss, counting its calls from inside jit (for one untimed run only)."""

    loss: eqx.Module
    calls: list = eqx.field(static=True)

    def __call__(self, params):
        jax.debug.callback(lambda: self.calls.append(1))
        return self.loss(params)


TORCH_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


def torch_problem(model, data, activation):
    params = []
    for k, w in enumerate(model.weights):
        params += [torch.tensor(np.asarray(w)), torch.tensor(np.asarray(model.biases[k]))]
    x, y = torch.tensor(np.asarray(data.x)), torch.tensor(np.asarray(data.y))

    def loss(ps):
        h = x
        for k in range(0, len(ps), 2):
            h = h @ ps[k].T + ps[k + 1]
            if k < len(ps) - 2:
                h = TORCH_ACTIVATIONS[activation](h)
        return torch.nn.functional.cross_entropy(h, y)

    return tuple(params), loss


def main():
    args = parse_args(__doc__, repeat=5, t1=(float, 5.0, "end time"),
                      tol=(float, 1e-6, "rtol = atol"),
                      activation=(str, "relu", "hidden activation: relu or tanh"),
                      examples=(int, 1797, "how many digits (the first ones)"))
    if args.activation not in TORCH_ACTIVATIONS:
        raise SystemExit(f"--activation must be one of {sorted(TORCH_ACTIVATIONS)}")
    torch.set_num_threads(os.cpu_count())
    torch.set_default_dtype(torch.float32 if args.float32 else torch.float64)
    model, loss, data = digits_problem(activation=args.activation, examples=args.examples)
    t1, tol = args.t1, args.tol

    def sim(loss=loss, solver=diffrax.Tsit5()):
        return dyn.simulate(
            dyn.GradientFlow(), model, loss, t1=t1, solver=solver,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            monitors=(dyn.monitors.Loss(),), save_params=False, max_steps=100_000)

    w0, static = eqx.partition(model, eqx.is_inexact_array)
    y0, unravel = ravel_pytree(w0)
    flat_loss = jax.jit(lambda y: loss(eqx.combine(unravel(y), static)))
    flat_rhs = jax.jit(lambda y: -jax.grad(lambda y: loss(eqx.combine(unravel(y), static)))(y))
    counts = {"scipy": 0, "torchdiffeq": 0}

    def scipy_rhs(t, y):
        counts["scipy"] += 1
        return np.asarray(flat_rhs(y))

    def scipy_default_blas():
        return scipy.integrate.solve_ivp(scipy_rhs, (0.0, t1), np.asarray(y0), method="RK45",
                                         rtol=tol, atol=tol)

    def scipy_run():
        with threadpool_limits(limits=1, user_api="blas"):
            return scipy_default_blas()

    p0, torch_loss = torch_problem(model, data, args.activation)

    def torch_rhs(t, ps):
        counts["torchdiffeq"] += 1
        with torch.enable_grad():
            ps = tuple(p.detach().requires_grad_() for p in ps)
            return tuple(-g for g in torch.autograd.grad(torch_loss(ps), ps))

    def torch_run():
        with torch.no_grad():
            return torchdiffeq.odeint(torch_rhs, p0, torch.tensor([0.0, t1]), method="dopri5",
                                      rtol=tol, atol=tol)

    # One untimed run of each (compiling the jitted functions): evaluation counts, steps
    # and final losses.
    nfev = {}
    for name, solver in (("simulate", diffrax.Tsit5()), ("simulate_dopri5", diffrax.Dopri5())):
        calls = []
        sim(Counted(loss, calls), solver)
        nfev[name] = len(calls) - 2  # minus the two Loss-monitor evaluations at t0 and t1
    traj, traj_dopri5 = sim(), sim(solver=diffrax.Dopri5())
    flat_rhs(y0).block_until_ready()
    sol, out = scipy_run(), torch_run()
    final = {
        "simulate": float(traj.monitors["loss"][-1]),
        "simulate_dopri5": float(traj_dopri5.monitors["loss"][-1]),
        "scipy": float(flat_loss(sol.y[:, -1])),
        "torchdiffeq": float(torch_loss(tuple(p[-1] for p in out))),
    }
    work = {
        **{name: {"nfev": nfev[name], "accepted": t.stats["num_accepted_steps"],
                  "rejected": t.stats["num_rejected_steps"]}
           for name, t in (("simulate", traj), ("simulate_dopri5", traj_dopri5))},
        "scipy": {"nfev": int(sol.nfev), "accepted": len(sol.t) - 1},
        "torchdiffeq": {"nfev": counts["torchdiffeq"]},
    }
    rel = {f"{a} vs {b}": abs(final[a] - final[b]) / abs(final[b])
           for a, b in (("simulate", "scipy"), ("simulate", "torchdiffeq"),
                        ("scipy", "torchdiffeq"), ("simulate_dopri5", "scipy"))}
    print(f"{num_params(model)} parameters, {args.examples} examples, {args.activation}, "
          f"t1={t1}, rtol=atol={tol}, {args.dtype}, "
          f"torch threads={torch.get_num_threads()}, initial loss jax "
          f"{float(loss(model)):.12f} / torch {float(torch_loss(p0)):.12f}")
    for name in final:
        print(f"  {name:<15} final loss {final[name]:.12f}  {work[name]}")
    for name, r in rel.items():
        print(f"  relative difference {name}: {r:.1e}")

    stats = compare({
        "simulate": lambda: sim().ts,
        "simulate_dopri5": lambda: sim(solver=diffrax.Dopri5()).ts,
        "scipy": scipy_run,
        "scipy_default_blas": scipy_default_blas,
        "torchdiffeq": torch_run,
    }, args.repeat, warmup=0)
    stats.update(compare({"rhs": lambda: flat_rhs(y0), "torch_rhs": lambda: torch_rhs(0, p0)},
                         args.repeat * 5))
    print_stats(stats)
    speedups, cpu_speedups = {}, {}
    for other, target in (("scipy", " (target >= 1.5)"), ("scipy_default_blas", ""),
                          ("torchdiffeq", " (target >= 2)")):
        for ours in ("simulate", "simulate_dopri5"):
            name = f"{other} / {ours}" + (target if ours == "simulate" else "")
            speedups[name] = ratio(stats, other, ours)
            cpu_speedups[name] = ratio(stats, other, ours, "cpu")
            print(f"  {name:<40} {speedups[name]:.2f}x (CPU time {cpu_speedups[name]:.2f}x)")
    work["scipy_default_blas"] = work["scipy"]
    per_eval = {name: stats[name]["median"] / work[name]["nfev"] for name in work}
    print(f"  one bare gradient: jax {stats['rhs']['median'] * 1e3:.2f} ms, "
          f"torch {stats['torch_rhs']['median'] * 1e3:.2f} ms; per evaluation within a solve:")
    for name, s in per_eval.items():
        print(f"  {name:<15} {s * 1e3:.2f} ms")
    suffix = "" if args.activation == "relu" else f"_{args.activation}"
    suffix += "" if args.examples == 1797 else f"_n{args.examples}"
    save(f"tsit5_{args.dtype}{suffix}", {
        "dtype": args.dtype, "activation": args.activation,
        "examples": args.examples, "t1": t1, "rtol": tol, "atol": tol,
        "num_params": num_params(model), "torch_threads": torch.get_num_threads(),
        "work": work, "final_loss": final, "final_loss_rel_diff": rel, "times": stats,
        "speedups": speedups, "cpu_speedups": cpu_speedups, "seconds_per_eval": per_eval,
    }, args.out)


if __name__ == "__main__":
    main()
