"""Cost of a projection inside `simulate`: `ChargeProjection` every step, `MinNormFix`
every 50 steps (targets 1.2× and 1.5× the plain run).

Problem: MLP 64-64-10 (ReLU, biases; 4,810 parameters) on the first 512 digits (option
--examples; fewer examples make a step cheaper and the projection's share larger) with
cross-entropy, gradient flow with 2,000 Euler steps of dt = 0.05, `save_params=False`.
Compared in the same process, interleaved, compile excluded (whole `simulate` calls):

- `plain`: no projection;
- `charge_every_step`: `dyn.balance.ChargeProjection()` after every step (back to the
  initial per-neuron charges by Newton in the log-scales). Target: <= 1.2 × plain;
- `minnorm_every_50`: `dyn.balance.MinNormFix(p=2, q=2)` every 50 steps. Target <= 1.5 ×.
"""

import diffrax
from _common import compare, digits_problem, num_params, parse_args, print_stats, ratio, save

import dynamics as dyn


def main():
    args = parse_args(__doc__, repeat=7, steps=(int, 2000, "Euler steps"),
                      dt=(float, 0.05, "step size"),
                      examples=(int, 512, "digits examples in the loss"))
    model, loss, _ = digits_problem(widths=(64, 64, 10), examples=args.examples)
    t1 = args.steps * args.dt
    kw = dict(t1=t1, solver=diffrax.Euler(), dt0=args.dt,
              stepsize_controller=diffrax.ConstantStepSize(), save_params=False)

    def run(projection):
        return lambda: dyn.simulate(dyn.GradientFlow(), model, loss, projection=projection,
                                    **kw).final_params

    fns = {
        "plain": run(None),
        "charge_every_step": run(dyn.Every(dyn.balance.ChargeProjection(), steps=1)),
        "minnorm_every_50": run(dyn.Every(dyn.balance.MinNormFix(p=2, q=2), steps=50)),
    }
    stats = compare(fns, args.repeat)
    print(f"MLP 64-64-10, {num_params(model)} parameters, {args.examples} examples, "
          f"{args.steps} Euler steps ({args.dtype})")
    print_stats(stats)
    charge = ratio(stats, "charge_every_step", "plain")
    minnorm = ratio(stats, "minnorm_every_50", "plain")
    charge_cpu = ratio(stats, "charge_every_step", "plain", "cpu")
    minnorm_cpu = ratio(stats, "minnorm_every_50", "plain", "cpu")
    print(f"ChargeProjection every step / plain = {charge:.3f} wall, {charge_cpu:.3f} CPU "
          "(target <= 1.2)")
    print(f"MinNormFix every 50 steps / plain = {minnorm:.3f} wall, {minnorm_cpu:.3f} CPU "
          "(target <= 1.5)")
    save("projection", {"params": num_params(model), "steps": args.steps,
                        "examples": args.examples, "stats": stats,
                        "ratio_charge_every_step": charge, "ratio_minnorm_every_50": minnorm,
                        "ratio_charge_every_step_cpu": charge_cpu,
                        "ratio_minnorm_every_50_cpu": minnorm_cpu}, args.out)


if __name__ == "__main__":
    main()
