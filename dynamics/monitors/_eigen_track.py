"""The warm start of `TopEigenvalues` and `Sharpness`: what they carry from one save to
the next (`EigenTrack`) and one save's eigensolve from it (`track_step`), on the
eigensolver of `dynamics/_lanczos.py`. `top_eigenvalues` is the eigensolve at one point
that every spectrum monitor shares.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array

from .._lanczos import basis_size, extrapolate, hessian_top_eigenpairs
from .._problem import Problem
from .._tree import all_finite

# Default relative eigenvalue-error target of the Lanczos stopping test, by precision:
# 1e-10 in float64 (measured true errors 1e-12 to 1e-11, `TopEigenvalues`); in float32 a Rayleigh
# quotient is good to ~eps·‖H‖, so 1e-5 is what float32 can certify.
_TOL = {8: 1e-10, 4: 1e-5}


def _tol(tol, w):
    if tol is not None:
        return tol
    return _TOL.get(jnp.dtype(jnp.result_type(*jax.tree.leaves(w))).itemsize, 1e-10)


def top_eigenvalues(problem: Problem, w, k: int, tol: float | None, max_hvp: int,
                    seed: int, owner: str, **warm) -> dict:
    """The k largest eigenpairs of ∇²L(w) (`dynamics._lanczos.hessian_top_eigenpairs` on
    the problem's loss; `warm`: its warm-start arguments)."""
    return hessian_top_eigenpairs(problem.loss, w, k, tol=_tol(tol, w), max_hvp=max_hvp,
                                  seed=seed, owner=owner, **warm)


# A predicted block whose top vector (a one-product probe), then whose Rayleigh–Ritz
# pairs, have a residual above _ACCEPT·|θ_1| is not tried: the point jumped (a
# projection, GD past the edge of stability). Below it, whether the warm start pays
# depends on the spectrum, not on the residual alone (k = 10 along GF, saves 0.1 to 0.2
# apart: on a 2,410-parameter MLP starts at 2e-4 took 28–30 HVPs against 55 cold and
# starts at 4e-4–1e-3 took 61–72; on the 26k-parameter one starts that a threshold of
# 3e-4 sent cold took 28–34 warm against 45 via the fallback and 67 cold), so the warm
# phase is capped instead (`track_step`).
_ACCEPT = 1e-2
# Saves of history carried: enough for extrapolation of order 0, 1 or 2.
_DEPTH = 3
# After a warm start that gave up, the next saves run cold, retried after this many.
_RETRY = 4


class EigenTrack(eqx.Module):
    """What `TopEigenvalues` and `Sharpness` carry from one save to the next.

    - `blocks` (3, k + 1, n): the top k + 1 Ritz vectors (rows) of the last three saves,
      newest first; (0, k + 1, n) with `warm=False` or where n is small enough for the
      dense path.
    - `times` (3,): their save times.
    - `count`: how many of `blocks` hold a save (0 to 3).
    - `order`: the extrapolation order the next save starts from: 0 while one save is
      held, then 1, or 2 where order 2 predicted the latest save's vectors better.
    - `cold_hvps`: the HVPs of the latest save that ran cold (0 before the first): the
      cap on a warm start, past which it gives up and runs cold.
    - `wait`: saves still to run cold before a warm start is tried again (after one
      gave up).
    - `hvps`: the Hessian–vector products the last save took (recorded as
      `<name>_hvps`).
    """

    blocks: Array
    times: Array
    count: Array
    order: Array
    cold_hvps: Array
    wait: Array
    hvps: Array


def _int(x):
    return jnp.asarray(x, jnp.int32)


def track_init(m, k: int, w, owner: str) -> EigenTrack:
    flat = ravel_pytree(w)[0]
    n, dtype = flat.shape[0], flat.dtype
    if k > n:
        raise ValueError(
            f"{owner}: k = {k} exceeds the number of parameters n = {n}; ask for at most "
            f"{n} eigenvalues."
        )
    # The dense path (n within the Lanczos basis) needs no start; a warm Lanczos holds
    # the k + 1 block within the k + 5 vectors a restart keeps.
    depth = _DEPTH if m.warm and n > basis_size(n, k) else 0
    return EigenTrack(jnp.zeros((depth, k + 1, n), dtype), jnp.zeros(depth, dtype),
                      _int(0), _int(0), _int(0), _int(0), _int(0))


def _miss(new, k: int, block):
    """How far the wanted k rows of `new` lie outside span(block): ‖N − N·QᵀQ‖_F, Q an
    orthonormal basis of block's rows."""
    q = jnp.linalg.qr(block.T)[0].T
    nk = new[:k]
    return jnp.linalg.norm(nk - (nk @ q.T) @ q)


def track_step(m, k: int, carry: EigenTrack, t, w, problem, owner: str):
    """One save of `TopEigenvalues` / `Sharpness`: (the new carry, the k eigenvalues)."""
    active = all_finite(w) & jnp.isfinite(t)
    depth = carry.blocks.shape[0]
    if depth == 0:
        out = top_eigenvalues(problem, w, k, m.tol, m.max_hvp, m.seed, owner,
                              active=active)
        new = eqx.tree_at(lambda c: c.hvps, carry, _int(out["matvecs"]))
        return new, jnp.where(active, out["evals"], jnp.nan)
    t = jnp.asarray(t, carry.times.dtype)
    # The predictions of this save's vectors by extrapolation of order 0, 1, 2 (each
    # valid once that many + 1 saves are held), and the one the carry chose.
    preds = jnp.stack([extrapolate(carry.blocks, carry.times, t, o) for o in range(3)])
    order = jnp.clip(carry.order, 0, jnp.maximum(carry.count - 1, 0))
    # A warm start may spend at most what the latest cold save took; past that it
    # gives up (its products are lost) and Lanczos runs cold from its Ritz vectors,
    # and the next `_RETRY` saves run cold (from the prediction's sum) before it is
    # tried again. So a phase where the warm start does not pay costs ~1 + 1/_RETRY
    # times cold, and one where it does is found again within `_RETRY` saves.
    cap = jnp.where(carry.cold_hvps > 0, carry.cold_hvps, m.max_hvp)
    out = top_eigenvalues(problem, w, k, m.tol, m.max_hvp, m.seed, owner,
                          block=preds[order],
                          use_block=active & (carry.count > 0) & (carry.wait == 0),
                          accept=_ACCEPT, warm_cap=cap, extra=1, active=active)
    new = out["basis"]
    hvps = _int(out["matvecs"])
    # A save at the newest held time (the final state at the last save) replaces it:
    # the held times stay distinct for the extrapolation.
    same = (carry.count > 0) & (t <= carry.times[0])
    blocks = jnp.where(same, carry.blocks.at[0].set(new),
                       jnp.concatenate([new[None], carry.blocks[:-1]]))
    times = jnp.where(same, carry.times.at[0].set(t),
                      jnp.concatenate([t[None], carry.times[:-1]]))
    count = jnp.where(same, carry.count, jnp.minimum(carry.count + 1, depth))
    # The next save's order: 0 while one save is held, then 1, or 2 where order 2's
    # prediction came closer to this save's vectors than order 1's (judged once three
    # saves were held). Order 0 is not judged against them: in a miss measured against
    # vectors that are themselves converged only to the stopping test, it often won
    # where its warm start then took 3x the HVPs of order 1's (26k-parameter MLP,
    # cross-entropy, saves 0.02 apart); order 2 pays where saves are far apart (saves
    # 0.2 apart on a 2,410-parameter MLP: 21-27 HVPs per save against 34-36).
    better2 = _miss(new, k, preds[2]) < _miss(new, k, preds[1])
    next_order = jnp.where(count >= 2, jnp.where((carry.count >= 3) & better2, 2, 1), 0)
    moved = EigenTrack(
        blocks, times, count, _int(next_order),
        jnp.where(out["warm"], carry.cold_hvps, hvps),
        # (not after the second save: its prediction could only be the first save's
        # vectors, order 0, and order 1 is tried next)
        _int(jnp.where(out["gave_up"] & (carry.count >= 2), _RETRY,
                       jnp.maximum(carry.wait - 1, 0))),
        hvps)
    new_carry = jax.tree.map(lambda a, b: jnp.where(active, a, b), moved,
                             eqx.tree_at(lambda c: c.hvps, carry, hvps))
    return new_carry, jnp.where(active, out["evals"], jnp.nan)
