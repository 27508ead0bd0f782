"""Hessian spectrum monitors: the top eigenvalues (sharpness) by Lanczos, and the spectral
density by stochastic Lanczos quadrature, both on Hessian–vector products of the loss.

`TopEigenvalues` and `Sharpness` are carrying monitors (`AbstractCarryingMonitor`): each
save starts from the previous saves' Ritz vectors, extrapolated in time (a warm start),
and falls back to Lanczos cold where that start is poor; `SpectralDensity` is a plain
monitor (its probes are fixed, its cost is set by `probes`·`steps`). See
`TopEigenvalues` for the method and its measured cost and accuracy.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._lanczos import gauss_rule, hessian_operator, lanczos_tridiagonal
from .._validate import positive_int, real
from ._carrying import AbstractCarryingMonitor
from ._eigen_track import EigenTrack, top_eigenvalues, track_init, track_step
from ._monitors import AbstractMonitor


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


class TopEigenvalues(AbstractSpectrumMonitor, AbstractCarryingMonitor):
    """The k algebraically largest eigenvalues λ_1 ≥ … ≥ λ_k of the Hessian ∇²L(w),
    recorded as a (k,) array at every save (`coords`: `index` 1..k), and the
    Hessian–vector products each save took as `<name>_hvps` (an int per save).

    λ_1 is the sharpness; gradient descent with step η is stable along the top
    eigenvector while η·λ_1 < 2, and full-batch GD at practical step sizes drives λ_1 up
    to 2/η and hovers there (progressive sharpening and the edge of stability, Cohen et
    al., "Gradient descent on neural networks typically occurs at the edge of
    stability", ICLR 2021).

    **Method.** Thick-restart Lanczos with full reorthogonalisation on Hessian–vector
    products (`dynamics/_lanczos.py`), float64. It stops when every wanted Ritz pair
    has the eigenvalue error estimate min(‖r_i‖, ‖r_i‖²/gap_i) ≤ `tol`·|λ_1| (r_i the
    Ritz residual, gap_i = θ_i − θ_{i+1}), or after `max_hvp` products. With n no
    larger than the Lanczos basis (max(2k + 20, 40)) the Hessian is formed from n
    products and diagonalised exactly instead (no warm start there).

    **Warm start** (`warm=True`, the default). A carrying monitor
    (`AbstractCarryingMonitor`): it keeps the top k + 1 Ritz vectors of the last three
    saves (`EigenTrack`). The first save runs cold, from a random vector (`seed`), as
    every save does with `warm=False`. At a later save it predicts the new vectors by
    extrapolating the held ones in time (aligned by orthogonal Procrustes; order 0 at
    the second save, then order 1, or order 2 where it predicted the previous save
    better), then:

    1. a probe: the residual of the predicted top vector (one HVP); above 1e-2·|θ| the
       point jumped (a projection, GD past the edge of stability, minibatch noise) and
       Lanczos runs cold, started from the sum of the predicted vectors;
    2. Rayleigh–Ritz on the predicted block (k more HVPs, one batched call); a Ritz
       residual above 1e-2·|θ_1| also sends it cold;
    3. Davidson corrections: the residual of the pair with the largest error estimate
       joins the basis (one HVP each) until the same stopping test passes. A warm start
       that has spent as many HVPs as the latest cold save took gives up and runs
       Lanczos from its Ritz vectors, and the next 4 saves run cold (from the
       prediction's sum) before it is tried again.

    The accuracy test is the same either way. In `simulate` the states at the save
    times are kept inside the solve for this (see `AbstractCarryingMonitor`).

    **Cost and accuracy (measured, benchmarks/bench_spectrum.py and tests/test_spectrum
    .py).** Cold, on a 64-128-128-10 tanh MLP on digits (26,122 parameters; MSE and
    cross-entropy, at init and after 100 GD steps), k = 10 at the default tol: 43–88
    HVPs per save (2–3.6 gradients each), and the largest relative error of the ten
    eigenvalues against ARPACK (`scipy.sparse.linalg.eigsh`) is ≤ 8e-12. k = 1 takes
    14–24 HVPs. Against a dense `eigh` of the full Hessian on MLPs of 460–2,410
    parameters (MSE and cross-entropy) the errors are ≤ 1e-9 relative. Where λ_i is part
    of a tight cluster the ‖r‖²/gap estimate is optimistic and convergence slower.
    Warm, on the same MLP after the 100 GD steps, k = 10, HVPs per save from the third
    save on (the first is cold; the second, from the first save's vectors alone, took
    69–89, a warm start that gave up): along gradient flow with saves 0.02 apart 16–20
    (MSE; cold 55) and 14–20 (cross-entropy; cold 40–43); 0.1 apart 24–34 and 19–33; GD
    with η = 0.1, a save per step, 23–34 and 19–32. From initialisation, where the
    Hessian moves fast, 50–54 and 66–77 (cold 62–64 and 81–88), with a give-up costing
    86–126 every fifth save or so. A 12-save run 0.02 apart took 16.7 s and 16.9 s warm
    against 37.7 s and 26.7 s cold (MSE, cross-entropy; the gradient flow included).
    k = 1: 2–3 HVPs per save 0.02 apart, 3–5 0.1 apart, 7–12 from initialisation (cold
    14–24). At every run's saves 0, 4, 8, 11 the ten eigenvalues
    are within 3.6e-11 relative of ARPACK, and within 2.2e-11·λ_1 of the cold ones at
    every save (warm or cold, the stopping test is the same). On a 460-parameter MLP
    (tests/test_spectrum.py) 13–18 HVPs per save from the third save (cold 36).

    On a ReLU network: see `AbstractSpectrumMonitor`.

    **Arguments:**

    - `k`: how many eigenvalues (≥ 1, at most the number of parameters; checked when
      the monitor first runs, where the parameters are known).
    - `tol`: relative eigenvalue error the stopping test aims at, in (0, 1); default
      1e-10 in float64, 1e-5 in float32 (what a float32 Rayleigh quotient resolves).
    - `max_hvp`: cap on the HVPs of one save (≥ k + 1); a save that reaches it records
      the current Ritz values, less accurate than `tol`.
    - `seed`: the random start vector's PRNG seed (the same at every cold save).
    - `warm`: warm-start each save from the previous ones (default True); False runs
      every save cold and independently (as this monitor did before it carried state),
      still recording `<name>_hvps`.
    - `name`: the record's name (default `top_eigenvalues`; the HVP counts are
      `<name>_hvps`).

    **Raises:** `ValueError` for k < 1, a tol outside (0, 1), `max_hvp` ≤ k, a `warm`
    that is not a bool, and (when the monitor first runs) k larger than the number of
    parameters.
    """

    k: int
    tol: float | None = None
    max_hvp: int = 1000
    seed: int = 0
    warm: bool = True
    name: str = "top_eigenvalues"

    def __check_init__(self):
        _check_common(self, "TopEigenvalues")

    def init(self, w, problem) -> EigenTrack:
        return track_init(self, self.k, w, "TopEigenvalues")

    def step(self, carry, t, w, v, problem):
        return track_step(self, self.k, carry, t, w, problem, "TopEigenvalues")

    def side_names(self):
        return (f"{self.name}_hvps",)

    def side_records(self, carry):
        return {f"{self.name}_hvps": carry.hvps}

    def coords(self, params):
        """`index`: 1 for the largest eigenvalue, ..., k."""
        return {"index": np.arange(1, self.k + 1)}


class Sharpness(AbstractSpectrumMonitor, AbstractCarryingMonitor):
    """λ_1(∇²L(w)), the largest Hessian eigenvalue, recorded as a scalar, and the HVPs
    each save took as `<name>_hvps`: `TopEigenvalues` with k = 1 (same method, warm
    start, arguments and errors; cold 14–24 HVPs per save on the 26k-parameter MLP of
    `TopEigenvalues`, warm 2–5 along gradient flow or GD after 100 GD steps, 7–12 from
    initialisation). Compare with 2/η for gradient descent with step η (the edge of
    stability, Cohen et al., ICLR 2021).

    On a ReLU network: see `AbstractSpectrumMonitor`.

    **Arguments:** `tol`, `max_hvp`, `seed`, `warm`, `name` (default `sharpness`) as
    for `TopEigenvalues`.

    **Raises:** `ValueError` for a tol outside (0, 1), `max_hvp` < 2, or a `warm` that
    is not a bool.
    """

    tol: float | None = None
    max_hvp: int = 1000
    seed: int = 0
    warm: bool = True
    name: str = "sharpness"
    k: ClassVar[int] = 1

    def __check_init__(self):
        _check_common(self, "Sharpness")

    def init(self, w, problem) -> EigenTrack:
        return track_init(self, 1, w, "Sharpness")

    def step(self, carry, t, w, v, problem):
        carry, evals = track_step(self, 1, carry, t, w, problem, "Sharpness")
        return carry, evals[0]

    def side_names(self):
        return (f"{self.name}_hvps",)

    def side_records(self, carry):
        return {f"{self.name}_hvps": carry.hvps}


def _check_common(m, owner: str) -> None:
    _count(m.k, "k", owner)
    if m.tol is not None:
        real(m.tol, "tol", owner, low=0.0, strict=True, high=1.0)
    _count(m.max_hvp, "max_hvp", owner, low=m.k + 1)
    _count(m.seed, "seed", owner, low=0)
    if not isinstance(m.warm, bool):
        raise ValueError(f"{owner}: `warm` must be True or False, got {m.warm!r}.")
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
