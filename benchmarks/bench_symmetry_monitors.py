"""Cost of monitoring every per-neuron charge and residual of a 64-200-200-200-10 ReLU MLP
at every saved step, against the same run with the loss monitor alone (target:
at most 1.3x).

Gradient flow, fixed-step Euler (200 steps, a save at every step), 512 digits, float64.
A: `Loss()`; B: `Loss()`, `RescalingCharges()` (600 per-neuron charges) and
`RescalingResiduals()` (eq. 17 for the 600 neurons, one vectorised pass). Interleaved
runs, medians (benchmarks/_common.py).
Usage: python benchmarks/bench_symmetry_monitors.py [--repeat 7]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import compare, digits_problem, parse_args, print_stats, ratio, save  # noqa: E402

import dynamics as dyn  # noqa: E402

STEPS, DT = 200, 0.01


def main() -> None:
    args = parse_args(__doc__, examples=(int, 512, "digits examples"))
    model, loss, _ = digits_problem((64, 200, 200, 200, 10), examples=args.examples)
    ts = jnp.linspace(0.0, STEPS * DT, STEPS + 1)

    def runner(monitors):
        def go():
            traj = dyn.simulate(dyn.GradientFlow(), model, loss, t1=STEPS * DT, ts=ts,
                                solver=diffrax.Euler(), dt0=DT,
                                stepsize_controller=diffrax.ConstantStepSize(),
                                monitors=monitors, save_params=False, max_steps=STEPS + 1)
            return jax.block_until_ready(traj.monitors)
        return go

    stats = compare({
        "loss": runner((dyn.monitors.Loss(),)),
        "all": runner((dyn.monitors.Loss(), dyn.monitors.RescalingCharges(),
                       dyn.monitors.RescalingResiduals())),
    }, repeat=args.repeat)
    print_stats(stats)
    r = ratio(stats, "all", "loss")
    print(f"all charges and residuals / loss only: {r:.2f} (target <= 1.3)")
    save("symmetry_monitors", {"stats": stats, "ratio": r, "steps": STEPS,
                               "examples": args.examples}, args.out)


if __name__ == "__main__":
    main()
