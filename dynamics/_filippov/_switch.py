"""The action at a Filippov event: which pairs cross, start sliding or leave, decided by
Filippov's rule one component at a time, then settled until the rule holds for every
pair the switch touched (`Switching` gives the field and the multipliers; the module
docstring of `_switching.py` states the rule)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._state import FilippovState, Linearisation
from ._switching import Switching


def _flip(mode: FilippovState, p) -> FilippovState:
    high = mode.high
    return mode.with_high(high.at[p].set(1.0 - high[p]))


def _count(mode: FilippovState, *which: int) -> FilippovState:
    counts = mode.counts
    for i in which:
        counts = counts.at[i].add(1)
    return eqx.tree_at(lambda m: m.counts, mode, counts)


def _exit(mode: FilippovState, k, to_high) -> FilippovState:
    p = jnp.maximum(mode.slots[k], 0).astype(int)
    high = mode.high.at[p].set(jnp.where(to_high, 1.0, 0.0))
    return FilippovState(high, mode.slots.at[k].set(-1.0), mode.counts.at[2].add(1),
                         mode.band, mode.clock, mode.bounce)


_NONE = np.int32(-1)  # no target pair


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


class _Switch(eqx.Module):
    """The carry of `switch`'s loop: the mode decided so far; the components still to
    process; the pairs decided at this switch; `target`, a pair to decide by Filippov's
    rule next (−1: none); the multipliers `s` and rates ż of `mode` (or of `target`'s
    flipped mode) when `solved`; the settling fixes made; whether the rule holds."""

    mode: FilippovState
    crossed: Array
    touched: Array
    target: Array
    s: Array
    zdot: Array
    solved: Array
    fixes: Array
    done: Array


def switch(sw: Switching, t, w, v, mode: FilippovState, crossed: Array, phi: Array,
           guess: Linearisation | None = None) -> tuple[FilippovState, Array]:
    """Process every switching component in `crossed` (of the values `phi`), most
    negative first, then settle the mode until Filippov's rule holds for every pair the
    switch touched; return the new mode and its multipliers (solved from `guess`, the
    step's linearisation, when given).

    A crossed pair p is decided on its flipped side: it crosses if the field there
    carries it away from its surface, −σ_p ż_p > 0 (σ_p = ±1 its old side), else it
    slides (or, with every slot taken, crosses and counts an overflow). A crossed slot
    component (s_k below 0 or above 1) leaves to that side. Then settling, one pair at
    a time (each change moves the others' multipliers and fields), until none of these
    is violated:

    1. a sliding pair with its multiplier outside [0, 1] (a near-tangent arrival, or
       another pair's switch moved it) leaves to the side it overshoots; otherwise
       its exit function would start negative and never fire;
    2. a sliding pair whose surface repels (both sides carry it away) leaves to the
       side it came from (`high` keeps it while it slides). With the other sliding
       pairs re-solved, ż_k responds to s_k through the Schur complement 1/(J⁻¹)_kk
       of the multiplier system's Jacobian J = ∂ż/∂s: a held pair has ż_k falling
       from the low side to the high side, (J⁻¹)_kk < 0. Filippov's solution is not
       unique on a repelling surface; the side it came from is the limit of solves
       that arrive a little later. (Continuously, s_k reaches 0 or 1 before this can
       happen, so it is checked only at switches, and only at those that changed the
       sliding set: J costs a K-column Jacobian, and checking it at every switch
       made the digits N = 64 run 111 s instead of 81 s, with rule 2 never firing.
       A crossing that leaves the set alone and turns a sliding pair repelling is
       therefore not caught; none has been seen.)
    3. a pair that crossed at this switch or left by rule 1 or 2, now pushed back
       into its surface by the field of its new side (the switches after its own
       changed that field), is decided again by the crossing rule from that side.
       (A pair that left by its own exit function, s reaching 0 or 1, leaves
       tangentially: ż ≈ 0 there, and only rounding could call it pushed back.)

    Rule 3 is what made Dopri5 at 1e-6 and the reference disagree by 3.3e-2 on the
    5-7-6-3 net: at t = 1.75747 unit (1, 17, 4) crossed while (1, 33, 4) still slid
    with a multiplier that its crossing pushed to 1.31; that pair left, and the field
    of the new side then carried the first straight back, from a start where its
    switching function was already negative, so no event ever fired (the reference
    kept it on the wrong side with z > 0 to the end); the looser run, a rounding
    apart, caught it 1e-10 later and slid. Both now slide it at the switch.

    One loop does it all, with one multiplier solve, one ż and one Jacobian in it
    (each evaluation site is a copy of the network's passes that XLA compiles; the
    switch and the settling were two loops with five solves between them, about a
    fifth of a Filippov solve's compiled program). A solve is skipped where the last
    one still holds (a pair that crossed: its flipped mode's multipliers are the new
    mode's).
    """
    num_pairs, k_max = sw.surfaces.num_pairs, sw.max_sliding
    if not sw.first_order:  # second-order flows cross, never slide
        flips = crossed[:num_pairs]
        high = jnp.where(flips, 1.0 - mode.high, mode.high)
        counts = mode.counts.at[0].add(flips.sum().astype(mode.counts.dtype))
        new = eqx.tree_at(lambda m: m.counts, mode.with_high(high), counts)
        return new, sw.multipliers(t, w, new, guess)
    before = mode

    def solve(candidate):
        s = sw.multipliers(t, w, candidate, guess)
        return s, sw.zdot(t, w, v, sw.slopes(candidate, s))

    def decide(st: _Switch, s, zdot) -> _Switch:
        # Filippov's rule for `target` from zdot on its flipped side.
        p = st.target
        away = -(2.0 * st.mode.high[p] - 1.0) * zdot[p] > 0
        free = st.mode.slots < 0
        k = jnp.argmax(free)
        slides = ~away & free.any()
        sliding = eqx.tree_at(lambda m: m.slots, _count(st.mode, 1),
                              st.mode.slots.at[k].set(p.astype(st.mode.slots.dtype)))
        crosses = _count(_flip(st.mode, p), 0)
        overflow = _count(crosses, 3)
        new = _select(slides, sliding, _select(away, crosses, overflow))
        # the flipped mode's multipliers are the crossed one's (same sides and slots)
        return eqx.tree_at(lambda x: (x.mode, x.target, x.s, x.zdot, x.solved), st,
                           (new, _NONE, s, zdot, ~slides))

    def next_crossed(st: _Switch) -> _Switch:
        c = jnp.argmin(jnp.where(st.crossed, phi, jnp.inf))
        crossed = st.crossed.at[c].set(False)
        touched = st.touched.at[c].set(True, mode="drop")  # pairs (not slots) decided
        is_pair = c < num_pairs
        k = jnp.where(c < num_pairs + k_max, c - num_pairs, c - num_pairs - k_max)
        left = _exit(st.mode, jnp.maximum(k, 0), c >= num_pairs + k_max)
        return eqx.tree_at(lambda x: (x.mode, x.crossed, x.touched, x.target, x.solved),
                           st, (_select(is_pair, st.mode, left), crossed, touched,
                                jnp.where(is_pair, c, -1).astype(jnp.int32),
                                st.solved & is_pair))

    def settle(st: _Switch, s, zdot) -> _Switch:
        mode = st.mode
        active = mode.slots >= 0
        excess = jnp.where(active, jnp.maximum(-s, s - 1.0), 0.0)

        def repelling():
            inverse = sw.jacobian_inverse(t, w, mode, s)
            return active & (jnp.diagonal(inverse) > 0)

        changed = (mode.slots != before.slots).any()
        repels = jax.lax.cond(changed & active.any() & ~(excess > 0).any(), repelling,
                              lambda: jnp.zeros_like(active))
        # ż on every pair's current side; pushed back beyond its rounding level.
        on_surface = jnp.zeros(num_pairs, bool).at[sw.slot_index(mode)].set(
            True, mode="drop")
        noise = 1e3 * jnp.finfo(s.dtype).eps * jnp.max(jnp.abs(zdot))
        pushed = st.touched & ~on_surface & ((2.0 * mode.high - 1.0) * zdot < -noise)
        over, away = (excess > 0).any(), repels.any()
        done = ~(over | away | pushed.any()) | (st.fixes >= 2 * k_max)
        k = jnp.where(over, jnp.argmax(excess), jnp.argmax(repels))
        p = jnp.maximum(mode.slots[k], 0).astype(int)
        leave = over | away
        left = _exit(mode, k, jnp.where(over, s[k] > 1.0, mode.high[p] > 0.5))
        fixed = eqx.tree_at(
            lambda x: (x.mode, x.touched, x.target, x.solved, x.fixes), st,
            (_select(leave, left, mode), jnp.where(leave, st.touched.at[p].set(True),
                                                   st.touched),
             jnp.where(leave, -1, jnp.argmax(pushed)).astype(jnp.int32), jnp.asarray(False),
             st.fixes + 1))
        stop = eqx.tree_at(lambda x: (x.s, x.zdot, x.solved, x.done), st,
                           (s, zdot, jnp.asarray(True), jnp.asarray(True)))
        return _select(done, stop, fixed)

    def body(st: _Switch) -> _Switch:
        deciding, processing = st.target >= 0, st.crossed.any()
        candidate = _select(deciding, _flip(st.mode, jnp.maximum(st.target, 0)), st.mode)
        need = deciding | (~processing & ~st.solved)
        s, zdot = jax.lax.cond(need, lambda: solve(candidate), lambda: (st.s, st.zdot))
        branch = jnp.where(deciding, 0, jnp.where(processing, 1, 2))
        return jax.lax.switch(branch, [lambda: decide(st, s, zdot),
                                       lambda: next_crossed(st),
                                       lambda: settle(st, s, zdot)])

    dtype = mode.high.dtype
    start = _Switch(mode, crossed, jnp.zeros(num_pairs, bool), _NONE,
                    jnp.zeros(k_max, dtype), jnp.zeros(num_pairs, dtype),
                    jnp.asarray(False), jnp.asarray(0, jnp.int32), jnp.asarray(False))
    end = jax.lax.while_loop(lambda st: ~st.done, body, start)
    return end.mode, end.s
