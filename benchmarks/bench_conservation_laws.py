"""Conservation-law counting (`dyn.symmetries.count_conservation_laws`) on random
architectures: N linear and N ReLU networks (depth 2–4, widths 2–9; ReLU ones with random
biases on half), each against its expected count (linear: independent entries of the
balance matrices by Jacobian rank; ReLU: one law per hidden neuron, every neuron alive on
the inputs). Reference: the SageMath code of Marcotte, Gribonval & Peyré (github
sibyllema/Conservation_laws) took 34 min (50 linear) and 1 h 53 min (50 ReLU) on 64 threads.

Reports the total wall time (compilation included: every architecture shape is new),
the compile count per architecture (one per bracket level reached) and mismatches.
Usage: python benchmarks/bench_conservation_laws.py [--n 50]
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_symmetries import _active_model, _expected_linear  # noqa: E402

import dynamics as dyn  # noqa: E402


def main(n: int) -> None:
    rng = np.random.default_rng(0)
    rows, t_all = [], time.perf_counter()
    for kind in ("linear", "relu"):
        for seed in range(n):
            depth = int(rng.integers(2, 5))
            widths = tuple(int(k) for k in rng.integers(2, 10, depth + 1))
            key = jax.random.key(seed)
            x = jax.random.normal(jax.random.fold_in(key, 7), (60, widths[0]))
            if kind == "linear":
                model = dyn.MLP(widths, activation=dyn.Identity(), bias=False, key=key)
                expected = _expected_linear(model)
            else:
                model = _active_model(widths, dyn.ReLU(), seed % 2 == 0, key, x)
                expected = sum(widths[1:-1])
            t = time.perf_counter()
            r = dyn.symmetries.count_conservation_laws(model, x, key=key)
            dt = time.perf_counter() - t
            rows.append((kind, widths, r.count, expected, r.rank_history, dt))
            print(f"{kind:6s} {str(widths):22s} count {r.count:3d} expected {expected:3d} "
                  f"ranks {r.rank_history} {dt:6.2f}s", flush=True)
    total = time.perf_counter() - t_all
    bad = [r for r in rows if r[2] != r[3]]
    print(f"\n{len(rows)} architectures, {len(bad)} mismatches, total {total:.1f} s "
          f"(counting {sum(r[5] for r in rows):.1f} s), "
          f"mean levels compiled {np.mean([len(r[4]) for r in rows]):.2f}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="architectures per kind")
    main(p.parse_args().n)
