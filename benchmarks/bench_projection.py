"""Cost of a projection inside `simulate`: every step, and a balancing fix every 50 steps.

Problem: MLP 64-64-10 (ReLU, biases; 4,810 parameters) on the first 512 digits (option
--examples; fewer examples make a step cheaper and the projection's share larger) with
cross-entropy, gradient flow with 2,000 Euler steps of dt = 0.05, `save_params=False`.
Compared in the same process, interleaved, compile excluded (whole `simulate` calls):

- `plain`: no projection;
- `every_step`: a cheap projection after every step (`NeuronBalance` below: each hidden
  neuron's incoming weights and bias scaled by λ, its outgoing weights by 1/λ, with
  λ = sqrt(‖out‖/‖in‖), which balances ‖in‖ = ‖out‖ and leaves a ReLU network's
  function unchanged). Target: every_step / plain <= 1.2;
- `fix_every_50`: `dyn.balance.MinNormFix(p=2, q=2)` every 50 steps when `dyn.balance` is
  importable (target <= 1.5), else `NeuronBalance` every 50 steps as a stand-in.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
from _common import compare, digits_problem, num_params, parse_args, print_stats, ratio, save

import dynamics as dyn


class NeuronBalance(dyn.AbstractProjection):
    """Per-neuron rescaling to ‖incoming‖ = ‖outgoing‖ (one shot, exact for one layer
    pair at a time; a stand-in for the balancing fixes of `dyn.balance`)."""

    def __call__(self, params, velocity, state=None):
        weights, biases = list(params.weights), list(params.biases)
        for k in range(len(weights) - 1):
            w_in, b_in, w_out = weights[k], biases[k], weights[k + 1]
            norm_in = jnp.sqrt(jnp.sum(w_in**2, axis=1) + b_in**2)
            norm_out = jnp.sqrt(jnp.sum(w_out**2, axis=0))
            lam = jnp.sqrt(norm_out / norm_in)
            weights[k], biases[k] = w_in * lam[:, None], b_in * lam
            weights[k + 1] = w_out / lam[None, :]
        new = eqx.tree_at(lambda m: (m.weights, m.biases), params,
                          (tuple(weights), tuple(biases)))
        return new, velocity


def main():
    args = parse_args(__doc__, repeat=5, steps=(int, 2000, "Euler steps"),
                      dt=(float, 0.05, "step size"),
                      examples=(int, 512, "digits examples in the loss"))
    model, loss, _ = digits_problem(widths=(64, 64, 10), examples=args.examples)
    t1 = args.steps * args.dt
    kw = dict(t1=t1, solver=diffrax.Euler(), dt0=args.dt,
              stepsize_controller=diffrax.ConstantStepSize(), save_params=False)
    try:
        from dynamics.balance import MinNormFix

        try:
            fix = MinNormFix(p=2, q=2)
        except TypeError:  # its signature was not settled when this was written
            fix = MinNormFix()
        fix_name = "MinNormFix"
    except ImportError:
        fix, fix_name = NeuronBalance(), "NeuronBalance (stand-in: dyn.balance missing)"

    def run(projection):
        return lambda: dyn.simulate(dyn.GradientFlow(), model, loss, projection=projection,
                                    **kw).final_params

    fns = {
        "plain": run(None),
        "every_step": run(NeuronBalance()),
        "fix_every_50": run(dyn.Every(fix, steps=50)),
    }
    stats = compare(fns, args.repeat)
    print(f"MLP 64-64-10, {num_params(model)} parameters, {args.examples} examples, "
          f"{args.steps} Euler steps "
          f"({args.dtype}); fix every 50 steps: {fix_name}")
    print_stats(stats)
    every, fix50 = ratio(stats, "every_step", "plain"), ratio(stats, "fix_every_50", "plain")
    print(f"every_step / plain = {every:.3f} (target <= 1.2); "
          f"fix_every_50 / plain = {fix50:.3f} (target <= 1.5)")
    save("projection", {"params": num_params(model), "steps": args.steps,
                        "examples": args.examples,
                        "fix": fix_name, "stats": stats,
                        "ratio_every_step": every, "ratio_fix_every_50": fix50}, args.out)


if __name__ == "__main__":
    main()
