"""Filippov mode (`nonsmooth=dyn.Filippov()`) against a plain adaptive solve on ReLU nets.

Part 1, the 5-7-6-3 ReLU network with biases on 40 Gaussian inputs (teacher labels), GF
on t ∈ [0, 3] at rtol = atol = 1e-8: Tsit5 without the mode against Tsit5, Dopri5 and
Dopri8 with it; wall time (median of --repeat interleaved runs, compilation excluded),
steps, rejected steps, vector-field evaluations (steps × stages: each stage is one
gradient; the mode adds forward passes for its switching functions, which the wall
time includes) and the final-state error against the mode's Dopri8 at 1e-12.
Targets: >= 10x fewer field evaluations and >= 5x less wall time at equal or better error.

Part 2, 64-32-32-10 ReLU MLPs on the first N digits (N × 64 example-unit pairs) to
t = --t1 at 1e-8 with Dopri5 and the mode: wall time, crossings, sliding entries, cost
per crossing, for N in --sizes (target: N = 256 to t = 5 in < 10 min on 2 cores).

Part 3, the mode's cost where nothing crosses or slides, and its first call: the same
64-32-32-10 nets on N digits, GF over t ∈ [0, 1e-4] with the steps capped at dtmax =
1e-6 (100 steps; no pre-activation gets to its surface in that time, checked by the
run's crossing count), Dopri5 at 1e-8 with and without the mode (the same steps: on one
piece the two fields are equal): wall time per step, median of --repeat interleaved
runs (target: ≤ 3× the plain step). Then the first call of the mode at N = 64 (trace
and compile included) in a fresh process, and its XLA compile time.
"""

import subprocess
import sys
import time

import _common as C
import diffrax
import jax
import numpy as np

STAGES = {"Tsit5": 6, "Dopri5": 6, "Dopri8": 12}  # new field evaluations per step (FSAL)


def _small():
    import dynamics as dyn

    kx, km = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (40, 5))
    teacher = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), key=jax.random.key(7))
    model = dyn.MLP((5, 7, 6, 3), activation=dyn.ReLU(), key=km)
    return model, dyn.losses.mse(dyn.datasets.Dataset(x, jax.vmap(teacher)(x)))


def _digits(n: int):
    """The 64-32-32-10 ReLU MLP and the cross-entropy on the first n digits (parts 2, 3)."""
    import dynamics as dyn

    model = dyn.MLP((64, 32, 32, 10), activation=dyn.ReLU(), key=jax.random.key(0))
    return model, dyn.losses.cross_entropy(dyn.datasets.digits(n))


def _run(model, loss, solver, tol, exact, t1, max_steps=400_000):
    import dynamics as dyn

    kw = dict(t1=t1, solver=getattr(diffrax, solver)(), max_steps=max_steps, throw=False,
              stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol))
    if exact:
        kw["nonsmooth"] = dyn.Filippov()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dyn.simulate(dyn.GradientFlow(), model, loss, **kw)


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def part1(args) -> dict:
    model, loss = _small()
    ref = _flat(_run(model, loss, "Dopri8", 1e-12, True, 3.0).final_params)
    cases = {"Tsit5 plain": ("Tsit5", False), "Tsit5 Filippov": ("Tsit5", True),
             "Dopri5 Filippov": ("Dopri5", True), "Dopri8 Filippov": ("Dopri8", True)}
    fns = {name: (lambda s=s, e=e: _run(model, loss, s, 1e-8, e, 3.0).final_params)
           for name, (s, e) in cases.items()}
    stats = C.compare(fns, args.repeat)
    C.print_stats(stats)
    out = {}
    for name, (solver, exact) in cases.items():
        traj = _run(model, loss, solver, 1e-8, exact, 3.0)
        err = float(np.max(np.abs(_flat(traj.final_params) - ref)))
        out[name] = dict(wall=stats[name]["median"], steps=traj.stats["num_steps"],
                         rejected=traj.stats["num_rejected_steps"],
                         evaluations=traj.stats["num_steps"] * STAGES[solver],
                         error=err, finished=bool(traj.success and traj.t_final >= 3.0))
        print(f"{name:16s} {out[name]['steps']:7d} steps ({out[name]['rejected']} rejected), "
              f"{out[name]['evaluations']:8d} field evals, error {err:.1e}, "
              f"median {C.fmt(out[name]['wall'])}")
    plain = out["Tsit5 plain"]
    best = min((v for k, v in out.items() if "Filippov" in k and v["error"] <= plain["error"]),
               key=lambda v: v["wall"], default=None)
    if best is not None:
        out["speedup_wall"] = plain["wall"] / best["wall"]
        out["fewer_evaluations"] = plain["evaluations"] / best["evaluations"]
        print(f"best Filippov run vs Tsit5 plain: {out['speedup_wall']:.1f}x less wall time, "
              f"{out['fewer_evaluations']:.1f}x fewer field evaluations")
    return out


