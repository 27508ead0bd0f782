"""`dyn.Simulation`: what `dyn.simulate` would run, prepared but not run, so that
`dyn.sweep` can solve the cells of one structure in one vmapped call."""

import inspect

import equinox as eqx
import jax
import numpy as np

from .._driver._prepare import check_finite, prepare, strong
from .._driver._spec import Prepared
from .._flows import AbstractFirstOrderFlow, NesterovFlow
from .._simulate import simulate
from .._tree import partition

SIMULATE_KWARGS = tuple(
    name for name, p in inspect.signature(simulate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("progress", "throw")
)
_SIMULATE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(simulate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
}


class Simulation:
    """What `dyn.simulate` would run, without running it: `run_fn` returns one per cell
    and `dyn.sweep` solves all cells of the same structure in one vmapped call.

    `Simulation(flow, params, loss, t1=..., solver=..., ...)` takes the arguments of
    `dyn.simulate` except `progress` (the sweep has one bar) and `throw` (a failed cell
    is recorded, not raised). They are validated as `simulate` validates them.
    """

    def __init__(self, flow, params, loss, **kwargs):
        unknown = sorted(set(kwargs) - set(SIMULATE_KWARGS))
        if unknown:
            raise ValueError(
                f"Simulation got unknown argument(s) {unknown}; it accepts dyn.simulate's "
                f"keyword arguments {list(SIMULATE_KWARGS)}."
            )
        self.flow, self.params, self.loss = flow, params, loss
        self.kwargs = {**{k: _SIMULATE_DEFAULTS[k] for k in SIMULATE_KWARGS
                          if k in _SIMULATE_DEFAULTS}, **kwargs}

    def prepare(self) -> Prepared:
        """The validated spec of the solve and its provenance (without the creation
        time: cells written at different times must compare equal)."""
        if "t1" not in self.kwargs:
            raise ValueError("Simulation needs `t1`, the end of the time interval.")
        prepared = prepare(self.flow, self.params, self.loss, **self.kwargs)
        meta = {k: v for k, v in prepared.meta.items() if k != "created"}
        return Prepared(prepared.spec, meta)

    def prepare_like(self, template: "Simulation", prepared: Prepared) -> Prepared | None:
        """`prepare()`, short-cut when this simulation differs from `template` (already
        prepared as `prepared`) only in the values of `params` and `v0`: then every
        other check `prepare` makes has the same outcome, so only the new parameters
        and velocity are checked (structure, shapes, dtypes, finiteness) and put into
        the template's arguments. Returns None when the short cut does not apply.

        A seed axis is the common case: `prepare` costs ~1-5 ms per cell, this ~0.1 ms,
        and in a vmapped sweep the per-cell Python work, not the solve, was the cost."""
        if self.kwargs.keys() != template.kwargs.keys():
            return None
        if isinstance(self.flow, NesterovFlow) and self.kwargs.get("v0") is not None:
            return None  # its v0 check depends on the values (and on t0)
        rest = lambda sim: (sim.flow, sim.loss,  # noqa: E731
                            {k: v for k, v in sim.kwargs.items() if k != "v0"})
        if not _same_values(rest(self), rest(template)):
            return None
        spec = prepared.spec
        old_w = spec.y0 if isinstance(self.flow, AbstractFirstOrderFlow) else spec.y0[0]
        w = _values_like(self.params, old_w, spec.problem.static, "params")
        if w is None:
            return None
        if isinstance(self.flow, AbstractFirstOrderFlow):
            if self.kwargs.get("v0") is not None:
                return None  # `prepare` raises the error for this
            y0 = w
        elif self.kwargs.get("v0") is None:
            y0 = (w, spec.y0[1])  # the template's zero velocity: one array, shared
        else:
            v = _values_like(self.kwargs["v0"], old_w, None, "v0")
            if v is None:
                return None
            y0 = (w, v)
        return Prepared(eqx.tree_at(lambda s: s.y0, spec, y0), prepared.meta)


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array | np.generic)


def _same_values(a, b) -> bool:
    """Equal pytrees: same structure (static fields included) and equal leaves, arrays
    compared by identity first and by value after."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    try:
        if ta != tb:
            return False
    except Exception:  # static fields that cannot be compared (arrays inside)
        return False
    for x, y in zip(la, lb, strict=True):
        if x is y:
            continue
        if _is_array(x) or _is_array(y):
            # `.dtype`, not np.result_type: that converts a jax array to a dtype
            # implicitly, deprecated in NumPy (a DeprecationWarning per leaf and cell).
            if not (_is_array(x) and _is_array(y)) or np.shape(x) != np.shape(y) \
                    or x.dtype != y.dtype \
                    or not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
                return False
        elif type(x) is not type(y) or not (x == y):
            return False
    return True


def _values_like(tree, like, static, name):
    """The inexact arrays of `tree`, checked to match `like` (structure, shapes, dtypes)
    and its other leaves to match `static` (when given); finite, else a ValueError as
    `simulate` raises. None when they do not match (the full checks then decide)."""
    w, rest = partition(tree)
    if jax.tree.structure(w) != jax.tree.structure(like):
        return None
    if static is not None and not _same_values(rest, static):
        return None
    w = strong(w)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(like), strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
    check_finite(name, w)
    return w
