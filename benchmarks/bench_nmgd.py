"""NMGD (Theory III eq. 26) through `dyn.discrete.run` against a bare `lax.scan` loop.

The problem: a linear model 64 → 10 on all 1797 digits with the halved mean squared
error on one-hot targets (the regression setting of Theory III sec. 14.1), 5,000 steps
of w ← w − (1 − λ_n)γ∇L − λ_n w with λ_n = n^(−a), γ = 0.2, a = 0.9. Both sides get
the same jitted gradient; `run` records nothing but the final state. Target: ≤ 1.05.
"""

import _common as C
import equinox as eqx
import jax
import jax.numpy as jnp

STEPS = 5_000
GAMMA, A = 0.2, 0.9


def main():
    args = C.parse_args(__doc__, steps=(int, STEPS, "NMGD steps"))
    import dynamics as dyn

    data = dyn.datasets.digits()
    loss = dyn.losses.mse(data)
    model = dyn.MLP((64, 10), activation=dyn.Identity(), bias=False, key=jax.random.key(0))
    alg = dyn.discrete.NMGD(GAMMA, A)
    steps = args.steps

    def dynamics_run():
        return dyn.discrete.run(alg, model, loss, steps, save_every=steps).final_params

    def with_weights(w):
        return eqx.tree_at(lambda m: m.weights, model, (w,))

    @jax.jit
    def scan_loop(w0):
        def body(w, n):  # eq. 26 written out by hand
            lam = n ** (-A)
            g = jax.grad(lambda w: loss(with_weights(w)))(w)
            return w - (1.0 - lam) * GAMMA * g - lam * w, None

        ns = jnp.arange(1, steps + 1, dtype=w0.dtype)
        return jax.lax.scan(body, w0, ns)[0]

    weights0 = model.weights[0]

    stats = C.compare({"dynamics.discrete.run": dynamics_run,
                       "lax.scan": lambda: scan_loop(weights0)}, args.repeat)
    C.print_stats(stats)
    r = C.ratio(stats, "dynamics.discrete.run", "lax.scan")
    r_cpu = C.ratio(stats, "dynamics.discrete.run", "lax.scan", "cpu")
    w_run = dynamics_run().weights[0]
    w_scan = scan_loop(weights0)
    diff = float(jnp.max(jnp.abs(w_run - w_scan)))
    print(f"ratio (median wall) {r:.3f}, CPU {r_cpu:.3f}; max |w_run - w_scan| = {diff:.1e}")
    C.save("nmgd", {"steps": steps, "gamma": GAMMA, "a": A, "dtype": args.dtype,
                    "stats": stats, "ratio": r, "ratio_cpu": r_cpu, "max_abs_diff": diff,
                    "target": 1.05})


if __name__ == "__main__":
    main()
