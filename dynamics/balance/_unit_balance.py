"""Neuron balancing (Baldi et al.) of any model that states its rescaling units.

Rescaling unit i of a family by λ = e^s multiplies each entry it holds by e^{k s}, k the
summed exponent of the unit's slices holding the entry: +1 on what feeds the unit, −d on
what reads it, and 1 − d on a recurrent unit's self-loop W_rec[i, i] (its row and its
column meet there). The unit's share of R = Σ_e g(|w_e|) is the 1-D function

    φ_i(s) = Σ_{k ∈ {1, −d, 1−d}} Σ_{e: k_e = k} g(|w_e| e^{k s}),

convex in s for g convex and increasing on [0, ∞) (g ∘ exp-affine); for L_p,

    φ_i(s) = A e^{p s} + B e^{−p d s} + C e^{p (1−d) s},
    A = Σ_in |w|^p (row of W_rec without the diagonal, W_in row, bias if included),
    B = Σ_out |w|^p (column of W_rec without the diagonal, next layer's column),
    C = |W_rec[i, i]|^p.

For d = 1 (ReLU) the self-loop term is constant, φ_i' = 0 gives Baldi's closed form
λ* = (B/A)^{1/(2p)}, and the self-loop weight is unchanged: the cycle constraint
Σ_cycle L_ij = 0 of Baldi et al.'s Thm 34 / Prop. 37 on the one-edge cycle i → i. For
d ≠ 1 (RePU) the root of φ_i' is found by damped Newton steps from the closed form of the
A, B terms. In the log-scales u of all units R is convex (Baldi et al. Thm 42: a sum of
e^{linear(u)} |w|^p), so visiting every unit again and again ("sequential",
"stochastic") converges to its unique minimiser, the one `scipy.optimize.minimize`
finds on the same objective (tests/test_unit_balance.py).

"layer": every unit of a family at once. Units of a family that share no entry (conv
channels, residual blocks) decouple, and this is sequential balancing exactly; units that
share entries (a recurrent layer: unit i's row meets unit j's column at W_rec[i, j]) take
half of their individual optimal steps, which still descends: each entry depends on at
most two units of the family, so by convexity F(u + δ/2) ≤ F(u) − ½ Σ_i Δ_i, Δ_i ≥ 0 the
decrease that unit i's step alone gives. "tied": one λ per family (Baldi App. B.7.2).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._units import family_exponents, leaf_at, weight_paths
from ._common import sweep_until


def _pairs_on_one_array(fam, exps, paths):
    """[(path index, [(axis, exponent), ...])] of the family's slices in the objective."""
    by = {}
    for s, e in zip(fam.slices, exps):
        if s.path in paths:
            by.setdefault(paths.index(s.path), []).append((s.axis, e))
    for k, items in by.items():
        if len(items) > 2:
            raise ValueError(
                f"neuron_balance: the units {fam.name!r} hold {len(items)} axes of one array; "
                "at most two (a row and a column, as in a recurrent layer) are supported.")
    return sorted(by.items())


def _groups(arrs, layout, i):
    """[(|w| values, exponent)] of unit i: each slice's entries, and the entries two of
    its slices share (a self-loop) once, with the summed exponent, zeroed in both."""
    out = []
    for k, items in layout:
        a = arrs[k]
        if len(items) == 1:
            ax, e = items[0]
            out.append((jax.lax.dynamic_index_in_dim(a, i, ax, keepdims=False), e))
            continue
        (a1, e1), (a2, e2) = sorted(items)
        v1 = jax.lax.dynamic_index_in_dim(a, i, a1, keepdims=False)
        v2 = jax.lax.dynamic_index_in_dim(a, i, a2, keepdims=False)
        shared = jax.lax.dynamic_index_in_dim(v1, i, a2 - 1, keepdims=True)
        zero = jnp.zeros_like(shared)
        v1 = jax.lax.dynamic_update_index_in_dim(v1, zero, i, a2 - 1)
        v2 = jax.lax.dynamic_update_index_in_dim(v2, zero, i, a1)
        out += [(v1, e1), (v2, e2), (shared, e1 + e2)]
    return out


def _unit_log_scale(groups, p, g):
    """argmin_s φ(s) = Σ_groups Σ g(v e^{k s}) (module docstring), 0 for a unit with no
    weight on one side; damped Newton from the two-sided closed form."""
    dtype = groups[0][0].dtype
    if g is None:
        # L_p: φ(s) = Σ_groups A_k e^{p k s}, a few exponentials
        terms = [(jnp.sum(v**p), k) for v, k in groups if k != 0]

        def phi(s):
            return sum(a * jnp.exp(p * k * s) for a, k in terms)
    else:
        terms = [(jnp.sum(v), k) for v, k in groups if k != 0]
        gv = jax.vmap(g)

        def phi(s):
            return sum(jnp.sum(gv(jnp.ravel(v) * jnp.exp(k * s))) for v, k in groups if k != 0)

    pos = sum((a for a, k in terms if k > 0), jnp.zeros((), dtype))
    neg = sum((a for a, k in terms if k < 0), jnp.zeros((), dtype))
    ok = (pos > 0) & (neg > 0)
    d1 = jax.grad(phi)
    d2 = jax.grad(d1)
    # the minimiser of the +1 and −d terms alone (exact for MLP-like units and for the
    # p = 1 self-loop, where C is constant), with d = −(most negative exponent)
    d = -min(k for _, k in terms) if any(k < 0 for _, k in terms) else 1.0
    pp = 2.0 if g is not None else p
    a_in = sum((jnp.sum(v**pp) for v, k in groups if k == 1), jnp.zeros((), dtype))
    b_out = sum((jnp.sum(v**pp) for v, k in groups if k == -d), jnp.zeros((), dtype))
    good = ok & (a_in > 0) & (b_out > 0)
    s0 = jnp.where(good, (jnp.log(jnp.where(good, d * b_out, 1.0))
                          - jnp.log(jnp.where(good, a_in, 1.0))) / (pp * (1 + d)), 0.0)
    s0 = jnp.where(ok, s0, 0.0)

    def cond(c):
        _, it, move = c
        return (it < 100) & (move > 1e-15 * (1 + jnp.abs(c[0])))

    def body(c):
        s, it, _ = c
        f, g1, h = phi(s), d1(s), d2(s)
        step = jnp.where(h > 0, g1 / jnp.where(h > 0, h, 1.0), 0.0)

        def shrink(tc):
            t, _ = tc
            return t / 2, phi(s - t / 2 * step)

        def too_high(tc):
            t, ft = tc
            return (~(ft <= f - 1e-4 * t * g1 * step)) & (t > 1e-12)

        t, _ = jax.lax.while_loop(too_high, shrink, (jnp.asarray(1.0, dtype), phi(s - step)))
        t = jnp.where(t > 1e-12, t, 0.0)
        return s - t * step, it + 1, jnp.abs(t * step)

    s, _, _ = jax.lax.while_loop(cond, body, (s0, jnp.asarray(0), jnp.asarray(jnp.inf, dtype)))
    return jnp.where(ok & jnp.isfinite(s), s, 0.0)


