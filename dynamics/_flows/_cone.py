"""A small convex quadratic program over the cone of positive semidefinite k×k matrices,

    minimise ½⟨X, Q X⟩ + ⟨C, X⟩   over X ⪰ 0,

solved inside a compiled step: the central flow's complementarity problem (`_edge.py`)
is the KKT system of this program. Q is a positive semidefinite operator on symmetric
matrices (a Gram matrix), so the program is convex and its KKT conditions,

    X ⪰ 0,   S = Q X + C ⪰ 0,   ⟨X, S⟩ = 0,

are exactly the semidefinite complementarity problem. k is small (the Hessian
eigenvalues at the edge of stability, a handful), so everything is dense.

Symmetric matrices are stored as vectors of their upper triangle with the off-diagonal
entries scaled by √2 (`sym_vec`), an isometry: ⟨X, Y⟩_F = sym_vec(X)·sym_vec(Y), so Q is
an ordinary symmetric p×p matrix, p = k(k+1)/2.

Method: accelerated projected gradient (FISTA with adaptive restart, O'Donoghue &
Candès 2015) on the isometric coordinates, the projection onto the PSD cone by an
eigendecomposition; it identifies the face of the cone that holds the solution (the
range of X), where the program is an unconstrained quadratic, and a final Newton step
on that face gives the solution to rounding when the face is right. The better of the
two points by the KKT residual is returned.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def _pairs(k: int):
    i, j = np.triu_indices(k)
    return i, j, np.where(i == j, 1.0, np.sqrt(2.0))


def sym_vec(X: Array) -> Array:
    """Upper triangle of a symmetric k×k matrix, off-diagonals ×√2 (an isometry)."""
    i, j, f = _pairs(X.shape[-1])
    return X[..., i, j] * f


def sym_mat(x: Array, k: int) -> Array:
    """Inverse of `sym_vec`."""
    i, j, f = _pairs(k)
    vals = x / f
    return jnp.zeros((k, k), x.dtype).at[i, j].set(vals).at[j, i].set(vals)


def _project(x, k):
    d, P = jnp.linalg.eigh(sym_mat(x, k))
    return sym_vec((P * jnp.maximum(d, 0.0)) @ P.T)


def _residual(x, Q, c, k, step):
    # The projected-gradient fixed-point residual: zero exactly at a KKT point.
    return jnp.linalg.norm(x - _project(x - step * (Q @ x + c), k))


def _face_newton(x, Q, c, k):
    """Minimise the quadratic over the face {P_a Z P_aᵀ} of the cone that contains x (P_a
    the eigenvectors of X with eigenvalues above rounding), by one linear solve in the
    rotated basis E_ab = (p_a p_bᵀ + p_b p_aᵀ)/√2 (orthonormal, so the program keeps its
    form)."""
    d, P = jnp.linalg.eigh(sym_mat(x, k))
    active = d > 1e-9 * jnp.maximum(jnp.max(jnp.abs(d)), jnp.finfo(x.dtype).tiny)
    i, j, f = _pairs(k)
    E = (P[:, i][:, None, :] * P[:, j][None, :, :]
         + P[:, j][:, None, :] * P[:, i][None, :, :]) / (2.0 / f)
    M = jax.vmap(sym_vec, in_axes=2, out_axes=1)(E)  # (p, p), orthogonal
    mask = active[i] & active[j]
    K = M.T @ Q @ M
    K = jnp.where(mask[:, None] & mask[None, :], K, jnp.diag(jnp.where(mask, 0.0, 1.0)))
    rhs = jnp.where(mask, -(M.T @ c), 0.0)
    z = jnp.linalg.lstsq(K, rhs)[0]
    return M @ jnp.where(mask, z, 0.0)


def solve_psd_qp(Q: Array, c: Array, k: int, *, tol: float = 1e-13,
                 max_iter: int = 2000) -> tuple[Array, Array]:
    """argmin over X ⪰ 0 of ½ xᵀQx + cᵀx, x = `sym_vec`(X).

    **Arguments:** `Q` (p, p) symmetric positive semidefinite, `c` (p,), `k` the matrix
    size (p = k(k+1)/2); `tol` the projected-gradient residual, relative to the scale of
    c, at which the iteration stops; `max_iter` its cap.

    **Returns:** (x, residual): the solution in `sym_vec` coordinates and its KKT
    residual ‖x − Π(x − (Qx + c)/‖Q‖)‖ relative to ‖c‖/‖Q‖ (the size of x).
    """
    lip = jnp.maximum(jnp.linalg.eigvalsh(Q)[-1], jnp.finfo(Q.dtype).tiny)
    step = 1.0 / lip
    scale = jnp.linalg.norm(c) * step + jnp.finfo(Q.dtype).tiny

    def objective(x):
        return 0.5 * x @ Q @ x + c @ x

    def cond(st):
        x, _, _, it, res = st
        return (res > tol * scale) & (it < max_iter)

    def body(st):
        x, y, t, it, _ = st
        x_new = _project(y - step * (Q @ y + c), k)
        # Adaptive restart: drop the momentum when the objective goes up.
        up = objective(x_new) > objective(x)
        t_new = jnp.where(up, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
        y_new = jnp.where(up, x_new, x_new + ((t - 1.0) / t_new) * (x_new - x))
        return x_new, y_new, t_new, it + 1, jnp.linalg.norm(x_new - x)

    x0 = jnp.zeros_like(c)
    x, *_ = jax.lax.while_loop(cond, body, (x0, x0, jnp.ones((), c.dtype), 0,
                                            jnp.asarray(jnp.inf, c.dtype)))
    polished = _face_newton(x, Q, c, k)
    r_fista, r_pol = _residual(x, Q, c, k, step), _residual(polished, Q, c, k, step)
    better = jnp.isfinite(r_pol) & (r_pol < r_fista)
    return jnp.where(better, polished, x), jnp.minimum(r_fista, r_pol) / scale
