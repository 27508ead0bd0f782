"""Saul (2023), Algorithm 1: parallel multiplicative updates to the least ℓ_{p,q} norm."""


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._models import MLP
from .._projection import AbstractProjection
from .._validate import float_array, positive_int, real
from ._common import (
    BalanceInfo,
    _apply,
    _check_exponent,
    _check_model,
    _check_velocity_rule,
)
from ._units import apply_units, check_units_model, units_min_norm


@eqx.filter_jit
def _min_norm_scales(abs_w, p, q, d, tol, max_iter: int):
    # Saul Alg. 1 on the log-scales u, with M_k = |W0_k|^p fixed: the current row sums
    # and the matrix-vector product of eq. (8) are
    #   S_k,i = e^{p u_i} (M_k e^{-p d u_prev})_i,
    #   Σ_j ρ_j π_ji = e^{-p d u_i} ((ρ_next/S_next · e^{p u_next})ᵀ M_next)_i,
    # so an iteration costs two passes over the weights and writes none of them.
    m = [a**p for a in abs_w]
    depth = len(m)
    dtype = m[0].dtype
    r = q / p
    # Outer exponent: 1/(4 max(p, q)) in Saul eq. (8) for d = 1. For d-homogeneous units
    # an entry depends on u_i - d u_j; splitting it as the convex combination
    # 1/(1+d)·(1+d)u_i + d/(1+d)·(-(1+d)u_j) in the auxiliary function of his App. A.3
    # gives 1/(2(1+d) max(p, q)); monotone descent is checked by the tests.
    expo = 1.0 / (2.0 * (1.0 + d) * jnp.maximum(p, q))

    def sums(u):
        rows, rhos = [], []
        for k in range(depth):
            x = jnp.ones(m[k].shape[1], dtype) if k == 0 else jnp.exp(-p * d * u[k - 1])
            s = m[k] @ x
            if k < depth - 1:
                s = s * jnp.exp(p * u[k])
            rows.append(s)
            rhos.append(s**r)
        return rows, rhos

    def norm(rhos):
        return sum(jnp.sum(x) for x in rhos) ** (1.0 / q)

    def step(u, rows, rhos):
        new = []
        for h in range(depth - 1):
            s_next, rho_next = rows[h + 1], rhos[h + 1]
            ratio = jnp.where(s_next > 0, rho_next / jnp.where(s_next > 0, s_next, 1.0), 0.0)
            y = ratio if h + 1 == depth - 1 else ratio * jnp.exp(p * u[h + 1])
            num = d * jnp.exp(-p * d * u[h]) * (y @ m[h + 1])
            ok = (num > 0) & (rhos[h] > 0)  # a unit with no in- or out-weights stays put
            s = jnp.where(
                ok, expo * (jnp.log(jnp.where(ok, num, 1.0)) - jnp.log(jnp.where(ok, rhos[h],
                                                                                    1.0))),
                0.0)
            new.append(s)
        return tuple(new)

    u0 = tuple(jnp.zeros(mk.shape[0], dtype) for mk in m[:-1])
    values0 = jnp.full(max_iter + 1, jnp.nan, dtype)

    def cond(carry):
        _, it, _, delta = carry
        return (it < max_iter) & (delta >= tol)

    def body(carry):
        u, it, values, _ = carry
        rows, rhos = sums(u)
        values = values.at[it].set(norm(rhos))
        s = step(u, rows, rhos)
        delta = jnp.asarray(0.0, dtype)
        for x in s:
            delta = jnp.maximum(delta, jnp.max(jnp.abs(jnp.expm1(x)), initial=0.0))
        u = tuple(a + b for a, b in zip(u, s))
        return u, it + 1, values, delta

    u, it, values, delta = jax.lax.while_loop(
        cond, body, (u0, jnp.asarray(0), values0, jnp.asarray(jnp.inf, dtype)))
    final = norm(sums(u)[1])
    values = values.at[it].set(final)
    # A non-finite norm (a NaN weight inside a solve) is no convergence.
    return u, it, values, (delta < tol) & jnp.isfinite(final)


