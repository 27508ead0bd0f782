"""`dyn.discrete.run` of GD versus a bare `jax.lax.scan` GD loop.

Problem: MLP 64-128-128-10 (ReLU, biases) on all 1797 digits with cross-entropy, 200 GD
steps of eta = 0.05; both sides do the same 200 updates and reach the same parameters
(checked).

Compared, all jitted, same dtype, compile excluded (the inner jitted run is timed, and
the whole `run` call with its Python-side validation and `Trajectory` building):

- `scan`: w <- w - eta * grad L(w) in `jax.lax.scan` (`_common.gd_loops`, the loop
  `bench_gf_euler.py` measures `simulate` against);
- `scan_value_and_grad`: the same with the loss at every step from `value_and_grad`;
- `run`: `dyn.discrete.run(GD(eta), ..., save_every=steps, save_params=False)` (start
  and end saved). Target: run / scan <= 1.05;
- `run_monitored`: the loss and all 256 per-neuron rescaling charges recorded at every
  step (`save_every=1`; the loss comes from the step's own `value_and_grad`).
  Target: run_monitored / scan <= 1.15.
"""

import _common as C
import equinox as eqx
import numpy as np

import dynamics as dyn
import dynamics.discrete._run as _run_module


def main():
    args = C.parse_args(__doc__, steps=(int, 200, "GD steps"), eta=(float, 0.05, "step size"))
    model, loss, _ = C.digits_problem()
    steps, eta = args.steps, args.eta
    w0, static = eqx.partition(model, eqx.is_inexact_array)
    scan, scan_value_and_grad, _ = C.gd_loops(static, steps, eta)
    monitors = (dyn.monitors.Loss(), dyn.monitors.RescalingCharges())

    def run():
        return dyn.discrete.run(dyn.discrete.GD(eta), model, loss, steps, save_every=steps,
                                save_params=False, check_stability=False)

    def run_monitored():
        return dyn.discrete.run(dyn.discrete.GD(eta), model, loss, steps, monitors=monitors,
                                save_params=False, check_stability=False)

    traj = run_monitored()
    w_run = eqx.filter(traj.final_params, eqx.is_inexact_array)
    err = C.max_abs_diff(w_run, scan(w0, loss))
    loss_err = float(np.max(np.abs(traj.monitors["loss"]
                                   - np.asarray(scan_value_and_grad(w0, loss)[1]))))
    n_charges = traj.monitors["rescaling_charges"].shape[1]
    print(f"{C.num_params(model)} parameters, {steps} steps, eta={eta}, {args.dtype}; "
          f"max |w_run - w_scan| = {err:.1e}, max |loss_run - loss_scan| = {loss_err:.1e}; "
          f"{n_charges} charges per step")

    fns = {
        "scan": lambda: scan(w0, loss),
        "scan_value_and_grad": lambda: scan_value_and_grad(w0, loss),
        "run_loop": C.inner_call(_run_module, "_run", run),
        "run_call": lambda: run().ts,
        "run_monitored_loop": C.inner_call(_run_module, "_run", run_monitored),
        "run_monitored_call": lambda: run_monitored().monitors["loss"],
    }
    stats = C.compare(fns, args.repeat)
    C.print_stats(stats)
    pairs = {
        "run loop / scan (target <= 1.05)": ("run_loop", "scan"),
        "run call / scan (target <= 1.05)": ("run_call", "scan"),
        "monitored loop / scan (target <= 1.15)": ("run_monitored_loop", "scan"),
        "monitored call / scan (target <= 1.15)": ("run_monitored_call", "scan"),
        "monitored call / scan_value_and_grad": ("run_monitored_call", "scan_value_and_grad"),
    }
    ratios = {name: C.ratio(stats, *pair) for name, pair in pairs.items()}
    cpu = {name: C.ratio(stats, *pair, "cpu") for name, pair in pairs.items()}
    for name, r in ratios.items():
        print(f"  {name:<42} {r:.3f} (CPU time {cpu[name]:.3f})")
    C.save(f"discrete_{args.dtype}", {
        "dtype": args.dtype, "steps": steps, "eta": eta, "num_params": C.num_params(model),
        "max_abs_param_diff": err, "max_abs_loss_diff": loss_err, "times": stats,
        "ratios": ratios, "cpu_ratios": cpu,
    }, args.out)


if __name__ == "__main__":
    main()
