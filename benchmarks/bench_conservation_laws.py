"""Conservation-law counting (`dyn.symmetries.count_conservation_laws`) on random
architectures: N linear and N ReLU networks (depth 2–4, widths 2–9; ReLU ones with random
biases on half), each against `dyn.symmetries.known_count` (linear: independent entries of
the balance matrices by Jacobian rank; ReLU: one law per hidden neuron, k(k − 1)/2 per
group of k neurons with one pattern, the directions the first layer's live inputs miss and
the dead connections of deeper layers, on generic draws: `random_alive_mlp`). Reference:
the SageMath code of Marcotte, Gribonval & Peyré (github sibyllema/Conservation_laws)
took 34 min (50 linear) and 1 h 53 min (50 ReLU) on 64 threads.

Reports the total wall time (compilation included: the first architecture compiles one
function per bracket level, the others reuse them through the padded embedding), the
number of compilations, and mismatches.
Usage: python benchmarks/bench_conservation_laws.py [--n 50]
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamics.symmetries._count import _padded_level_values  # noqa: E402
from studies.conservation_laws import architectures, count_one  # noqa: E402


def main(n: int) -> None:
    rows, t_all = [], time.perf_counter()
    for kind, widths, bias, seed in architectures(n):
        r = count_one(kind, widths, bias, seed)
        rows.append(r)
        print(f"{kind:6s} {r['widths']:12s} bias {bias!s:5s} count {r['count']:3d} expected "
              f"{r['expected']:3d} ranks {r['ranks']} {r['seconds']:6.2f}s", flush=True)
    total = time.perf_counter() - t_all
    bad = [r for r in rows if r["count"] != r["expected"] and r["expected"] >= 0]
    counting = sum(r["seconds"] for r in rows)
    print(f"\n{len(rows)} architectures, {len(bad)} mismatches, "
          f"{sum(r['expected'] < 0 for r in rows)} without a closed form; total {total:.1f} s "
          f"(counting {counting:.1f} s, median {np.median([r['seconds'] for r in rows]):.2f} s; "
          f"the rest draws the nets and the closed forms), "
          f"compiled bracket functions {_padded_level_values._cache_size()}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50, help="architectures per kind")
    main(p.parse_args().n)
