"""Filippov integration of flows on piecewise-linear networks: `dyn.Filippov`.

Between events the activation pattern is frozen: every stage of every step evaluates
the smooth field of one piece (`Surfaces.loss_on_piece`), so a Runge–Kutta method keeps
its order. The events are found by the driver's exact triggers (`_actions`): the step
that crosses a surface z_p = 0 ends just past the crossing (cut there on its dense
output where its error estimate is far below the tolerance, else retried), and there
the action decides, by Filippov's rule (Filippov 1988, ch. 2 §4; Cortés 2008, sec. 3.3):

- **crossing**: the field of the new side carries z_p away from the surface: the
  pair's slope flips and the solve goes on;
- **sliding**: the new side's field pushes back (both sides point into the surface):
  the pair's slope becomes the multiplier s_p ∈ [0, 1] (d_p = α + (1 − α)s_p) for which
  ż_p = ⟨∇z_p, f(w; d(s))⟩ = 0, solved jointly for all sliding pairs by Newton's
  method, chord iterations on a kept inverse Jacobian while the same pairs slide (ż is
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


import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._problem import Problem
from .._surfaces import Surfaces
from ._state import FilippovState, Linearisation
from ._system import AbstractSlidingSystem, FullSystem, SlotSystem


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
        if not self.first_order:  # second-order flows cross, never slide
            return jnp.full(self.max_sliding, 0.5, mode.high.dtype)
        return _sliding(self, t, w, mode, guess)[0]

    @property
    def by_slots(self) -> bool:
        """Whether the multiplier system is evaluated on the sliding examples alone
        (`SlotSystem`): for flows affine in the loss, on at least `_SLOT_EXAMPLES`
        examples and four per slot. Below that a residual on all examples costs little
        more than on the K slots' ones, and the slot system's program compiles slower
        (the 5-7-6-3 net on 40 examples with one slot: 10.8 s a test against 5.2 s)."""
        n = self.surfaces.num_examples
        return (self.first_order and getattr(self.problem.flow, "affine_in_loss", False)
                and n >= max(4 * self.max_sliding, _SLOT_EXAMPLES))

    def system(self, t, w, mode: FilippovState, s0: Array) -> AbstractSlidingSystem:
        """The multiplier system at (t, w) in `mode`, set up at the multipliers s0
        (`_system.py`)."""
        if self.by_slots:
            return SlotSystem.build(self, t, w, mode, s0)
        return FullSystem(self, t, w, mode)

    def _jacobian(self, system: AbstractSlidingSystem, s: Array) -> Array:
        """J = ∂r/∂s, one forward-mode column per occupied slot. A free slot's residual
        is s_k − ½ and its s_k enters no other (its slope is dropped), so its column is
        e_k: the loop runs over the occupied slots only, where `jax.jacfwd` took all K
        columns (64 by default) whatever the number sliding. Measured on the 64-32-32-10
        digits MLP (N = 64, K = 64, 2 pairs sliding): a Newton solve 40 ms and a
        linearisation 24 ms with `jacfwd`."""
        residual = system.residual
        active = system.mode.slots >= 0
        eye = jnp.eye(self.max_sliding, dtype=s.dtype)
        order = jnp.argsort(~active, stable=True)  # occupied slots first

        def column(i, jac):
            k = order[i]
            return jac.at[:, k].set(jax.jvp(residual, (s,), (eye[k],))[1])

        return jax.lax.fori_loop(0, active.sum(), column, eye)

    def _solve(self, system: AbstractSlidingSystem, s: Array, inverse, phase,
               chords: int, refresh: bool):
        """Solve r(s) = 0 for the multipliers, from s: chord iterations s ← s − J⁻¹r(s)
        on the fixed inverse of some earlier J (Kelley 2003, sec. 5.4: each costs one ż,
        a few gradients, instead of a K-column Jacobian, and gains a factor ‖I − J⁻¹J(s)‖
        = O(distance to where J was taken)), falling back to Newton's method, J taken
        afresh at every iteration (`_jacobian`). The system is affine in s up to O(z_p)
        and the rare product of two sliding slopes on one example (layers multiply in
        the backward pass), so Newton converges in 1–3 iterations. Every iteration ends
        when its step is below 1e3 ulps.

        Phases (`phase` is where it starts, traced): 0, up to `chords` iterations on
        `inverse`; 1, J taken at s, then up to 8 chord iterations on it; 2, Newton (at
        most 32 iterations); 3, one Newton iteration, for fresh factors after a phase 1
        that needed more than 2 (only with `refresh`). A phase that does not converge
        goes on to the next (0 to 2 when `refresh` is off).

        One loop with one residual and one Jacobian in it, for every policy: XLA
        compiles a copy of a loop's body at each place it is called, and this solve is
        called at ~8 places in a Filippov solve (each field evaluation, switching-function
        sample and switch); chord and Newton as two loops were two copies each. Not
        `optimistix.root_find(..., Newton)`: the same iterations, but its wrappers
        (implicit-function JVP, termination and error machinery) make each copy larger.

        J is inverted explicitly: K ≤ 64, so a chord iteration is one K×K product
        where a lineax LU solve (two triangular solves) cost more on the CPU (N = 256
        digits to t = 1: 39.9 s against 41.7 s, the same state to 5e-15).

        Returns (s, J⁻¹ of the last J used, converged)."""
        residual = system.residual
        tol = 1e3 * jnp.finfo(s.dtype).eps

        def body(carry):
            s, inverse, phase, k, _ = carry
            fresh = ((phase == 1) & (k == 0)) | (phase >= 2)
            inverse = jax.lax.cond(fresh, lambda: _invert(self, system, s),
                                    lambda: inverse)
            ds = inverse @ residual(s)
            s, k, conv = s - ds, k + 1, jnp.max(jnp.abs(ds)) <= tol
            stalled = ((phase == 0) & (k >= chords)) | ((phase == 1) & (k >= 8))
            if refresh:
                after = jnp.select([phase == 0, phase == 1], [1, 2], 4)
                finished = (conv & ((phase == 0) | ((phase == 1) & (k <= 2)) | (phase == 2))
                            ) | (phase == 3) | ((phase == 2) & (k >= 32))
                phase = jnp.where(conv & (phase == 1) & (k > 2), 3, phase)
            else:
                after = jnp.where(phase == 0, 2, 4)
                finished = conv | ((phase == 2) & (k >= 32))
            moved = stalled & ~conv
            phase = jnp.where(finished, 4, jnp.where(moved, after, phase))
            k = jnp.where(moved | (phase == 3), 0, k)
            return s, inverse, phase, k, conv

        carry = (s, inverse, jnp.asarray(phase, jnp.int32), jnp.asarray(0, jnp.int32),
                 jnp.asarray(False))
        s, inverse, _, _, conv = jax.lax.while_loop(lambda c: c[2] < 4, body, carry)
        return s, inverse, conv

    def _invert(self, system: AbstractSlidingSystem, s: Array):
        jac = self._jacobian(system, s)
        return jnp.linalg.inv(jac)

    def _identity(self, dtype):
        return jnp.eye(self.max_sliding, dtype=dtype)

    @staticmethod
    def _warm(mode: FilippovState, guess: Linearisation, half: Array) -> Array:
        """The guess's multipliers on the slots that hold the same pair, ½ elsewhere."""
        return jnp.where((guess.slots == mode.slots) & (mode.slots >= 0), guess.s, half)

    def _sliding(self, t, w, mode: FilippovState, guess) -> tuple[Array, PyTree]:
        """(s, ẇ): the multipliers (`multipliers`) and the first-order field on their
        piece, from one system: a `SlotSystem` gives the field for a few examples'
        gradient where a full gradient would follow the solve."""
        active = mode.slots >= 0
        half = jnp.full(self.max_sliding, 0.5, mode.high.dtype)

        def frozen(s):
            return s, self._rate(t, w, None, self.slopes(mode, s))

        if guess is not None and guess.here:
            return frozen(guess.s)
        if guess is None:
            identity = self._identity(half.dtype)  # unused: Newton factors J afresh

            def newton():
                system = self.system(t, w, mode, half)
                s = _solve(self, system, half, identity, 2, 0, False)[0]
                return s, system.rate(s)

            return jax.lax.cond(active.any(), newton, lambda: frozen(half))

        # Within a step s and J move by O(h): chord iterations from the step's start
        # while the same pairs slide, Newton when they stall, or from the guess's
        # multipliers on the slots that kept their pair (an action's new mode).
        def solve():
            same = (guess.slots == mode.slots).all()
            start = jnp.where(same, guess.s, self._warm(mode, guess, half))
            system = self.system(t, w, mode, start)
            s = _solve(self, system, start, guess.inverse, jnp.where(same, 0, 2), 8, False)[0]
            return s, system.rate(s)

        return jax.lax.cond(active.any(), solve, lambda: frozen(half))

    def linearise(self, t, w, mode: FilippovState,
                  previous: Linearisation | None = None) -> Linearisation:
        """The multipliers at (t, w) and the inverse of their system's Jacobian: made
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
            start, old = self._warm(mode, previous, half), previous.inverse
            valid = (previous.slots == mode.slots).all()

        def solve():
            system = self.system(t, w, mode, start)
            s, inverse, _ = _solve(self, system, start, old, jnp.where(valid, 0, 1), 2, True)
            return s, inverse

        s, inverse = jax.lax.cond((mode.slots >= 0).any(), solve,
                             lambda: (half, self._identity(dtype)))
        return Linearisation(s, inverse, mode.slots)

    def rate(self, t, w, v, mode: FilippovState, s: Array | None = None, guess=None):
        """The Filippov field at (w, v) in `mode` (`s`: its multipliers, if known)."""
        if s is None and self.first_order:
            return _sliding(self, t, w, mode, guess)[1]
        if s is None:  # second-order flows cross, never slide
            s = jnp.full(self.max_sliding, 0.5, mode.high.dtype)
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

    def jacobian_inverse(self, t, w, mode: FilippovState, s: Array) -> Array:
        """J⁻¹, the inverse of the multiplier system's Jacobian J = ∂ż/∂s at s."""
        return _invert(self, self.system(t, w, mode, s), s)


# Fewest examples for `SlotSystem` (`Switching.by_slots`): at N = 256 digits with K = 64
# slots it took the run to t = 5 from 118 to 89 s.
_SLOT_EXAMPLES = 128


# Nested jits: traced once per signature for the ~50 places a solve asks for them
# (every stage, every switching-function sample, the action's decisions), where inline
# calls cost ~0.5 s of tracing each.
@eqx.filter_jit
def _sliding(switching: Switching, t, w, mode: FilippovState, guess):
    return switching._sliding(t, w, mode, guess)


@eqx.filter_jit
def _solve(switching: Switching, system: AbstractSlidingSystem, s, inverse, phase,
           chords: int, refresh: bool):
    return switching._solve(system, s, inverse, phase, chords, refresh)


@eqx.filter_jit
def _invert(switching: Switching, system: AbstractSlidingSystem, s):
    return switching._invert(system, s)
