"""256 seeds in one vmapped `dyn.sweep` versus a Python loop of 256 `dyn.simulate` calls.

Problem: Newtonian flow w'' = -grad L(w) on the rotational toy L(w) = (|w|^2 - 1)^2
(Głuch & Urbanke 6.1), w0 ~ N(0, I_2) from the seed, v0 = 0, t in [0, 10], adaptive
Tsit5 with simulate's default PIDController(rtol=1e-7, atol=1e-9), 1000 save times, the
Loss monitor, float64 on the CPU.

- `sweep`: `dyn.sweep(run, {"seed": range(256)})` with `run` returning a `dyn.Simulation`:
  the whole call (256 validations, one compiled vmapped solve, the xarray Dataset).
- `vmapped_solve`: the one compiled, vmapped solve inside `sweep` alone, on the 256 cells
  prepared beforehand (what `sweep` costs beyond its per-cell Python work).
- `loop`: `[dyn.simulate(...) for seed in range(256)]`, every call hitting the same
  compiled solve. Target: >= 20x the loop's throughput (cells per second).

Both are warmed up first, so compilation is excluded; they run interleaved and we report
the ratio of medians. The script also checks that the two give the same losses.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import compare, parse_args, print_stats, ratio, save

import dynamics as dyn
from dynamics._sweep import _batch

N_SEEDS, N_SAVES, T1 = 256, 1000, 10.0


def main():
    args = parse_args(__doc__, repeat=5)
    loss = dyn.losses.rotational_toy()
    ts = jnp.linspace(0.0, T1, N_SAVES)
    monitors = (dyn.monitors.Loss(),)

    def w0(seed):
        return jax.random.normal(jax.random.key(seed), (2,))

    def run(seed):
        return dyn.Simulation(dyn.NewtonianFlow(), w0(seed), loss, t1=T1,
                              solver=diffrax.Tsit5(), ts=ts, monitors=monitors)

    def sweep():
        return dyn.sweep(run, {"seed": range(N_SEEDS)}, progress=False).dataset

    def loop():
        return [dyn.simulate(dyn.NewtonianFlow(), w0(seed), loss, t1=T1,
                             solver=diffrax.Tsit5(), ts=ts, monitors=monitors)
                for seed in range(N_SEEDS)]

    prepared = [run(seed).prepare().spec for seed in range(N_SEEDS)]
    parts = [eqx.partition(args, eqx.is_array) for args in prepared]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[d for d, _ in parts])

    def vmapped_solve():
        return _batch._solve_batch(stacked, parts[0][1])

    ds, trajs = sweep(), loop()
    loop_loss = np.stack([t.monitors["loss"] for t in trajs])
    # Same steps per seed, batched or not: agreement to round-off.
    diff = float(np.max(np.abs(ds["loss"].values - loop_loss)))
    print(f"max |loss(sweep) - loss(loop)| = {diff:.2e}")
    assert diff < 1e-10, diff
    stats = compare({"sweep": sweep, "vmapped_solve": vmapped_solve, "loop": loop},
                    args.repeat, warmup=1)
    print_stats(stats)
    speedup = ratio(stats, "loop", "sweep")
    solve_speedup = ratio(stats, "loop", "vmapped_solve")
    for name in stats:
        print(f"throughput {name}: {N_SEEDS / stats[name]['median']:.0f} cells/s")
    print(f"loop / sweep: {speedup:.1f}x; loop / vmapped solve: {solve_speedup:.1f}x "
          "(target >= 20x)")
    save(f"sweep_{args.dtype}", {
        "problem": {"seeds": N_SEEDS, "saves": N_SAVES, "t1": T1, "flow": "NewtonianFlow",
                    "solver": "Tsit5", "rtol": 1e-7, "atol": 1e-9},
        "times": stats, "speedup": speedup, "solve_speedup": solve_speedup,
        "max_loss_difference": diff,
    }, args.out)


if __name__ == "__main__":
    main()
