"""Events that stop a run: reaching a loss, diverging, a user condition.

Real-valued conditions are root-found on diffrax's dense interpolant, so the recorded
event time is where the condition crosses zero, not the end of the step. Boolean
conditions (non-finite state) stop at the end of the step on which they turn true.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PyTree

from .._problem import Problem
from .._tree import all_finite, sqnorm
from .._validate import traced_scalar


class AbstractEvent(eqx.Module):
    """A stopping condition c(t, w, ẇ): real (stop when it crosses zero in `direction`:
    True up-crossing, False down-crossing, None either) or boolean (stop when True)."""

    name: eqx.AbstractVar[str]
    direction: eqx.AbstractVar[bool | None]

    @abc.abstractmethod
    def condition(self, t, w: PyTree, v: PyTree | None, problem: Problem) -> Array:
        """A scalar float or bool."""


class AbstractDivergenceEvent(AbstractEvent):
    """Marker: firing means the run diverged (`Trajectory.diverged` is set)."""


class LossBelow(AbstractEvent):
    """Stop when the loss falls to `value`: c = L(w) − value crosses zero downwards.
    (A run that starts below `value` never crosses, and does not stop.)

    `value` is stored as an array: runs that differ only in the threshold share one
    compiled solve."""

    value: Array
    name: ClassVar[str] = "loss_below"
    direction: ClassVar[bool | None] = False

    def __init__(self, value: float):
        self.value = traced_scalar(value, "value", "LossBelow")

    def condition(self, t, w, v, problem):
        # Relative units keep the root find's |c| < atol test meaningful at any scale.
        return (problem.loss(w) - self.value) / jnp.maximum(jnp.abs(self.value), 1.0)


class NormAbove(AbstractDivergenceEvent):
    """Divergence guard: stop when ‖w‖ (over all parameters) rises to `value` > 0
    (stored as an array, like `LossBelow`'s)."""

    value: Array
    name: ClassVar[str] = "norm_above"
    direction: ClassVar[bool | None] = True

    def __init__(self, value: float):
        self.value = traced_scalar(value, "value", "NormAbove", low=0.0, strict=True)

    def condition(self, t, w, v, problem):
        return jnp.sqrt(sqnorm(w)) / self.value - 1.0


class NonFinite(AbstractDivergenceEvent):
    """Stop as soon as the state holds a NaN or Inf. Always active in `simulate`: its
    step-size controller's guard ends a run at the first step that reaches a non-finite
    state and reports this event there (`Trajectory.event == "non_finite"`, `diverged`
    set), so passing it in `events` changes nothing. `condition` is what the guard
    tests, for use outside `simulate`."""

    name: ClassVar[str] = "non_finite"
    direction: ClassVar[bool | None] = None

    def condition(self, t, w, v, problem):
        finite = all_finite(w) if v is None else all_finite(w) & all_finite(v)
        return jnp.logical_not(finite)


class Condition(AbstractEvent):
    """A user event: `fn(t, params, velocity)` returning a float (stop at its zero,
    crossing in `direction`) or a bool (stop when True). `params` is the full model."""

    fn: Callable
    name: str = "condition"
    direction: bool | None = None

    def __check_init__(self):
        if not callable(self.fn):
            raise ValueError(
                f"Condition: `fn` must be a function (t, params, velocity) -> scalar, got "
                f"{self.fn!r}."
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Condition: `name` must be a non-empty string, got {self.name!r}.")
        if self.direction not in (None, True, False):
            raise ValueError("`direction` must be None, True (up-crossing) or False.")

    def condition(self, t, w, v, problem):
        velocity = None if v is None else problem.params(v)
        return self.fn(t, problem.params(w), velocity)


class _BracketState(eqx.Module):
    lower: Array
    upper: Array
    f_lower: Array
    f_at_y: Array


def _scalar(f) -> Array:
    # diffrax hands the root finder one value per event, all zero but the one that
    # fired, so their sum is the triggered condition.
    return sum(jnp.asarray(x, dtype=jnp.result_type(float)) for x in jax.tree.leaves(f))


class EventRootFinder(optx.AbstractRootFinder):
    """Bisection on the step that crossed, for diffrax's event time.

    Newton and optimistix's `Bisection` both also demand |c| < atol, which is out of
    reach where the condition is steep (a blow-up guard crossing at ‖w‖ = 1e6 moves by
    1e-10 per ulp of t); bracketing in t alone always converges, to `atol + rtol·|t|`,
    and it returns the end of the bracket where the condition has crossed.

    The tolerance never goes below `ulps` units in the last place of t in the dtype of
    the solve: a bracket cannot be narrower than the floats between its ends, so 1e-13
    asked for in float32 would never be met (the root find would run out of steps).
    """

    rtol: float
    atol: float
    ulps: float = 4.0
    norm: ClassVar[Callable] = jnp.abs

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        lower = jnp.asarray(options["lower"], dtype=jnp.result_type(float))
        upper = jnp.asarray(options["upper"], dtype=jnp.result_type(float))
        f_lower = _scalar(fn(lower, args)[0])
        return _BracketState(lower, upper, f_lower, _scalar(fn(upper, args)[0]))

    def step(self, fn, y, args, options, state, tags):
        mid = state.lower + 0.5 * (state.upper - state.lower)
        f_mid, aux = fn(mid, args)
        f_mid = _scalar(f_mid)
        # Keep the half whose ends differ in sign; a zero at `mid` is the crossing.
        same_side = (jnp.sign(f_mid) == jnp.sign(state.f_lower)) & (f_mid != 0)
        lower = jnp.where(same_side, mid, state.lower)
        upper = jnp.where(same_side, state.upper, mid)
        f_lower = jnp.where(same_side, f_mid, state.f_lower)
        return upper, _BracketState(lower, upper, f_lower, f_mid), aux

    def terminate(self, fn, y, args, options, state, tags):
        width = state.upper - state.lower
        done = (width <= self.tolerance(state.lower, state.upper)) | (state.f_at_y == 0)
        return done, optx.RESULTS.successful

    def tolerance(self, lower, upper):
        """The bracket width at which the crossing counts as found: `atol + rtol·|t|`,
        at least `ulps` units in the last place of t."""
        scale = jnp.maximum(jnp.abs(upper), jnp.abs(lower))
        eps = jnp.finfo(scale.dtype).eps
        return jnp.maximum(self.atol + self.rtol * scale,
                           self.ulps * eps * scale + jnp.finfo(scale.dtype).tiny)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return state.upper, aux, {}


class _IllinoisState(eqx.Module):
    lower: Array
    upper: Array
    f_lower: Array
    f_upper: Array
    f_at_y: Array
    side: Array  # which end moved last: +1 lower, -1 upper, 0 none yet


def _illinois_point(lo, hi, flo, fhi):
    """The regula falsi point of the bracket, or its midpoint if that is not strictly
    inside (equal values, or rounding at a bracket a few ulps wide)."""
    denom = fhi - flo
    t = hi - fhi * (hi - lo) / jnp.where(denom != 0, denom, 1.0)
    inside = (denom != 0) & (t > lo) & (t < hi)
    return jnp.where(inside, t, lo + 0.5 * (hi - lo))


def _illinois_update(state: "_IllinoisState", t, f_t) -> "_IllinoisState":
    """The bracket after fn(t) = f_t: the end on f_t's side moves to t."""
    lo, hi, flo, fhi = state.lower, state.upper, state.f_lower, state.f_upper
    same_side = (jnp.sign(f_t) == jnp.sign(flo)) & (f_t != 0)
    # Illinois: the end kept for a second step in a row has its value halved (the
    # halving accumulates), which stops regula falsi from stalling on one side.
    fhi = jnp.where(same_side & (state.side == 1), 0.5 * fhi, fhi)
    flo = jnp.where(~same_side & (state.side == -1), 0.5 * flo, flo)
    return _IllinoisState(jnp.where(same_side, t, lo), jnp.where(same_side, hi, t),
                          jnp.where(same_side, f_t, flo), jnp.where(same_side, fhi, f_t),
                          f_t, jnp.where(same_side, 1, -1))


class IllinoisRootFinder(EventRootFinder):
    """`EventRootFinder`'s bracket and stopping rule, with the Illinois variant of
    regula falsi (Dowell & Jarratt 1971) for the new point: superlinear (order ~1.44)
    on a smooth crossing where bisection is linear, so a switching time to 1e-13 costs
    ~10 evaluations instead of ~45; a point that is not strictly inside the bracket is
    replaced by the midpoint."""

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        state = super().init(fn, y, args, options, f_struct, aux_struct, tags)
        return _IllinoisState(state.lower, state.upper, state.f_lower, state.f_at_y,
                              state.f_at_y, jnp.asarray(0))

    def step(self, fn, y, args, options, state, tags):
        t = _illinois_point(state.lower, state.upper, state.f_lower, state.f_upper)
        f_t, aux = fn(t, args)
        new = _illinois_update(state, t, _scalar(f_t))
        return new.upper, new, aux

    def bracket(self, fn: Callable, lower, upper, f_lower, f_upper, max_steps: int = 256):
        """The crossing of a scalar fn(t) in [lower, upper], where f_upper < 0 and
        f_lower ≥ 0: the end of the final bracket on the crossed side (fn < 0 there),
        lower itself if fn(lower) < 0. A NaN `f_lower` means fn(lower) is not known
        yet: it is evaluated first.

        The same Illinois steps and stopping rule as `optx.root_find` with this root
        finder, written as one loop that calls `fn` at one place: XLA inlines a copy of
        `fn` wherever it is called, and optimistix calls it three times (both ends in
        `init`, one point per `step`); the Filippov mode's switching function solves its
        sliding multipliers, so each copy is a Newton solve of its own."""
        dtype = jnp.result_type(lower, upper)
        lower, upper = jnp.asarray(lower, dtype), jnp.asarray(upper, dtype)
        f_lower, f_upper = jnp.asarray(f_lower, dtype), jnp.asarray(f_upper, dtype)
        unknown = jnp.isnan(f_lower)
        state = _IllinoisState(lower, upper, jnp.where(unknown, 1.0, f_lower), f_upper,
                               f_upper, jnp.asarray(0))

        def cont(carry):
            state, first, n = carry
            width = state.upper - state.lower
            done = (width <= self.tolerance(state.lower, state.upper)) | (state.f_at_y == 0)
            return first | (~done & (n < max_steps))

        def body(carry):
            state, first, n = carry
            t = jnp.where(first, state.lower, _illinois_point(
                state.lower, state.upper, state.f_lower, state.f_upper))
            f_t = jnp.asarray(fn(t), dtype)
            # The first evaluation (only when f_lower was unknown) is of lower itself: a
            # negative value there closes the bracket on it (the crossing was at lower).
            at_lower = _IllinoisState(state.lower, jnp.where(f_t < 0, state.lower, state.upper),
                                      jnp.where(f_t < 0, state.f_lower, f_t),
                                      jnp.where(f_t < 0, f_t, state.f_upper),
                                      jnp.where(f_t < 0, 0.0, 1.0), state.side)
            return (jax.tree.map(lambda a, b: jnp.where(first, a, b), at_lower,
                                 _illinois_update(state, t, f_t)), jnp.asarray(False), n + 1)

        state, _, _ = jax.lax.while_loop(cont, body, (state, unknown, 0))
        return state.upper
