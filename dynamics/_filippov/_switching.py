"""Filippov integration of flows on piecewise-linear networks: `dyn.Filippov`.

Between events the activation pattern is frozen: every stage of every step evaluates
the smooth field of one piece (`Surfaces.loss_on_piece`), so a Runge–Kutta method keeps
its order. The events are found by the driver's exact triggers (`_actions`): the step
that crosses a surface z_p = 0 is retried to end just past the crossing, and there the
action decides, by Filippov's rule (Filippov 1988, ch. 2 §4; Cortés 2008, sec. 3.3):

- **crossing**: the field of the new side carries z_p away from the surface: the
  pair's slope flips and the solve goes on;
- **sliding**: the new side's field pushes back (both sides point into the surface):
  the pair's slope becomes the multiplier s_p ∈ [0, 1] (d_p = α + (1 − α)s_p) for which
  ż_p = ⟨∇z_p, f(w; d(s))⟩ = 0, solved jointly for all sliding pairs by Newton's
  method, chord iterations on kept LU factors while the same pairs slide (ż is
  multilinear in s: slopes of different layers multiply in the backward pass). The
  pair leaves when s_p reaches 0 (to the low side) or 1 (the high side): two more
  switching functions per sliding pair;
- **several at one instant** (a crossing that moves a sliding pair's multiplier out of
  [0, 1], whose exit pushes the first pair back): the mode is settled pair by pair
  until the rule holds for every pair the switch touched (`_switch.py`).

For second-order flows (ẅ = F(w, ẇ)) the discontinuity is in the acceleration and the
surface is crossed transversally whenever ż = ⟨∇z, v⟩ ≠ 0, so the rule is always to
cross. The convention for ReLU'(0) never enters: the slopes are explicit.

Because the rescaling symmetry acts on each piece (and on the sliding field, a convex
combination of the pieces' fields) the per-neuron charges of gradient flow are exact
invariants of the Filippov solution, conserved to the solver's tolerance.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array

from .._problem import Problem
from .._surfaces import Surfaces
from ._state import FilippovState, Linearisation


def _iterate(step: Callable, s: Array, max_iter: int) -> tuple[Array, Array, Array]:
    """s ← s − step(s) until the step is below 1e3 ulps (converged) or `max_iter`
    iterations: (s, converged, iterations). The loop of both Newton and chord."""
    tol = 1e3 * jnp.finfo(s.dtype).eps

    def body(carry):
        s, _, n = carry
        ds = step(s)
        return s - ds, jnp.max(jnp.abs(ds)), n + 1

    s, last, n = jax.lax.while_loop(lambda c: (c[1] > tol) & (c[2] < max_iter), body,
                                    (s, jnp.asarray(jnp.inf, s.dtype), 0))
    return s, last <= tol, n


class Switching(eqx.Module):
    """The piecewise-smooth field of a flow on a piecewise-linear network."""

    problem: Problem
    surfaces: Surfaces
    first_order: bool = eqx.field(static=True)
    max_sliding: int = eqx.field(static=True)

    # -- the mode ------------------------------------------------------------------

    def init(self, w) -> FilippovState:
        dtype = jnp.result_type(float)
        model = self.problem.params(w)
        high = self.surfaces.signs(model).astype(dtype)
        slots = jnp.full(self.max_sliding, -1.0, dtype)
        # 1000 ulps of the pre-activations' scale: above the rounding noise of z (a sum
        # of |W||h| terms), far below anything a solver tolerance resolves.
        scale = jnp.max(jnp.abs(self.surfaces.preactivations(model, self.surfaces.slopes(high))))
        band = 1e3 * jnp.finfo(dtype).eps * jnp.maximum(scale, 1.0)
        clock = jnp.array([-jnp.inf, -jnp.inf, 0.0], dtype)
        bounce = jnp.array([-1.0, -jnp.inf, 0.0], dtype)
        return FilippovState(high, slots, jnp.zeros(4, dtype), band, clock, bounce)

    def reset(self, w, mode: FilippovState) -> FilippovState:
        """The mode derived again for a state `w` that an action (a projection) moved,
        keeping the counts, band and clock of `mode`.

        Every pair takes the side of its pre-activation under the network's own
        activation, except pairs within the band of their surface: those keep their
        side, and a sliding pair stays in its slot. A positive rescaling (the balancing
        fixes) multiplies each z_p by a positive factor, so it keeps every side and every
        sliding pair; a general projection may move pairs across (they take their new
        side) or off their surface (a sliding pair beyond the band is released to the
        side it is on). A pair that lands on its surface with both sides pushing into it
        crosses at the next step's start and the switch decides whether it slides."""
        model = self.problem.params(w)
        signs = self.surfaces.signs(model).astype(mode.high.dtype)
        z = self.surfaces.preactivations(model, self.surfaces.slopes(signs))
        near = jnp.abs(z) <= mode.band
        index = self.slot_index(mode)
        keep = (mode.slots >= 0) & near.at[index].get(mode="fill", fill_value=False)
        slots = jnp.where(keep, mode.slots, -1.0)
        high = jnp.where(near, mode.high, signs)
        return FilippovState(high, slots, mode.counts, mode.band, mode.clock, mode.bounce)

    def slot_index(self, mode: FilippovState) -> Array:
        # Free slots point past the end, so scatters drop them.
        return jnp.where(mode.slots >= 0, mode.slots, self.surfaces.num_pairs).astype(int)

    def slopes(self, mode: FilippovState, s: Array) -> Array:
        a = self.surfaces.alpha
        d = self.surfaces.slopes(mode.high)
        return d.at[self.slot_index(mode)].set(a + (1.0 - a) * s, mode="drop")

    # -- the field of a piece, and the sliding multipliers ----------------------------

    def _loss(self, d):
        return lambda w: self.surfaces.loss_on_piece(self.problem.params(w), d)

    def _rate(self, t, w, v, d):
        """(ẇ) or (ẇ, v̇) on the piece with slopes d."""
        flow, loss = self.problem.flow, self._loss(d)
        if self.first_order:
            return flow.vector_field(t, w, loss)
        return v, flow.acceleration(t, w, v, loss)

    def z(self, w, d) -> Array:
        return self.surfaces.preactivations(self.problem.params(w), d)

    def zdot(self, t, w, v, d) -> Array:
        """ż_p = ⟨∇z_p, ẇ⟩ for every pair, on the piece d."""
        wdot = self._rate(t, w, v, d) if self.first_order else v
        return jax.jvp(lambda u: self.z(u, d), (w,), (wdot,))[1]

    def multipliers(self, t, w, mode: FilippovState, guess: "Linearisation | None" = None
                    ) -> Array:
        """s ∈ R^K with ż_p = 0 on every sliding pair (0.5 on free slots). `guess`: a
        `linearise` (the step's, at its start): chord iterations from it while the same
        pairs slide, else Newton from its multipliers on the slots that kept their pair."""
        return _multipliers(self, t, w, mode, guess)

    def _residual(self, t, w, mode: FilippovState):
        active = mode.slots >= 0
        idx = jnp.where(active, mode.slots, 0).astype(int)

        def residual(s, _=None):
            zdot = self.zdot(t, w, None, self.slopes(mode, s))
            return jnp.where(active, zdot[idx], s - 0.5)

        return residual

    def _newton(self, t, w, mode: FilippovState, start: Array) -> Array:
        """Newton's method: s ← s − J(s)⁻¹ r(s), J column by column over the occupied
        slots (`_jacobian`), LU factors by lineax, until the step is below 1e3 ulps (at most
        32 iterations). The system is affine in s up to O(z_p) and the rare product of
        two sliding slopes on one example (layers multiply in the backward pass), so it
        converges in 1–3 iterations.

        Written as a loop of its own rather than `optimistix.root_find(..., Newton)`:
        the same iterations, but XLA inlines a copy wherever a multiplier solve may fall
        back on it (~10 places in a solve), and optimistix's wrappers (implicit-function
        JVP, termination and error machinery) made each copy larger. Measured on the
        5-7-6-3 net (Dopri5, 1e-8, t ≤ 3, two runs each): first call 24.7–28.3 s with
        this loop against 28.6–29.5 s with optimistix, the compiled solve 1.3–1.5 s
        against 1.8 s; with it (and one fallback site per multiplier solve instead of
        two) the solve is 3,060 XLA fusions instead of 3,590."""
        residual, lu = self._residual(t, w, mode), lx.LU()

        def step(s):
            jac = self._jacobian(t, w, mode, s)
            return lu.compute(lu.init(lx.MatrixLinearOperator(jac), {}), residual(s), {})[0]

        return _iterate(step, start, 32)[0]

    def _jacobian(self, t, w, mode: FilippovState, s: Array) -> Array:
        """J = ∂r/∂s, one forward-mode column per occupied slot. A free slot's residual
        is s_k − ½ and its s_k enters no other (its slope is dropped), so its column is
        e_k: the loop runs over the occupied slots only, where `jax.jacfwd` took all K
        columns (64 by default) whatever the number sliding. Measured on the 64-32-32-10
        digits MLP (N = 64, K = 64, 2 pairs sliding): a Newton solve 40 ms and a
        linearisation 24 ms with `jacfwd`."""
        residual = self._residual(t, w, mode)
        active = mode.slots >= 0
        eye = jnp.eye(self.max_sliding, dtype=s.dtype)
        order = jnp.argsort(~active, stable=True)  # occupied slots first

        def column(i, jac):
            k = order[i]
            return jac.at[:, k].set(jax.jvp(residual, (s,), (eye[k],))[1])

        return jax.lax.fori_loop(0, active.sum(), column, eye)

    def _chord(self, t, w, mode: FilippovState, s: Array, lu_state, max_iter: int):
        """Chord iterations s ← s − J⁻¹ r(s) with the fixed LU factors of some earlier J
        (Kelley 2003, sec. 5.4): each costs one ż (a few gradients) instead of a K-column
        Jacobian, and gains a factor ‖I − J⁻¹J(s)‖ = O(distance to where J was taken).
        Returns (s, converged, iterations)."""
        residual, lu = self._residual(t, w, mode), lx.LU()
        return _iterate(lambda s: lu.compute(lu_state, residual(s), {})[0], s, max_iter)

    def _factor(self, t, w, mode: FilippovState, s: Array):
        jac = self._jacobian(t, w, mode, s)
        return lx.LU().init(lx.MatrixLinearOperator(jac), {})

    def _identity(self, dtype):
        eye = jnp.eye(self.max_sliding, dtype=dtype)
        return lx.LU().init(lx.MatrixLinearOperator(eye), {})

    @staticmethod
    def _warm(mode: FilippovState, guess: Linearisation, half: Array) -> Array:
        """The guess's multipliers on the slots that hold the same pair, ½ elsewhere."""
        return jnp.where((guess.slots == mode.slots) & (mode.slots >= 0), guess.s, half)

    def _multipliers(self, t, w, mode: FilippovState, guess) -> Array:
        active = mode.slots >= 0
        half = jnp.full(self.max_sliding, 0.5, mode.high.dtype)
        if not self.first_order:
            return half
        if guess is not None and guess.here:
            return guess.s
        if guess is None:
            return jax.lax.cond(active.any(), lambda: _newton(self, t, w, mode, half),
                                lambda: half)

        # Within a step s and J move by O(h): a few chord iterations from the step's
        # start while the same pairs slide; Newton when they stall, or from the guess's
        # multipliers on the slots that kept their pair (an action's new mode). One
        # Newton call site, not one per branch: each is a loop XLA inlines.
        def solve():
            same = (guess.slots == mode.slots).all()
            s, ok, _ = jax.lax.cond(
                same, lambda: _chord(self, t, w, mode, guess.s, guess.lu, 8),
                lambda: (self._warm(mode, guess, half), jnp.asarray(False), 0))
            return jax.lax.cond(ok, lambda: s, lambda: _newton(self, t, w, mode, s))

        return jax.lax.cond(active.any(), solve, lambda: half)

    def linearise(self, t, w, mode: FilippovState,
                  previous: Linearisation | None = None) -> Linearisation:
        """The multipliers at (t, w) and the LU factors of their system's Jacobian: made
        once per step, they make every other solve of the step a few chord iterations
        (`multipliers(..., guess=)`).

        `previous`: the last step's. While the same pairs slide, its multipliers are
        the start and its factors are kept as long as they converge in two chord
        iterations (the Jacobian moves by O(h) per step); otherwise J is taken afresh
        (and once more at the root when its first point was far from it: a pair that
        just started sliding starts at s = ½). A K-column Jacobian costs ~8 field
        evaluations at K = 16, so reusing it is most of a sliding step's saving (a
        sliding step at N = 64 digits: ~12 ms of Newton and Jacobian before)."""
        dtype = mode.high.dtype
        half = jnp.full(self.max_sliding, 0.5, dtype)
        if not self.first_order:  # second-order flows cross, never slide
            return Linearisation(half, self._identity(dtype), mode.slots)
        if previous is None:
            start, valid, old = half, jnp.asarray(False), self._identity(dtype)
        else:
            start, old = self._warm(mode, previous, half), previous.lu
            valid = (previous.slots == mode.slots).all()

        def solve():
            s, ok, _ = jax.lax.cond(
                valid, lambda: _chord(self, t, w, mode, start, old, 2),
                lambda: (start, jnp.asarray(False), 0))

            def refactor():
                lu = _factor(self, t, w, mode, s)
                s1, ok1, n1 = _chord(self, t, w, mode, s, lu, 8)
                s1 = jax.lax.cond(ok1, lambda: s1, lambda: _newton(self, t, w, mode, s1))
                lu = jax.lax.cond(ok1 & (n1 <= 2), lambda: lu,
                                  lambda: _factor(self, t, w, mode, s1))
                return s1, lu

            return jax.lax.cond(ok, lambda: (s, old), refactor)

        s, lu = jax.lax.cond((mode.slots >= 0).any(), solve,
                             lambda: (half, self._identity(dtype)))
        return Linearisation(s, lu, mode.slots)

    def rate(self, t, w, v, mode: FilippovState, s: Array | None = None, guess=None):
        """The Filippov field at (w, v) in `mode` (`s`: its multipliers, if known)."""
        s = self.multipliers(t, w, mode, guess) if s is None else s
        return self._rate(t, w, v, self.slopes(mode, s))

    # -- switching functions ------------------------------------------------------

    def values(self, t, w, mode: FilippovState, s: Array | None = None,
               guess=None) -> Array:
        """φ: σ_p z_p + band for pairs off the surface (+inf while sliding), then s_k
        and 1 − s_k for occupied slots (+inf for free ones). A component going negative
        is an event.

        The band (~1e-13) is a hysteresis: a pair that leaves sliding does so
        tangentially (ż_p = 0 at the exit), and z_p then sits at the rounding level of
        its own evaluation for a while; without the band its sign noise would be read
        as crossings, each re-entering and leaving the surface (a numerical Zeno loop).
        A true crossing is located where z_p = ∓band, a shift of band/|ż_p| in time."""
        s = self.multipliers(t, w, mode, guess) if s is None else s
        z = self.z(w, self.slopes(mode, s))
        sliding = jnp.zeros_like(mode.high).at[self.slot_index(mode)].set(1.0, mode="drop")
        phi_pairs = jnp.where(sliding > 0, jnp.inf, (2.0 * mode.high - 1.0) * z + mode.band)
        active = mode.slots >= 0
        phi_slots = jnp.concatenate([jnp.where(active, s, jnp.inf),
                                     jnp.where(active, 1.0 - s, jnp.inf)])
        return jnp.concatenate([phi_pairs, phi_slots])

    def value(self, t, w, mode: FilippovState, c: Array, guess=None) -> Array:
        """`values(t, w, mode, guess=guess)[c]` for one component c (traced). A pair
        whose example has no sliding pair in an earlier layer sees no multiplier (its
        forward pass reads the frozen slopes only): one example's forward pass
        (`Surfaces.preactivation`), without solving for the multipliers; otherwise (a
        slot's exit function, or a pair downstream of a sliding one) the full values."""
        num_pairs = self.surfaces.num_pairs
        pair = jnp.minimum(c, num_pairs - 1)
        layer, example = self.surfaces.locate(pair)
        active = mode.slots >= 0
        slot_layer, slot_example = self.surfaces.locate(
            jnp.where(active, mode.slots, 0).astype(int))
        # (a sliding pair itself reads +inf in `values`: the full path gives that)
        upstream = active & (((slot_example == example) & (slot_layer < layer))
                             | (mode.slots == c))
        alone = (c < num_pairs) & ~upstream.any()

        def one():
            d = self.surfaces.slopes(mode.high)
            z = self.surfaces.preactivation(self.problem.params(w), d, pair)
            return (2.0 * mode.high[pair] - 1.0) * z + mode.band

        return jax.lax.cond(alone, one, lambda: self.values(t, w, mode, guess=guess)[c])

    def jacobian_lu(self, t, w, mode: FilippovState, s: Array):
        """The lineax LU state of the multiplier system's Jacobian J = ∂ż/∂s at s."""
        return _factor(self, t, w, mode, s)


# Nested jits: traced once per signature for the ~50 places a solve asks for them
# (every stage, every switching-function sample, the action's decisions), where inline
# calls cost ~0.5 s of tracing each.
@eqx.filter_jit
def _multipliers(switching: Switching, t, w, mode: FilippovState, guess) -> Array:
    return switching._multipliers(t, w, mode, guess)


@eqx.filter_jit
def _newton(switching: Switching, t, w, mode: FilippovState, start) -> Array:
    return switching._newton(t, w, mode, start)


@eqx.filter_jit
def _chord(switching: Switching, t, w, mode: FilippovState, s, lu_state, max_iter: int):
    return switching._chord(t, w, mode, s, lu_state, max_iter)


@eqx.filter_jit
def _factor(switching: Switching, t, w, mode: FilippovState, s):
    return switching._factor(t, w, mode, s)
