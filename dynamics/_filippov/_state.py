"""The discrete state of a Filippov solve, the events read from it (stall, overflow,
Zeno), and the linearisation of the sliding multipliers that a step carries."""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from ..events._events import AbstractEvent


def _word_bits(dtype) -> tuple[int, type]:
    """Bits per stored word (a float holds the integers below 2^(mantissa+1) exactly)
    and the integer type that unpacks them."""
    dtype = jnp.dtype(dtype)
    return jnp.finfo(dtype).nmant, (jnp.int64 if dtype.itemsize == 8 else jnp.int32)


def pack_bits(high: Array) -> Array:
    """0/1 floats, `bits` to a float word (the word's integer value; exact)."""
    bits, itype = _word_bits(high.dtype)
    n = high.shape[0]
    padded = jnp.zeros(-(-n // bits) * bits, itype).at[:n].set(high.astype(itype))
    shifts = jnp.arange(bits, dtype=itype)
    return jnp.sum(padded.reshape(-1, bits) << shifts, axis=1).astype(high.dtype)


def unpack_bits(words: Array, n: int) -> Array:
    bits, itype = _word_bits(words.dtype)
    shifts = jnp.arange(bits, dtype=itype)
    flags = (words.astype(itype)[:, None] >> shifts) & 1
    return flags.reshape(-1)[:n].astype(words.dtype)


class FilippovState(eqx.Module):
    """The discrete mode, carried in the solver's state vector with zero derivative
    (so that saves see it; the step-size control ignores it).

    `high`: 1.0 for pairs on their high side (slope 1), 0.0 on the low side (slope α),
    stored as bits packed into float words (`words`, 52 pairs to a float64): the
    solver's step does its arithmetic on every entry of the state, a zero derivative
    included, and one float per pair made that the largest cost of a step where
    nothing slides (N = 256 digits on a 64-32-32-10 net: 16,384 pairs, ~1.4 ms a
    Dopri5 step beside 1.3 ms for the six gradients). Adding a zero derivative leaves
    a word exactly as it is, so the packed form survives every stage, the step and the
    dense output bit for bit. `slots`: the sliding pairs' indices, -1.0 for a free slot;
    `counts`: crossings, sliding entries, sliding exits, overflows (floats, exact
    integers); `band`: how far past its surface a pair must go to count as crossed (see
    `Switching.values`); `clock`: the time of the last switch, the start of the current
    window and how many switches in it overflowed or came without time advancing
    (`FilippovStall`); `bounce`: the pair that crossed last, when, and how many times
    in a row it crossed again soon after its previous crossing (`FilippovZeno`)."""

    words: Array
    slots: Array
    counts: Array
    band: Array
    clock: Array
    bounce: Array
    num_pairs: int = eqx.field(static=True)

    def __init__(self, high, slots, counts, band, clock, bounce):
        self.words = pack_bits(high)
        self.num_pairs = high.shape[0]
        self.slots, self.counts, self.band = slots, counts, band
        self.clock, self.bounce = clock, bounce

    @property
    def high(self) -> Array:
        return unpack_bits(self.words, self.num_pairs)

    def with_high(self, high: Array) -> "FilippovState":
        return eqx.tree_at(lambda m: m.words, self, pack_bits(high))


class AbstractModeEvent(AbstractEvent):
    """An event of the Filippov mode: read from the mode carried in the solver state
    (`reached`), not from (t, w, ẇ); boolean, so it stops the run at the end of a step."""

    direction: ClassVar[bool | None] = None

    def condition(self, t, w, v, problem):
        raise NotImplementedError("read from the Filippov mode in the solver state")

    @abc.abstractmethod
    def reached(self, mode: "FilippovState") -> Array:
        """Whether the run stops, judged from `mode`."""


class FilippovStall(AbstractModeEvent):
    """Stops a Filippov solve that no longer makes progress: `switches` switches within
    `window` in t each of which overflowed (a pair that should slide, every slot taken,
    crosses, is pushed straight back, crosses again: a chattering that advances t by
    ~1e-9 per switch, measured on the digits MLP with an occasional plain crossing
    between) or came at the instant of the last one (a Zeno loop). A healthy run has
    nowhere near 64 of them in 1e-6. `simulate` adds this event to every Filippov run
    and reports it, naming the remedy (a larger `max_sliding`)."""

    name: ClassVar[str] = "filippov_stall"
    switches: ClassVar[int] = 64
    window: ClassVar[float] = 1e-6

    def reached(self, mode: "FilippovState") -> Array:
        return mode.clock[2] >= self.switches

    @classmethod
    def tick(cls, t, old: "FilippovState", new: "FilippovState") -> "FilippovState":
        """`new` (the mode after a switch at t from `old`) with its clock advanced."""
        last, start, count = old.clock
        scale = jnp.maximum(jnp.abs(t), 1.0)
        still = t - last <= 1e3 * jnp.finfo(old.clock.dtype).eps * scale
        stuck = still | (new.counts[3] > old.counts[3])
        later = t - start > cls.window * scale
        clock = jnp.stack([t, jnp.where(later, t, start),
                           jnp.where(later, 0.0, count) + stuck]).astype(old.clock.dtype)
        return FilippovZeno.tick(t, old, eqx.tree_at(lambda m: m.clock, new, clock))


class FilippovZeno(AbstractModeEvent):
    """Stops a Filippov solve in which one pair crossed its surface `crossings` times
    in a row, each within `window`·max(1, |t|) of its previous crossing: an
    accumulation of crossings (Zeno behaviour). Under a second-order flow (heavy ball,
    Nesterov, Newtonian) a surface that pulls from both sides is crossed back and forth
    with a shrinking amplitude: the crossings accumulate in finite time, after which the
    solution slides along the surface with z = ż = 0 (second-order sliding), a motion
    the mode does not integrate; on the way the solve would spin until `max_steps`
    (measured: the one-unit net of the tests under heavy ball γ = 5 crossed 3,108
    times by t = 8.25, its gaps settling at 2e-5 and 1.7e-3, before 20,000 steps ran
    out). A genuine oscillation crosses a pair's surface once per half period, and
    `crossings` half periods each shorter than `window` is far faster than anything a
    network's loss drives. `simulate` adds this event to every Filippov run."""

    name: ClassVar[str] = "filippov_zeno"
    window: ClassVar[float] = 1e-2
    crossings: int = eqx.field(static=True, default=64)

    def reached(self, mode: "FilippovState") -> Array:
        return mode.bounce[2] >= self.crossings

    @classmethod
    def tick(cls, t, old: "FilippovState", new: "FilippovState") -> "FilippovState":
        """`new` with its record of the last pair to cross updated, if one crossed."""
        flipped = new.high != old.high
        pair, last, count = old.bounce
        p = jnp.argmax(flipped).astype(old.bounce.dtype)
        soon = t - last <= cls.window * jnp.maximum(jnp.abs(t), 1.0)
        again = (p == pair) & soon
        bounce = jnp.stack([p, t, jnp.where(again, count + 1, 1.0)]).astype(old.bounce.dtype)
        bounce = jnp.where(flipped.any(), bounce, old.bounce)
        return eqx.tree_at(lambda m: m.bounce, new, bounce)


class FilippovOverflow(AbstractModeEvent):
    """Stops a Filippov solve at the end of the step in which a pair that should slide
    found every one of the `max_sliding` slots taken. Such a pair crosses instead of
    sliding, which is not the Filippov solution: from there on the trajectory would be
    wrong by far more than the tolerance (3.2e-3 on the 5-7-6-3 net of the tests with
    one slot, at rtol 1e-8), so the run ends, flagged, with what it has computed.
    `simulate` adds this event to every Filippov run and names the remedy (a larger
    `max_sliding`)."""

    name: ClassVar[str] = "filippov_overflow"

    def reached(self, mode: "FilippovState") -> Array:
        return mode.counts[3] > 0


class Linearisation(eqx.Module):
    """The sliding multipliers `s` at a step's start, the inverse of their
    system's Jacobian (identity while nothing slides), and the `slots` they were solved
    for: a later step with the same sliding pairs starts from them.

    `here`: `s` are the multipliers at the very point where the field or the switching
    functions are evaluated (the restart after a switch, the solve's start), so nothing
    is solved again; a static flag, so that those call sites compile no solve."""

    s: Array
    inverse: Array
    slots: Array
    here: bool = eqx.field(static=True, default=False)

    def at_its_point(self) -> "Linearisation":
        return Linearisation(self.s, self.inverse, self.slots, here=True)
