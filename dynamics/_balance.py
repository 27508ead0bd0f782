"""The balancing fixes: rescalings along the symmetry orbit of a homogeneous MLP.

A rescaling by a_i = e^{u_i} > 0 at each hidden unit i of a d-homogeneous network
(σ(λz) = λ^d σ(z)) maps

    W_k[i, j] -> W_k[i, j] · a_i / a_j^d,    b_k[i] -> b_k[i] · a_i,

(a = 1 at input and output units) and leaves the network function unchanged (Saul,
eqs. 4–5 for d = 1; Baldi et al., App. B.5.2 for BiPU units of exponent c = d). The fixes
pick the rescaling that minimizes a regularizer:

- `min_norm_fix` (Saul, Alg. 1): parallel multiplicative updates on ‖W‖_{p,q};
- `neuron_balance` (Baldi et al., sec. 2, App. B): one neuron (or layer) at a time, in
  closed form for L_p and by a 1-D root solve for any additive regularizer Σ g(|w|);
- `enorm` (Stock et al. 2019): block coordinate descent layer by layer, p = q;
- `ChargeProjection`: back to the initial per-neuron gradient-flow charges.

Everything works on the log-scales u (one array per hidden layer) and applies them
once at the end, so the rescaled weights are exactly W0 · a_i/a_j^d.
"""

import math
import numbers
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray

from ._models import MLP
from ._projection import AbstractProjection

__all__ = [
    "BalanceInfo",
    "lpq_norm",
    "min_norm_fix",
    "neuron_balance",
    "enorm",
    "MinNormFix",
    "NeuronBalance",
    "ENorm",
    "ChargeProjection",
]

_VELOCITY_RULES = ("pushforward", "keep", "zero")
_SCHEDULES = ("sequential", "stochastic", "layer", "tied")


# --------------------------------------------------------------------------- checks


def _check_model(model, owner: str) -> float:
    """The homogeneity degree d of `model`'s hidden units, or a ValueError."""
    if not isinstance(model, MLP):
        raise ValueError(f"{owner}: `model` must be a dyn.MLP, got {type(model).__name__}.")
    d = model.activation.degree
    if d is None:
        raise ValueError(
            f"{owner}: `model` has activation {type(model.activation).__name__}, which is not "
            "positively homogeneous, so rescaling hidden units changes the network function; "
            "use ReLU, LeakyReLU, RePU, Polynomial or Identity."
        )
    return float(d)


def _check_exponent(name: str, value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: `{name}` must be a real number >= 1, got {value!r}.")
    value = float(value)
    if not (value >= 1 and math.isfinite(value)):
        raise ValueError(
            f"{owner}: `{name}` must be a finite number >= 1 (ℓ_{name} with {name} < 1 is not "
            f"a norm and the minimization is not convex), got {value!r}."
        )
    return value


def _check_tol(tol, owner: str) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < 1):
        raise ValueError(f"{owner}: `tol` must be a number in (0, 1), got {tol!r}.")
    return float(tol)


