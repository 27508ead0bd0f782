"""`dyn.solvers.VelocityVerlet` through `dyn.simulate` against a hand-written `lax.scan`
velocity-Verlet loop.

Problem: Newtonian flow ẅ = −∇L(w) of the MLP 64-128-128-10 (ReLU, biases) on all 1797
digits with cross-entropy, zero initial velocity, `--steps` fixed steps of h = 0.01,
float64 on the CPU.

- `simulate`: `VelocityVerlet()` + `ConstantStepSize()`, `save_params=False`, no
  monitors; timed as the whole `simulate` call (validation, solve, Trajectory).
- `scan`: v½ = v + h/2 F(w), w += h v½, v = v½ + h/2 F(w) in `jax.lax.scan` over the
  steps, with F(w) carried from one step to the next (one gradient per step, as the
  solver), jitted once.

Target: simulate / scan ≤ 1.10 (ratio of medians, interleaved runs). The script also
checks that both end at the same state (to rounding).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import compare, digits_problem, num_params, parse_args, print_stats, ratio, save

import dynamics as dyn


def main():
    args = parse_args(__doc__, repeat=5, steps=(int, 200, "Verlet steps"),
                      dt=(float, 0.01, "step size"))
    model, loss, _ = digits_problem()
    h, steps = args.dt, args.steps
    t1 = h * steps

    def sim():
        traj = dyn.simulate(dyn.NewtonianFlow(), model, loss, t1=t1, dt0=h,
                            solver=dyn.solvers.VelocityVerlet(),
                            stepsize_controller=diffrax.ConstantStepSize(), save_params=False,
                            max_steps=steps + 1)
        return traj.final_params

    w0, static = eqx.partition(model, eqx.is_inexact_array)

    def force(w):
        return jax.tree.map(jnp.negative, jax.grad(lambda w: loss(eqx.combine(w, static)))(w))

    @jax.jit
    def scan(w):
        def step(carry, _):
            w, v, a = carry
            v = jax.tree.map(lambda v, a: v + 0.5 * h * a, v, a)
            w = jax.tree.map(lambda w, v: w + h * v, w, v)
            a = force(w)
            v = jax.tree.map(lambda v, a: v + 0.5 * h * a, v, a)
            return (w, v, a), None

        v = jax.tree.map(jnp.zeros_like, w)
        (w, _, _), _ = jax.lax.scan(step, (w, v, force(w)), None, length=steps)
        return w

    a = eqx.filter(sim(), eqx.is_inexact_array)
    b = scan(w0)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b), strict=True))
    print(f"{num_params(model)} parameters, {steps} steps; max |w_simulate - w_scan| = {diff:.1e}")
    stats = compare({"simulate": sim, "scan": lambda: scan(w0)}, args.repeat)
    print_stats(stats)
    r = ratio(stats, "simulate", "scan")
    print(f"simulate / scan = {r:.3f} (target <= 1.10)")
    save(f"verlet_{args.dtype}", {"stats": stats, "ratio": r, "steps": steps, "dt": h,
                                  "max_abs_diff": diff, "target": 1.10})
    assert np.isfinite(diff)


if __name__ == "__main__":
    main()
