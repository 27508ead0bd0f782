"""Cost and convergence of `dyn.balance.min_norm_fix` (Saul, Alg. 1) on 200-2500-1250-10.

- Time per iteration of the compiled `lax.while_loop` (run for a fixed number of
  iterations, tol below reach) against one jitted elementwise pass |W|^p over all
  weights, in the same process, interleaved; target ratio <= 3. Two baselines: |W|^p
  with p a runtime array (a general `pow`, as the fix's p is) and |W|² with a static
  integer exponent (a multiply, the cheapest pass there is); the strict ratio is the
  second. An iteration never writes the weights: it is two matrix-vector products
  with the fixed |W0|^p (see `_min_norm_scales`).
- Iterations to reach 1e-6 relative of the global minimum for p, q in {1, 2, 3}²; the
  global minimum is the norm after `--max-iter` iterations (its own convergence flag and
  last step size are recorded), as beside Saul's Fig. 2.

He-initialised Gaussian weights, zero biases, ReLU, as in Saul sec. 2.3.
"""

import jax
import jax.numpy as jnp
import numpy as np
from _common import compare, parse_args, print_stats, ratio, save

WIDTHS = (200, 2500, 1250, 10)
GRID = (1.0, 2.0, 3.0)
TIMED_ITERS = 50


def main():
    args = parse_args(__doc__, repeat=5,
                      max_iter=(int, 1000, "iterations that define the global minimum"))
    import dynamics as dyn
    from dynamics._validate import float_array as _float_array
    from dynamics.balance._minnorm import _min_norm_scales

    model = dyn.MLP(WIDTHS, dyn.ReLU(), bias=True, key=jax.random.key(0))
    abs_w = tuple(jnp.abs(w) for w in model.weights)
    p = q = _float_array(2.0)
    one, never = _float_array(1.0), _float_array(1e-300)

    power = jax.jit(lambda ws, p: tuple(jnp.abs(w) ** p for w in ws))
    square = jax.jit(lambda ws: tuple(jnp.abs(w) ** 2 for w in ws))
    stats = compare({
        "abs_pow_pass": lambda: power(model.weights, p),
        "abs_square_pass": lambda: square(model.weights),
        f"min_norm_{TIMED_ITERS}_iters": lambda: _min_norm_scales(abs_w, p, q, one, never,
                                                                   TIMED_ITERS),
    }, args.repeat)
    print_stats(stats)
    per_iter = ratio(stats, f"min_norm_{TIMED_ITERS}_iters", "abs_pow_pass") / TIMED_ITERS
    per_iter_cpu = ratio(stats, f"min_norm_{TIMED_ITERS}_iters", "abs_pow_pass",
                         "cpu") / TIMED_ITERS
    strict = ratio(stats, f"min_norm_{TIMED_ITERS}_iters", "abs_square_pass") / TIMED_ITERS
    strict_cpu = ratio(stats, f"min_norm_{TIMED_ITERS}_iters", "abs_square_pass",
                       "cpu") / TIMED_ITERS
    print(f"time per iteration / one |W|^p pass (p an array): {per_iter:.2f} (wall), "
          f"{per_iter_cpu:.2f} (CPU)  [target <= 3]")
    print(f"time per iteration / one |W|^2 pass (static square): {strict:.2f} (wall), "
          f"{strict_cpu:.2f} (CPU)  [target <= 3]")

    table = {}
    for pp in GRID:
        for qq in GRID:
            u, it, values, conv = _min_norm_scales(abs_w, _float_array(pp), _float_array(qq),
                                                   one, _float_array(1e-13), args.max_iter)
            v = np.asarray(values[: int(it) + 1])
            best = v[-1]
            hit = np.nonzero((v - best) <= 1e-6 * best)[0]
            table[f"p={pp:g},q={qq:g}"] = {
                "iterations_to_1e-6": int(hit[0]),
                "final_ratio": float(best / v[0]),
                "iterations_run": int(it),
                "converged_1e-13": bool(conv),
                "last_step_rel_change": float((v[-2] - v[-1]) / v[-1]) if len(v) > 1 else 0.0,
            }
            print(f"  p={pp:g} q={qq:g}: {int(hit[0]):5d} iterations to 1e-6, "
                  f"‖W‖/‖W0‖ = {best / v[0]:.4f} (ran {int(it)}, converged {bool(conv)})")
    save(f"balance_{args.dtype}", {"widths": WIDTHS, "timed_iterations": TIMED_ITERS,
                                   "times": stats, "per_iteration_ratio_wall": per_iter,
                                   "per_iteration_ratio_cpu": per_iter_cpu,
                                   "per_iteration_ratio_square_wall": strict,
                                   "per_iteration_ratio_square_cpu": strict_cpu,
                                   "iterations": table}, args.out)


if __name__ == "__main__":
    main()
