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
from .._units import family_exponents, homogeneous_families, leaf_at, weight_paths
from ._common import sweep_until


def check_units_model(model, owner: str):
    """The unit families of `model`, every one positively homogeneous, and finite
    parameters (concrete ones); else a ValueError naming `model`."""
    families = homogeneous_families(model, owner)
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


def _newton_sweep(objective, n: int, dtype, delta):
    """One damped Newton step on the convex `objective` over R^n, as a `sweep_until`
    sweep: (v, _) -> (v − t·step, delta(new v, t·step)), t from a backtracking (Armijo)
    line search that allows for rounding in the objective (near the minimum the decrease
    is below it, and a full Newton step is then right)."""
    value_and_grad = jax.value_and_grad(objective)
    hess = jax.hessian(objective)

    def sweep(v, _):
        f, g = value_and_grad(v)
        h = hess(v)
        # a unit with no weights leaves the objective flat along it: a relative ridge
        # keeps the solve regular and that unit's step at ~0
        ridge = 1e-12 * (jnp.trace(h) / n + jnp.finfo(dtype).tiny)
        step = jnp.linalg.solve(h + ridge * jnp.eye(n, dtype=dtype), g)
        slope = jnp.vdot(g, step)
        slack = 8 * jnp.finfo(dtype).eps * jnp.abs(f)

        def shrink(c):
            t, _ = c
            return t / 2, objective(v - t / 2 * step)

        def too_high(c):
            t, ft = c
            return (~(ft <= f - 1e-4 * t * slope + slack)) & (t > 1e-10)

        t, _ = jax.lax.while_loop(too_high, shrink,
                                  (jnp.asarray(1.0, dtype), objective(v - step)))
        move = t * step
        return v - move, delta(v - move, move)

    return sweep


def _splitter(families):
    cuts = np.cumsum([0, *[f.size for f in families]])
    return int(cuts[-1]), lambda v: tuple(v[cuts[k]:cuts[k + 1]] for k in range(len(families)))


@eqx.filter_jit
def units_min_norm(model, p, q, tol, max_iter: int):
    """(log-scales per family, iterations, norm history, converged) of the least ℓ_{p,q}
    rescaling of `model` (module docstring)."""
    families = model.rescaling_units()
    paths = weight_paths(model, families)
    n, split = _splitter(families)
    dtype = leaf_at(model, paths[0]).dtype

    def objective(v):
        logs = _log_multipliers(model, families, split(v))
        total = jnp.zeros((), dtype)
        for path in paths:
            w = leaf_at(model, path)
            m = jnp.abs(w) ** p * jnp.exp(p * logs[path])
            rows = jnp.sum(m.reshape(m.shape[0], -1), axis=1)
            total = total + jnp.sum(rows ** (q / p))
        return total

    sweep = _newton_sweep(objective, n, dtype,
                          lambda v, move: jnp.max(jnp.abs(jnp.expm1(move))))
    v, it, values, delta = sweep_until(sweep, lambda v: objective(v) ** (1.0 / q),
                                       jnp.zeros(n, dtype), tol, max_iter, None, dtype)
    # A non-finite norm (a NaN weight inside a solve) is no convergence.
    return split(v), it, values, (delta < tol) & jnp.isfinite(values[it])


@eqx.filter_jit
def units_charge_scales(model, target, rtol, atol, max_steps: int):
    """Log-scales u (per family) with the unit charges of the rescaled `model` equal to
    `target` (one array per family), and whether Newton converged.

    Entry e scales by e^{L_e(u)}, so Φ(u) = ½ Σ_e w_e² e^{2 L_e(u)} (every entry of every
    array a unit touches, biases included) has ∂Φ/∂u_i = Σ_S e_S ‖w_S[i](u)‖² = Q_i(u),
    the charge after the rescaling (a self-loop, in two slices, with the summed
    exponent, as the charge counts it). Φ is convex (a sum of exponentials of linear
    functions), so Q(u) = target is the minimum of Φ(u) − ⟨target, u⟩, found by damped
    Newton steps until every |δu_i| <= atol + rtol |u_i| or `max_steps`."""
    families = model.rescaling_units()
    paths = weight_paths(model, families, include_bias=True)
    n, split = _splitter(families)
    dtype = leaf_at(model, paths[0]).dtype
    flat_target = jnp.concatenate(target)

    def objective(v):
        logs = _log_multipliers(model, families, split(v))
        total = -jnp.vdot(flat_target, v)
        for path in paths:
            total = total + 0.5 * jnp.sum(leaf_at(model, path) ** 2 * jnp.exp(2 * logs[path]))
        return total

    def delta(v, move):
        return jnp.max(jnp.abs(move) / (atol + rtol * jnp.abs(v)))

    v, _, _, last = sweep_until(_newton_sweep(objective, n, dtype, delta), objective,
                                jnp.zeros(n, dtype), 1.0, max_steps, None, dtype)
    return split(v), last < 1.0
