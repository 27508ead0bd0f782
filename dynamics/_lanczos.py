"""Matrix-free eigensolvers on Hessian–vector products, for the spectrum monitors and the
edge-of-stability flows.

- `top_eigenpairs`: the k algebraically largest eigenpairs of a symmetric operator by
  thick-restart Lanczos with full reorthogonalisation, written as a Rayleigh–Ritz loop
  that stores the images A·V next to the basis V (Stathopoulos & Saad's form of
  Davidson/Lanczos: started from one vector, the residual of any Ritz pair of a Krylov
  space is parallel to the next Lanczos vector, so extending by the least-converged
  residual *is* Lanczos; no three-term recurrence has to stay exact).
- `lanczos_tridiagonal`: m plain Lanczos steps from a probe (full reorthogonalisation),
  the Jacobi matrix of stochastic Lanczos quadrature.
- `hessian_top_eigenpairs`: `top_eigenpairs` of ∇²L(w), or `dense_eigh` where n is
  small; what the spectrum monitors and the central flow call.
- `dense_eigh`: the whole spectrum from n HVPs, where n is no larger than the basis a
  Lanczos run would hold anyway.

Everything is a `lax.while_loop` / `fori_loop` of fixed shapes, so it runs inside a
compiled solve (a monitor evaluated at every save).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree


def hessian_operator(loss: Callable, w: PyTree) -> tuple[Callable, int, jnp.dtype]:
    """u ↦ ∇²L(w)u on the flattened dynamic parameters (forward-over-reverse: one
    gradient's cost ×~3), with the parameter count n and dtype."""
    flat, unravel = ravel_pytree(w)
    grad = jax.grad(lambda x: loss(unravel(x)))

    def matvec(u):
        return jax.jvp(grad, (flat,), (u.astype(flat.dtype),))[1]

    return matvec, flat.shape[0], flat.dtype


def dense_eigh(matvec: Callable, n: int, dtype) -> tuple[Array, Array]:
    """All eigenpairs (descending, vectors as rows) from the n columns H e_i."""
    h = jax.lax.map(matvec, jnp.eye(n, dtype=dtype))
    evals, evecs = jnp.linalg.eigh(0.5 * (h + h.T))
    return evals[::-1], evecs[:, ::-1].T


def basis_size(n: int, k: int) -> int:
    """Lanczos basis held before a thick restart: 2k + 20, at least 40 (enough that the
    restart keeps k + 5 Ritz vectors plus room to grow), at most n."""
    return min(n, max(2 * k + 20, 40))


def _orthogonalise(v, basis):
    # Two passes of classical Gram–Schmidt ("twice is enough", Giraud et al. 2005)
    # against the zero-padded rows of `basis`: full reorthogonalisation.
    v = v - basis.T @ (basis @ v)
    return v - basis.T @ (basis @ v)


def top_eigenpairs(matvec: Callable, n: int, k: int, dtype, *, tol: float,
                   max_matvecs: int, key, start: Array | None = None) -> dict:
    """The k algebraically largest eigenpairs of the symmetric operator `matvec` on R^n.

    Started from one vector: `start` (a warm start, e.g. the previous point's top
    eigenvector; it must not be zero) or else a random one from `key`; each iteration
    adds one vector, the residual r_i = A y_i − θ_i y_i of the least-converged wanted
    Ritz pair; at M =
    `basis_size(n, k)` vectors the basis is compressed to its top k + 5 Ritz vectors
    with no matvec (A·(SᵀV) = Sᵀ(AV)). Stops when every wanted pair has the eigenvalue
    error estimate min(‖r_i‖, ‖r_i‖²/gap_i) ≤ tol·|θ_1| (|θ − λ| ≤ ‖r‖ always, and
    ≲ ‖r‖²/gap for an isolated eigenvalue, Parlett ch. 11), or after `max_matvecs`.

    **Returns:** a dict with `evals` (k,) descending, `evecs` (k, n), `err_est` (k,),
    `matvecs` (the HVPs spent) and `converged`.
    """
    m_max = basis_size(n, k)
    keep = min(m_max - 1, k + 5)
    idx = jnp.arange(m_max)
    v0 = jax.random.normal(key, (n,), dtype) if start is None else start.astype(dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    av0 = matvec(v0)
    V = jnp.zeros((m_max, n), dtype).at[0].set(v0)
    AV = jnp.zeros((m_max, n), dtype).at[0].set(av0)
    G = jnp.zeros((m_max, m_max), dtype).at[0, 0].set(v0 @ av0)

    def ritz(G, m):
        # Rayleigh–Ritz on the m valid rows; unused rows get eigenvalues far below the
        # spectrum so that they sort last.
        valid = idx < m
        Gs = jnp.where(valid[:, None] & valid[None, :], 0.5 * (G + G.T), 0.0)
        floor = -2.0 * (jnp.sqrt(jnp.sum(Gs * Gs)) + 1.0)
        th, S = jnp.linalg.eigh(Gs + jnp.diag(jnp.where(valid, 0.0, floor)))
        return th[::-1], S[:, ::-1]

    def estimates(V, AV, G, m):
        th, S = ritz(G, m)
        Sk = S[:, :k]
        Y, R = Sk.T @ V, Sk.T @ AV - th[:k, None] * (Sk.T @ V)
        rn = jnp.linalg.norm(R, axis=1)
        gap = jnp.abs(th[:k] - th[1 : k + 1])
        err = jnp.minimum(rn, rn**2 / jnp.where(gap > 0, gap, jnp.inf))
        conv = err <= tol * jnp.maximum(jnp.abs(th[0]), jnp.finfo(dtype).tiny)
        return th, S, Y, R, rn, err, conv

    def cond(st):
        return ~st[-1] & (st[4] < max_matvecs)

    def body(st):
        # The Ritz step of the basis as it stands (computed once per iteration: the
        # convergence flag it gives is carried to `cond`).
        V, AV, G, m, used, key, _ = st
        th, S, Y, R, rn, err, conv = estimates(V, AV, G, m)
        done = jnp.all(conv)

        def restart(a):
            V, AV, G, m = a
            Sk = S[:, :keep]
            return (jnp.zeros_like(V).at[:keep].set(Sk.T @ V),
                    jnp.zeros_like(AV).at[:keep].set(Sk.T @ AV),
                    jnp.zeros_like(G).at[:keep, :keep].set(jnp.diag(th[:keep])),
                    jnp.asarray(keep, m.dtype))

        def extend(V, AV, G, m, key):
            V, AV, G, m = jax.lax.cond(m >= m_max, restart, lambda a: a, (V, AV, G, m))
            return add(V, AV, G, m, key, R, rn, conv)

        V, AV, G, m, key, added = jax.lax.cond(
            done, lambda *a: (*a, 0), extend, V, AV, G, m, key)
        return V, AV, G, m, used + added, key, done

    def add(V, AV, G, m, key, R, rn, conv):
        i = jnp.argmax(jnp.where(conv, -1.0, rn))
        t = _orthogonalise(R[i], V)
        tn = jnp.linalg.norm(t)
        # A residual already inside span(V) (to rounding) would add nothing: a random
        # direction keeps the basis growing (and finds a missed multiple eigenvalue).
        key, sub = jax.random.split(key)
        rnd = _orthogonalise(jax.random.normal(sub, (n,), dtype), V)
        bad = tn <= 1e-8 * rn[i]
        t = jnp.where(bad, rnd / jnp.linalg.norm(rnd), t / jnp.where(tn > 0, tn, 1.0))
        at = matvec(t)
        col = (V @ at).at[m].set(t @ at)
        V, AV = V.at[m].set(t), AV.at[m].set(at)
        G = G.at[:, m].set(col).at[m, :].set(col)
        return V, AV, G, m + 1, key, 1

    st = (V, AV, G, jnp.asarray(1), jnp.asarray(1), key, jnp.asarray(False))
    V, AV, G, m, used, _, _ = jax.lax.while_loop(cond, body, st)
    th, _, Y, _, _, err, conv = estimates(V, AV, G, m)
    return {"evals": th[:k], "evecs": Y, "err_est": err, "matvecs": used,
            "converged": jnp.all(conv)}


def lanczos_tridiagonal(matvec: Callable, v0: Array, steps: int,
                        project: Callable | None = None) -> tuple[Array, Array]:
    """`steps` Lanczos steps from v0 with full reorthogonalisation: the diagonal α and
    off-diagonal β (β[-1] unused) of the Jacobi matrix T = VᵀAV. `project` restricts A
    to a subspace (deflation). A breakdown (β ≈ 0: the Krylov space is invariant) ends
    the recurrence; the later rows are zero and carry no Gauss weight."""
    project = project or (lambda x: x)
    n = v0.shape[0]
    v0 = project(v0)
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((steps + 1, n), v0.dtype).at[0].set(v0)
    eps = jnp.finfo(v0.dtype).eps

    def body(j, carry):
        basis, alpha, beta, scale = carry
        v = basis[j]
        av = project(matvec(v))
        a = v @ av
        r = _orthogonalise(av, basis)
        b = jnp.linalg.norm(r)
        scale = jnp.maximum(scale, jnp.linalg.norm(av))
        live = b > 100 * eps * scale
        basis = basis.at[j + 1].set(jnp.where(live, r / jnp.where(live, b, 1.0), 0.0))
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(live, b, 0.0)), scale

    zeros = jnp.zeros(steps, v0.dtype)
    _, alpha, beta, _ = jax.lax.fori_loop(0, steps, body,
                                          (basis, zeros, zeros, jnp.zeros((), v0.dtype)))
    return alpha, beta


def gauss_rule(alpha: Array, beta: Array) -> tuple[Array, Array]:
    """Nodes θ_j and weights τ_j² = (e_1ᵀ s_j)² of the Gauss quadrature rule of the
    Jacobi matrix (α, β): exact for polynomials of degree < 2m against the probe's
    spectral measure (Golub & Meurant 2010, ch. 6)."""
    off = beta[:-1]
    T = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    nodes, S = jnp.linalg.eigh(T)
    return nodes, S[0] ** 2


def hessian_top_eigenpairs(loss: Callable, w: PyTree, k: int, *, tol: float, max_hvp: int,
                           seed: int, owner: str, start: Array | None = None) -> dict:
    """The k largest eigenpairs of ∇²L(w) on the flattened parameters (a dict as
    `top_eigenpairs` returns), densely from n HVPs when the Lanczos basis would hold all
    n directions anyway. `owner` names the caller in the error for k > n."""
    matvec, n, dtype = hessian_operator(loss, w)
    if k > n:
        raise ValueError(
            f"{owner}: k = {k} exceeds the number of parameters n = {n}; ask for at most "
            f"{n} eigenvalues."
        )
    if n <= basis_size(n, k) and n <= max_hvp:
        evals, evecs = dense_eigh(matvec, n, dtype)
        return {"evals": evals[:k], "evecs": evecs[:k], "err_est": jnp.zeros(k, dtype),
                "matvecs": jnp.asarray(n), "converged": jnp.asarray(True)}
    return top_eigenpairs(matvec, n, k, dtype, tol=tol, max_matvecs=max_hvp,
                          key=jax.random.key(seed), start=start)
