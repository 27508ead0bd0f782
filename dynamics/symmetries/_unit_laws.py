"""The conservation laws a model's rescaling units give, counted without Lie brackets: the
reference `known_count` uses for any model that states `rescaling_units()` (ConvNet,
RNN, ResidualMLP, a user's Equinox model).

For a family of n units with slices S (exponent e_S, the units indexed along one axis),
a symmetric n×n matrix E acts on the parameters linearly,

    (A_E w)_S = e_S · E ×_axis w_S      (E mixes the units along the unit axis),

and A_E is symmetric for the Frobenius product (two slices of one array, a recurrent
unit's row and column of W_rec, give E W − W E, still symmetric). Its charge is

    Q_E(w) = ½ ⟨w, A_E w⟩ = ½ Σ_ij E_ij M_ij,   M_ij = Σ_S e_S ⟨w_S[i], w_S[j]⟩,

with ∇Q_E = A_E w =: ξ_E. Gradient flow on any loss of the outputs moves w along
J(w)ᵀ(…), J the Jacobian of the outputs on the data, so dQ_E/dt = 0 for every such loss
iff J(w) ξ_E(w) = 0 (Noether; Głuch & Urbanke eq. 17). For E = e_i e_iᵀ this is unit i's
rescaling (M_ii its charge); for E = e_i e_jᵀ + e_j e_iᵀ it mixes two units, a symmetry
when they act linearly together: always in a linear family (identity activation, a
residual stream: GL(n) acts, Marcotte et al. 2023), and in a ReLU family when the two
units are live on exactly the same (example, position, step) of the data (a linear block
there, as `known_count` finds for MLPs). ReLU and linear nets have locally constant
activation patterns, so a generator tangent at θ stays tangent near θ and its charge is a
law. A parameter whose column of J is exactly zero (a kernel tap that only reads zero
padding, a weight read only where its unit is off) never moves, and is a law too.

The count is the rank of {ξ_E kept} ∪ {e_p : column p of J zero} (normalised rows,
SVD). It is a lower bound in general (other laws have no closed form here: a unit's
in-weights along directions its live inputs never span, behind a narrow layer); on generic
data it is the count of `count_conservation_laws` (tested on random conv nets and RNNs).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._tree import partition
from .._units import Units, family_exponents, leaf_at, unit_families
from ._count import _default_forward, _rank

# J ξ_E counts as zero below this, relative to ‖J‖_F ‖ξ_E‖: a symmetry leaves float64
# rounding (~1e-16 per product, sums of ~1e3 terms), a non-symmetry O(1e-3) or more
# (a pair of ReLU units that differ on one of ~100 (example, position) pairs)
_TANGENT = 1e-10


@eqx.filter_jit
def _jacobian(w, static, x):
    theta, unravel = ravel_pytree(w)

    def outputs(th):
        return jnp.ravel(_default_forward(eqx.combine(unravel(th), static), x))

    return jax.jacrev(outputs)(theta)


def _flat_index(model):
    """`model` with each floating-point array replaced by its entries' positions in the
    flat parameter vector (`ravel_pytree`'s order), as NumPy int arrays."""
    w, static = partition(model)
    arrays, treedef = jax.tree.flatten(w)
    offsets = np.cumsum([0] + [a.size for a in arrays])
    index = [np.arange(o, o + a.size).reshape(a.shape) for o, a in zip(offsets, arrays)]
    return eqx.combine(jax.tree.unflatten(treedef, index), static), int(offsets[-1])


def _family_rows(model, index, units: Units, owner: str):
    """Per slice of `units`: (positions, values, exponent), positions and values of shape
    (size, rest) with unit i in row i."""
    out = []
    for s, e in zip(units.slices, family_exponents(units, None, owner, model)):
        pos, val = leaf_at(index, s.path), np.asarray(leaf_at(model, s.path), np.float64)
        if pos.ndim != (s.ndim or pos.ndim):
            raise ValueError(f"{owner}: `model` must be one model, not a stack of models "
                             f"(the array {s.path} has {pos.ndim} axes, its units say "
                             f"{s.ndim}).")
        pos, val = (np.moveaxis(a, s.axis, 0).reshape(units.size, -1) for a in (pos, val))
        out.append((pos, val, e))
    return out


def _generator(rows, i: int, j: int, d: int) -> np.ndarray:
    """ξ_E = A_E w for E = e_i e_jᵀ + e_j e_iᵀ (E = e_i e_iᵀ when i = j), flat."""
    xi = np.zeros(d)
    for pos, val, e in rows:
        np.add.at(xi, pos[i], e * val[j])
        if i != j:
            np.add.at(xi, pos[j], e * val[i])
    return xi


class UnitLaws(eqx.Module):
    """What `unit_laws` found: `count` independent laws, from `charges` unit charges and
    `mixing` charges M_ij (i < j) whose generator is tangent, and `dead` parameters that no
    output depends on; `deficient` units see, through their in-weights (exponent +1),
    fewer directions than they have live in-weights (the case with no closed form)."""

    count: int
    charges: int
    mixing: int
    dead: int
    deficient: int


def _deficient(jac: np.ndarray, rows, unit: int, threshold: float) -> bool:
    """Whether the columns of J on unit `unit`'s in-weights (exponent > 0), the exactly
    zero ones (dead) left out, have deficient rank: a direction of its in-weights that no
    output moves at θ, a law when the unit reads fixed data (the first layer), and of no
    closed form deeper."""
    cols = np.concatenate([pos[unit] for pos, _, e in rows if e > 0])
    block = jac[:, cols][:, np.any(jac[:, cols] != 0, axis=0)]
    return block.shape[1] > 0 and _rank(block.T, threshold)[0] < block.shape[1]


def unit_laws(model, x, threshold: float = 1e-9, owner: str = "known_count") -> UnitLaws:
    """The laws the rescaling units of `model` give on inputs `x` (module docstring)."""
    families = unit_families(model, owner)
    w, static = partition(model)
    w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)
    jac = np.asarray(_jacobian(w, static, jnp.asarray(x, jnp.float64)))
    scale = np.linalg.norm(jac)
    index, d = _flat_index(model)
    rows, charges, mixing, deficient = [], 0, 0, 0
    for units in families:
        if units.degree is None:
            continue  # not homogeneous: no rescaling symmetry to give a law
        slices = _family_rows(model, index, units, owner)
        kept = 0
        for i in range(units.size):
            for j in range(i, units.size):
                xi = _generator(slices, i, j, d)
                norm = np.linalg.norm(xi)
                if norm > 0 and np.linalg.norm(jac @ xi) <= _TANGENT * scale * norm:
                    rows.append(xi)
                    kept += 1
                    charges, mixing = charges + (i == j), mixing + (i != j)
        if kept < units.size * (units.size + 1) // 2:
            # not a linear family (there GL(n) gives every law, whatever the data span)
            deficient += sum(_deficient(jac, slices, i, threshold) for i in range(units.size))
    dead = np.flatnonzero(~np.any(jac != 0, axis=0))
    unit = np.zeros((dead.size, d))
    unit[np.arange(dead.size), dead] = 1.0
    count = _rank(np.concatenate([np.asarray(rows).reshape(-1, d), unit]), threshold)[0]
    return UnitLaws(count=count, charges=charges, mixing=mixing, dead=int(dead.size),
                    deficient=deficient)
