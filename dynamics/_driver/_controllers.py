"""Step-size controllers around an adaptive one, for solves whose actions must fall on
step ends: `LandOnEvent` (retry a step to end at a located crossing) and `LandOnGrid`
(end steps on the times of `dyn.Every(..., time=)`)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


class WrappedController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive controller around `controller`, whose tolerances and norm it reports
    (diffrax gives them to an implicit solver's root finder)."""

    controller: eqx.AbstractVar[diffrax.AbstractAdaptiveStepSizeController]

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):  # pyright: ignore
        return self.controller.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))


# A step is cut at a crossing only where its scaled error estimate is at most this. The
# error of a Dopri5 interpolant inside a step is about the step's error estimate
# (0.45x median, 1.2x at the 90th percentile, on the 5-7-6-3 net at 1e-8), while a
# retried step's own error is far below its estimate (local extrapolation): cut at any
# accepted step, that net's charges drifted 10x more. At 1e-3 a cut adds about a
# thousandth of the tolerance; where crossings set the steps (each far shorter than the
# tolerance allows) nearly every step passes.
_CUT_ERROR = 1e-3
# ... and, while crossings come every `gap` (the time between the last two), no step is
# proposed longer than this many gaps. A longer step is cut at its first crossing all
# the same, but its stages reach far past it (on the Filippov mode's frozen piece,
# where sliding multipliers drift and take more chord iterations), and its error
# estimate, which grows as the fifth power of its length, fails the cut's test more
# often. 3 to 5 gaps ran the N = 256 digits benchmark equally fast, and ~20% faster
# than uncapped (benchmarks page).
_GAPS = 4.0


