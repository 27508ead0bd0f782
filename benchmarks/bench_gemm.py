"""Matrix-product throughput of XLA:CPU, numpy and torch at the reference MLP's shapes.

Why it exists: in `bench_tsit5.py` almost all the time goes into gradient evaluations,
so how fast the three libraries multiply matrices bounds how far `simulate` can get
ahead of scipy (numpy products) and torchdiffeq (torch products). Shapes of the MLP
64-128-128-10 on 1797 digits, float64 unless --float32:

- `forward`: X (1797 x 128) @ W (128 x 128), a hidden layer's forward product;
- `weight_grad`: H^T (128 x 1797) @ D (1797 x 128), its weight gradient (contracting the
  long batch axis).

Each product is timed as a block of 20 calls (jitted for JAX), one library after the
other; we report GFLOP/s from the median block. torch uses all cores
(`torch.set_num_threads(os.cpu_count())`), as in `bench_tsit5.py`; numpy uses its BLAS
defaults.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _common import compare, parse_args, print_stats, save

BATCH, WIDTH, CALLS = 1797, 128, 20


def main():
    args = parse_args(__doc__, repeat=7)
    dtype = np.float32 if args.float32 else np.float64
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    x, d = (rng.standard_normal((BATCH, WIDTH)).astype(dtype) for _ in range(2))
    w = rng.standard_normal((WIDTH, WIDTH)).astype(dtype)
    jx, jd, jw = jnp.asarray(x), jnp.asarray(d), jnp.asarray(w)
    tx, td, tw = torch.tensor(x), torch.tensor(d), torch.tensor(w)
    forward = jax.jit(lambda a, b: a @ b)
    weight_grad = jax.jit(lambda a, b: a.T @ b)

    def block(fn):
        def run():
            out = None
            for _ in range(CALLS):
                out = fn()
            return out

        return run

    fns = {
        "jax": {"forward": block(lambda: forward(jx, jw)),
                "weight_grad": block(lambda: weight_grad(jx, jd))},
        "numpy": {"forward": block(lambda: x @ w), "weight_grad": block(lambda: x.T @ d)},
        "torch": {"forward": block(lambda: tx @ tw), "weight_grad": block(lambda: tx.T @ td)},
    }
    # One library at a time, with a pause between: numpy's and torch's BLAS threads spin
    # after each call, and interleaving the libraries made them fight for the 2 cores
    # (torch fell from ~80 to ~24 GFLOP/s). `compare` blocks on JAX results; the last
    # call of a block waits for the others.
    stats = {}
    for lib, pair in fns.items():
        time.sleep(1.0)
        stats.update({f"{lib}_{k}": v for k, v in compare(pair, args.repeat).items()})
    print_stats(stats)
    flops = 2 * BATCH * WIDTH * WIDTH * CALLS
    gflops = {name: flops / s["median"] / 1e9 for name, s in stats.items()}
    for name, g in gflops.items():
        print(f"  {name:<18} {g:6.1f} GFLOP/s")
    save(f"gemm_{args.dtype}", {"dtype": args.dtype, "batch": BATCH, "width": WIDTH,
                                "calls_per_run": CALLS, "times": stats, "gflops": gflops},
         args.out)


if __name__ == "__main__":
    main()
