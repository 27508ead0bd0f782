"""Hessian spectrum monitors: the top eigenvalues (sharpness) by Lanczos, and the spectral
density by stochastic Lanczos quadrature, both on Hessian–vector products of the loss.

A monitor is a function of the state at one save (`AbstractMonitor`): `simulate` saves it
through diffrax's `SaveAt(fn=...)`, which carries nothing from one save to the next, so
each save starts Lanczos cold, from a fixed random vector, and runs it to a tolerance
(an adaptive number of HVPs); see `TopEigenvalues` for the measured cost and accuracy.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._lanczos import (
    gauss_rule,
    hessian_operator,
    hessian_top_eigenpairs,
    lanczos_tridiagonal,
)
from .._problem import Problem
from .._validate import positive_int, real
from ._monitors import AbstractMonitor

# Default relative eigenvalue-error target of the Lanczos stopping test, by precision:
# 1e-10 in float64 (measured true errors 1e-12 to 1e-11, below); in float32 a Rayleigh
# quotient is good to ~eps·‖H‖, so 1e-5 is what float32 can certify.
_TOL = {8: 1e-10, 4: 1e-5}

def _count(value, name: str, owner: str, low: int = 1) -> int:
    return positive_int(value, name, owner, low=low)


class AbstractSpectrumMonitor(AbstractMonitor):
    """A monitor of the spectrum of ∇²L(w), the Hessian of the loss in the dynamic
    parameters (flattened in `jax.flatten_util.ravel_pytree` order), computed from
    Hessian–vector products ∇²L(w)u = d/dε ∇L(w + εu) (forward over reverse mode, about
    three gradients' cost each) without forming the Hessian.

    **Non-smooth losses.** On a ReLU or LeakyReLU network the loss is only piecewise
    twice differentiable. Automatic differentiation takes σ'' = 0, so a spectrum monitor
    returns the spectrum of the Hessian of the smooth piece that contains w (the
    current activation pattern held fixed); it jumps where a unit switches, and the
    singular part that lives on the switching surfaces is not seen. This is what
    edge-of-stability papers measure on ReLU nets; for a continuous λ_max(t) use a
    smooth activation (tanh, softplus, GELU)."""


def top_eigenvalues(problem: Problem, w, k: int, tol: float | None, max_hvp: int,
                    seed: int, owner: str) -> dict:
    """The k largest eigenpairs of ∇²L(w) (`dynamics._lanczos.hessian_top_eigenpairs` on
    the problem's loss)."""
    if tol is None:
        tol = _TOL.get(jnp.dtype(jnp.result_type(*jax.tree.leaves(w))).itemsize, 1e-10)
    return hessian_top_eigenpairs(problem.loss, w, k, tol=tol, max_hvp=max_hvp, seed=seed,
                                  owner=owner)


class TopEigenvalues(AbstractSpectrumMonitor):
    """The k algebraically largest eigenvalues λ_1 ≥ … ≥ λ_k of the Hessian ∇²L(w),
    recorded as a (k,) array at every save (`coords`: `index` 1..k).

    λ_1 is the sharpness; gradient descent with step η is stable along the top
    eigenvector while η·λ_1 < 2, and full-batch GD at practical step sizes drives λ_1 up
    to 2/η and hovers there (progressive sharpening and the edge of stability, Cohen et
    al., "Gradient descent on neural networks typically occurs at the edge of
    stability", ICLR 2021).

    **Method.** Thick-restart Lanczos with full reorthogonalisation on Hessian–vector
    products (`dynamics/_lanczos.py`), float64, started at every save from the
    same random vector (`seed`): a monitor sees one save at a time (diffrax's `SaveAt(fn=
    ...)` carries no state between saves), so the previous save's Ritz vectors are not
    available for a warm start. It stops when every wanted Ritz pair has the eigenvalue
    error estimate min(‖r_i‖, ‖r_i‖²/gap_i) ≤ `tol`·|λ_1| (r_i the Ritz residual), or
    after `max_hvp` products. With n no larger than the Lanczos basis (max(2k + 20, 40))
    the Hessian is formed from n products and diagonalised exactly instead.

    **Cost and accuracy (measured, benchmarks/bench_spectrum.py and tests/test_spectrum
    .py).** On a 64-128-128-10 tanh MLP on digits (26,122 parameters; MSE and
    cross-entropy, at init and after 100 GD steps), k = 10 at the default tol: 43–88
    HVPs per save (2–3.6 gradients each), and the largest relative error of the ten
    eigenvalues against ARPACK (`scipy.sparse.linalg.eigsh`) is ≤ 8e-12. k = 1 takes
    14–24 HVPs. Against a dense `eigh` of the full Hessian on MLPs of 460–2,410
    parameters (MSE and cross-entropy) the errors are ≤ 1e-9 relative. Where λ_i is part
    of a tight cluster the ‖r‖²/gap estimate is optimistic and convergence slower.

    On a ReLU network: see `AbstractSpectrumMonitor`.

    **Arguments:**

    - `k`: how many eigenvalues (≥ 1, at most the number of parameters; checked when
      the monitor first runs, where the parameters are known).
    - `tol`: relative eigenvalue error the stopping test aims at, in (0, 1); default
      1e-10 in float64, 1e-5 in float32 (what a float32 Rayleigh quotient resolves).
    - `max_hvp`: cap on the HVPs of one save (≥ k + 1); a save that reaches it records
      the current Ritz values, less accurate than `tol`.
    - `seed`: the start vector's PRNG seed (the same at every save).
    - `name`: the record's name (default `top_eigenvalues`).

    **Raises:** `ValueError` for k < 1, a tol outside (0, 1), `max_hvp` ≤ k, and (when
    the monitor first runs) k larger than the number of parameters.
    """

    k: int
    tol: float | None = None
    max_hvp: int = 1000
    seed: int = 0
    name: str = "top_eigenvalues"

    def __check_init__(self):
        _check_common(self, "TopEigenvalues")

    def __call__(self, t, w, v, problem) -> Array:
        out = top_eigenvalues(problem, w, self.k, self.tol, self.max_hvp, self.seed,
                              "TopEigenvalues")
        return out["evals"]


    def coords(self, params):
        """`index`: 1 for the largest eigenvalue, ..., k."""
        return {"index": np.arange(1, self.k + 1)}


class Sharpness(AbstractSpectrumMonitor):
    """λ_1(∇²L(w)), the largest Hessian eigenvalue, recorded as a scalar: `TopEigenvalues`
    with k = 1 (same method, arguments and errors; 14–24 HVPs per save on the
    26k-parameter MLP of `TopEigenvalues`). Compare with 2/η for gradient descent with
    step η (the edge of stability, Cohen et al., ICLR 2021).

    On a ReLU network: see `AbstractSpectrumMonitor`.

    **Arguments:** `tol`, `max_hvp`, `seed`, `name` (default `sharpness`) as for
    `TopEigenvalues`.

    **Raises:** `ValueError` for a tol outside (0, 1) or `max_hvp` < 2.
    """

    tol: float | None = None
    max_hvp: int = 1000
    seed: int = 0
    name: str = "sharpness"
    k: ClassVar[int] = 1

    def __check_init__(self):
        _check_common(self, "Sharpness")

    def __call__(self, t, w, v, problem) -> Array:
        out = top_eigenvalues(problem, w, 1, self.tol, self.max_hvp, self.seed, "Sharpness")
        return out["evals"][0]



def _check_common(m, owner: str) -> None:
    _count(m.k, "k", owner)
    if m.tol is not None:
        real(m.tol, "tol", owner, low=0.0, strict=True, high=1.0)
    _count(m.max_hvp, "max_hvp", owner, low=m.k + 1)
    _count(m.seed, "seed", owner, low=0)
    if not isinstance(m.name, str) or not m.name:
        raise ValueError(f"{owner}: `name` must be a non-empty string, got {m.name!r}.")


class SpectralDensity(AbstractSpectrumMonitor):
    """The spectral measure μ = (1/n) Σ_i δ_{λ_i} of the Hessian ∇²L(w) by stochastic
    Lanczos quadrature (SLQ; Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 2017;
    Ghorbani, Krishnan & Xiao, ICML 2019 for neural-network Hessians), recorded at every
    save as a (2, N) array: row 0 the nodes θ_j, row 1 their weights (summing to 1),
    N = `deflate` + `probes`·`steps` (`coords`: `part` = node, weight).

    **Method.** For each of `probes` Rademacher vectors v (the same at every save,
    from `seed`), `steps` Lanczos steps with full reorthogonalisation give the Jacobi
    matrix T_m; its Gauss rule (θ_j, (e_1ᵀs_j)²) integrates polynomials of degree
    < 2m exactly against v's spectral measure Σ_i (vᵀq_i)² δ_{λ_i}/‖v‖², whose mean
    over probes is μ. With `deflate` = d > 0 the top d eigenpairs are found first
    (`TopEigenvalues`) and enter as exact atoms of mass 1/n, and the probes are
    projected onto their orthogonal complement, so an outlier does not spread its mass
    over the quadrature nodes.

    **Cost:** `probes`·`steps` HVPs per save, plus the deflation's Lanczos (≈ 45–90 HVPs
    for d = 10 at 26k parameters).

    **Error (measured against a dense `eigh`, tests/test_spectrum.py).** The
    Wasserstein-1 distance to μ is quadrature bias (falling like m^−0.6 to m^−0.8 in the
    steps m) plus probe sampling (like (λ_max − λ_min)/√(nP)): at the defaults (m = 80,
    16 probes) it was 0.7e-3–3e-3 of the spectral range λ_max − λ_min on tanh MLPs on
    digits of 610–4,810 parameters (5.5e-4 absolute for a 4,810-parameter
    cross-entropy Hessian of range 0.8; 5e-2 for a 610-parameter MSE Hessian of range
    16 at initialisation). Small n: more probes help; large n: more steps; outliers:
    `deflate` (610 parameters: 3.1e-3 → 0.6e-3 of the range with `deflate=30`). A
    smoothed density is Σ_j w_j N(x; θ_j, σ²) on a grid.

    On a ReLU network: see `AbstractSpectrumMonitor`.

    **Arguments:**

    - `probes`: Rademacher probes (≥ 1).
    - `steps`: Lanczos steps per probe (≥ 1, at most n − `deflate`; checked when the
      monitor first runs).
    - `deflate`: top eigenpairs to remove exactly first (≥ 0, < n).
    - `seed`: PRNG seed of the probes.
    - `name`: the record's name (default `spectral_density`).

    **Raises:** `ValueError` for probes or steps < 1, deflate < 0, and (when the monitor
    first runs) steps + deflate larger than the number of parameters.
    """

    probes: int = 16
    steps: int = 80
    deflate: int = 0
    seed: int = 0
    name: str = "spectral_density"

    def __check_init__(self):
        _count(self.probes, "probes", "SpectralDensity")
        _count(self.steps, "steps", "SpectralDensity")
        _count(self.deflate, "deflate", "SpectralDensity", low=0)
        _count(self.seed, "seed", "SpectralDensity", low=0)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"SpectralDensity: `name` must be a non-empty string, got {self.name!r}.")

    def __call__(self, t, w, v, problem) -> Array:
        matvec, n, dtype = hessian_operator(problem.loss, w)
        d = self.deflate
        if self.steps + d > n:
            raise ValueError(
                f"SpectralDensity: steps + deflate = {self.steps} + {d} exceeds the number "
                f"of parameters n = {n}; a Krylov space has at most n − deflate directions. "
                f"Use steps <= {n - d}."
            )
        project, atoms = None, jnp.zeros(0, dtype)
        if d:
            top = top_eigenvalues(problem, w, d, None, 1000, self.seed + 1,
                                  "SpectralDensity")
            atoms, U = top["evals"], top["evecs"]

            def project(x):
                return x - U.T @ (U @ x)

        def one(key):
            probe = jax.random.rademacher(key, (n,), dtype)
            return gauss_rule(*lanczos_tridiagonal(matvec, probe, self.steps, project))

        keys = jax.random.split(jax.random.key(self.seed), self.probes)
        nodes, weights = jax.lax.map(one, keys)  # one probe at a time: memory (m + 1)·n
        weights = weights.ravel() * ((n - d) / (n * self.probes))
        nodes = jnp.concatenate([atoms, nodes.ravel()])
        weights = jnp.concatenate([jnp.full(d, 1.0 / n, dtype), weights])
        return jnp.stack([nodes, weights])


    def coords(self, params):
        """`part`: `node` (row 0, the quadrature nodes) and `weight` (row 1)."""
        return {"part": np.array(["node", "weight"])}