def part2(args) -> dict:
    rows = {}
    for n in args.sizes:
        model, loss = _digits(n)
        _run(model, loss, "Dopri5", 1e-8, True, 1e-3)  # compile apart
        start = time.perf_counter()
        traj = _run(model, loss, "Dopri5", 1e-8, True, args.t1)
        jax.block_until_ready(traj.final_params)
        wall = time.perf_counter() - start
        crossings = int(traj.monitors["crossings"][-1])
        # accuracy: against the mode's Dopri8 two decades tighter (not timed)
        ref = _run(model, loss, "Dopri8", 1e-10, True, args.t1) if args.reference else None
        error = (float(np.max(np.abs(_flat(traj.final_params) - _flat(ref.final_params))))
                 if ref is not None else float("nan"))
        rows[n] = dict(pairs=n * 64, wall=wall, steps=traj.stats["num_steps"],
                       rejected=traj.stats["num_rejected_steps"],
                       crossings=crossings, entries=int(traj.monitors["sliding_entries"][-1]),
                       overflow=int(traj.monitors["sliding_overflow"][-1]),
                       per_crossing=wall / max(crossings, 1), t_final=traj.t_final,
                       error=error, result=traj.result)
        print(f"N={n:4d} ({n * 64} pairs): {wall:.1f} s, {rows[n]['steps']} steps "
              f"({rows[n]['rejected']} rejected), {crossings} crossings, "
              f"{rows[n]['entries']} sliding entries ({rows[n]['overflow']} overflows), "
              f"{1e3 * rows[n]['per_crossing']:.1f} ms per crossing, reached t = "
              f"{traj.t_final:g}, error vs Dopri8 at 1e-10: {error:.1e}", flush=True)
    return rows


def part3(args) -> dict:
    import dynamics as dyn

    rows = {}
    for n in args.sizes:
        model, loss = _digits(n)

        def run(exact, model=model, loss=loss):
            kw = dict(t1=1e-4, solver=diffrax.Dopri5(), max_steps=10_000,
                      stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8,
                                                                dtmax=1e-6))
            if exact:
                kw["nonsmooth"] = dyn.Filippov()
            return dyn.simulate(dyn.GradientFlow(), model, loss, **kw)

        exact = run(True)
        assert int(exact.monitors["crossings"][-1]) == 0, "a pair crossed: shorten t1"
        steps = exact.stats["num_steps"]
        stats = C.compare({"plain": lambda: run(False).final_params,
                           "Filippov": lambda: run(True).final_params}, args.repeat)
        C.print_stats(stats)
        rows[n] = dict(steps=steps, plain=stats["plain"]["median"] / steps,
                       mode=stats["Filippov"]["median"] / steps)
        rows[n]["ratio"] = rows[n]["mode"] / rows[n]["plain"]
        print(f"N={n}: {steps} steps, {1e3 * rows[n]['plain']:.3f} ms a plain step, "
              f"{1e3 * rows[n]['mode']:.3f} ms a mode step: {rows[n]['ratio']:.2f}x", flush=True)
    code = ("import time, jax; jax.config.update('jax_enable_x64', %r)\n"
            "import diffrax, dynamics as dyn\n"
            "compiled = []\n"
            "jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: "
            "compiled.append(d) if e.endswith('backend_compile_duration') else None)\n"
            "m = dyn.MLP((64, 32, 32, 10), activation=dyn.ReLU(), key=jax.random.key(0))\n"
            "loss = dyn.losses.cross_entropy(dyn.datasets.digits(64))\n"
            "t = time.perf_counter()\n"
            "dyn.simulate(dyn.GradientFlow(), m, loss, t1=0.01, solver=diffrax.Dopri5(), "
            "stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8), "
            "nonsmooth=dyn.Filippov())\n"
            "print(time.perf_counter() - t, sum(compiled))\n") % (args.dtype == "float64")
    firsts = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        firsts.append((float(out[0]), float(out[1])))
    first = float(np.median([f for f, _ in firsts]))
    compile_s = float(np.median([c for _, c in firsts]))
    print(f"first call at N = 64 (fresh process, median of {args.repeat}): {first:.1f} s, "
          f"of which XLA compilation {compile_s:.1f} s", flush=True)
    return dict(sizes=rows, first_call=first, first_call_compile=compile_s,
                first_calls=firsts)


def main():
    args = C.parse_args(__doc__, repeat=5,
                        t1=(float, 5.0, "flow time of part 2"),
                        sizes=(str, "64,128,256", "digits examples of part 2"),
                        part=(str, "123", "which parts to run"),
                        reference=(int, 1, "part 2: also solve a Dopri8 1e-10 reference"))
    args.sizes = [int(s) for s in args.sizes.split(",")]
    result = {"dtype": args.dtype}
    if "1" in args.part:
        result["small"] = part1(args)
    if "2" in args.part:
        result["digits"] = part2(args)
    if "3" in args.part:
        result["quiet"] = part3(args)
    C.save("filippov", result)


if __name__ == "__main__":
    main()
