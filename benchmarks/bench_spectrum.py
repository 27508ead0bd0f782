"""Hessian spectrum monitors on the 26k-parameter MLP: accuracy against ARPACK, HVPs per
save, and time per save against one gradient; cold and warm-started.

Tanh 64-128-128-10 (26,122 parameters, LeCun init) on all 1797 digits, MSE and
cross-entropy, float64.

Part `cold`: TopEigenvalues(10) and Sharpness() at the initial parameters and after 100
GD steps (η = 0.1), each compared with `scipy.sparse.linalg.eigsh` (ARPACK, which="LA",
tol 1e-14) on a LinearOperator of the same jitted HVP. (A dense `eigh` of the full
26k×26k Hessian needs 5.5 GB and hours here; tests/test_spectrum.py checks the monitors
against dense `eigh` on nets of 460–682 parameters.) Times: one monitor evaluation,
jitted, against one `value_and_grad`, interleaved, medians.

Part `warm`: the same monitors inside runs of 12 saves, warm-started (the default) and
with `warm=False`: gradient flow (`simulate`, Tsit5) from the initial parameters and from
the 100-GD-step point with saves Δt = 0.02 apart, and from the latter Δt = 0.1 apart; GD
(η = 0.1, `discrete.run`, a save at every step) from the latter. Per save: the HVPs
(the `<name>_hvps` records), the largest difference warm − cold relative to λ_1, and at
saves 0, 4, 8, 11 the largest relative error of the ten eigenvalues against ARPACK.
Times: the second (compiled) call of the Δt = 0.02 run from the 100-step point, warm and
cold, one each.
Usage: python benchmarks/bench_spectrum.py [--repeat 5] [--parts cold,warm]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import compare, parse_args, print_stats, ratio, save  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.sparse.linalg import LinearOperator, eigsh  # noqa: E402

import dynamics as dyn  # noqa: E402
from dynamics._lanczos import hessian_operator  # noqa: E402
from dynamics._problem import Problem  # noqa: E402
from dynamics._tree import partition  # noqa: E402
from dynamics.monitors._spectrum import top_eigenvalues  # noqa: E402

WIDTHS = (64, 128, 128, 10)


def arpack(problem, w, k):
    _, n, dtype = hessian_operator(problem.loss, w)
    # w as an argument, not a constant of the program: XLA would fold the products of
    # the data with the weights at compile time (seconds per call at this size).
    mv = jax.jit(lambda w, u: hessian_operator(problem.loss, w)[0](u))
    op = LinearOperator((n, n),
                        matvec=lambda u: np.asarray(mv(w, np.asarray(u, dtype).ravel())),
                        dtype=np.float64)
    return np.sort(eigsh(op, k=k, which="LA", tol=1e-14, ncv=max(2 * k + 1, 40),
                         return_eigenvectors=False))[::-1]


def case(loss_name, point, w, problem, repeat):
    out = {}
    solve = {k: jax.jit(lambda w, k=k: top_eigenvalues(problem, w, k, None, 1000, 0, "bench"))
             for k in (1, 10)}
    for k in (1, 10):
        r = solve[k](w)
        ref = arpack(problem, w, k)
        err = np.abs(np.asarray(r["evals"]) - ref) / np.abs(ref)
        out[f"k{k}"] = {"hvps": int(r["matvecs"]), "max_rel_error": float(err.max()),
                        "evals": np.asarray(r["evals"]).tolist(), "arpack": ref.tolist()}
        print(f"{loss_name} {point} k={k}: {int(r['matvecs'])} HVPs, max rel error vs ARPACK "
              f"{err.max():.2e} (λ1 = {ref[0]:.6g})")
    grad = jax.jit(jax.value_and_grad(problem.loss))
    stats = compare({"gradient": lambda: grad(w), "sharpness": lambda: solve[1](w)["evals"],
                     "top10": lambda: solve[10](w)["evals"]}, repeat=repeat)
    print_stats(stats)
    out["stats"] = stats
    for k, name in ((1, "sharpness"), (10, "top10")):
        out[f"k{k}"]["time_per_save_in_gradients"] = ratio(stats, name, "gradient")
        print(f"  {name}: {ratio(stats, name, 'gradient'):.1f} gradients per save")
    return out


SAVES = 12
REFERENCE_SAVES = (0, 4, 8, 11)


def monitors(warm: bool):
    return (dyn.monitors.TopEigenvalues(10, warm=warm), dyn.monitors.Sharpness(warm=warm))


def warm_case(label, run, loss):
    """`run(monitors)` warm and cold: HVPs per save, warm − cold, and ARPACK at a few
    saves (the parameters of each save from the warm run)."""
    warm, cold = run(monitors(True)), run(monitors(False))
    top, ref_top = np.asarray(warm.monitors["top_eigenvalues"]), \
        np.asarray(cold.monitors["top_eigenvalues"])
    lam1 = np.abs(ref_top[:, 0])
    diff = np.max(np.abs(top - ref_top), axis=1) / lam1
    sharp_diff = np.abs(np.asarray(warm.monitors["sharpness"])
                        - np.asarray(cold.monitors["sharpness"])) / lam1
    errors = {}
    for i in REFERENCE_SAVES:
        params = jax.tree.map(lambda a, i=i: a[i] if eqx.is_array(a) else a, warm.params)
        w, static = partition(params)
        problem = Problem(None, lambda w, s=static: loss(eqx.combine(w, s)), static)
        ref = arpack(problem, w, 10)
        errors[i] = float(np.max(np.abs(top[i] - ref) / np.abs(ref)))
    out = {
        "hvps_top10": np.asarray(warm.monitors["top_eigenvalues_hvps"]).tolist(),
        "hvps_top10_cold": np.asarray(cold.monitors["top_eigenvalues_hvps"]).tolist(),
        "hvps_sharpness": np.asarray(warm.monitors["sharpness_hvps"]).tolist(),
        "hvps_sharpness_cold": np.asarray(cold.monitors["sharpness_hvps"]).tolist(),
        "max_rel_diff_warm_cold": float(diff.max()),
        "max_rel_diff_warm_cold_sharpness": float(sharp_diff.max()),
        "max_rel_error_vs_arpack": errors,
    }
    print(f"{label}: TopEigenvalues(10) HVPs warm {out['hvps_top10']}")
    print(f"{' ' * len(label)}                        cold {out['hvps_top10_cold']}")
    print(f"{' ' * len(label)}  Sharpness() HVPs warm {out['hvps_sharpness']}, cold "
          f"{out['hvps_sharpness_cold']}")
    print(f"{' ' * len(label)}  warm − cold ≤ {diff.max():.1e}·λ1 (sharpness "
          f"{sharp_diff.max():.1e}); vs ARPACK at saves {list(errors)}: "
          f"≤ {max(errors.values()):.1e}")
    return out


def warm_part(loss_name, loss, model, gd100) -> dict:
    out = {}

    def flow(params, dt):
        ts = jnp.arange(SAVES) * dt

        def run(mons):
            return dyn.simulate(dyn.GradientFlow(), params, loss, t1=float(ts[-1]), ts=ts,
                                monitors=mons)

        return run

    for label, params, dt in (("gf_init_dt0.02", model, 0.02),
                              ("gf_gd100_dt0.02", gd100, 0.02),
                              ("gf_gd100_dt0.1", gd100, 0.1)):
        out[label] = warm_case(f"{loss_name} {label}", flow(params, dt), loss)

    def gd(mons):
        return dyn.discrete.run(dyn.discrete.GD(0.1), gd100, loss, SAVES - 1,
                                monitors=mons, check_stability=False)

    out["gd_gd100_eta0.1"] = warm_case(f"{loss_name} gd_gd100_eta0.1", gd, loss)
    # Wall time of a compiled run (the second call), warm against cold.
    times = {}
    for warm in (True, False):
        run = flow(gd100, 0.02)
        start = time.perf_counter()
        jax.block_until_ready(run(monitors(warm)).monitors["top_eigenvalues"])
        times["warm" if warm else "cold"] = time.perf_counter() - start
    out["seconds_gf_gd100_dt0.02"] = times
    print(f"{loss_name}: the Δt = 0.02 run from the 100-step point, compiled: "
          f"warm {times['warm']:.1f} s, cold {times['cold']:.1f} s")
    return out


def main() -> None:
    args = parse_args(__doc__, repeat=5,
                      parts=(str, "cold,warm", "comma-separated parts: cold, warm"))
    parts = set(args.parts.split(","))
    data = dyn.datasets.digits()
    model = dyn.MLP(WIDTHS, "tanh", key=jax.random.key(0), init="lecun")
    result = {"widths": WIDTHS}
    for loss_name, loss_fn in (("mse", dyn.losses.mse),
                               ("cross_entropy", dyn.losses.cross_entropy)):
        loss = loss_fn(data)
        gd = dyn.discrete.run(dyn.discrete.GD(0.1), model, loss, 100, save_every=100,
                              check_stability=False)
        if "cold" in parts:
            for point, params in (("init", model), ("gd100", gd.final_params)):
                w, static = partition(params)
                problem = Problem(None, lambda w, s=static, f=loss: f(eqx.combine(w, s)),
                                  static)
                print(f"-- {loss_name}, {point}, n = {ravel_pytree(w)[0].size}")
                result[f"{loss_name}_{point}"] = case(loss_name, point, w, problem,
                                                      args.repeat)
        if "warm" in parts:
            print(f"-- {loss_name}, warm start along runs of {SAVES} saves")
            result[f"{loss_name}_warm"] = warm_part(loss_name, loss, model, gd.final_params)
    save("spectrum" if parts == {"cold", "warm"} else f"spectrum_{'_'.join(sorted(parts))}",
         result, args.out)


if __name__ == "__main__":
    main()