def _check_count(name: str, value, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive int, got {value!r}.")
    return int(value)


def _check_velocity_rule(rule, owner: str) -> str:
    if rule not in _VELOCITY_RULES:
        raise ValueError(
            f"{owner}: `velocity` must be one of {_VELOCITY_RULES} (push the velocity forward "
            f"by the same rescaling, keep it, or zero it), got {rule!r}."
        )
    return rule


# --------------------------------------------------------------------------- rescaling


def _multipliers(log_scales, depth: int, d) -> tuple[list[Array], list[Array]]:
    """Per-entry factors a_i/a_j^d of every weight matrix and a_i of every bias."""
    w_mult, b_mult = [], []
    for k in range(depth):
        e = 0.0
        if k < depth - 1:
            e = e + log_scales[k][:, None]
        if k > 0:
            e = e - d * log_scales[k - 1][None, :]
        w_mult.append(jnp.exp(e))
        b_mult.append(jnp.exp(log_scales[k]) if k < depth - 1 else None)
    return w_mult, b_mult


def _rescale(tree, w_mult, b_mult):
    """Apply the factors to anything with MLP-shaped `weights` (and maybe `biases`)."""
    weights = tuple(w * m for w, m in zip(tree.weights, w_mult))
    tree = eqx.tree_at(lambda t: t.weights, tree, weights)
    if getattr(tree, "biases", None) is not None:
        biases = tuple(b if m is None else b * m for b, m in zip(tree.biases, b_mult))
        tree = eqx.tree_at(lambda t: t.biases, tree, biases)
    return tree


def _apply(model: MLP, velocity, log_scales, d, rule: str):
    """The rescaled (model, velocity); the velocity follows `rule`.

    The rescaling is linear in the weights, W -> D W, so a velocity V = dW/dt is pushed
    forward as V -> D V ("pushforward"); "keep" leaves it, "zero" restarts from rest.
    """
    w_mult, b_mult = _multipliers(log_scales, model.depth, d)
    new_model = _rescale(model, w_mult, b_mult)
    if velocity is None:
        return new_model, None
    if rule == "keep":
        return new_model, velocity
    if rule == "zero":
        return new_model, jax.tree.map(jnp.zeros_like, velocity)
    return new_model, _rescale(velocity, w_mult, b_mult)


def _zeros_log_scales(model: MLP):
    return tuple(jnp.zeros(w, model.weights[0].dtype) for w in model.widths[1:-1])


# --------------------------------------------------------------------------- norms


def lpq_norm(model: MLP, p: float = 2, q: float = 2) -> Array:
    """Entry-wise ℓ_{p,q} norm of the weights (Saul, eq. 1), biases excluded:

        ‖W‖_{p,q} = ( Σ_i ( Σ_j |W_ij|^p )^{q/p} )^{1/q},

    i running over all non-input units (rows of every weight matrix), j over a unit's
    incoming weights.
    """
    if not isinstance(model, MLP):
        raise ValueError(f"lpq_norm: `model` must be a dyn.MLP, got {type(model).__name__}.")
    p = _check_exponent("p", p, "lpq_norm")
    q = _check_exponent("q", q, "lpq_norm")
    total = sum(jnp.sum(jnp.sum(jnp.abs(w) ** p, axis=-1) ** (q / p)) for w in model.weights)
    return total ** (1.0 / q)


class BalanceInfo(eqx.Module):
    """What a balancing run did.

    - `num_steps`: iterations (min_norm_fix) or sweeps (neuron_balance, enorm) taken.
    - `values`: the objective before each step and after the last, in a fixed-size
      buffer of length max_steps + 1 (NaN beyond `num_steps`); for `min_norm_fix` the
      norm ‖W‖_{p,q}, for neuron balancing the regularizer Σ g(|w|).
    - `converged`: whether the tolerance was met before the step limit.
    - `log_scales`: the total log-rescaling u, one array per hidden layer.
    """

    num_steps: Array
    values: Array
    converged: Array
    log_scales: tuple[Array, ...]


# --------------------------------------------------------------------------- Saul


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
    values = values.at[it].set(norm(sums(u)[1]))
    return u, it, values, delta < tol


def min_norm_fix(model: MLP, p: float = 2, q: float = 2, tol: float = 1e-8,
                 max_iter: int = 1000) -> tuple[MLP, BalanceInfo]:
    """The functionally equivalent network of least ‖W‖_{p,q} (Saul, Alg. 1, Thm 1).

    Each iteration rescales every hidden unit at once by (Saul eq. 8, our d-extension)

        a_i = [ d Σ_j ρ_j π_ji / ρ_i ]^{1/(2(1+d) max(p, q))},
        ρ_i = (Σ_j |W_ij|^p)^{q/p},   π_ji = |W_ji|^p / Σ_k |W_jk|^p,

    until max_i |a_i − 1| < `tol` or `max_iter` iterations; d is the activation's
    homogeneity degree (1 for ReLU, where this is exactly eq. 8). Biases rescale with
    their unit but are not in the norm. One `lax.while_loop` under jit.

    Returns the rescaled model and a `BalanceInfo` (norm history in `values`).
    """
    d = _check_model(model, "min_norm_fix")
    p = _check_exponent("p", p, "min_norm_fix")
    q = _check_exponent("q", q, "min_norm_fix")
    tol = _check_tol(tol, "min_norm_fix")
    max_iter = _check_count("max_iter", max_iter, "min_norm_fix")
    u, it, values, conv = _min_norm_scales(
        tuple(jnp.abs(w) for w in model.weights), _float_array(p), _float_array(q),
        _float_array(d), _float_array(tol), max_iter)
    new, _ = _apply(model, None, u, d, "keep")
    return new, BalanceInfo(it, values, conv, u)


# --------------------------------------------------------------------------- Baldi


def _lp_log_scale(x, y, p, d, wx=1.0, wy=1.0):
    """log λ* minimizing wx λ^p Σ x^p + wy λ^{-dp} Σ y^p (Baldi sec. 2 for d = 1:
    λ* = (‖out‖_p^p / ‖in‖_p^p)^{1/(2p)}; here λ* = (d wy B / wx A)^{1/(p(1+d))})."""
    a = wx * jnp.sum(x**p)
    b = wy * jnp.sum(y**p)
    ok = (a > 0) & (b > 0)
    s = (jnp.log(jnp.where(ok, d * b, 1.0)) - jnp.log(jnp.where(ok, a, 1.0))) / (p * (1 + d))
    return jnp.where(ok, s, 0.0)


def _g_log_scale(g, x, y, d):
    """log λ* minimizing Σ g(λ x) + Σ g(λ^{-d} y) by Newton on s = log λ (optimistix).

    The stationarity condition Σ g'(e^s x) e^s x − d Σ g'(e^{-ds} y) e^{-ds} y = 0 is
    increasing in s when g is convex and increasing on [0, ∞) (Baldi et al., Thm 9).
    """
    dg = jax.vmap(jax.grad(g))

    def fn(s, _):
        ex, ey = jnp.exp(s) * x, jnp.exp(-d * s) * y
        return jnp.sum(dg(ex) * ex) - d * jnp.sum(dg(ey) * ey)

    ok = (jnp.sum(x) > 0) & (jnp.sum(y) > 0)
    s0 = _lp_log_scale(x, y, 2.0, d)
    # A safe s0 where the unit is left alone: Newton on an all-zero side has no root.
    s0 = jnp.where(ok, s0, 0.0)
    sol = optx.root_find(fn, optx.Newton(rtol=1e-12, atol=1e-14), s0, max_steps=64,
                         throw=False)
    return jnp.where(ok & jnp.isfinite(sol.value), sol.value, 0.0)


def _neuron_log_scales(x, y, p, d, g, wx=1.0, wy=1.0):
    if g is None:
        return _lp_log_scale(x, y, p, d, wx, wy)
    return _g_log_scale(g, x, y, d)


def _objective(abs_w, abs_b, p, g, coef):
    f = (lambda a: a**p) if g is None else (lambda a: jax.vmap(g)(a.ravel()))
    total = 0.0
    for k, a in enumerate(abs_w):
        total = total + coef**k * jnp.sum(f(a))
    if abs_b is not None:
        total = total + sum(jnp.sum(f(b)) for b in abs_b[:-1])
    return total


@eqx.filter_jit
def _balance_scales(abs_w, abs_b, p, d, g, schedule: str, tol, max_sweeps: int, key,
                    coef):
    depth = len(abs_w)
    dtype = abs_w[0].dtype
    sizes = [a.shape[0] for a in abs_w[:-1]]

    def in_out(w, b, h):
        x = w[h]
        if b is not None:
            x = jnp.concatenate([x, b[h][:, None]], axis=1)
        return x, w[h + 1].T

    def scale(w, b, h, s, index=None):
        # Rescale unit(s) `index` of hidden layer h by e^s (all of the layer if None).
        w, b = list(w), None if b is None else list(b)
        lam_in, lam_out = jnp.exp(s), jnp.exp(-d * s)
        if index is None:
            w[h] = w[h] * lam_in[:, None] if jnp.ndim(s) else w[h] * lam_in
            w[h + 1] = w[h + 1] * (lam_out[None, :] if jnp.ndim(s) else lam_out)
            if b is not None:
                b[h] = b[h] * lam_in
        else:
            w[h] = w[h].at[index].multiply(lam_in)
            w[h + 1] = w[h + 1].at[:, index].multiply(lam_out)
            if b is not None:
                b[h] = b[h].at[index].multiply(lam_in)
        return tuple(w), None if b is None else tuple(b)

    def weights_of(h):
        # ENorm's asymmetry: layer k's weights count c^k (c = 1 for neuron balancing).
        return coef**h, coef ** (h + 1)

    def one_neuron(state, h, i):
        w, b, u, delta = state
        x, y = in_out(w, b, h)
        s = _neuron_log_scales(x[i], y[i], p, d, g, *weights_of(h))
        w, b = scale(w, b, h, s, i)
        u = list(u)
        u[h] = u[h].at[i].add(s)
        return w, b, tuple(u), jnp.maximum(delta, jnp.abs(jnp.expm1(s)))

    def sweep(state, key):
        if schedule == "sequential":
            for h in range(depth - 1):
                state = jax.lax.fori_loop(0, sizes[h], lambda i, st, h=h: one_neuron(st, h, i),
                                          state)
            return state
        if schedule == "stochastic":
            # One sweep = as many uniformly random picks as there are hidden units.
            layer_of = jnp.concatenate([jnp.full(n, h) for h, n in enumerate(sizes)])
            index_of = jnp.concatenate([jnp.arange(n) for n in sizes])
            picks = jax.random.randint(key, (sum(sizes),), 0, sum(sizes))
            branches = [lambda st, i, h=h: one_neuron(st, h, i) for h in range(depth - 1)]

            def pick(n, st):
                j = picks[n]
                return jax.lax.switch(layer_of[j], branches, st, index_of[j])

            return jax.lax.fori_loop(0, sum(sizes), pick, state)
        w, b, u, delta = state
        for h in range(depth - 1):
            x, y = in_out(w, b, h)
            wx, wy = weights_of(h)
            if schedule == "layer":
                # Units of one layer share no weight: balancing them all at once is
                # exactly balancing them one after the other.
                if g is None:
                    s = jax.vmap(lambda xi, yi: _lp_log_scale(xi, yi, p, d, wx, wy))(x, y)
                else:
                    s = jax.vmap(lambda xi, yi: _g_log_scale(g, xi, yi, d))(x, y)
                w, b = scale(w, b, h, s)
                u = tuple(uu + s if k == h else uu for k, uu in enumerate(u))
            else:  # tied: one factor for the whole layer (Baldi App. B.7.2)
                s = _neuron_log_scales(x.ravel(), y.ravel(), p, d, g, wx, wy)
                w, b = scale(w, b, h, s)
                u = tuple(uu + s if k == h else uu for k, uu in enumerate(u))
            delta = jnp.maximum(delta, jnp.max(jnp.abs(jnp.expm1(s))))
        return w, b, u, delta

    u0 = tuple(jnp.zeros(n, dtype) for n in sizes)
    values0 = jnp.full(max_sweeps + 1, jnp.nan, dtype)
    keys = (jax.random.split(key, max_sweeps) if key is not None
            else jnp.zeros((max_sweeps,), dtype))

    def cond(carry):
        return (carry[4] < max_sweeps) & (carry[5] >= tol)

    def body(carry):
        w, b, u, values, it, _ = carry
        values = values.at[it].set(_objective(w, b, p, g, coef))
        w, b, u, delta = sweep((w, b, u, jnp.asarray(0.0, dtype)), keys[it])
        return w, b, u, values, it + 1, delta

    w, b, u, values, it, delta = jax.lax.while_loop(
        cond, body, (abs_w, abs_b, u0, values0, jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
    values = values.at[it].set(_objective(w, b, p, g, coef))
    return u, it, values, delta < tol


def _check_g(regularizer, owner: str):
    if regularizer is None:
        return None
    if not callable(regularizer):
        raise ValueError(
            f"{owner}: `regularizer` must be None (the L_p regularizer) or a callable g "
            f"giving the cost g(|w|) of one weight, e.g. lambda a: a**2; got {regularizer!r}.")
    return regularizer


def neuron_balance(model: MLP, p: float = 2, schedule: str = "sequential",
                   include_bias: bool = False, tol: float = 1e-10, max_sweeps: int = 1000,
                   key: PRNGKeyArray | None = None,
                   regularizer: Callable[[Array], Array] | None = None
                   ) -> tuple[MLP, BalanceInfo]:
    """Neural synaptic balancing (Baldi et al., sec. 2 and App. B).

    Balancing a hidden unit with in-weights x (and its bias when `include_bias`, Baldi's
    convention; Saul's is to leave it out) and out-weights y rescales x by λ* and y by
    λ*^{-d} where λ* minimizes the unit's contribution to R = Σ g(|w|):

    - L_p (g(a) = a^p, `regularizer=None`): λ* = (d ‖y‖_p^p / ‖x‖_p^p)^{1/(p(1+d))},
      Baldi's (‖y‖_p^p/‖x‖_p^p)^{1/(2p)} for d = 1, their BiPU scaling (App. B.5) for
      d = c;
    - any other g (convex, increasing on [0, ∞)): a 1-D Newton root solve (optimistix).

    Schedules: "sequential" (each unit in order, layer by layer), "stochastic" (units
    drawn uniformly at random; needs `key`), "layer" (all units of a layer at once),
    "tied" (one λ per layer). A sweep visits every unit (or layer) once; sweeps repeat
    until every |λ − 1| < `tol`. By Baldi's Thm 10 every schedule but "tied" reaches the
    same unique balanced network, which for L_p without bias is `min_norm_fix` with q = p.
    The biases always rescale with their unit.
    """
    d = _check_model(model, "neuron_balance")
    p = _check_exponent("p", p, "neuron_balance")
    if schedule not in _SCHEDULES:
        raise ValueError(f"neuron_balance: `schedule` must be one of {_SCHEDULES}, got "
                         f"{schedule!r}.")
    if schedule == "stochastic" and key is None:
        raise ValueError("neuron_balance: the 'stochastic' schedule needs a PRNG key; pass "
                         "key=jax.random.key(0).")
    if not isinstance(include_bias, bool):
        raise ValueError(f"neuron_balance: `include_bias` must be True or False, got "
                         f"{include_bias!r}.")
    tol = _check_tol(tol, "neuron_balance")
    max_sweeps = _check_count("max_sweeps", max_sweeps, "neuron_balance")
    g = _check_g(regularizer, "neuron_balance")
    abs_b = None
    if include_bias and model.biases is not None:
        abs_b = tuple(jnp.abs(b) for b in model.biases)
    u, it, values, conv = _balance_scales(
        tuple(jnp.abs(w) for w in model.weights), abs_b, _float_array(p), _float_array(d), g,
        schedule, _float_array(tol), max_sweeps, key if schedule == "stochastic" else None,
        _float_array(1.0))
    new, _ = _apply(model, None, u, d, "keep")
    return new, BalanceInfo(it, values, conv, u)


def enorm(model: MLP, p: float = 2, c: float = 1.0, tol: float = 1e-10,
          max_sweeps: int = 1000) -> tuple[MLP, BalanceInfo]:
    """Equi-normalization (Stock et al. 2019), a baseline: block coordinate descent on

        Σ_k c^k ‖W_k‖_p^p   (biases rescale, not in the objective),

    one block per hidden layer, visited in order; within a block every unit gets its
    closed-form minimizer λ_i = (d c ‖W_{k+1}[:, i]‖_p^p / ‖W_k[i, :]‖_p^p)^{1/(p(1+d))}.
    With c = 1 the fixed point is `min_norm_fix` with q = p (Saul App. A.2).
    """
    d = _check_model(model, "enorm")
    p = _check_exponent("p", p, "enorm")
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (0 < c < math.inf):
        raise ValueError(f"enorm: the asymmetry coefficient `c` must be a positive number, "
                         f"got {c!r}.")
    tol = _check_tol(tol, "enorm")
    max_sweeps = _check_count("max_sweeps", max_sweeps, "enorm")
    u, it, values, conv = _balance_scales(
        tuple(jnp.abs(w) for w in model.weights), None, _float_array(p), _float_array(d), None,
        "layer", _float_array(tol), max_sweeps, None, _float_array(c))
    new, _ = _apply(model, None, u, d, "keep")
    return new, BalanceInfo(it, values, conv, u)


# --------------------------------------------------------------------------- projections


def _float_array(x):
    return jnp.asarray(x, dtype=float)


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
                 velocity: str = "pushforward"):
        self.p = _float_array(_check_exponent("p", p, "MinNormFix"))
        self.q = _float_array(_check_exponent("q", q, "MinNormFix"))
        self.tol = _float_array(_check_tol(tol, "MinNormFix"))
        self.max_iter = _check_count("max_iter", max_iter, "MinNormFix")
        self.velocity = _check_velocity_rule(velocity, "MinNormFix")

    def __call__(self, params, velocity=None, state=None):
        d = _check_model(params, "MinNormFix")
        u, *_ = _min_norm_scales(tuple(jnp.abs(w) for w in params.weights), self.p, self.q,
                                 _float_array(d), self.tol, self.max_iter)
        return _apply(params, velocity, u, d, self.velocity)


class NeuronBalance(AbstractProjection):
    """`neuron_balance` as a projection (Baldi et al., sec. 2). A "stochastic" schedule
    uses the same `key` at every call."""

    p: Array
    tol: Array
    key: PRNGKeyArray | None
    schedule: str = eqx.field(static=True)
    include_bias: bool = eqx.field(static=True)
    max_sweeps: int = eqx.field(static=True)
    regularizer: Callable | None = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, p: float = 2, schedule: str = "sequential", include_bias: bool = False,
                 tol: float = 1e-10, max_sweeps: int = 1000, key=None, regularizer=None,
                 velocity: str = "pushforward"):
        self.p = _float_array(_check_exponent("p", p, "NeuronBalance"))
        if schedule not in _SCHEDULES:
            raise ValueError(f"NeuronBalance: `schedule` must be one of {_SCHEDULES}, got "
                             f"{schedule!r}.")
        if schedule == "stochastic" and key is None:
            raise ValueError("NeuronBalance: the 'stochastic' schedule needs a PRNG key; "
                             "pass key=jax.random.key(0).")
        if not isinstance(include_bias, bool):
            raise ValueError(f"NeuronBalance: `include_bias` must be True or False, got "
                             f"{include_bias!r}.")
        self.schedule = schedule
        self.key = key if schedule == "stochastic" else None
        self.include_bias = include_bias
        self.tol = _float_array(_check_tol(tol, "NeuronBalance"))
        self.max_sweeps = _check_count("max_sweeps", max_sweeps, "NeuronBalance")
        self.regularizer = _check_g(regularizer, "NeuronBalance")
        self.velocity = _check_velocity_rule(velocity, "NeuronBalance")

    def __call__(self, params, velocity=None, state=None):
        d = _check_model(params, "NeuronBalance")
        abs_b = None
        if self.include_bias and params.biases is not None:
            abs_b = tuple(jnp.abs(b) for b in params.biases)
        u, *_ = _balance_scales(tuple(jnp.abs(w) for w in params.weights), abs_b, self.p,
                                _float_array(d), self.regularizer, self.schedule, self.tol,
                                self.max_sweeps, self.key, _float_array(1.0))
        return _apply(params, velocity, u, d, self.velocity)


class ENorm(AbstractProjection):
    """`enorm` as a projection (Stock et al. 2019)."""

    p: Array
    c: Array
    tol: Array
    max_sweeps: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, p: float = 2, c: float = 1.0, tol: float = 1e-10,
                 max_sweeps: int = 1000, velocity: str = "pushforward"):
        self.p = _float_array(_check_exponent("p", p, "ENorm"))
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (0 < c < math.inf):
            raise ValueError(f"ENorm: `c` must be a positive number, got {c!r}.")
        self.c = _float_array(c)
        self.tol = _float_array(_check_tol(tol, "ENorm"))
        self.max_sweeps = _check_count("max_sweeps", max_sweeps, "ENorm")
        self.velocity = _check_velocity_rule(velocity, "ENorm")

    def __call__(self, params, velocity=None, state=None):
        d = _check_model(params, "ENorm")
        u, *_ = _balance_scales(tuple(jnp.abs(w) for w in params.weights), None, self.p,
                                _float_array(d), None, "layer", self.tol, self.max_sweeps,
                                None, self.c)
        return _apply(params, velocity, u, d, self.velocity)


