"""The least-ℓ_{p,q}-norm rescaling of any model that states its rescaling units.

For a model with units (`dyn.symmetries.Units`: conv channels, recurrent units, residual
streams) entry e of the parameters scales by exp(L_e(u)), L_e(u) = Σ_S e_S u_{S,i(e)}
over the unit slices S holding it, and the ℓ_{p,q} norm of the weights along the orbit,

    F(u) = Σ_r ( Σ_{e ∈ r} |w_e|^p e^{p L_e(u)} )^{q/p},

r running over the rows (axis 0) of every weight array a unit touches, is convex in u: a
row's term is exp((q/p)·logsumexp(p L_e + log|w_e|^p)), the exponential of a convex
function (Saul, sec. 3 and App. A, for MLPs; Baldi et al. eq. 38 for recurrent nets,
where the cycle constraints hold automatically in these coordinates). It is minimised
by damped Newton steps with a backtracking line search, in one `lax.while_loop`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import is_concrete, partition
from .._units import family_exponents, leaf_at, unit_families
from ._common import sweep_until


def check_units_model(model, owner: str):
    """The unit families of `model`, every one positively homogeneous, and finite
    parameters (concrete ones); else a ValueError naming `model`."""
    families = unit_families(model, owner)
    for u in families:
        family_exponents(u, None, owner, model)
    for path, leaf in jax.tree_util.tree_leaves_with_path(partition(model)[0]):
        if is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{owner}: `model` has NaN or Inf at {jax.tree_util.keystr(path)}; the "
                "balancing fixes rescale finite weights."
            )
    return families


def _log_multipliers(model, families, u):
    """{path: log-multiplier array broadcastable to the leaf} for every touched leaf."""
    out = {}
    for fam, us in zip(families, u):
        for s, e in zip(fam.slices, family_exponents(fam, None, "min_norm_fix", model)):
            leaf = leaf_at(model, s.path)
            lead = 0 if s.ndim is None else leaf.ndim - s.ndim
            shape = [1] * leaf.ndim
            shape[lead + s.axis] = fam.size
            term = e * us.reshape(shape)
            out[s.path] = term if s.path not in out else out[s.path] + term
    return out


def rescale_by_units(tree, model, families, u):
    """`tree` (the model, or a velocity shaped like it) with every unit scaled by e^u."""
    for path, log_m in _log_multipliers(model, families, u).items():
        tree = eqx.tree_at(lambda t, path=path: leaf_at(t, path), tree,
                           leaf_at(tree, path) * jnp.exp(log_m))
    return tree


def apply_units(params, velocity, families, u, rule: str):
    """The rescaled (model, velocity): every unit scaled by e^u; the velocity pushed
    forward by the same linear map ("pushforward"), kept ("keep") or zeroed ("zero")."""
    new = rescale_by_units(params, params, families, u)
    if velocity is not None and rule == "pushforward":
        velocity = rescale_by_units(velocity, params, families, u)
    elif velocity is not None and rule == "zero":
        velocity = jax.tree.map(jnp.zeros_like, velocity)
    return new, velocity


def weight_paths(model, families, include_bias: bool = False):
    """Paths of the arrays in the objective: touched by a unit, rank >= 2 (biases, rank
    1, rescale with their unit but stay out of the norm, as in `lpq_norm`, unless
    `include_bias`)."""
    paths = []
    for fam in families:
        for s in fam.slices:
            ndim = s.ndim if s.ndim is not None else leaf_at(model, s.path).ndim
            if (ndim >= 2 or include_bias) and s.path not in paths:
                paths.append(s.path)
    return paths


@eqx.filter_jit
def units_min_norm(model, p, q, tol, max_iter: int):
    """(log-scales per family, iterations, norm history, converged) of the least ℓ_{p,q}
    rescaling of `model` (module docstring)."""
    families = model.rescaling_units()
    paths = weight_paths(model, families)
    sizes = [f.size for f in families]
    cuts = np.cumsum([0, *sizes])
    dtype = leaf_at(model, paths[0]).dtype

    def split(v):
        return tuple(v[cuts[k]:cuts[k + 1]] for k in range(len(sizes)))

    def objective(v):
        logs = _log_multipliers(model, families, split(v))
        total = jnp.zeros((), dtype)
        for path in paths:
            w = leaf_at(model, path)
            m = jnp.abs(w) ** p * jnp.exp(p * logs[path])
            rows = jnp.sum(m.reshape(m.shape[0], -1), axis=1)
            total = total + jnp.sum(rows ** (q / p))
        return total

    value_and_grad = jax.value_and_grad(objective)
    hess = jax.hessian(objective)
    n = int(cuts[-1])

    def newton_step(v, _):
        f, g = value_and_grad(v)
        h = hess(v)
        # a unit with no weights leaves F flat along it: a relative ridge keeps the
        # solve regular and that unit's step at ~0
        ridge = 1e-12 * (jnp.trace(h) / n + jnp.finfo(dtype).tiny)
        step = jnp.linalg.solve(h + ridge * jnp.eye(n, dtype=dtype), g)
        slope = jnp.vdot(g, step)

        def shrink(c):
            t, _ = c
            return t / 2, objective(v - t / 2 * step)

        def too_high(c):
            t, ft = c
            return (~(ft <= f - 1e-4 * t * slope)) & (t > 1e-10)

        t, _ = jax.lax.while_loop(too_high, shrink,
                                  (jnp.asarray(1.0, dtype), objective(v - step)))
        move = t * step
        return v - move, jnp.max(jnp.abs(jnp.expm1(move)))

    v, it, values, delta = sweep_until(newton_step, lambda v: objective(v) ** (1.0 / q),
                                       jnp.zeros(n, dtype), tol, max_iter, None, dtype)
    # A non-finite norm (a NaN weight inside a solve) is no convergence.
    return split(v), it, values, (delta < tol) & jnp.isfinite(values[it])
