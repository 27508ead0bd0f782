"""Matrix-free eigensolvers on Hessian–vector products, for the spectrum monitors and the
edge-of-stability flows.

- `top_eigenpairs`: the k algebraically largest eigenpairs of a symmetric operator by
  thick-restart Lanczos with full reorthogonalisation, written as a Rayleigh–Ritz loop
  that stores the images A·V next to the basis V (Stathopoulos & Saad's form of
  Davidson/Lanczos: started from one vector, the residual of any Ritz pair of a Krylov
  space is parallel to the next Lanczos vector, so extending by the least-converged
  residual *is* Lanczos; no three-term recurrence has to stay exact). Started from a
  block of vectors instead (a warm start), the same loop is Davidson's method without
  a preconditioner.
- `aligned`, `extrapolate`: the prediction of the next point's eigenvectors from the
  previous points' (the warm start of the spectrum monitors).
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

import equinox as eqx
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


def _int(x):
    return jnp.asarray(x, jnp.int32)


class _Basis(eqx.Module):
    """A Rayleigh–Ritz basis: orthonormal rows V (zero past the first m), their images
    AV = A·V, the Gram matrix G = V·AVᵀ, and the products spent so far."""

    V: Array
    AV: Array
    G: Array
    m: Array
    used: Array


def top_eigenpairs(matvec: Callable, n: int, k: int, dtype, *, tol: float,
                   max_matvecs, key, start: Array | None = None,
                   block: Array | None = None, use_block=True, accept: float = 1e-2,
                   warm_cap=None, extra: int = 0) -> dict:
    """The k algebraically largest eigenpairs of the symmetric operator `matvec` on R^n.

    **Cold start.** From one vector: `start` (e.g. the previous point's top
    eigenvector; it must not be zero) or else a random one from `key`. Each iteration
    adds one vector, the residual r_i = A y_i − θ_i y_i of the least-converged wanted
    Ritz pair; at M = `basis_size(n, k)` vectors the basis is compressed to its top
    k + 5 Ritz vectors with no matvec (A·(SᵀV) = Sᵀ(AV)). From one vector the residual
    of every Ritz pair is parallel to the next Lanczos vector, so this is thick-restart
    Lanczos.

    **Warm start.** With `block` (b, n), 1 ≤ b ≤ k + 5 (the spectrum monitors pass
    the previous saves' top k + 1 Ritz vectors, extrapolated), and `use_block` true
    (may be traced):

    1. a probe: the residual of the block's first (orthonormalised) vector, one
       product; above `accept`·|θ| the block is poor (the point jumped, or it holds NaN);
    2. else Rayleigh–Ritz on span(block), b − 1 more products in one batched call; if
       a wanted Ritz pair there has ‖r_i‖ > `accept`·|θ_1|, the block is poor;
    3. else the loop below runs from that basis: each added vector is the residual of
       the least-converged pair (by its error estimate), a Davidson correction without
       preconditioner, so a converged pair costs nothing and each other one product per
       correction; if it has not converged after `warm_cap` products (may be traced;
       default `max_matvecs`) it gives up: the basis is emptied and Lanczos starts from
       the sum of its current Ritz vectors.

    A poor block costs its products (1 or b) and then the cold start runs from the sum
    of its first k vectors. With `use_block` false the block is not tried, but its sum
    still starts Lanczos (a random vector where it is zero or not finite). A block start
    is no Krylov space, and Davidson without a preconditioner corrects one pair per
    product, so from a poor start it is slower than Lanczos (measured 87–114 products
    against 50 cold for k = 10 on a 2,410-parameter MLP at initialisation): hence the
    probe, the bound and the cap.

    **Stopping test** (both): every wanted pair has the eigenvalue error estimate
    err_i = min(‖r_i‖, ‖r_i‖²/gap_i) ≤ tol·|θ_1|, gap_i = θ_i − θ_{i+1} (|θ − λ| ≤ ‖r‖
    always, ≲ ‖r‖²/gap for an isolated eigenvalue, Parlett ch. 11); where θ_{i+1} is
    not a Ritz value of the basis yet (fewer than i + 2 vectors) or the gap is 0,
    err_i = ‖r_i‖. A pair the basis cannot hold yet (i ≥ its size) is not converged.
    Or after `max_matvecs` products (may be traced).

    **Returns:** a dict with `evals` (k,) descending, `evecs` (k, n), `err_est` (k,),
    `matvecs` (the products spent, the warm start's included), `converged`, `warm`
    (whether the block passed 1–2 and the loop started from it), `gave_up` (whether
    that warm start then hit `warm_cap`), `block_residual` (the ‖r‖/|θ_1| of 1 or 2;
    inf without a block) and `basis` (k + `extra`, n): the top Ritz vectors, what a next
    warm start takes as its `block`.
    """
    m_max = basis_size(n, k)
    keep = min(m_max - 1, k + 5)
    idx = jnp.arange(m_max)
    wanted = jnp.arange(k)
    warm_cap = max_matvecs if warm_cap is None else warm_cap

    def ritz(G, m):
        # Rayleigh–Ritz on the m valid rows; unused rows get eigenvalues far below the
        # spectrum so that they sort last.
        valid = idx < m
        Gs = jnp.where(valid[:, None] & valid[None, :], 0.5 * (G + G.T), 0.0)
        floor = -2.0 * (jnp.sqrt(jnp.sum(Gs * Gs)) + 1.0)
        th, S = jnp.linalg.eigh(Gs + jnp.diag(jnp.where(valid, 0.0, floor)))
        return th[::-1], S[:, ::-1]

    def estimates(b: _Basis):
        th, S = ritz(b.G, b.m)
        Sk = S[:, :k]
        Y, R = Sk.T @ b.V, Sk.T @ b.AV - th[:k, None] * (Sk.T @ b.V)
        rn = jnp.linalg.norm(R, axis=1)
        gap = jnp.where(wanted + 1 < b.m, th[:k] - th[1 : k + 1], 0.0)
        err = jnp.where(gap > 0, jnp.minimum(rn, rn**2 / jnp.where(gap > 0, gap, 1.0)),
                        rn)
        conv = (wanted < b.m) & (err <= tol * jnp.maximum(jnp.abs(th[0]),
                                                          jnp.finfo(dtype).tiny))
        return th, S, Y, R, rn, err, conv

    zeros = _Basis(jnp.zeros((m_max, n), dtype), jnp.zeros((m_max, n), dtype),
                   jnp.zeros((m_max, m_max), dtype), _int(0), _int(0))

    def cold(used, v0):
        v0 = v0 / jnp.linalg.norm(v0)
        av0 = matvec(v0)
        return _Basis(zeros.V.at[0].set(v0), zeros.AV.at[0].set(av0),
                      zeros.G.at[0, 0].set(v0 @ av0), _int(1), used + 1)

    v0 = jax.random.normal(key, (n,), dtype) if start is None else start.astype(dtype)
    if block is None:
        basis, warm = cold(_int(0), v0), jnp.asarray(False)
        residual = jnp.asarray(jnp.inf, dtype)
    else:
        nb = block.shape[0]
        if not 1 <= nb <= keep:
            raise ValueError(f"a warm-start block holds 1 to {keep} vectors, got {nb}.")

        def rayleigh_ritz_on_block():
            q = jnp.linalg.qr(block.astype(dtype).T)[0].T  # orthonormal rows
            # A poor block still points the cold start somewhere useful: the sum of its
            # first k vectors (Lanczos from it finds all k faster than from a random
            # vector; docs/benchmarks.md measured ~15% at k = 10 from the top one).
            guess = jnp.sum(q[: min(k, nb)], axis=0)
            guess = jnp.where(jnp.all(jnp.isfinite(guess)) & jnp.any(guess != 0), guess,
                              v0)
            # Probe: the first vector's own residual (one product). Above `accept`, the
            # block is not worth its other nb − 1 products.
            aq0 = matvec(q[0])
            theta0 = q[0] @ aq0
            probe = jnp.linalg.norm(aq0 - theta0 * q[0]) / jnp.abs(theta0)
            probe = jnp.where(jnp.isfinite(probe), probe, jnp.inf)

            def full():
                aq = aq0[None]
                if nb > 1:
                    aq = jnp.concatenate([aq, jax.vmap(matvec)(q[1:])])
                b = _Basis(zeros.V.at[:nb].set(q), zeros.AV.at[:nb].set(aq),
                           zeros.G.at[:nb, :nb].set(q @ aq.T), _int(nb), _int(nb))
                th, _, _, _, rn, _, _ = estimates(b)
                residual = jnp.max(rn) / jnp.abs(th[0])
                residual = jnp.where(jnp.isfinite(residual), residual, jnp.inf)
                return b, residual <= accept, residual

            def poor():
                return eqx.tree_at(lambda b: b.used, zeros, _int(1)), jnp.asarray(False), probe

            b, good, residual = jax.lax.cond(probe <= accept, full, poor)
            return b, good, residual, guess

        def unused():
            # Not tried: the block's sum still starts the Lanczos, where it is one.
            guess = jnp.sum(block[: min(k, nb)].astype(dtype), axis=0)
            guess_n = jnp.linalg.norm(guess)
            guess = jnp.where(jnp.isfinite(guess_n) & (guess_n > 0), guess, v0)
            return zeros, jnp.asarray(False), jnp.asarray(jnp.inf, dtype), guess

        basis, warm, residual, guess = jax.lax.cond(use_block, rayleigh_ritz_on_block,
                                                    unused)
        basis = jax.lax.cond(warm, lambda: basis, lambda: cold(basis.used, guess))

    def cond(st):
        return ~st[2] & (st[0].used < max_matvecs)

    def body(st):
        # The Ritz step of the basis as it stands (computed once per iteration: the
        # convergence flag it gives is carried to `cond`).
        b, key, _, warm_phase = st
        th, S, Y, R, rn, err, conv = estimates(b)
        done = jnp.all(conv)
        # A warm start that has spent `warm_cap` products gives up: the basis is
        # emptied and Lanczos starts from the sum of its current Ritz vectors.
        give_up = warm_phase & (b.used >= warm_cap)
        i = jnp.argmax(jnp.where(conv, -1.0, err))
        guess = jnp.sum(Y, axis=0)
        guess_n = jnp.linalg.norm(guess)
        guess = jnp.where(jnp.isfinite(guess_n) & (guess_n > 0), guess, v0)
        direction = jnp.where(give_up, guess, R[i])
        scale = jnp.where(give_up, jnp.linalg.norm(guess), rn[i])

        def restart(b):
            Sk = S[:, :keep]
            return _Basis(jnp.zeros_like(b.V).at[:keep].set(Sk.T @ b.V),
                          jnp.zeros_like(b.AV).at[:keep].set(Sk.T @ b.AV),
                          jnp.zeros_like(b.G).at[:keep, :keep].set(jnp.diag(th[:keep])),
                          jnp.asarray(keep, b.m.dtype), b.used)

        def extend(b, key):
            b = jax.lax.cond(
                give_up, lambda b: eqx.tree_at(lambda z: z.used, zeros, b.used),
                lambda b: jax.lax.cond(b.m >= m_max, restart, lambda b: b, b), b)
            return add(b, key, direction, scale)

        b, key = jax.lax.cond(done, lambda b, key: (b, key), extend, b, key)
        return b, key, done, warm_phase & ~give_up

    def add(b, key, direction, scale):
        t = _orthogonalise(direction, b.V)
        tn = jnp.linalg.norm(t)
        # A residual already inside span(V) (to rounding) would add nothing: a random
        # direction keeps the basis growing (and finds a missed multiple eigenvalue).
        key, sub = jax.random.split(key)
        rnd = _orthogonalise(jax.random.normal(sub, (n,), dtype), b.V)
        bad = tn <= 1e-8 * scale
        t = jnp.where(bad, rnd / jnp.linalg.norm(rnd), t / jnp.where(tn > 0, tn, 1.0))
        at = matvec(t)
        col = (b.V @ at).at[b.m].set(t @ at)
        return _Basis(b.V.at[b.m].set(t), b.AV.at[b.m].set(at),
                      b.G.at[:, b.m].set(col).at[b.m, :].set(col), b.m + 1,
                      b.used + 1), key

    basis, _, _, warm_left = jax.lax.while_loop(
        cond, body, (basis, key, jnp.asarray(False), warm))
    th, S, Y, _, _, err, conv = estimates(basis)
    top = S[:, : k + extra].T @ basis.V
    return {"evals": th[:k], "evecs": Y, "err_est": err, "matvecs": basis.used,
            "converged": jnp.all(conv), "warm": warm, "gave_up": warm & ~warm_left,
            "block_residual": residual, "basis": top}


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
                           seed: int, owner: str, start: Array | None = None,
                           block: Array | None = None, use_block=True,
                           accept: float = 1e-2, warm_cap=None, extra: int = 0,
                           active=True) -> dict:
    """The k largest eigenpairs of ∇²L(w) on the flattened parameters (a dict as
    `top_eigenpairs` returns; `start`, `block`, `use_block`, `accept`, `warm_cap`,
    `extra` as there), densely from n HVPs when the Lanczos basis would hold all n directions
    anyway (then no warm start: `warm` is False). `active` (may be traced) false caps
    the products at the start's (for a point whose result is discarded: the loop would
    otherwise run to `max_hvp` on a non-finite one). `owner` names the caller in the
    error for k > n."""
    matvec, n, dtype = hessian_operator(loss, w)
    if k > n:
        raise ValueError(
            f"{owner}: k = {k} exceeds the number of parameters n = {n}; ask for at most "
            f"{n} eigenvalues."
        )
    if n <= basis_size(n, k) and n <= max_hvp:
        evals, evecs = dense_eigh(matvec, n, dtype)
        return {"evals": evals[:k], "evecs": evecs[:k], "err_est": jnp.zeros(k, dtype),
                "matvecs": _int(n), "converged": jnp.asarray(True),
                "warm": jnp.asarray(False), "gave_up": jnp.asarray(False),
                "block_residual": jnp.asarray(jnp.inf, dtype),
                "basis": evecs[: k + extra]}
    return top_eigenpairs(matvec, n, k, dtype, tol=tol,
                          max_matvecs=jnp.where(active, max_hvp, 0),
                          key=jax.random.key(seed), start=start, block=block,
                          use_block=use_block, accept=accept, warm_cap=warm_cap,
                          extra=extra)


def aligned(prev: Array, cur: Array) -> Array:
    """The rows of `prev` rotated to match those of `cur` (both (b, n), orthonormal
    rows): Q·prev with Q = UWᵀ from the SVD UΣWᵀ = cur·prevᵀ, the orthogonal Procrustes
    solution. Eigenvector bases of nearby operators then correspond row by row: signs,
    the order of crossing eigenvalues and rotations inside near-degenerate pairs."""
    u, _, wt = jnp.linalg.svd(cur @ prev.T)
    return (u @ wt) @ prev


def extrapolate(blocks: Array, times: Array, t, order: int) -> Array:
    """The value at t of the polynomial of degree `order` through blocks[j] at times[j],
    j = 0..order (newest first; each aligned with blocks[0] first): a prediction of the
    next basis along a smooth path, error O(Δt^(order+1)) but with the blocks' own
    errors amplified (independent errors by √(4 + 1) ≈ 2.2 for order 1 at equal
    spacing, √19 ≈ 4.4 for order 2). `times` must be distinct in their first
    order + 1 entries."""
    pts = [blocks[0]] + [aligned(blocks[j], blocks[0]) for j in range(1, order + 1)]
    out = jnp.zeros_like(blocks[0])
    for j in range(order + 1):
        c = 1.0
        for m in range(order + 1):
            if m != j:
                c = c * (t - times[m]) / (times[j] - times[m])
        out = out + c * pts[j]
    return out
