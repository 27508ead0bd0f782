"""Hessian spectrum monitors on the 26k-parameter MLP: accuracy against ARPACK, HVPs per
save, and time per save against one gradient.

Tanh 64-128-128-10 (26,122 parameters, LeCun init) on all 1797 digits, MSE and
cross-entropy, float64. TopEigenvalues(10) and Sharpness() at the initial parameters and
after 100 GD steps (η = 0.1), each compared with `scipy.sparse.linalg.eigsh` (ARPACK,
which="LA", tol 1e-14) on a LinearOperator of the same jitted HVP. (A dense `eigh` of the
full 26k×26k Hessian needs 5.5 GB and hours here; tests/test_spectrum.py checks the
monitors against dense `eigh` on nets of 460–682 parameters.) Times: one monitor
evaluation, jitted, against one `value_and_grad`, interleaved, medians.
Usage: python benchmarks/bench_spectrum.py [--repeat 5]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
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
    matvec, n, dtype = hessian_operator(problem.loss, w)
    mv = jax.jit(matvec)
    op = LinearOperator((n, n), matvec=lambda u: np.asarray(mv(np.asarray(u, dtype).ravel())),
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


def main() -> None:
    args = parse_args(__doc__, repeat=5)
    data = dyn.datasets.digits()
    model = dyn.MLP(WIDTHS, "tanh", key=jax.random.key(0), init="lecun")
    result = {"widths": WIDTHS}
    for loss_name, loss_fn in (("mse", dyn.losses.mse),
                               ("cross_entropy", dyn.losses.cross_entropy)):
        loss = loss_fn(data)
        gd = dyn.discrete.run(dyn.discrete.GD(0.1), model, loss, 100, save_every=100,
                              check_stability=False)
        for point, params in (("init", model), ("gd100", gd.final_params)):
            w, static = partition(params)
            problem = Problem(None, lambda w, s=static, f=loss: f(eqx.combine(w, s)), static)
            print(f"-- {loss_name}, {point}, n = {ravel_pytree(w)[0].size}")
            result[f"{loss_name}_{point}"] = case(loss_name, point, w, problem, args.repeat)
    save("spectrum", result, args.out)


if __name__ == "__main__":
    main()