def _charges_of(model: MLP, d, u):
    """Per-neuron charges b_i² + ‖W_h[i,:]‖² − d ‖W_{h+1}[:,i]‖² after the rescaling u
    (dyn.charges.rescaling, written on the log-scales so Newton can differentiate it)."""
    w_mult, b_mult = _multipliers(u, model.depth, d)
    w = [x * m for x, m in zip(model.weights, w_mult)]
    out = []
    for h in range(model.depth - 1):
        q = jnp.sum(w[h] ** 2, axis=-1) - d * jnp.sum(w[h + 1] ** 2, axis=-2)
        if model.biases is not None:
            q = q + (model.biases[h] * b_mult[h]) ** 2
        out.append(q)
    return tuple(out)


class ChargeProjection(AbstractProjection):
    """Back along the rescaling orbit to the initial gradient-flow charges.

    Finds log-scales u with Q_i(u) = Q_i(init) for every hidden unit, Q the charges of
    `dyn.charges.rescaling` (b_i² + ‖W_h[i,:]‖² − d‖W_{h+1}[:,i]‖²). With

        Φ(u) = ½ Σ_k Σ_ij W_k,ij² e^{2(u_i − d u_j)} + ½ Σ_i b_i² e^{2 u_i},

    Q(u) = ∇Φ(u) and Φ is convex, so the coupled system (a unit's out-weights are the
    next layer's in-weights) has a unique solution, found by Newton's method on all
    hidden log-scales at once (optimistix; dense lineax solve of the Hessian of Φ, so
    meant for networks with up to a few thousand hidden units). Units with all in- or
    all out-weights zero are held at u = 0. The velocity follows `velocity` as for the
    other fixes. `init` returns the charges to restore.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, rtol: float = 1e-14, atol: float = 1e-14, max_steps: int = 64,
                 velocity: str = "pushforward"):
        self.rtol = _check_tol(rtol, "ChargeProjection")
        self.atol = _check_tol(atol, "ChargeProjection")
        self.max_steps = _check_count("max_steps", max_steps, "ChargeProjection")
        self.velocity = _check_velocity_rule(velocity, "ChargeProjection")

    def init(self, params, velocity):
        d = _check_model(params, "ChargeProjection")
        return _charges_of(params, d, _zeros_log_scales(params))

    def __call__(self, params, velocity=None, state=None):
        d = _check_model(params, "ChargeProjection")
        target = self.init(params, velocity) if state is None else state
        live = tuple(
            (jnp.sum(params.weights[h] ** 2, axis=-1) > 0)
            & (jnp.sum(params.weights[h + 1] ** 2, axis=-2) > 0)
            for h in range(params.depth - 1))

        def fn(u, _):
            q = _charges_of(params, d, u)
            # A dead unit's equation is replaced by u_i = 0 so the Jacobian stays regular.
            return tuple(jnp.where(m, a - b, x) for a, b, m, x in zip(q, target, live, u))

        sol = optx.root_find(fn, optx.Newton(rtol=self.rtol, atol=self.atol),
                             _zeros_log_scales(params), max_steps=self.max_steps, throw=False)
        return _apply(params, velocity, sol.value, d, self.velocity)
