"""Gradient flow with fixed Euler steps through `dyn.simulate` versus a hand-written GD loop.

Problem: MLP 64-128-128-10 (ReLU, biases) on all 1797 digits with cross-entropy, 200 Euler
steps of dt = 0.05 (explicit Euler on GF *is* GD with eta = dt, so both sides do exactly
200 gradient evaluations and reach the same parameters; the script checks that).

Compared, all jitted, same float dtype, compile excluded:

- `simulate(..., save_params=False)`, timed two ways: the inner jitted solve alone, and
  the whole `simulate` call (Python-side validation and `Trajectory` post-processing);
- `scan`: `jax.lax.scan` of w <- w - eta * grad L(w).
  Target: simulate / scan <= 1.10.

Second variant, the loss recorded at every step (`monitors=(Loss(),)`, `ts` = every step
time, 201 values) against (a) the plain scan, (b) a scan with `jax.value_and_grad`, the loss
at w_k coming for free (plus one loss at the end), (c) a scan that evaluates L(w_{k+1})
separately after each update (plus L(w_0)). Target: simulate / scan <= 1.25.
`simulate` runs this as `LossCarryingEuler`: the loss comes from the step's own
`value_and_grad` (like (b)), at the cost of one extra evaluation at the last state.
"""

import jax.numpy as jnp
import numpy as np
from _common import (
    EulerCase,
    compare,
    digits_problem,
    inner_call,
    num_params,
    parse_args,
    print_stats,
    ratio,
    ratio_table,
    save,
)

import dynamics as dyn
import dynamics._simulate as _simulate


def main():
    args = parse_args(__doc__, steps=(int, 200, "Euler steps"), dt=(float, 0.05, "step size"))
    model, loss, _ = digits_problem()
    steps, eta = args.steps, args.dt
    case = EulerCase(model, loss, steps, eta)
    ts = jnp.arange(steps + 1) * eta

    def sim_loss():
        return case.sim(ts=ts, monitors=(dyn.monitors.Loss(),))

    traj_loss = sim_loss()
    err = case.err
    _, losses_vg = case.value_and_grad(case.w0, loss)
    loss_err = float(np.max(np.abs(traj_loss.monitors["loss"] - np.asarray(losses_vg))))
    print(f"{num_params(model)} parameters, {steps} steps, dt={eta}, {args.dtype}; "
          f"max |w_sim - w_gd| = {err:.1e}, max |loss_sim - loss_gd| = {loss_err:.1e}")

    fns = {
        "scan": lambda: case.plain(case.w0, loss),
        "simulate_solve": inner_call(_simulate, "solve", case.sim),
        "simulate_call": lambda: case.sim().ts,
        "scan_value_and_grad": lambda: case.value_and_grad(case.w0, loss),
        "scan_separate_loss": lambda: case.separate(case.w0, loss),
        "simulate_loss_solve": inner_call(_simulate, "solve", sim_loss),
        "simulate_loss_call": lambda: sim_loss().monitors["loss"],
    }
    stats = compare(fns, args.repeat)
    print_stats(stats)
    floor = ratio(stats, "scan_separate_loss", "scan", "cpu")
    print(f"  a loss evaluation per step costs {floor - 1:.0%} of a plain GD step in CPU time "
          "(one forward pass next to a forward + backward pass)")
    pairs = {
        "plain: solve / scan (target <= 1.10)": ("simulate_solve", "scan"),
        "plain: call / scan (target <= 1.10)": ("simulate_call", "scan"),
        "loss: solve / scan (target <= 1.25)": ("simulate_loss_solve", "scan"),
        "loss: call / scan (target <= 1.25)": ("simulate_loss_call", "scan"),
        "loss: solve / scan_value_and_grad": ("simulate_loss_solve", "scan_value_and_grad"),
        "loss: solve / scan_separate_loss": ("simulate_loss_solve", "scan_separate_loss"),
        "loss: call / scan_separate_loss": ("simulate_loss_call", "scan_separate_loss"),
    }
    ratios, cpu = ratio_table(stats, pairs)
    save(f"gf_euler_{args.dtype}", {
        "dtype": args.dtype, "steps": steps, "dt": eta, "num_params": num_params(model),
        "max_abs_param_diff": err, "max_abs_loss_diff": loss_err,
        "times": stats, "ratios": ratios, "cpu_ratios": cpu, "loss_floor": floor,
    }, args.out)


if __name__ == "__main__":
    main()
