"""Run every benchmark, each in a fresh process, and print a markdown table of the results.

    .venv/bin/python benchmarks/run_all.py [--repeat N] [--only gf_euler tsit5 ...]

(`--only` with no name reruns nothing and prints the table of the results on disk.)

Each script writes benchmarks/results/<name>.json (git-ignored); the table is built from
those files and also written to benchmarks/results/summary.md. The GF/Euler benchmark runs
in float64 and in float32 (cheaper gradients make fixed overheads weigh more); the rest in
float64. Run on a quiet machine: the scripts time wall clock.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = {  # name -> [(script, flags, extra environment)]
    "gf_euler": [("bench_gf_euler.py", (), {}), ("bench_gf_euler.py", ("--float32",), {})],
    "tsit5": [("bench_tsit5.py", (), {}),
              ("bench_tsit5.py", ("--activation", "tanh"), {}),
              ("bench_tsit5.py", ("--examples", "128"), {})],
    "equal_accuracy": [("bench_equal_accuracy.py", ("--activation", "tanh", "--examples", "512",
                                                    "--tmax", "10"), {})],
    "compile": [("bench_compile.py", (), {})],
    "memory": [("bench_memory.py", (), {})],
    "gemm": [("bench_gemm.py", (), {})],
    "sme": [("bench_sme.py", (), {})],
    "conv_gf": [("bench_conv_gf.py", (), {})],
}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def rows() -> list[str]:
    out = ["| benchmark | measured (median) | against (median) | ratio (CPU-time ratio) | target |",
           "| --- | --- | --- | --- | --- |"]
    for dtype in ("float64", "float32"):
        r = load(f"gf_euler_{dtype}")
        if r is None:
            continue
        t = {k: v["median"] for k, v in r["times"].items()}
        cpu = {k: v["cpu"]["median"] for k, v in r["times"].items()}
        head = f"GF Euler {r['steps']} steps, {dtype}"
        for what, num, den, target in (
            ("solve", "simulate_solve", "scan", "<= 1.10"),
            ("`simulate` call", "simulate_call", "scan", "<= 1.10"),
            ("+Loss every step, solve", "simulate_loss_solve", "scan", "<= 1.25"),
            ("+Loss every step, call", "simulate_loss_call", "scan", "<= 1.25"),
            ("+Loss every step, solve", "simulate_loss_solve", "scan_value_and_grad", "-"),
            ("+Loss every step, solve", "simulate_loss_solve", "scan_separate_loss", "-"),
        ):
            out.append(f"| {head}: {what} | {ms(t[num])} | {den} {ms(t[den])} | "
                       f"{t[num] / t[den]:.2f} ({cpu[num] / cpu[den]:.2f}) | {target} |")
    for variant in ("", "_tanh", "_n128"):
        r = load(f"tsit5_float64{variant}")
        if r is None:
            continue
        t = {k: v["median"] for k, v in r["times"].items()}
        cpu = {k: v["cpu"]["median"] for k, v in r["times"].items()}
        w = r["work"]
        setting = (f"t1={r['t1']:g} rtol=atol={r['rtol']:g}, {r.get('activation', 'relu')}, "
                   f"{r.get('examples', 1797)} examples")
        for ours, other, target in (
            ("simulate", "scipy", ">= 1.5x faster"),
            ("simulate", "scipy_default_blas", "-"),
            ("simulate", "torchdiffeq", ">= 2x faster"),
            ("simulate_dopri5", "scipy", "-"),
            ("simulate_dopri5", "scipy_default_blas", "-"),
            ("simulate_dopri5", "torchdiffeq", "-"),
        ):
            solver = "Tsit5" if ours == "simulate" else "Dopri5"
            out.append(
                f"| {solver} {setting}: simulate vs {other} | {ms(t[ours])} "
                f"({w[ours]['nfev']} evals) | {other} {ms(t[other])} ({w[other]['nfev']} "
                f"evals) | {t[other] / t[ours]:.2f}x faster ({cpu[other] / cpu[ours]:.2f}x) | "
                f"{target if not variant else '-'} |")
    r = load("compile")
    if r is not None:
        for flow, s in r["times"].items():
            split = r["split_medians"][flow]
            label = "GF by bare diffrax.diffeqsolve" if flow == "diffrax" else flow
            out.append(f"| compile, quickstart {label} | {s['median']:.2f} s (min {s['min']:.2f},"
                       f" max {s['max']:.2f}) | XLA compile {split['xla_compile']:.2f} s, "
                       f"trace {split['trace']:.2f} s | - | - |")
    r = load("memory")
    if r is not None:
        for name, run in r["runs"].items():
            out.append(f"| memory, 1.06M params, 500 steps, {name} | peak RSS "
                       f"{run['peak_rss_gb']:.2f} GB ({run['peak_rss_after_solve_gb']:.2f} GB "
                       f"when the solve returns) | params at every step "
                       f"{r['params_every_step_estimate_gb']:.2f} GB | - | - |")
    r = load("gemm_float64")
    if r is not None:
        g = r["gflops"]
        for shape in ("forward", "weight_grad"):
            out.append(f"| float64 matrix product, {shape} | XLA {g[f'jax_{shape}']:.1f} GFLOP/s "
                       f"| numpy {g[f'numpy_{shape}']:.1f}, torch {g[f'torch_{shape}']:.1f} "
                       f"GFLOP/s | - | - |")
    r = load("sme_float64")
    if r is not None:
        t = {k: v["median"] for k, v in r["times"].items()}
        cpu = {k: v["cpu"]["median"] for k, v in r["times"].items()}
        for what, num, den, target in (
            ("EM SME-1 100 paths, solve", "simulate_solve_100", "scan_100", "<= 1.2"),
            ("EM SME-1 100 paths, `simulate` call", "simulate_call_100", "scan_100", "<= 1.2"),
            ("EM SME-1 1 path, `simulate` call", "simulate_call_1", "scan_1", "-"),
        ):
            out.append(f"| {what} | {ms(t[num])} | lax.scan {ms(t[den])} | "
                       f"{t[num] / t[den]:.2f} ({cpu[num] / cpu[den]:.2f}) | {target} |")
        for name in ("digits", "toy"):
            num, den = f"{name}_loop_1000", f"{name}_vmapped_1000"
            out.append(f"| SME 1,000 paths ({name}): vmapped vs a loop of single paths | "
                       f"{ms(t[den])} | loop {ms(t[num])} | {t[num] / t[den]:.1f}x faster "
                       f"({cpu[num] / cpu[den]:.1f}x) | >= 50x |")
    r = load("conv_gf_float64")
    if r is not None:
        t = {k: v["median"] for k, v in r["times"].items()}
        cpu = {k: v["cpu"]["median"] for k, v in r["times"].items()}
        for what, num in (("solve", "simulate_solve"), ("`simulate` call", "simulate_call")):
            out.append(f"| GF Euler {r['steps']} steps, Theory III conv net "
                       f"({r['num_params']} params), {what} | {ms(t[num])} | lax.scan "
                       f"{ms(t['scan'])} | {t[num] / t['scan']:.2f} "
                       f"({cpu[num] / cpu['scan']:.2f}) | <= 1.10 |")
    steal = {p.stem: json.loads(p.read_text())["machine"].get("steal_fraction")
             for p in sorted(RESULTS.glob("*.json"))}
    out.append("")
    out.append("Hypervisor steal while each ran (share of CPU time): " + ", ".join(
        f"{k} {v:.0%}" for k, v in steal.items() if v is not None))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, help="passed on to every script")
    p.add_argument("--only", nargs="*", choices=list(SCRIPTS), default=list(SCRIPTS))
    args = p.parse_args()
    for name in args.only:
        for script, flags, env in SCRIPTS[name]:  # env: kept for variants that need one
            cmd = [sys.executable, str(HERE / script), *flags]
            if args.repeat:
                cmd += ["--repeat", str(args.repeat)]
            print(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd[1:])}",
                  flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, **env})
    table = "\n".join(rows())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