def min_norm_fix(model, p: float = 2, q: float = 2, tol: float = 1e-8,
                 max_iter: int = 1000) -> tuple[MLP, BalanceInfo]:
    """The functionally equivalent network of least ‖W‖_{p,q} (Saul, Alg. 1, Thm 1).

    For a `dyn.MLP`, Saul's parallel multiplicative updates below. For any other model
    that states its rescaling units (`dyn.ConvNet`, `dyn.RNN`, `dyn.ResidualMLP`, a
    user's model with `rescaling_units()`), the same convex problem in the log-scales of
    its units, solved by damped Newton steps (module `balance._units`): the norm then
    runs over the rows (axis 0) of every weight array (rank ≥ 2) a unit touches, biases
    excluded, and `max_iter` counts Newton steps.

    Each iteration rescales every hidden unit at once by (Saul eq. 8, our d-extension)

        a_i = [ d Σ_j ρ_j π_ji / ρ_i ]^{1/(2(1+d) max(p, q))},
        ρ_i = (Σ_j |W_ij|^p)^{q/p},   π_ji = |W_ji|^p / Σ_k |W_jk|^p,

    until max_i |a_i − 1| < `tol` or `max_iter` iterations; d is the activation's
    homogeneity degree (1 for ReLU, where this is exactly eq. 8). Biases rescale with
    their unit but are not in the norm. One `lax.while_loop` under jit.

    Returns the rescaled model and a `BalanceInfo` (norm history in `values`).

    **Raises:** ValueError naming the argument for a model without units, a
    non-homogeneous activation (Tanh, Swish), a NaN weight, or p, q < 1.
    """
    fix = MinNormFix(p, q, tol, max_iter, _owner="min_norm_fix")
    new, _, info = fix._run(model, None, "min_norm_fix")
    return new, info


class MinNormFix(AbstractProjection):
    """`min_norm_fix` as a projection: the weights rescaled to the least ‖W‖_{p,q}
    (Saul, Alg. 1); the velocity pushed forward by the same rescaling unless
    `velocity="keep"` or `"zero"`."""

    p: Array
    q: Array
    tol: Array
    max_iter: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, p: float = 2, q: float = 2, tol: float = 1e-8, max_iter: int = 1000,
                 velocity: str = "pushforward", *, _owner: str = "MinNormFix"):
        # `_owner`: the public name that error messages give (`min_norm_fix` builds one).
        self.p = float_array(_check_exponent("p", p, _owner))
        self.q = float_array(_check_exponent("q", q, _owner))
        self.tol = float_array(real(tol, "tol", _owner, low=0.0, strict=True, high=1.0))
        self.max_iter = positive_int(max_iter, "max_iter", _owner)
        self.velocity = _check_velocity_rule(velocity, _owner)

    def _run(self, params, velocity, owner: str):
        if not isinstance(params, MLP):
            return _run_units(self, params, velocity, owner)
        d = _check_model(params, owner)
        u, it, values, conv = _min_norm_scales(tuple(jnp.abs(w) for w in params.weights),
                                               self.p, self.q, float_array(d), self.tol,
                                               self.max_iter)
        return *_apply(params, velocity, u, d, self.velocity), BalanceInfo(it, values, conv, u)

    def __call__(self, params, velocity=None, state=None):
        return self._run(params, velocity, "MinNormFix")[:2]


def _run_units(fix: MinNormFix, params, velocity, owner: str):
    families = check_units_model(params, owner)
    u, it, values, conv = units_min_norm(params, fix.p, fix.q, fix.tol, fix.max_iter)
    new, velocity = apply_units(params, velocity, families, u, fix.velocity)
    return new, velocity, BalanceInfo(it, values, conv, u)
