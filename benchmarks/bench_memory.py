"""Peak memory of a long GF run that records only the loss, against storing every state.

Problem: MLP 256-1024-768-10 (ReLU, biases; 1,058,058 parameters) on 128 random examples
with cross-entropy, 500 Euler steps of GF (dt = 0.01), the Loss monitor saved at every
step (`ts` = 501 times), float64.

- `save_params=False`: peak resident memory (`resource.getrusage(...).ru_maxrss`) of a
  fresh subprocess, and its growth over the RSS just before the `simulate` call (which
  includes compiling it); also the peak when the jitted solve returns, before `simulate`
  turns its output into a `Trajectory`. Target: far below the ~4.2 GB that storing the parameters at
  every save time needs (501 x 1,058,058 x 8 bytes).
- `save_params=True`: the same in another subprocess, for comparison; skipped when twice
  that estimate exceeds 12 GiB or the memory available now.
"""

import json
import resource
import subprocess
import sys
import time

import psutil
from _common import parse_args, save

WIDTHS = (256, 1024, 768, 10)
N_EXAMPLES, STEPS, DT = 128, 500, 0.01


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child(save_params: bool) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    from _common import mlp, num_params

    import dynamics as dyn
    import dynamics._simulate
    import dynamics.datasets
    import dynamics.losses

    solve, after_solve = dynamics._simulate.solve, {}

    def spy(*args, **kwargs):
        out = jax.block_until_ready(solve(*args, **kwargs))
        after_solve["peak_gb"] = peak_gb()
        return out

    dynamics._simulate.solve = spy
    jax.config.update("jax_enable_x64", True)
    kx, ky = jax.random.split(jax.random.key(1))
    data = dynamics.datasets.Dataset(
        jax.random.normal(kx, (N_EXAMPLES, WIDTHS[0])),
        jax.random.randint(ky, (N_EXAMPLES,), 0, WIDTHS[-1]), num_classes=WIDTHS[-1])
    model, loss = mlp(WIDTHS), dynamics.losses.cross_entropy(data)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    traj = dyn.simulate(
        dyn.GradientFlow(), model, loss, t1=STEPS * DT, solver=diffrax.Euler(), dt0=DT,
        stepsize_controller=diffrax.ConstantStepSize(), ts=jnp.arange(STEPS + 1) * DT,
        monitors=(dyn.monitors.Loss(),), save_params=save_params)
    seconds = time.perf_counter() - start
    saved = sum(x.nbytes for x in jax.tree.leaves(traj.params) if hasattr(x, "nbytes"))
    return {
        "save_params": save_params, "num_params": num_params(model), "steps": STEPS,
        "saved_times": len(traj.ts), "loss_first_last": [float(traj.monitors["loss"][0]),
                                                         float(traj.monitors["loss"][-1])],
        "rss_before_gb": rss_before / 1e9,
        "peak_rss_gb": peak_gb(), "peak_rss_after_solve_gb": after_solve["peak_gb"],
        "trajectory_params_gb": saved / 1e9, "seconds_first_call": seconds,
    }


def run_child(save_params: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(save_params)], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["growth_gb"] = r["peak_rss_gb"] - r["rss_before_gb"]
    return r


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "True")))
        return
    args = parse_args(__doc__, repeat=5)
    if args.float32:
        sys.exit("bench_memory measures float64 only")
    lean = run_child(False)
    estimate_gb = (STEPS + 1) * lean["num_params"] * 8 / 1e9
    print(f"{lean['num_params']:,} parameters; storing them at {STEPS + 1} save times "
          f"takes {estimate_gb:.2f} GB")
    runs = {"save_params=False": lean}
    available = psutil.virtual_memory().available / 1e9
    if 2 * estimate_gb > min(12 * 2**30 / 1e9, available):
        print(f"  save_params=True skipped ({available:.1f} GB available)")
    else:
        runs["save_params=True"] = run_child(True)
    for name, r in runs.items():
        print(f"  {name:<18} peak RSS {r['peak_rss_gb']:.2f} GB (RSS before the call "
              f"{r['rss_before_gb']:.2f} GB, growth {r['growth_gb']:.2f} GB; peak when the "
              f"jitted solve returned {r['peak_rss_after_solve_gb']:.2f} GB); trajectory "
              f"params {r['trajectory_params_gb']:.2f} GB; {r['seconds_first_call']:.1f} s")
    save("memory", {"widths": WIDTHS, "examples": N_EXAMPLES, "dt": DT,
                    "params_every_step_estimate_gb": estimate_gb, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