def _scale(arrs, layout, s, i=None):
    """Multiply unit i's slices (every unit's, with s a vector, for i None) by e^{k s}."""
    arrs = list(arrs)
    for k, items in layout:
        for ax, e in items:
            a = arrs[k]
            if i is None:
                shape = [1] * a.ndim
                shape[ax] = s.shape[0]
                arrs[k] = a * jnp.exp(e * s).reshape(shape)
            else:
                v = jax.lax.dynamic_index_in_dim(a, i, ax, keepdims=True)
                arrs[k] = jax.lax.dynamic_update_index_in_dim(a, v * jnp.exp(e * s), i, ax)
    return tuple(arrs)


@eqx.filter_jit
def units_neuron_balance(model, p, g, schedule: str, include_bias: bool, tol,
                         max_sweeps: int, key):
    """(log-scales per family, sweeps, objective history, converged) of neuron balancing
    `model` (module docstring); the objective is Σ g(|w|) (g = |·|^p for None) over the
    arrays the units touch (rank ≥ 2, and the biases when `include_bias`)."""
    families = model.rescaling_units()
    paths = weight_paths(model, families, include_bias)
    layouts = [_pairs_on_one_array(f, family_exponents(f, None, "neuron_balance", model),
                                   paths) for f in families]
    arrs0 = tuple(jnp.abs(leaf_at(model, q)) for q in paths)
    dtype = arrs0[0].dtype
    sizes = [f.size for f in families]
    cost = (lambda a: a**p) if g is None else (lambda a: jax.vmap(g)(jnp.ravel(a)))

    def objective(arrs):
        return sum(jnp.sum(cost(a)) for a in arrs)

    def one_unit(state, f, i):
        arrs, u, delta = state
        s = _unit_log_scale(_groups(arrs, layouts[f], i), p, g)
        u = tuple(uu.at[i].add(s) if k == f else uu for k, uu in enumerate(u))
        return _scale(arrs, layouts[f], s, i), u, jnp.maximum(delta, jnp.abs(jnp.expm1(s)))

    def family_at_once(state, f):
        arrs, u, delta = state
        if schedule == "tied":
            s = jnp.full(sizes[f], _unit_log_scale(_tied_groups(arrs, layouts[f]), p, g))
        else:
            s = jax.vmap(lambda i: _unit_log_scale(_groups(arrs, layouts[f], i), p, g))(
                jnp.arange(sizes[f]))
            if any(len(items) == 2 for _, items in layouts[f]):
                s = s / 2  # coupled units: the damped Jacobi step (module docstring)
        u = tuple(uu + s if k == f else uu for k, uu in enumerate(u))
        delta = jnp.maximum(delta, jnp.max(jnp.abs(jnp.expm1(s))))
        return _scale(arrs, layouts[f], s), u, delta

    def sweep(state, key):
        if schedule == "sequential":
            for f in range(len(families)):
                state = jax.lax.fori_loop(0, sizes[f],
                                          lambda i, st, f=f: one_unit(st, f, i), state)
            return state
        if schedule == "stochastic":
            fam_of = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes))
            index_of = jnp.asarray(np.concatenate([np.arange(n) for n in sizes]))
            picks = jax.random.randint(key, (sum(sizes),), 0, sum(sizes))
            branches = [lambda st, i, f=f: one_unit(st, f, i) for f in range(len(sizes))]

            def pick(n, st):
                j = picks[n]
                return jax.lax.switch(fam_of[j], branches, st, index_of[j])

            return jax.lax.fori_loop(0, sum(sizes), pick, state)
        for f in range(len(families)):
            state = family_at_once(state, f)
        return state

    def run(state, key):
        arrs, u, delta = sweep((*state, jnp.asarray(0.0, dtype)), key)
        return (arrs, u), delta

    u0 = tuple(jnp.zeros(n, dtype) for n in sizes)
    (_, u), it, values, delta = sweep_until(run, lambda st: objective(st[0]), (arrs0, u0),
                                            tol, max_sweeps, key, dtype)
    final = values[it]
    return u, it, values, (delta < tol) & jnp.isfinite(final)


def _tied_groups(arrs, layout):
    """[(|w|, summed exponent)] when every unit of the family shares one λ: an array with
    two of the family's axes (W_rec) scales by the sum of their exponents everywhere."""
    return [(arrs[k], sum(e for _, e in items)) for k, items in layout]
