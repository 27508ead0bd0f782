"""Shared pieces of the balancing fixes: argument checks, the rescaling map and its
push-forward of the velocity, the ℓ_{p,q} norm and `BalanceInfo`."""

import math
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._models import MLP, Swish
from .._tree import is_concrete, partition
from .._validate import one_of, prng_key
from ..regularizers._regularizers import Lpq

_VELOCITY_RULES = ("pushforward", "keep", "zero")
_SCHEDULES = ("sequential", "stochastic", "layer", "tied")



# checks


def _check_model(model, owner: str) -> float:
    """The homogeneity degree d of `model`'s hidden units, or a ValueError."""
    if not isinstance(model, MLP):
        raise ValueError(f"{owner}: `model` must be a dyn.MLP, got {type(model).__name__}.")
    d = model.activation.degree
    if isinstance(model.activation, Swish) and model.activation.trainable:
        # Swish with trainable β has a rescaling symmetry, but only with β_i -> β_i / a_i
        # as well (σ(ax; β/a) = a σ(x; β), Głuch & Urbanke Table 1): the fixes rescale
        # weights and biases alone, which would change the network function.
        raise ValueError(
            f"{owner}: `model` has activation Swish(trainable=True); its rescaling "
            "symmetry also maps each β_i to β_i/a_i, which the balancing fixes do not do, "
            "and Swish is not positively homogeneous, so rescaling the weights alone "
            "changes the network function; use ReLU, LeakyReLU, RePU, Polynomial or "
            "Identity."
        )
    if d is None:
        raise ValueError(
            f"{owner}: `model` has activation {type(model.activation).__name__}, which is not "
            "positively homogeneous, so rescaling hidden units changes the network function; "
            "use ReLU, LeakyReLU, RePU, Polynomial or Identity."
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(partition(model)[0]):
        # (concrete values only: inside a solve the fixes run traced, and there a NaN
        # state is the NonFinite event's business)
        if is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{owner}: `model` has NaN or Inf at {jax.tree_util.keystr(path)}; the "
                "balancing fixes rescale finite weights (a NaN weight left every scale at "
                "1 and reported converged=True)."
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


def _check_schedule(schedule, key, include_bias, owner: str):
    """`neuron_balance`'s schedule, its key (kept for "stochastic" only) and the bias
    convention."""
    one_of(schedule, "schedule", _SCHEDULES, owner)
    if schedule == "stochastic" and key is None:
        raise ValueError(f"{owner}: the 'stochastic' schedule needs a PRNG key; pass "
                         "key=jax.random.key(0).")
    if not isinstance(include_bias, bool):
        raise ValueError(f"{owner}: `include_bias` must be True or False, got "
                         f"{include_bias!r}.")
    if schedule != "stochastic":
        return schedule, None, include_bias
    # An int seed is a key, as everywhere (a raw int reached jax.random.split: TypeError).
    return schedule, prng_key(key, owner), include_bias


def _check_velocity_rule(rule, owner: str) -> str:
    return one_of(rule, "velocity", _VELOCITY_RULES, owner,
                  "push the velocity forward by the same rescaling, keep it, or zero it")


# rescaling


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


def sweep_until(sweep, objective, state, tol, max_sweeps: int, key, dtype):
    """Repeat `sweep(state, key) -> (state, delta)` while delta (the largest |λ − 1| of the
    sweep) >= `tol`, at most `max_sweeps` times, in one `lax.while_loop`; returns (state,
    sweeps, objective before each sweep and after the last, NaN-padded, last delta)."""
    values0 = jnp.full(max_sweeps + 1, jnp.nan, dtype)
    keys = (jax.random.split(key, max_sweeps) if key is not None
            else jnp.zeros((max_sweeps,), dtype))

    def cond(carry):
        return (carry[2] < max_sweeps) & (carry[3] >= tol)

    def body(carry):
        state, values, it, _ = carry
        values = values.at[it].set(objective(state))
        state, delta = sweep(state, keys[it])
        return state, values, it + 1, delta

    state, values, it, delta = jax.lax.while_loop(
        cond, body, (state, values0, jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
    return state, it, values.at[it].set(objective(state)), delta


# norms


def lpq_norm(model: MLP, p: float = 2, q: float = 2) -> Array:
    """Entry-wise ℓ_{p,q} norm of the weights (Saul, eq. 1), biases excluded:

        ‖W‖_{p,q} = ( Σ_i ( Σ_j |W_ij|^p )^{q/p} )^{1/q},

    i running over all non-input units (rows of every weight matrix), j over a unit's
    incoming weights. The same as `dyn.regularizers.Lpq(p, q).norm(model.weights)` and
    the `dyn.monitors.LpqNorm` monitor, which it calls.
    """
    if not isinstance(model, MLP):
        raise ValueError(f"lpq_norm: `model` must be a dyn.MLP, got {type(model).__name__}.")
    p = _check_exponent("p", p, "lpq_norm")
    q = _check_exponent("q", q, "lpq_norm")
    return Lpq(p, q).norm(model.weights)


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
