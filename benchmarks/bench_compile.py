"""Compile time of a quickstart-like `simulate` call, for GF, Newtonian and Nesterov flows.

The call: MLP 64-32-32-10 (ReLU) on all 1797 digits with cross-entropy, Tsit5 with
`PIDController(rtol=atol=1e-6)`, t in [0, 10], `ts` = 101 points, Loss and Energy monitors.
Compile time = wall time of the first call minus that of the second (same arguments, so
the second reuses the compiled solve). Each flow is measured in a fresh subprocess (so no
flow profits from tracing caches warmed by another), `--repeat` times; we report
min / median / max, and the median of JAX's own split of the first call into tracing,
lowering to MLIR and XLA compilation (`jax.monitoring` duration events). For scale,
`diffrax` is the same GF solve written directly with `diffrax.diffeqsolve` (loss saved
at `ts` by `SaveAt(fn=...)`, no events, no Trajectory).
"""

import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from _common import parse_args, print_stats, save, summary

FLOWS = ("GradientFlow", "NewtonianFlow", "NesterovFlow", "diffrax")
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla_compile",
}


def child(flow_name: str) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    from _common import digits_problem

    import dynamics as dyn

    durations = defaultdict(float)

    def listener(event, seconds, **kwargs):
        if event in EVENTS:
            durations[EVENTS[event]] += seconds

    import equinox as eqx

    model, loss, _ = digits_problem((64, 32, 32, 10))
    ts = jnp.linspace(0.0, 10.0, 101)
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)

    @eqx.filter_jit
    def diffrax_only(w, static, loss):
        def loss_of(w):
            return loss(eqx.combine(w, static))

        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, w, _: jax.tree.map(lambda g: -g, jax.grad(loss_of)(w))),
            diffrax.Tsit5(), 0.0, 10.0, 1e-2, w, stepsize_controller=controller,
            saveat=diffrax.SaveAt(ts=ts, fn=lambda t, w, _: loss_of(w)))

    def call():
        start = time.perf_counter()
        if flow_name == "diffrax":
            sol = diffrax_only(*eqx.partition(model, eqx.is_inexact_array), loss)
            jax.block_until_ready(sol.ys)
            return time.perf_counter() - start, int(sol.stats["num_steps"])
        traj = dyn.simulate(
            getattr(dyn, flow_name)(), model, loss, t1=10.0, solver=diffrax.Tsit5(),
            dt0=1e-2, stepsize_controller=controller, ts=ts,
            monitors=(dyn.monitors.Loss(), dyn.monitors.Energy()), save_params=False)
        jax.block_until_ready(traj.monitors)
        return time.perf_counter() - start, traj.stats["num_steps"]

    jax.monitoring.register_event_duration_secs_listener(listener)
    first, steps = call()
    split = dict(durations)
    second, _ = call()
    return {"first": first, "second": second, "compile": first - second, "steps": steps,
            **split}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        import jax

        jax.config.update("jax_enable_x64", True)  # before any array is made
        print(json.dumps(child(sys.argv[2])))
        return
    args = parse_args(__doc__, repeat=5)
    if args.float32:
        sys.exit("bench_compile measures float64 only")
    runs = {f: [] for f in FLOWS}
    for _ in range(args.repeat):
        for flow in FLOWS:
            out = subprocess.run([sys.executable, __file__, "--child", flow], check=True,
                                 capture_output=True, text=True).stdout
            runs[flow].append(json.loads(out.strip().splitlines()[-1]))
    stats = {f: summary([r["compile"] for r in rs]) for f, rs in runs.items()}
    print("compile time = first call - second call, each flow in a fresh process:")
    print_stats(stats)
    split = {f: {k: statistics.median(r[k] for r in rs)
                 for k in ("first", "second", "trace", "lower", "xla_compile", "steps")}
             for f, rs in runs.items()}
    for f, s in split.items():
        print(f"  {f:<14} first {s['first']:.2f} s, second {s['second']:.2f} s "
              f"({s['steps']} steps); trace {s['trace']:.2f} s, lower {s['lower']:.2f} s, "
              f"XLA compile {s['xla_compile']:.2f} s")
    save("compile", {"times": stats, "split_medians": split, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
