"""What one `dyn.simulate` call costs beyond its compiled solve: the Python-side checks
before it and the `Trajectory` built after it, against the same solve written directly
with `diffrax.diffeqsolve`.

It matters where solves are short: the toy problems of a seed sweep run in a loop, and
small networks, where a whole solve takes a few milliseconds (the equal-accuracy
comparison on the 64-16-10 net, `bench_equal_accuracy.py`).

Problems (float64, CPU, compiled solves reused: compilation excluded):
- `toy`: Newtonian flow on the rotational toy L(w) = (|w|² − 1)² from w0 ~ N(0, I₂),
  t ∈ [0, 10], Tsit5 at simulate's default PIDController(rtol=1e-7, atol=1e-9), 1000
  save times, the Loss monitor (`bench_sweep.py`'s cell);
- `mlp`: gradient flow of the MLP 64-16-10 (Tanh, biases) on 256 digits with
  cross-entropy, t ∈ [0, 2], Tsit5 at rtol = atol = 1e-6, the loss at 101 times.

For each: `simulate` (the whole call, parameters not saved); `diffrax`: a jitted
`diffeqsolve` of the same vector field, steps and saves (the loss by `SaveAt(fn=...)`,
no events, no result object); and `simulate`'s three parts timed alone (`prepare`,
the compiled `solve`, `Trajectory.from_solve`). Reported: medians of interleaved
runs and simulate / diffrax. No target: a record of what a call costs, kept so that a
change that makes it slower shows.
"""

import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import compare, digits_problem, parse_args, print_stats, ratio, save

import dynamics as dyn
from dynamics._driver._prepare import prepare
from dynamics._driver._solve import solve
from dynamics._trajectory import Trajectory
from dynamics.events._events import AbstractDivergenceEvent


def _parts(flow, params, loss, kwargs, repeat):
    """Median seconds of `prepare`, `solve` and `from_solve`, each timed alone."""
    full = dict(t0=0.0, v0=None, dt0=None, events=(), projection=None,
                max_steps=4096, nonsmooth=None, **kwargs)
    times = {"prepare": [], "solve": [], "trajectory": []}
    for k in range(repeat + 2):
        a = time.perf_counter()
        prepared = prepare(flow, params, loss, **full)
        b = time.perf_counter()
        out = jax.block_until_ready(solve(prepared.spec))
        c = time.perf_counter()
        Trajectory.from_solve(prepared.spec.problem, prepared.spec.events, out, throw=True,
                              meta=prepared.meta, divergence=AbstractDivergenceEvent)
        d = time.perf_counter()
        if k >= 2:  # the first two warm up (compile, caches)
            for name, dt in zip(times, (b - a, c - b, d - c), strict=True):
                times[name].append(dt)
    return {name: float(np.median(t)) for name, t in times.items()}


def _diffrax_solve(term, y0, t1, ts, rtol, atol, loss_of):
    saveat = diffrax.SaveAt(subs=(diffrax.SubSaveAt(ts=ts, fn=lambda t, y, _: loss_of(y)),
                                  diffrax.SubSaveAt(t1=True)))

    @eqx.filter_jit
    def solve(y0):
        return diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, t1, None, y0, saveat=saveat,
                                   stepsize_controller=diffrax.PIDController(rtol=rtol,
                                                                             atol=atol),
                                   max_steps=4096).ys

    return lambda: solve(y0)


def main():
    args = parse_args(__doc__, repeat=30)
    inner = 20  # calls per timed run: one call is ~1 ms, below the timer's resolution
    results = {}

    # The toy: y = (w, v), ẇ = v, v̇ = −∇L(w).
    toy = dyn.losses.rotational_toy()
    w0 = jax.random.normal(jax.random.key(0), (2,))
    ts = jnp.linspace(0.0, 10.0, 1000)
    toy_kwargs = dict(t1=10.0, solver=diffrax.Tsit5(), stepsize_controller=None, ts=ts,
                      monitors=(dyn.monitors.Loss(),), save_params=False)
    newton = diffrax.ODETerm(lambda t, y, _: (y[1], -jax.grad(toy)(y[0])))
    toy_diffrax = _diffrax_solve(newton, (w0, jnp.zeros(2)), 10.0, ts, 1e-7, 1e-9,
                                 lambda y: toy(y[0]))

    # The small MLP: ẇ = −∇L(w).
    model, loss, _ = digits_problem((64, 16, 10), activation="tanh", examples=256)
    w, static = eqx.partition(model, eqx.is_inexact_array)
    ts_mlp = jnp.linspace(0.0, 2.0, 101)
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    mlp_kwargs = dict(t1=2.0, solver=diffrax.Tsit5(), stepsize_controller=controller,
                      ts=ts_mlp, monitors=(dyn.monitors.Loss(),), save_params=False)
    loss_w = lambda w: loss(eqx.combine(w, static))  # noqa: E731
    gf = diffrax.ODETerm(lambda t, w, _: jax.tree.map(jnp.negative, jax.grad(loss_w)(w)))
    mlp_diffrax = _diffrax_solve(gf, w, 2.0, ts_mlp, 1e-6, 1e-6, loss_w)

    cases = {
        "toy": (dyn.NewtonianFlow(), w0, toy, toy_kwargs, toy_diffrax),
        "mlp": (dyn.GradientFlow(), model, loss, mlp_kwargs, mlp_diffrax),
    }
    for name, (flow, params, loss_fn, kwargs, plain) in cases.items():
        def sim(flow=flow, params=params, loss_fn=loss_fn, kwargs=kwargs):
            for _ in range(inner):
                traj = dyn.simulate(flow, params, loss_fn, **kwargs)
            return traj.monitors["loss"]

        def base(plain=plain):
            for _ in range(inner):
                out = jax.block_until_ready(plain())
            return out

        stats = compare({"simulate": sim, "diffrax": base}, args.repeat, warmup=1)
        for s in stats.values():  # per call
            for key in ("min", "median", "max"):
                s[key] /= inner
        print(f"--- {name} (per call)")
        print_stats(stats)
        parts = _parts(flow, params, loss_fn, kwargs, args.repeat)
        over = ratio(stats, "simulate", "diffrax")
        print(f"simulate / diffrax: {over:.2f}; parts: " + ", ".join(
            f"{k} {v * 1e3:.3f} ms" for k, v in parts.items()), flush=True)
        results[name] = {"times": stats, "ratio": over, "parts": parts}
    save(f"overhead_{args.dtype}", results, args.out)


if __name__ == "__main__":
    main()
