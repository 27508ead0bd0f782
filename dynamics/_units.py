"""Rescaling units: one description of a network's rescaling symmetries.

A *unit* (a hidden neuron, a conv channel, a recurrent unit) is a set of parameter
slices that scale together: w_S ↦ λ^{e_S} w_S for every slice S of the unit, with e = +1
on what feeds the unit (in-weights, bias) and e = −p on what reads it (out-weights), p
the activation's homogeneity degree (Głuch & Urbanke, Tables 1–3; Baldi et al., Def. 12;
Neyshabur et al. 2015 for the general rescaling-invariance of homogeneous networks). When
this is a symmetry of the loss, the generator ξ(w) = A w with A = diag(e_entry), e_entry
the sum of the exponents of the unit's slices holding the entry, gives the gradient-flow
charge

    Q = ⟨w, A w⟩ = Σ_S e_S ‖w_S‖²,

with dQ/dt = −2⟨A w, ∇L⟩ = 0 (Głuch & Urbanke eq. 17 with κ2 = 0). Two slices of one
unit may share an entry (a recurrent unit's row and column of W_rec meet on the
self-loop, which scales by λ^{1−p}: unchanged for p = 1, Baldi et al. Prop. 37); the sum
counts it with the summed exponent, as A does.

`Units` describes a whole family of units at once (all hidden neurons of one layer, all
channels of one conv layer): unit i of the family is index i along `axis` of each slice,
so charges and residuals are computed for all of them in one vectorised pass. A model
states its units with a method `rescaling_units()` returning a tuple of `Units`; every
rescaling tool of the package reads that method (`unit_families`).
"""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

__all__ = ["Slice", "Units", "leaf_at", "unit_families", "family_exponents",
           "homogeneous_families", "unit_inner",
           "unit_charges", "unit_generator", "unit_residuals", "zeros_like", "weight_paths",
           "weight_matrices", "put_weight_matrices"]

_OUT = "-p"


def _path_text(path) -> str:
    return "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in path)


class Slice(eqx.Module):
    """One parameter array of a family of units, and how it scales.

    **Arguments:**

    - `path`: where the array sits in the model, a tuple of attribute names (str) and
      sequence indices (int), e.g. `("weights", 1)` for `model.weights[1]`.
    - `axis`: the axis of that array that indexes the units (axis 0 of W_h: unit i owns
      the row W_h[i, :]; axis 1 of W_{h+1}: unit i owns the column W_{h+1}[:, i]).
    - `exponent`: the slice scales by λ^exponent; a number, or `"-p"` for the units'
      out-weights (λ^{−p}, p the family's `degree`, so that a generator may override p).
    - `ndim`: the rank of the array in one model; `None` takes it from the model at hand.
      Set by the package's models, so that a stack of models (leading axes, e.g. a saved
      trajectory) keeps its leading axes in the charges.
    """

    path: tuple[str | int, ...] = eqx.field(static=True)
    axis: int = eqx.field(static=True)
    exponent: float | str = eqx.field(static=True)
    ndim: int | None = eqx.field(static=True, default=None)

    def __init__(self, path, axis: int, exponent: float | str = 1.0, ndim: int | None = None):
        if isinstance(path, str | int):
            path = (path,)
        if not isinstance(path, tuple) or not path or not all(
                isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool))
                for p in path):
            raise ValueError(
                f"Slice: `path` must be a non-empty tuple of attribute names and indices, "
                f"e.g. ('weights', 1), got {path!r}."
            )
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis < 0:
            raise ValueError(f"Slice: `axis` must be an int >= 0, got {axis!r}.")
        if exponent != _OUT:
            if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real):
                raise ValueError(
                    f"Slice: `exponent` must be a real number or '-p', got {exponent!r}."
                )
            exponent = float(exponent)
        if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, int)
                                 or ndim <= axis):
            raise ValueError(f"Slice: `ndim` must be an int > axis = {axis}, got {ndim!r}.")
        self.path, self.axis, self.exponent, self.ndim = path, int(axis), exponent, ndim


class Units(eqx.Module):
    """A family of `size` rescaling units: unit i scales index i along `axis` of each of
    its `slices` (see the module docstring for the charge they give).

    **Arguments:**

    - `name`: a label for messages and plots, e.g. `"conv 2"`.
    - `size`: the number of units.
    - `slices`: the `Slice`s, at most one per (array, axis).
    - `degree`: p in the exponent `"-p"`: the activation's homogeneity degree, or None
      when the activation is not positively homogeneous (no symmetry, unless a generator
      forces p to test it).
    """

    name: str = eqx.field(static=True)
    size: int = eqx.field(static=True)
    slices: tuple[Slice, ...] = eqx.field(static=True)
    degree: float | None = eqx.field(static=True)

    def __init__(self, name: str, size: int, slices, degree: float | None):
        if not isinstance(name, str):
            raise ValueError(f"Units: `name` must be a string, got {name!r}.")
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"Units {name!r}: `size` must be a positive int, got {size!r}.")
        slices = tuple(slices)
        if not slices or not all(isinstance(s, Slice) for s in slices):
            raise ValueError(f"Units {name!r}: `slices` must be a non-empty tuple of Slice.")
        seen = [(s.path, s.axis) for s in slices]
        if len(set(seen)) != len(seen):
            raise ValueError(
                f"Units {name!r}: two slices on the same array and axis; merge them into "
                "one slice with the summed exponent."
            )
        if degree is not None:
            if isinstance(degree, bool) or not isinstance(degree, numbers.Real):
                raise ValueError(f"Units {name!r}: `degree` must be a number or None, got "
                                 f"{degree!r}.")
            degree = float(degree)
        self.name, self.size, self.slices, self.degree = name, int(size), slices, degree


