"""Gradient flow on the Theory III conv net through `dyn.simulate` versus a hand-written GD loop.

Problem: the 5-layer ReLU conv net of Theory III (Banburski et al., Figs. 2-3: 16 channels
per layer, 3x3 kernels, stride 2, padding 1, no pooling, a dense head; 9,610 parameters on
1x8x8 inputs) on all 1797 digits as images (`dyn.datasets.digits_images("all")`) with
cross-entropy; `steps` Euler steps of dt (explicit Euler on GF *is* GD with eta = dt, so
both sides do the same gradient evaluations and reach the same parameters: checked).

Compared, all jitted, same dtype, compile excluded, interleaved, medians:

- `scan`: `jax.lax.scan` of w <- w - eta * grad L(w) (`_common.gd_loops`);
- `simulate_solve`: the inner jitted solve of `simulate(..., save_params=False)`;
- `simulate_call`: the whole `simulate` call (validation, `Trajectory` building).

Target (issue 25): simulate / scan <= 1.10.
"""

import jax
import numpy as np
from _common import (
    EulerCase,
    compare,
    inner_call,
    num_params,
    parse_args,
    print_stats,
    ratio_table,
    save,
)

import dynamics as dyn
import dynamics._simulate as _simulate


def main():
    args = parse_args(__doc__, repeat=5, steps=(int, 100, "Euler steps"),
                      dt=(float, 0.05, "step size"))
    dtype = np.float32 if args.dtype == "float32" else np.float64
    data = dyn.datasets.digits_images("all", dtype=dtype)
    loss = dyn.losses.cross_entropy(data)
    model = dyn.ConvNet(1, (16,) * 5, 3, 10, stride=2, padding=1, image_size=8,
                        key=jax.random.key(0))
    steps, eta = args.steps, args.dt
    case = EulerCase(model, loss, steps, eta)
    print(f"Theory III conv net, {num_params(model)} parameters, {data.x.shape[0]} images, "
          f"{steps} steps, dt={eta}, {args.dtype}; max |w_sim - w_gd| = {case.err:.1e}")
    fns = {
        "scan": lambda: case.plain(case.w0, loss),
        "simulate_solve": inner_call(_simulate, "solve", case.sim),
        "simulate_call": lambda: case.sim().ts,
    }
    stats = compare(fns, args.repeat)
    print_stats(stats)
    ratios, cpu = ratio_table(stats, {
        "solve / scan (target <= 1.10)": ("simulate_solve", "scan"),
        "call / scan (target <= 1.10)": ("simulate_call", "scan")})
    save(f"conv_gf_{args.dtype}", {
        "dtype": args.dtype, "steps": steps, "dt": eta, "num_params": num_params(model),
        "max_abs_param_diff": case.err, "times": stats, "ratios": ratios, "cpu_ratios": cpu,
    }, args.out)


if __name__ == "__main__":
    main()