class LandOnEvent(WrappedController):
    """The adaptive controller of a solve with an exact trigger: when the step found a
    crossing inside it (the solver's error output carries the time `t_hit` just past
    it), the step is retried to end there, or, where the solver cut it there (its error
    output's `t_end` < t1), accepted as ending at `t_end`; otherwise `controller`
    decides as usual. Both only in a step that `controller` accepts.

    The wrapped controller does not see the retry (its error history is that of the
    steps it judged), and after the short step that ends at the crossing the next step
    is at least as long as the remainder of the step that found it: without this a PID
    controller, which grows steps by at most 10x, would need several small steps to
    recover from every crossing.

    `split`: the state is (y, mode) with a discrete `mode` that has no error (the
    Filippov mode): only y is shown to `controller`, so that the mode's entries do not
    dilute its RMS error norm; the steps are then those of the same solve without it.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController
    split: bool = eqx.field(static=True, default=False)
    saves: Array | None = None

    def _clip(self, t_prev, t_next, gap):
        # Where steps are cut (`saves` given) and crossings come every `gap` (inf
        # before the first), no step is proposed longer than `_GAPS` gaps. A step that
        # reaches a save time s but finds a crossing before it cannot be cut (diffrax
        # reads s off its dense output, past the cut) and is retried; so no step runs
        # past s either, and one that would reach s ends halfway there unless s is
        # within 2·gap: about one retry per save, not one per crossing before it.
        # Without crossings the steps are the wrapped controller's alone.
        if self.saves is None:
            return t_next
        t_next = jnp.where(gap > 0, jnp.minimum(t_next, t_prev + _GAPS * gap), t_next)
        s = jnp.min(jnp.where(self.saves > t_prev, self.saves, jnp.inf))  # (NaN: never)
        short = (t_next >= s) & (s - t_prev > 2 * gap)
        clipped = jnp.where(short, t_prev + 0.5 * (s - t_prev), jnp.minimum(t_next, s))
        return jnp.where(jnp.isfinite(gap), clipped, t_next)

    def _error_ratio(self, y0, y1, y_error):
        # `controller`'s scaled error norm, as diffrax's PIDController computes it
        # (`norm(y_error / (atol + rtol·max(|y0|, |y1|)))`); inf for a controller
        # without a tolerance, whose steps are then never cut.
        c = self.controller
        if not all(hasattr(c, a) for a in ("rtol", "atol", "norm")):
            return jnp.inf

        def scale(a, b, e):
            return e / (c.atol + c.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))

        return c.norm(jax.tree.map(scale, y0, y1, y_error))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        if self.split:
            mode = y0[1]
            inner_func = func
            y0 = y0[0]

            def func(terms, t, y, args):
                return inner_func(terms, t, (y, mode), args)[0]

        t_next, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        inf = jnp.asarray(jnp.inf, jnp.result_type(t_next))
        t_next = self._clip(t0, t_next, inf)
        # (the wrapped controller's state, where a retried step resumes, the gap
        # between crossings, the last crossing's step end)
        return t_next, (inner, -inf, inf, -inf)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        inner, resume, gap, last = controller_state
        y_error, t_hit, t_end = y_error
        if self.split:
            y0, y1_candidate, y_error = y0[0], y1_candidate[0], y_error[0]
        keep, t_prev, t_next, made_jump, new_inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        # A crossing is trusted only in a step the error control accepts.
        retry = keep & (t_hit < t1)
        # A step is cut (its end state read off its dense output) only where its error
        # estimate is well below the tolerance (`_CUT_ERROR`); otherwise it is retried
        # to end at the same time.
        cut = keep & (t_end < t1)
        fine = self._error_ratio(y0, y1_candidate, y_error) <= _CUT_ERROR
        t_hit = jnp.where(cut & ~fine, t_end, t_hit)
        retry = retry | (cut & ~fine)
        cut = cut & fine
        keep = keep & ~retry
        # After a cut step the next one is as long as `controller` asks after the
        # whole step, which it judged.
        t_next = jnp.where(cut, t_end + (t_next - t_prev), t_next)
        t_prev = jnp.where(retry, t0, jnp.where(cut, t_end, t_prev))
        t_next = jnp.where(retry, t_hit, jnp.where(keep, jnp.maximum(t_next, resume), t_next))
        # The gap: from the last crossing (or this step's start, before the first) to
        # the one this step found. A step that crossed nothing (other than the one
        # that lands a retry, or one that ends at a save time) doubles it, at least to
        # twice its own length: steps grow back geometrically where the crossings thin
        # out (inf stays inf).
        landed = keep & (resume > -jnp.inf)
        at_save = False if self.saves is None else jnp.any(self.saves == t1)
        quiet = keep & ~landed & ~cut & ~at_save
        crossed = cut | landed  # an accepted step that ends at a crossing
        since = jnp.where(cut, t_end, t1) - jnp.where(jnp.isfinite(last), last, t0)
        gap = jnp.where(crossed, since,
                        jnp.where(quiet, 2 * jnp.maximum(gap, t1 - t0), gap))
        last = jnp.where(crossed, jnp.where(cut, t_end, t1), last)
        t_next = self._clip(t_prev, t_next, gap)
        new_inner = jax.tree.map(lambda a, b: jnp.where(retry, a, b), inner, new_inner)
        resume = jnp.where(retry, t1, jnp.where(keep, -jnp.inf, resume))
        return keep, t_prev, t_next, made_jump, (new_inner, resume, gap, last), result


class LandOnGrid(WrappedController):
    """An adaptive controller whose steps also end exactly on start + j·period, so
    that an `EveryTime(exact=True)` action fires at its scheduled time. `start` and
    `period` are arrays: a new period does not compile the solve again (diffrax's
    `ClipStepSizeController` takes the grid as an array whose length is static)."""

    controller: diffrax.AbstractAdaptiveStepSizeController
    start: Array
    period: Array

    def _clip(self, t_prev, t_next, j):
        due = self.start + j * self.period
        # Past the grid time already (t_prev == due): aim at the next one.
        j = jnp.where(t_prev >= due, j + 1, j)
        due = self.start + j * self.period
        return jnp.minimum(t_next, due), j

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t_next, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        t_next, j = self._clip(t0, t_next, jnp.array(1))
        return t_next, (inner, j)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        inner, j = controller_state
        keep, t_prev, t_next, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        t_next, j = self._clip(t_prev, t_next, j)
        return keep, t_prev, t_next, made_jump, (inner, j), result
