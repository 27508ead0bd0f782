"""Gauss–Legendre collocation: implicit, symplectic, order 2s, exact on quadratic
first integrals."""

import functools
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from numpy.polynomial import legendre, polynomial

from ._base import hermite_info


@functools.cache
def tableau(stages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, b, c, b̂) of the s-stage Gauss–Legendre method.

    c are the Gauss nodes on [0, 1]; A_ij = ∫_0^{c_i} ℓ_j and b_j = ∫_0^1 ℓ_j with ℓ_j
    the Lagrange polynomials on c (collocation: Hairer, Nørsett & Wanner I, Thm. II.7.7;
    Hairer & Wanner II, Table IV.5.1 lists s = 1, 2, 3, which this reproduces, see
    tests/test_solvers.py). b̂ (on the nodes {0, c_1..c_s, 1}, the last weight zero) are
    those of a quadrature exact to degree s − 1 with weight b_1/2 at 0: the error
    estimate.
    """
    x, _ = legendre.leggauss(stages)
    c = 0.5 * (x + 1.0)

    def lagrange_integral(nodes, j):
        others = np.delete(nodes, j)
        coef = polynomial.polyfromroots(others) / np.prod(nodes[j] - others)
        return polynomial.polyint(coef)

    A = np.array([[polynomial.polyval(ci, lagrange_integral(c, j)) for j in range(stages)]
                  for ci in c])
    b = np.array([polynomial.polyval(1.0, lagrange_integral(c, j)) for j in range(stages)])
    # Interpolatory weights on {0, c} or {0, c, 1} would be (0, b[, 0]) again (Gauss's
    # rule is exact to degree 2s − 1 and such weights are unique): a zero estimate. So
    # fix the weight of f(t_n) at γ = b_1/2 and ask exactness to degree s − 1 only:
    # ŷ − y then annihilates polynomials of degree < s but not the collocation error.
    gamma = 0.5 * b[0]
    vandermonde = np.vander(c, stages, increasing=True).T
    moments = 1.0 / np.arange(1, stages + 1) - gamma * (np.arange(stages) == 0)
    b_hat = np.concatenate([[gamma], np.linalg.solve(vandermonde, moments), [0.0]])
    return A, b, c, b_hat


def _default_tol() -> float:
    # eps^¾ of the working precision (2e-12 in float64, 6e-6 in float32): tighter and
    # fixed-point iteration stalls on rounding before its criterion holds (measured at
    # 1e-13 on an MLP); at this level the GF charges of a small MLP hold to ~1e-13.
    return float(jnp.finfo(jnp.result_type(float)).eps ** 0.75)


def newton_gmres(tol: float) -> optx.Newton:
    """Newton's method on the stage equations with GMRES for its linear solves:
    Jacobian-vector products only, where a dense LU would build the (s·D)² Jacobian at
    every iteration (on a 1210-parameter MLP, s = 2: 0.7 s a run against 40 s, the
    integrators study). Restarts every 40 Krylov vectors, at most 400 in all."""
    return optx.Newton(rtol=tol, atol=tol, linear_solver=lx.GMRES(
        rtol=tol, atol=tol, restart=40, stagnation_iters=40, max_steps=400))


_DEFAULT = object()  # `fallback` not given


class GaussLegendre(diffrax.AbstractAdaptiveSolver):
    """The s-stage Gauss–Legendre collocation method, s = 1 (implicit midpoint), 2, 3:

        Kᵢ = f(t_n + cᵢ h, y_n + h Σⱼ aᵢⱼ Kⱼ),   y_{n+1} = y_n + h Σᵢ bᵢ Kᵢ

    (Hairer, Lubich & Wanner, *Geometric Numerical Integration*, sec. II.1.3). Order 2s,
    symmetric and symplectic, and it conserves every quadratic first integral
    Q(y) = yᵀ C y exactly (ibid. Thm. IV.2.2), up to how well the stage equations are
    solved: the rescaling charges of gradient flow and the balance matrices of linear
    networks hold to the nonlinear solve's tolerance at any step size.

    Works on any flow, first or second order. The stage equations are solved by
    optimistix: by fixed-point iteration (default; converges when h·Lip(f)·‖A‖ < 1),
    and where that fails, by Newton's method with GMRES from the same start (default
    `fallback`), which converges well beyond that bound (tests: a RePU(2) MLP at h = 1
    and 2, where the fixed-point iteration stops at the first step) and through stiff
    transients (the integrators study's Polynomial(2) net has h·ρ(A)·Lip ≥ 0.83 near
    t = 0.1 for h ≥ 0.025). Any optimistix root finder can be the first or the
    fallback solver, e.g. `root_finder=optx.Newton(rtol, atol)` with a dense LU for a
    small system.

    Adaptive steps: the error estimate is y_{n+1} − ŷ_{n+1}, with ŷ from a quadrature
    on {t_n, t_n + cᵢh} exact to degree s − 1 only (f(t_n) is kept from the previous
    step, as f(t_{n+1}) is needed anyway for the Hermite dense output): O(h^{s+1}),
    conservative for a method of order 2s, so tolerances buy more accuracy than asked.

    **Arguments:**

    - `stages`: s ∈ {1, 2, 3}.
    - `root_finder`: an `optx.AbstractFixedPointSolver` (applied to K = G(K)) or an
      `optx.AbstractRootFinder` (applied to K − G(K) = 0). Default
      `optx.FixedPointIteration` at rtol = atol = eps^¾ of the working precision
      (2e-12 in float64); `optx.Newton` solves to rounding level.
    - `fallback`: an `optx.AbstractRootFinder` tried from the same start on a step whose
      first solve failed, or None. Default: Newton–GMRES at the default tolerance when
      `root_finder` is a fixed-point solver, none when it is a root finder already. It
      runs only on the steps that need it (a loop of at most one trip, so a vmapped
      sweep pays for it only while some cell needs it, where a `lax.cond` would run it
      for every cell). It costs compile time even where it never runs: 2.2 → 6.4 s on
      the 64-128-128-10 digits MLP; pass None to save that.
    - `max_iterations`: the most iterations of each stage solve per step; a step whose
      solves fail is rejected (adaptive) or ends the run with an error (fixed steps).
    """

    stages: int = eqx.field(static=True)
    root_finder: optx.AbstractFixedPointSolver | optx.AbstractRootFinder
    fallback: optx.AbstractRootFinder | None
    max_iterations: int = eqx.field(static=True)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation

    def __init__(self, stages: int = 2, *, root_finder=None, fallback=_DEFAULT,
                 max_iterations: int = 100):
        if isinstance(stages, bool) or stages not in (1, 2, 3):
            raise ValueError(
                f"GaussLegendre: `stages` must be 1 (implicit midpoint), 2 or 3, got "
                f"{stages!r}; higher stage counts are not provided."
            )
        if root_finder is None:
            tol = _default_tol()
            root_finder = optx.FixedPointIteration(rtol=tol, atol=tol)
        if not isinstance(root_finder, (optx.AbstractFixedPointSolver, optx.AbstractRootFinder)):
            raise ValueError(
                "GaussLegendre: `root_finder` must be an optimistix fixed-point solver "
                "(e.g. optx.FixedPointIteration(rtol, atol)) or root finder (e.g. "
                f"optx.Newton(rtol, atol)), got {root_finder!r}."
            )
        if fallback is _DEFAULT:
            fallback = (newton_gmres(_default_tol())
                        if isinstance(root_finder, optx.AbstractFixedPointSolver) else None)
        if fallback is not None and not isinstance(fallback, optx.AbstractRootFinder):
            raise ValueError(
                "GaussLegendre: `fallback` must be an optimistix root finder (e.g. "
                f"optx.Newton(rtol, atol)) or None, got {fallback!r}."
            )
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
                or max_iterations < 1:
            raise ValueError(
                f"GaussLegendre: `max_iterations` must be a positive int, got {max_iterations!r}."
            )
        self.stages = int(stages)
        self.root_finder = root_finder
        self.fallback = fallback
        self.max_iterations = max_iterations

    def order(self, terms):
        return 2 * self.stages

    def error_order(self, terms):
        # The estimate sees f − u' at the step ends, u the collocation polynomial:
        # O(h^s) there (Hairer, Nørsett & Wanner I, Thm. II.7.10), so O(h^{s+1}) in all.
        return self.stages + 1

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        A, b, c, b_hat = tableau(self.stages)
        dtype = jnp.result_type(*jax.tree.leaves(y0))
        A, b, c, b_hat = (jnp.asarray(x, dtype) for x in (A, b, c, b_hat))
        if made_jump is False:
            f0 = solver_state
        else:  # after a jump in the vector field the stored derivative is stale
            f0 = jax.lax.cond(made_jump, lambda: terms.vf(t0, y0, args), lambda: solver_state)
        h = t1 - t0
        stage_times = t0 + c * h

        def stage_states(k):
            return jax.tree.map(lambda y, ki: y + h * jnp.tensordot(A, ki, axes=1), y0, k)

        def collocate(k, _):
            return jax.vmap(lambda t, z: terms.vf(t, z, args))(stage_times, stage_states(k))

        # Start every stage from f(t_n, y_n): an O(h) guess, one evaluation saved per step.
        k_init = jax.tree.map(lambda f: jnp.broadcast_to(f, (self.stages,) + f.shape), f0)
        residual = lambda k, a: jax.tree.map(jnp.subtract, k, collocate(k, a))  # noqa: E731

        def solve(solver):
            if isinstance(solver, optx.AbstractFixedPointSolver):
                sol = optx.fixed_point(collocate, solver, k_init,
                                       max_steps=self.max_iterations, throw=False)
            else:
                sol = optx.root_find(residual, solver, k_init,
                                     max_steps=self.max_iterations, throw=False)
            return sol.value, sol.result

        k, result = solve(self.root_finder)
        if self.fallback is not None:
            # At most one trip, taken only where the first solve failed: under vmap a
            # while loop runs while any cell needs it, a cond would run both branches.
            def retry(carry):
                return (jnp.zeros((), bool),) + solve(self.fallback)

            failed = result != optx.RESULTS.successful
            _, k, result = jax.lax.while_loop(lambda c: c[0], retry, (failed, k, result))
        y1 = jax.tree.map(lambda y, ki: y + h * jnp.tensordot(b, ki, axes=1), y0, k)
        f1 = terms.vf(t1, y1, args)
        # ŷ − y1 = h (b̂_0 f0 + Σ (b̂_i − b_i) K_i + b̂_{s+1} f1).
        error = jax.tree.map(
            lambda f_0, ki, f_1: h * (b_hat[0] * f_0 + jnp.tensordot(b_hat[1:-1] - b, ki, axes=1)
                                      + b_hat[-1] * f_1),
            f0, k, f1,
        )
        result = diffrax.RESULTS.promote(result)
        # As diffrax's implicit Runge–Kutta: a stage solve that failed gives an infinite
        # error, so an adaptive controller rejects the step and shrinks h (diffrax then
        # ignores the result of a rejected step); under fixed steps the run stops.
        failed = result != diffrax.RESULTS.successful
        error = jax.tree.map(lambda e: jnp.where(failed, jnp.inf, e), error)
        return y1, error, hermite_info(t0, t1, y0, y1, f0, f1), f1, result

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