def leaf_at(tree: PyTree, path: tuple[str | int, ...]):
    """The array of `tree` at `path` (attribute names and indices)."""
    node = tree
    for p in path:
        node = getattr(node, p) if isinstance(p, str) else node[p]
    return node


def _replace(tree, path, value):
    return eqx.tree_at(lambda t: leaf_at(t, path), tree, value)


def unit_families(model, owner: str = "model", name: str = "model") -> tuple[Units, ...]:
    """`model.rescaling_units()`, checked against the model's arrays; a ValueError naming
    the argument when the model states no units or they do not fit its arrays."""
    method = getattr(model, "rescaling_units", None)
    if not callable(method):
        raise ValueError(
            f"{owner}: `{name}` must be a model that states its rescaling units (a "
            f"dyn.MLP, ConvNet, RNN, ResidualMLP, or an Equinox model with a "
            f"`rescaling_units()` method), got {type(model).__name__}."
        )
    families = tuple(method())
    if not all(isinstance(u, Units) for u in families):
        raise ValueError(f"{owner}: `{name}.rescaling_units()` must return a tuple of "
                         "dyn.symmetries.Units.")
    for u in families:
        for s in u.slices:
            try:
                leaf = leaf_at(model, s.path)
            except (AttributeError, IndexError, TypeError, KeyError) as e:
                raise ValueError(
                    f"{owner}: units {u.name!r} of `{name}` name the array "
                    f"{_path_text(s.path)}, which the model does not have ({e})."
                ) from e
            shape = getattr(leaf, "shape", None)
            ndim = s.ndim if s.ndim is not None else (len(shape) if shape is not None else 0)
            if shape is None or len(shape) < ndim or s.axis >= ndim:
                raise ValueError(
                    f"{owner}: units {u.name!r} of `{name}` index axis {s.axis} of "
                    f"{_path_text(s.path)}, which is not an array with that axis."
                )
            if shape[len(shape) - ndim + s.axis] != u.size:
                raise ValueError(
                    f"{owner}: units {u.name!r} of `{name}` number {u.size}, but axis "
                    f"{s.axis} of {_path_text(s.path)} has length "
                    f"{shape[len(shape) - ndim + s.axis]}."
                )
    return families


def homogeneous_families(model, owner: str, name: str = "model") -> tuple[Units, ...]:
    """`unit_families(model)`, with every family positively homogeneous (its rescaling a
    symmetry); else a ValueError naming `name` and the activation."""
    families = unit_families(model, owner, name)
    for u in families:
        family_exponents(u, None, owner, model)
    return families


def unit_inner(a, b, degree: float | None = None, owner: str = "charge_inner"):
    """⟨a, b⟩_M = Σ_S e_S ⟨a_S[i], b_S[i]⟩ for every unit i, one array per family of
    `a`'s units (`a`, `b` shaped like the model, static parts included): the bilinear form
    whose diagonal ⟨w, w⟩_M is the charge (a self-loop with its summed exponent)."""
    out = []
    for u in unit_families(a, owner, "params"):
        values = {s.path: leaf_at(a, s.path) * leaf_at(b, s.path) for s in u.slices}
        out.append(unit_charges(a, u, degree, owner, values))
    return tuple(out)


def family_exponents(units: Units, degree: float | None, owner: str,
                     model=None) -> tuple[float, ...]:
    """The exponent of each slice, with `degree` (if given) overriding the family's p."""
    p = units.degree if degree is None else float(degree)
    if p is None and any(s.exponent == _OUT for s in units.slices):
        activation = getattr(model, "activation", None)
        which = ("" if activation is None
                 else f" (the activation {type(activation).__name__})")
        raise ValueError(
            f"{owner}: the units {units.name!r} have no homogeneity degree{which}: the "
            "activation is not positively homogeneous, so rescaling them is not a symmetry; "
            "use ReLU, LeakyReLU, RePU, Polynomial, Identity or Swish(trainable=True), or "
            "pass `degree=` to a generator to test it with dyn.symmetries.check."
        )
    return tuple(-p if s.exponent == _OUT else s.exponent for s in units.slices)


def _axes(leaf, s: Slice) -> tuple[int, int]:
    """(number of leading batch axes, position of the unit axis) in `leaf`."""
    lead = 0 if s.ndim is None else leaf.ndim - s.ndim
    return lead, lead + s.axis


