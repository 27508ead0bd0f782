"""Shared helpers for the benchmarks: timing, the reference problem, machine info, results.

Timing rules (every script follows them): compilation is excluded by warm-up calls; each
call is closed by `jax.block_until_ready`; the compared functions are run interleaved
(A, B, A, B, ...) so that load from other processes hits both alike; we report
min / median / max over >= 5 runs and compute ratios of medians in the same process.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def _steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other machines (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


_START = (time.perf_counter(), _steal_seconds())


def parse_args(doc: str, repeat: int = 7, **extra: tuple[type, object, str]):
    """Command line shared by all scripts: --repeat, --float32, --out, plus `extra`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeat", type=int, default=repeat, help="timed runs per function (>= 5)")
    p.add_argument("--float32", action="store_true", help="measure in float32 (default float64)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    for name, (typ, default, help_) in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=default, help=help_)
    args = p.parse_args()
    if args.repeat < 5:
        p.error("--repeat must be >= 5 (we report medians)")
    jax.config.update("jax_enable_x64", not args.float32)
    args.dtype = "float32" if args.float32 else "float64"
    return args


def summary(times: list[float]) -> dict:
    return {
        "min": min(times),
        "median": statistics.median(times),
        "max": max(times),
        "runs": len(times),
        "all": times,
    }


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict:
    """Time each zero-argument function `repeat` times, interleaved, after `warmup` calls.

    Returns wall-clock statistics per name, with the process CPU time (all threads) under
    "cpu": a second view that other processes' load disturbs less than the wall clock.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: {**summary([w for w, _ in t]), "cpu": summary([c for _, c in t])}
            for name, t in times.items()}


def ratio(stats: dict, num: str, den: str, key: str | None = None) -> float:
    """Ratio of medians, of wall time (default) or of `key` ("cpu")."""
    a, b = (stats[num], stats[den]) if key is None else (stats[num][key], stats[den][key])
    return a["median"] / b["median"]


def mlp(widths, *, activation="relu", key=0):
    """`dyn.MLP` with biases and the named activation (see `dyn.activation_from_name`)."""
    import dynamics as dyn

    return dyn.MLP(tuple(widths), activation=dyn.activation_from_name(activation), bias=True,
                   key=jax.random.key(key))


def digits_problem(widths=(64, 128, 128, 10), activation="relu", examples=None):
    """The reference problem: an MLP on the digits (all 1797 unless `examples` says
    how many of the first) with cross-entropy."""
    import dynamics.datasets
    import dynamics.losses

    data = dynamics.datasets.digits(examples)
    return mlp(widths, activation=activation), dynamics.losses.cross_entropy(data), data


def inner_call(module, name: str, call: Callable[[], object]) -> Callable[[], object]:
    """Run `call()` once and return a thunk re-running the jitted `module.name` it made,
    with the same arguments (the inner loop alone, without the Python-side checks and
    post-processing around it)."""
    seen, inner = {}, getattr(module, name)

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return inner(*args, **kwargs)

    setattr(module, name, spy)
    try:
        call()
    finally:
        setattr(module, name, inner)
    return lambda: inner(*seen["args"], **seen["kwargs"])


def gd_loops(static, steps: int, eta: float):
    """The hand-written GD baselines, jitted, taking (w, loss) with `loss` a traced
    argument as in `dyn.simulate` and `dyn.discrete.run`:

    - `plain`: `lax.scan` of w <- w - eta * grad L(w);
    - `value_and_grad`: the same with `jax.value_and_grad`, the loss at w_k for free
      (plus one loss at the end), returning (w, losses);
    - `separate`: L(w_{k+1}) evaluated separately after each update (plus L(w_0)).
    """
    import equinox as eqx
    import jax.numpy as jnp

    def loss_of(loss, w):
        return loss(eqx.combine(w, static))

    def update(w, g):
        return jax.tree.map(lambda a, b: a - eta * b, w, g)

    @eqx.filter_jit
    def plain(w, loss):
        def step(w, _):
            return update(w, jax.grad(loss_of, argnums=1)(loss, w)), None

        return jax.lax.scan(step, w, length=steps)[0]

    @eqx.filter_jit
    def value_and_grad(w, loss):
        def step(w, _):
            value, g = jax.value_and_grad(loss_of, argnums=1)(loss, w)
            return update(w, g), value

        w, values = jax.lax.scan(step, w, length=steps)
        return w, jnp.append(values, loss_of(loss, w))

    @eqx.filter_jit
    def separate(w, loss):
        def step(w, _):
            w = update(w, jax.grad(loss_of, argnums=1)(loss, w))
            return w, loss_of(loss, w)

        w_end, values = jax.lax.scan(step, w, length=steps)
        return w_end, jnp.concatenate([loss_of(loss, w)[None], values])

    return plain, value_and_grad, separate


def max_abs_diff(a, b) -> float:
    """max |a − b| over the leaves of two pytrees of the same structure."""
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class EulerCase:
    """Gradient flow by fixed-step Euler through `dyn.simulate` beside the hand-written
    `lax.scan` GD loops of the same field (`gd_loops`), checked equal before timing:
    `sim()` the timed call (no params saved), `plain`, `value_and_grad`, `separate` the
    loops, `w0` the start, `euler` the simulate keywords, `err` max |w_sim − w_gd|."""

    def __init__(self, model, loss, steps: int, eta: float):
        import diffrax
        import equinox as eqx

        import dynamics as dyn

        self.model, self.loss = model, loss
        self.w0, static = eqx.partition(model, eqx.is_inexact_array)
        self.plain, self.value_and_grad, self.separate = gd_loops(static, steps, eta)
        self.euler = dict(t1=steps * eta, solver=diffrax.Euler(), dt0=eta,
                          stepsize_controller=diffrax.ConstantStepSize(), save_params=False)
        # Same number of gradient evaluations, same result: check before timing.
        # (`save_params=False` returns no final params, so this one check saves them.)
        traj = dyn.simulate(dyn.GradientFlow(), model, loss,
                            **{**self.euler, "save_params": True})
        assert traj.stats["num_steps"] == steps, traj.stats
        w_sim = eqx.filter(traj.final_params, eqx.is_inexact_array)
        self.err = max_abs_diff(w_sim, self.plain(self.w0, loss))

    def sim(self, **kwargs):
        import dynamics as dyn

        return dyn.simulate(dyn.GradientFlow(), self.model, self.loss, **self.euler, **kwargs)


def ratio_table(stats: dict, pairs: dict[str, tuple[str, str]]) -> tuple[dict, dict]:
    """Wall-time and CPU-time ratios of medians for each named (numerator, denominator)
    pair, printed one per line; returns (ratios, cpu_ratios)."""
    ratios = {name: ratio(stats, *pair) for name, pair in pairs.items()}
    cpu = {name: ratio(stats, *pair, "cpu") for name, pair in pairs.items()}
    width = max(map(len, pairs))
    for name, r in ratios.items():
        print(f"  {name:<{width}} {r:.3f} (CPU time {cpu[name]:.3f})")
    return ratios, cpu


def num_params(tree) -> int:
    import equinox as eqx

    return sum(x.size for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)))


def machine() -> dict:
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem_gb = None
    wall, steal = time.perf_counter() - _START[0], _steal_seconds()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        # Share of the machine's CPU time stolen by the hypervisor while this script ran:
        # above a few percent, trust the CPU-time ratios more than the wall-clock ones.
        "steal_fraction": None if steal is None else (steal - _START[1]) / (wall * os.cpu_count()),
        "memory_gib": mem_gb,
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        **{p: ver(p) for p in ("jax", "jaxlib", "equinox", "diffrax", "scipy", "torch",
                               "torchdiffeq", "numpy")},
    }


def save(name: str, result: dict, out: Path = RESULTS) -> Path:
    """Write results/<name>.json (with machine info) and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    result = {"benchmark": name, "argv": sys.argv[1:], "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    steal = result["machine"]["steal_fraction"]
    print(f"wrote {path}" + ("" if steal is None else f" (hypervisor steal: {steal:.0%})"))
    return path


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def print_stats(stats: dict) -> None:
    width = max(map(len, stats))
    for name, s in stats.items():
        cpu = f"; CPU median {fmt(s['cpu']['median'])}" if "cpu" in s else ""
        print(f"  {name:<{width}}  median {fmt(s['median'])}  "
              f"(min {fmt(s['min'])}, max {fmt(s['max'])}, n={s['runs']}){cpu}")
