"""Euler–Maruyama for the SME through `dyn.simulate` versus a hand-written `lax.scan`, and
many vmapped paths versus a loop of single paths.

Problem: SME-1 of SGD (η = 0.1, batch 16 without replacement) on a 64-16-10 Tanh MLP
over the first 256 digits with cross-entropy (1,210 parameters, a 256-dimensional
Brownian motion), 64 Euler–Maruyama steps of 1/64 to t1 = 1.

1. `simulate(dyn.SME(0.1, 16), ..., solver=diffrax.Euler(), dt0=1/64, key=keys)` against
   a jitted, vmapped `lax.scan` of the same SDE: the same keys and the same increments
   (diffrax's `UnsafeBrownianPath` evaluated at the same step times), one VJP of the
   per-example loss vector per step, w ← w − Jᵀ(h/n + √(ηc_b/n)(dB − mean dB)). The
   script checks that both give the same parameters (to rounding) before timing.
   100 paths vmapped (one chunk), and 1 path. Target: simulate / scan <= 1.2.
2. 1,000 paths: one `simulate` with 1,000 keys (vmapped in chunks: 250 for the digits
   net, all 1,000 at once for the toy) against a Python loop of 1,000 single-path
   `simulate` calls (compiled once, then reused). Target: >= 50x. Also on a toy problem
   (3-4-3 MLP on 10 examples), where a path's arithmetic is negligible and the loop is
   all per-call overhead. On a CPU the digits net cannot get near 50x: a path's 64
   steps are 64 dense VJPs over 256 examples, which vmapping does not make cheaper, and
   a single-path call costs only ~1.5x its arithmetic; the target is a GPU's.
"""

import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import compare, inner_call, max_abs_diff, parse_args, print_stats, ratio, save

import dynamics as dyn
import dynamics._driver._paths as _paths
from dynamics import datasets, losses

ETA, BATCH, T1, STEPS = 0.1, 16, 1.0, 64


def problem(toy: bool):
    if toy:
        rng = np.random.default_rng(0)
        data = datasets.Dataset(rng.normal(size=(10, 3)), rng.integers(0, 3, 10), num_classes=3)
        return dyn.MLP((3, 4, 3), dyn.Tanh(), key=jax.random.key(0)), losses.cross_entropy(data)
    data = datasets.digits(256)
    model = dyn.MLP((64, 16, 10), dyn.Tanh(), key=jax.random.key(0), init="lecun")
    return model, losses.cross_entropy(data)


def scan_em(model, loss, batch):
    """The same SDE, hand-written: a jitted function of one key."""
    w0, static = eqx.partition(model, eqx.is_inexact_array)
    n = loss.num_examples
    c = dyn.discrete.batch_factor(n, batch, False)
    s = np.sqrt(ETA * c / n)

    def examples(w):
        return loss.example_losses(eqx.combine(w, static))

    def one(key):
        bm = diffrax.UnsafeBrownianPath(shape=(n,), key=key)

        def step(w, k):
            # diffrax's ConstantStepSize puts step k at t0 + (t1 − t0)·k/K: same times,
            # same increments (the path's key is folded with both end times).
            t0, t1 = T1 * k / STEPS, T1 * (k + 1) / STEPS
            db = bm.evaluate(t0, t1)
            _, vjp = jax.vjp(examples, w)
            return jax.tree.map(jnp.subtract, w, vjp((t1 - t0) / n + s * (db - db.mean()))[0]), None

        return jax.lax.scan(step, w0, jnp.arange(STEPS, dtype=float))[0]

    return jax.jit(jax.vmap(one)), one


def main():
    args = parse_args(__doc__, repeat=5)
    model, loss = problem(toy=False)
    sme = dyn.SME(ETA, BATCH)
    kw = dict(t1=T1, dt0=T1 / STEPS, save_params=False)
    keys100 = jax.random.split(jax.random.key(1), 100)
    keys1000 = jax.random.split(jax.random.key(2), 1000)
    scan, one = scan_em(model, loss, BATCH)

    # Same paths first: simulate's final parameters against the scan's, every path.
    paths = dyn.simulate(sme, model, loss, key=keys100, **{**kw, "save_params": True})
    ref = scan(keys100)
    err = max_abs_diff(eqx.filter(paths.final_params, eqx.is_inexact_array), ref)
    print(f"{args.dtype}: max |w_simulate - w_scan| over 100 paths = {err:.1e}")
    assert err < 1e-12, err

    def sim(keys):
        return lambda: dyn.simulate(sme, model, loss, key=keys, **kw).t_final

    scan1 = jax.jit(one)
    stats = compare({
        "scan_100": lambda: scan(keys100),
        "simulate_solve_100": inner_call(_paths, "_solve_keys", sim(keys100)),
        "simulate_call_100": sim(keys100),
        "scan_1": lambda: scan1(keys100[0]),
        "simulate_call_1": sim(keys100[0]),
    }, args.repeat)
    print_stats(stats)
    ratios = {
        "100 paths: solve / scan (target <= 1.2)": ratio(stats, "simulate_solve_100", "scan_100"),
        "100 paths: call / scan (target <= 1.2)": ratio(stats, "simulate_call_100", "scan_100"),
        "1 path: call / scan": ratio(stats, "simulate_call_1", "scan_1"),
    }
    cpu = {"100 paths: solve / scan": ratio(stats, "simulate_solve_100", "scan_100", "cpu")}

    many = {}
    for name, toy in (("digits", False), ("toy", True)):
        m, lo = problem(toy)
        batch = BATCH if not toy else 3
        flow = dyn.SME(ETA, batch)

        def vmapped(m=m, lo=lo, flow=flow):
            return dyn.simulate(flow, m, lo, key=keys1000, **kw).t_final

        def loop(m=m, lo=lo, flow=flow):
            return [dyn.simulate(flow, m, lo, key=k, **kw).t_final for k in keys1000]

        stats_many = compare({f"{name}_vmapped_1000": vmapped, f"{name}_loop_1000": loop},
                             args.repeat)
        print_stats(stats_many)
        stats.update(stats_many)
        many[name] = ratio(stats_many, f"{name}_loop_1000", f"{name}_vmapped_1000")
        print(f"  1,000 paths, {name}: loop / vmapped = {many[name]:.1f}x (target >= 50x)")
    for name, r in ratios.items():
        print(f"  {name:<42} {r:.3f}")
    save(f"sme_{args.dtype}", {"dtype": args.dtype, "max_abs_param_diff": err, "eta": ETA,
                               "batch_size": BATCH, "steps": STEPS, "times": stats,
                               "ratios": ratios, "cpu_ratios": cpu,
                               "loop_over_vmapped_1000": many,
                               "when": time.strftime("%Y-%m-%d %H:%M")}, args.out)


if __name__ == "__main__":
    main()