def unit_charges(model, units: Units, degree: float | None = None,
                 owner: str = "rescaling", values: dict | None = None) -> Array:
    """Q_i = Σ_S e_S ‖w_S[i]‖² for every unit i of `units` (leading batch axes kept).
    With `values` ({path: array shaped like the leaf}), Σ_S e_S Σ values_S[i] over the
    slices whose path it holds instead: Saul's imbalance, values = W ⊙ ∂R/∂W."""
    q = None
    for s, e in zip(units.slices, family_exponents(units, degree, owner, model)):
        leaf = leaf_at(model, s.path)
        if values is not None and s.path not in values:
            continue
        lead, ax = _axes(leaf, s)
        sq = leaf**2 if values is None else values[s.path]
        sq = jnp.sum(sq, axis=tuple(a for a in range(lead, leaf.ndim) if a != ax))
        # `q − p·sq` rather than `q + (−p)·sq`, and no ×1: both are exact, and an MLP's
        # charges then round exactly as they did before units existed
        if q is None:
            q = sq if e == 1.0 else e * sq
        elif e < 0:
            q = q - (-e) * sq
        else:
            q = q + (sq if e == 1.0 else e * sq)
    return q


def zeros_like(model: PyTree) -> PyTree:
    """`model` with every floating-point array replaced by zeros."""
    return jax.tree.map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else x, model)


def unit_generator(model, units: Units, index=None, degree: float | None = None,
                   owner: str = "Rescaling") -> PyTree:
    """ξ(w) of the rescaling of unit `index` of `units` (all of them for None): e_S·w on
    each slice S of the unit (summed where slices share an entry), zero elsewhere."""
    xi = zeros_like(model)
    for s, e in zip(units.slices, family_exponents(units, degree, owner, model)):
        leaf = leaf_at(model, s.path)
        _, ax = _axes(leaf, s)
        idx = (Ellipsis,) if index is None else (slice(None),) * ax + (index,)
        value = leaf[idx] if e == 1.0 else e * leaf[idx]
        xi = _replace(xi, s.path, leaf_at(xi, s.path).at[idx].add(value))
    return xi


def _shared_entries(leaf, s1: Slice, s2: Slice, values):
    """Σ over the entries unit i holds through both slices (index i on both axes), per i:
    the self-loop W_rec[i, i] of a recurrent unit."""
    lead, a1 = _axes(leaf, s1)
    _, a2 = _axes(leaf, s2)
    diag = jnp.diagonal(values, axis1=a1, axis2=a2)  # the diagonal becomes the last axis
    return jnp.sum(diag, axis=tuple(range(lead, diag.ndim - 1)))


def unit_residuals(force, model, units: Units, degree: float | None = None,
                   owner: str = "RescalingResiduals") -> Array:
    """r_i = ⟨F, ξ_i⟩ / (‖F_i‖ ‖ξ_i‖) for every unit i of `units`, with ξ_i the unit's
    generator and F_i the part of `force` (shaped like `model`) on the unit's entries."""
    dot = fsq = xsq = None
    exps = family_exponents(units, degree, owner, model)
    for s, e in zip(units.slices, exps):
        w, f = leaf_at(model, s.path), leaf_at(force, s.path)
        lead, ax = _axes(w, s)
        axes = tuple(a for a in range(lead, w.ndim) if a != ax)
        fw, ff, ww = (jnp.sum(a, axis=axes) for a in (f * w, f**2, w**2))
        ww = ww if e * e == 1.0 else e * e * ww
        if dot is None:
            dot, fsq, xsq = (fw if e == 1.0 else e * fw), ff, ww
        else:
            dot = dot - (-e) * fw if e < 0 else dot + (fw if e == 1.0 else e * fw)
            fsq, xsq = fsq + ff, xsq + ww
    # an entry in two slices of the unit (a self-loop) was counted twice in ‖F_i‖² and
    # with e1² + e2² instead of (e1 + e2)² in ‖ξ_i‖²
    for j, (s1, e1) in enumerate(zip(units.slices, exps)):
        for s2, e2 in zip(units.slices[j + 1:], exps[j + 1:]):
            if s1.path == s2.path:
                w, f = leaf_at(model, s1.path), leaf_at(force, s1.path)
                fsq = fsq - _shared_entries(w, s1, s2, f**2)
                xsq = xsq + 2 * e1 * e2 * _shared_entries(w, s1, s2, w**2)
    denom = jnp.sqrt(fsq * xsq)
    return dot / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny)


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


def weight_matrices(model, paths) -> tuple[Array, ...]:
    """The arrays at `paths` as matrices, rows = axis 0 (a kernel (out, in, kh, kw) as
    (out, in·kh·kw)): the rows Saul's ℓ_{p,q} norm and regularizers run over."""
    return tuple(jnp.reshape(leaf_at(model, p), (leaf_at(model, p).shape[0], -1))
                 for p in paths)


def put_weight_matrices(tree, paths, matrices):
    """`tree` with the array at each of `paths` replaced by the matrix, reshaped back."""
    for p, m in zip(paths, matrices, strict=True):
        tree = _replace(tree, p, jnp.reshape(m, leaf_at(tree, p).shape))
    return tree
