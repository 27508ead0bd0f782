"""Flows of gradient descent at the edge of stability (EoS).

Full-batch GD with step η on a neural network sharpens (the top Hessian eigenvalue λ_1
grows) until λ_1 = 2/η, then hovers there while the iterates oscillate along the top
eigenvector(s) (Cohen et al., ICLR 2021). Gradient flow and the modified flows of
`_modified.py` miss this: they keep sharpening past 2/η. The central flow of Cohen,
Damian, Talwalkar, Kolter & Lee ("Understanding Optimization in Deep Learning with
Central Flows", ICLR 2025) models the time average of the oscillating iterates.

Derivation (their section 3; the formulas below were re-derived and checked numerically
in tests/test_eos.py rather than copied). Write the iterate as w + x with x the
oscillation in the span of the unstable eigenvectors V = [v_1 … v_k] of H(w) = ∇²L(w)
and Σ = E[x xᵀ] its covariance, in the eigenbasis Σ = V X Vᵀ, X ⪰ 0 (k×k). Averaging
the gradient to second order in x, E[∇L(w + x)] = ∇L(w) + ½ ∇_w⟨H(w), Σ⟩, so

    dw/dt = −[∇L(w) + ½ Σ_ij X_ij ∇_w(v_iᵀ H(w) v_j)]        (their eq. 9 / 13)

with the third derivative ∇_w(v_iᵀ H v_j) = ∇³L[v_i, v_j, ·] taken at fixed v_i, v_j;
for k = 1 this is ∇S(w), the gradient of the sharpness S = λ_1 (Hellmann–Feynman).
X is what keeps the iterates at the edge: with A = (2/η) I − VᵀHV (the margin of
stability, ⪰ 0) and its rate Ȧ = ⟨G, ∇L⟩ + ½ B X (G_ij = ∇_w(v_iᵀHv_j), B the Gram
matrix of the G_ij), X solves the semidefinite complementarity problem

    X ⪰ 0,   A + τ Ȧ ⪰ 0,   ⟨X, A + τ Ȧ⟩ = 0                   (their eq. 14)

i.e. the margin may not close faster than it relaxes over a time τ; where it is open X
is zero and the flow is gradient flow. τ → 0 is the paper's continuous limit
(Ȧ ⪰ 0 on the active set, A ⪰ 0); the authors' own code (central_flows_jax) solves
the same problem with τ one Euler substep. A positive τ makes A = 0 an attracting
manifold instead of a constraint that integration error could cross. Because B is
positive semidefinite, the problem is the KKT system of the convex program
min_{X⪰0} (τ/4)⟨X, BX⟩ + ⟨A + τ⟨G,∇L⟩, X⟩ (`_cone.solve_psd_qp`). For k = 1 it is
closed form: σ² = X_11 = max(0, −2(a + τ⟨∇S,∇L⟩)/(τ‖∇S‖²)), a = 2/η − S, which on the
manifold a = 0 is the paper's σ² = 2⟨−∇L, ∇S⟩/‖∇S‖² (their eq. 8).

The central flow predicts GD's time-averaged loss L(w) + ½⟨H, Σ⟩ = L(w) + ½ Σ_i X_ii λ_i
(their eq. 10), not L(w): on the edge it is L + σ²/η for k = 1.

Edge Flow (Marion, arXiv 2606.18080) and Rod Flow (Regis & Chewi, arXiv 2602.01480) are
not here: their abstracts were found but not their equations (see the CHANGELOG).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Scalar

from .._lanczos import hessian_top_eigenpairs
from .._validate import positive_int, real, traced_scalar
from ._base import AbstractFirstOrderFlow
from ._cone import solve_psd_qp, sym_mat, sym_vec

# Lanczos stopping tolerance (relative eigenvalue error) by precision, as the spectrum
# monitors: the field must be a smooth function of w to well below the solver's rtol.
_TOL = {8: 1e-12, 4: 1e-5}


class CentralFlowState(eqx.Module):
    """What the central flow computes at one point w (flattened parameters).

    - `loss`, `grad`: L(w), ∇L(w) (flat).
    - `evals` (k,), `evecs` (k, n): the top-k Hessian eigenpairs.
    - `third` (p, n): ∇_w(v_iᵀ H v_j) for the pairs i ≤ j, off-diagonal pairs ×√2
      (`_cone.sym_vec` order), p = k(k+1)/2.
    - `covariance` (k, k): X, the oscillation covariance in the eigenbasis.
    - `velocity` (n,): dw/dt.
    - `residual`: the complementarity solver's relative KKT residual (0 for k = 1).
    - `hvps`: Hessian–vector products the eigensolver spent.
    """

    loss: Scalar
    grad: Array
    evals: Array
    evecs: Array
    third: Array
    covariance: Array
    velocity: Array
    residual: Scalar
    hvps: Array

    def time_averaged_loss(self) -> Scalar:
        """L(w) + ½⟨H, Σ⟩ = L(w) + ½ Σ_i X_ii λ_i: the prediction of GD's time-averaged
        loss (Cohen et al. 2025, eq. 10)."""
        return self.loss + 0.5 * jnp.sum(jnp.diag(self.covariance) * self.evals)


class CentralFlow(AbstractFirstOrderFlow):
    """The central flow of gradient descent with step η (Cohen, Damian, Talwalkar, Kolter &
    Lee, ICLR 2025): gradient flow while the sharpness is below 2/η; at the edge,

        dw/dt = −[∇L(w) + ½ Σ_ij X_ij ∇_w(v_iᵀ ∇²L(w) v_j)],

    with X ⪰ 0 the covariance of GD's oscillation in the top-k eigenbasis, the solution of
    a semidefinite complementarity problem that holds the top eigenvalues at 2/η (module
    docstring: the derivation, the equations used and the role of τ). Time is flow time:
    GD's iterate k is compared at t = kη. It models the *time average* of GD's
    oscillating iterates: GD's average loss is `time_averaged_loss`, not L(w).

    **Method.** At every evaluation the top-k eigenpairs are recomputed by Lanczos from a
    fixed start vector (`dynamics._lanczos`, to `tol`), so the field is a function of w
    alone, as adaptive step control assumes; the third derivatives are k(k+1)/2
    reverse-over-forward products (about two HVPs each); k = 1 is closed form, k > 1
    solves the complementarity problem inside the step (`_cone.solve_psd_qp`: projected
    gradient plus a Newton step on the solution's face). Eigenvalues of the top k that are
    far below 2/η get X = 0 and cost only their Lanczos work; eigenvalues past the k-th are
    not watched, so k must cover every eigenvalue that reaches 2/η. With no eigenvalue at
    the edge (every η·λ_i < 2 and not closing in within τ) the flow is gradient flow
    exactly (X = 0): that is its meaning there, not an error. Started past the edge
    (η·λ_1 > 2, where GD would catapult), X pushes λ_1 back to 2/η over ~τ steps, which
    GD does not do: start it below the edge.

    **Arguments:**

    - `eta`: GD's learning rate, > 0 (traced: a sweep over η compiles once).
    - `k`: eigenpairs tracked, ≥ 1 (at most the number of parameters, checked when the
      flow first runs).
    - `tau`: relaxation time of the constraint in GD steps (> 0; flow time τη): the
      margin 2/η − λ may close no faster than it would relax to 0 over τ steps. Small τ
      is the paper's limit but makes the field stiff (rate 1/(τη)); the solution on the
      edge does not depend on it.
    - `tol`: Lanczos's relative eigenvalue tolerance (default 1e-12 in float64, 1e-5 in
      float32).
    - `max_hvp`: cap on the HVPs of one eigensolve (> k).
    - `seed`: the Lanczos start vector's seed.

    **Raises:** `ValueError` for η ≤ 0 or not finite, k < 1, τ ≤ 0, `tol` outside (0, 1),
    `max_hvp` ≤ k, and (when the flow first runs) k larger than the parameter count.
    """

    eta: Array
    k: int = eqx.field(static=True)
    tau: Array
    tol: float | None = eqx.field(static=True)
    max_hvp: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __init__(self, eta, k: int = 1, tau=1.0, tol: float | None = None,
                 max_hvp: int = 1000, seed: int = 0):
        self.eta = traced_scalar(eta, "eta", "CentralFlow", low=0.0, strict=True)
        self.k = positive_int(k, "k", "CentralFlow")
        self.tau = traced_scalar(tau, "tau", "CentralFlow", low=0.0, strict=True)
        self.tol = None if tol is None else real(tol, "tol", "CentralFlow", low=0.0,
                                                  strict=True, high=1.0)
        self.max_hvp = positive_int(max_hvp, "max_hvp", "CentralFlow", low=self.k + 1)
        self.seed = positive_int(seed, "seed", "CentralFlow", low=0)

    def state(self, t, w, loss) -> CentralFlowState:
        """Everything the field is made of at w (`CentralFlowState`)."""
        flat, unravel = ravel_pytree(w)

        def flat_loss(x):
            return loss(unravel(x))

        value, grad = jax.value_and_grad(flat_loss)(flat)
        tol = self.tol if self.tol is not None else _TOL.get(flat.dtype.itemsize, 1e-12)
        top = hessian_top_eigenpairs(loss, w, self.k, tol=tol, max_hvp=self.max_hvp,
                                     seed=self.seed, owner="CentralFlow")
        evals, V = top["evals"], top["evecs"]
        grad_fn = jax.grad(flat_loss)
        i, j = jnp.triu_indices(self.k)
        factor = jnp.where(i == j, 1.0, jnp.sqrt(2.0)).astype(flat.dtype)

        def third(vi, vj):
            # ∇_x (v_iᵀ H(x) v_j) at fixed v_i, v_j: reverse over forward over reverse.
            return jax.grad(lambda x: vi @ jax.jvp(grad_fn, (x,), (vj,))[1])(flat)

        G = jax.lax.map(lambda ab: third(*ab), (V[i], V[j])) * factor[:, None]
        eta = jnp.asarray(self.eta, flat.dtype)
        tau = jnp.asarray(self.tau, flat.dtype) * eta  # in flow time
        margin = sym_vec(jnp.diag(2.0 / eta - evals))
        c = margin + tau * (G @ grad)
        Q = 0.5 * tau * (G @ G.T)
        if self.k == 1:
            x = jnp.maximum(0.0, -c / jnp.where(Q[0, 0] > 0, Q[0, 0], jnp.inf))
            residual = jnp.zeros((), flat.dtype)
        else:
            x, residual = solve_psd_qp(Q, c, self.k)
        velocity = -(grad + 0.5 * (G.T @ x))
        return CentralFlowState(loss=value, grad=grad, evals=evals, evecs=V, third=G,
                                covariance=sym_mat(x, self.k), velocity=velocity,
                                residual=residual, hvps=top["matvecs"])

    def vector_field(self, t, w, loss):
        return self.vector_field_and_loss(t, w, loss)[0]

    def vector_field_and_loss(self, t, w, loss):
        _, unravel = ravel_pytree(w)
        st = self.state(t, w, loss)
        return unravel(st.velocity), st.loss

    def time_averaged_loss(self, t, w, loss) -> Scalar:
        """The central flow's prediction of GD's time-averaged loss at w,
        L(w) + ½⟨H, Σ⟩ = L(w) + ½ Σ_i X_ii λ_i (Cohen et al. 2025, eq. 10)."""
        return self.state(t, w, loss).time_averaged_loss()

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        st = self.state(t, w, loss)
        return st.grad @ st.velocity
