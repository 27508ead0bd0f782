"""The sliding multipliers' system at one point (t, w) of a mode: its residual
r(s) = ż on the sliding pairs (s_k − ½ on free slots) and the field on the piece d(s),
which `Switching` solves by chord and Newton iterations (`Switching._solve`).

Two forms with the same value. `FullSystem` evaluates both on every example: each
residual is the field (a gradient over all N examples) and a forward-mode pass of all
N·Σwidths pre-activations. `SlotSystem` is for flows affine in the loss (ẇ = A(t, w)∇L
+ b(t, w), `affine_in_loss`: gradient flow): only the examples with a sliding pair see s,
so with S their set and L_S(w; d) = (1/N) Σ_{n∈S} ℓ_n(w; d_n) their share of the loss,

    f(w; d(s)) = f(w; d(s0)) − F(L_S(·; d(s0))) + F(L_S(·; d(s))),

F(L) the flow's field of the loss L (b cancels between the last two terms, A∇ is
linear), and ż_p of a sliding pair reads its own example's forward pass. A residual
then costs a gradient and a forward-mode pass over the K slots' examples instead of
all N, after one full gradient f(w; d(s0)) per system: at K = 64 slots and N = 256
digits a quarter of the work, and less the larger N (Głuch & Urbanke's network sees
1,000 examples)."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._state import FilippovState


class AbstractSlidingSystem(eqx.Module):
    """r(s) and the field f(w; d(s)) at one (t, w) and mode."""

    switching: eqx.AbstractVar[eqx.Module]
    t: eqx.AbstractVar[Array]
    w: eqx.AbstractVar[PyTree]
    mode: eqx.AbstractVar[FilippovState]

    @abc.abstractmethod
    def rate(self, s: Array) -> PyTree:
        """ẇ on the piece whose sliding pairs have the multipliers s."""

    @abc.abstractmethod
    def zdot(self, s: Array) -> Array:
        """ż of each slot's pair on the piece d(s) (any value on a free slot)."""

    def residual(self, s: Array) -> Array:
        """r(s): ż_p of each occupied slot's pair, s_k − ½ on a free slot (whose slope is
        dropped, so its column of ∂r/∂s is e_k)."""
        active = self.mode.slots >= 0
        return jnp.where(active, self.zdot(s), s - 0.5)


def _slot_pairs(mode: FilippovState) -> Array:
    """Each slot's pair (its flat index; 0 on a free slot)."""
    return jnp.where(mode.slots >= 0, mode.slots, 0).astype(int)


class FullSystem(AbstractSlidingSystem):
    """The system evaluated on every example (any first-order flow)."""

    switching: eqx.Module
    t: Array
    w: PyTree
    mode: FilippovState

    def rate(self, s):
        sw = self.switching
        return sw._rate(self.t, self.w, None, sw.slopes(self.mode, s))

    def zdot(self, s):
        sw, mode = self.switching, self.mode
        return sw.zdot(self.t, self.w, None, sw.slopes(mode, s))[_slot_pairs(mode)]


class SlotSystem(AbstractSlidingSystem):
    """The system on the sliding examples only, for a flow affine in the loss (module
    docstring). `examples`: each slot's example (0 on a free slot); `weights`: 1/N on
    the first slot of each sliding example, 0 on repeats and free slots (so that
    Σ_k weights_k ℓ_{examples_k} is L_S); `base`: f(w; d(s0)) − F(L_S(·; d(s0)))."""

    switching: eqx.Module
    t: Array
    w: PyTree
    mode: FilippovState
    examples: Array
    weights: Array
    base: PyTree

    @classmethod
    def build(cls, switching, t, w, mode: FilippovState, s0: Array) -> "SlotSystem":
        surfaces = switching.surfaces
        active = mode.slots >= 0
        _, examples = surfaces.locate(_slot_pairs(mode))
        # A repeated example (two of its pairs slide) enters L_S once: its first slot.
        same = (examples[:, None] == examples[None, :]) & active[None, :]
        earlier = jnp.tril(same, k=-1).any(axis=1)
        weights = jnp.where(active & ~earlier, 1.0 / surfaces.num_examples, 0.0)
        weights = weights.astype(surfaces.x.dtype)
        half = cls(switching, t, w, mode, examples, weights, None)
        d0 = switching.slopes(mode, s0)
        f0 = switching._rate(t, w, None, d0)
        base = jax.tree.map(jnp.subtract, f0, half._share(d0))
        return cls(switching, t, w, mode, examples, weights, base)

    def _share(self, d) -> PyTree:
        """F(L_S(·; d)): the flow's field of the sliding examples' share of the loss."""
        sw = self.switching
        rows = sw.surfaces.rows(d, self.examples)

        def share(u):
            return sw.surfaces.data_loss_on_rows(sw.problem.params(u), rows, self.examples,
                                                 self.weights)

        return sw.problem.flow.vector_field(self.t, self.w, share)

    def rate(self, s):
        d = self.switching.slopes(self.mode, s)
        return jax.tree.map(jnp.add, self.base, self._share(d))

    def zdot(self, s):
        sw, mode = self.switching, self.mode
        d = sw.slopes(mode, s)
        pairs = _slot_pairs(mode)

        def z(u):
            return sw.surfaces.pair_preactivations(sw.problem.params(u), d, pairs)

        return jax.jvp(z, (self.w,), (self.rate(s),))[1]
