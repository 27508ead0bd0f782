"""How the solver's state y is laid out around the flow's (w, v).

Diffrax integrates one pytree. Besides w (first-order flows) or (w, v), a run may
carry, nested in this order from the inside out:

- `carry`: the loss (and ẇ) of fixed-step Euler's last evaluation, y = (w, (L, ẇ|None))
  (`LossCarryingEuler`);
- `integrals`: the running integrals of integral monitors, y = (that, {name: I});
- `mode`: a nonsmooth mode's discrete state, y = (that, mode).

`StateLayout` packs and unpacks these, so that the terms, the saves, the events and
the actions all read the state the same way.
"""

import equinox as eqx
from jaxtyping import PyTree


class Unpacked(eqx.Module):
    """The parts of a state y: `w`, `v` (None for first-order flows), `carried`
    ((L(w), ẇ or None) or None), `integrals` ({name: I} or None), `mode` (or None)."""

    w: PyTree
    v: PyTree | None
    carried: PyTree | None
    integrals: PyTree | None
    mode: PyTree | None


class StateLayout(eqx.Module):
    """Which of the optional parts a run's state carries (see the module docstring)."""

    first_order: bool = eqx.field(static=True)
    carry: bool = eqx.field(static=True)
    integrals: bool = eqx.field(static=True)
    mode: bool = eqx.field(static=True, default=False)

    def unpack(self, y) -> Unpacked:
        mode = integrals = carried = None
        if self.mode:
            y, mode = y
        if self.integrals:
            y, integrals = y
        if self.carry:
            y, carried = y
        if self.first_order:
            return Unpacked(y, None, carried, integrals, mode)
        w, v = y
        return Unpacked(w, v, carried, integrals, mode)

    def pack(self, w, v, *, carried=None, integrals=None, mode=None):
        """The state from its parts (those the layout does not carry are ignored)."""
        y = w if self.first_order else (w, v)
        if self.carry:
            y = (y, carried)
        if self.integrals:
            y = (y, integrals)
        if self.mode:
            y = (y, mode)
        return y

    def replace(self, y, w, v):
        """`y` with its (w, v) replaced and every other part kept."""
        u = self.unpack(y)
        return self.pack(w, v, carried=u.carried, integrals=u.integrals, mode=u.mode)
