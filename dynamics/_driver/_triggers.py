"""When an action fires inside a solve (`_actions.ActingSolver`): every k steps, on a
time grid, when a condition turns, or exactly where switching functions cross zero
(root-found on the step's dense output)."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


class AbstractTrigger(eqx.Module):
    """When an action is due, judged at the end of each step."""

    def init(self, t0, y0: PyTree, args=None) -> PyTree:
        """The trigger state at the solve's start; `args` are the first step's (an exact
        trigger's `step_args` made there, `here`), which other triggers ignore."""
        return None

    @abc.abstractmethod
    def fires(self, t0, t1, y0, y1, state) -> tuple[Any, PyTree]:
        """(fire now?, new trigger state) for the step [t0, t1] from y0 to y1."""

    def reset(self, t1, y1, state) -> PyTree:
        """The trigger state after an action moved the state to y1."""
        return state


class EverySteps(AbstractTrigger):
    """Every `k` accepted steps (k = 1: every step, decided at trace time)."""

    k: int = eqx.field(static=True)

    def init(self, t0, y0, args=None):
        return jnp.array(0)

    def fires(self, t0, t1, y0, y1, state):
        if self.k == 1:
            return True, state
        count = state + 1
        fire = count >= self.k
        return fire, jnp.where(fire, 0, count)


class EveryTime(AbstractTrigger):
    """At the grid times start + j·period, j = 1, 2, ...

    `exact`: the controller lands on the grid (`LandOnGrid`), and the action fires on the
    step that ends there. Otherwise (constant steps) it fires on the step end nearest to
    the grid time, within half a step.
    """

    start: Array
    period: Array
    exact: bool = eqx.field(static=True)

    def init(self, t0, y0, args=None):
        return jnp.array(1)

    def fires(self, t0, t1, y0, y1, state):
        due = self.start + state * self.period
        slack = 0.0 if self.exact else 0.5 * (t1 - t0)
        fire = t1 >= due - slack
        return fire, state + jnp.where(fire, 1, 0)


class OnCondition(AbstractTrigger):
    """When a condition c(t, y) crosses zero during a step (real c, in `direction`:
    True upwards, False downwards, None either way), or is True at its end (boolean c).
    The crossing is judged at the step ends: the action fires at the end of the step in
    which c changed sign."""

    condition: Callable
    direction: bool | None = eqx.field(static=True)
    real: bool = eqx.field(static=True)

    def init(self, t0, y0, args=None):
        return self.condition(t0, y0)

    def fires(self, t0, t1, y0, y1, state):
        c0, c1 = state, self.condition(t1, y1)
        if not self.real:
            return c1, c1
        up = (c0 < 0) & (c1 >= 0)
        down = (c0 > 0) & (c1 <= 0)
        fire = {True: up, False: down, None: up | down}[self.direction]
        return fire, c1

    def reset(self, t1, y1, state):
        return self.condition(t1, y1)


# An exact trigger's crossing is acted on at the end of a step only if it lies within
# this fraction of the step from the end; earlier, the step ends just past it (cut there
# or retried: `_actions`). The action may use the gap t1 − t_event ≤ margin·h for a
# first-order correction (the Filippov action does), whose error is O((margin·h)²):
# below 1e-12·h².
_END_MARGIN = 1e-6


class AbstractExactTrigger(AbstractTrigger):
    """A trigger whose switching functions φ(t, y) are root-found inside the step.

    A component fires when it goes from φ ≥ 0 to φ < 0. The step's dense output is
    sampled at `samples` points, the first sample interval where an eligible component
    went negative is root-found to ~1e-13 in t (the solver's `root_finder`, an
    `IllinoisRootFinder`'s `bracket`), and the step then ends just past the crossing
    (cut there on its dense output, or retried: `LandOnEvent` reads the request) or,
    when the crossing lies within `_END_MARGIN` of its end, is acted on there. Components
    negative at the start of a step (just switched, a few ulps on the wrong side) are
    not eligible in it: the state carries the eligibility mask.
    """

    samples: eqx.AbstractVar[int]

    @abc.abstractmethod
    def values(self, t, y, state, args=None) -> Array:
        """φ(t, y), a vector (or scalar) of switching values; `args` those of the step
        (`step_args`), or None outside a step."""

    def step_args(self, t0, y0, aux, previous=None):
        """The `args` the wrapped solver's step (its field evaluations) and this
        trigger's values see: data computed once per step at its start (the Filippov
        mode's linearised multiplier system); by default the action's `aux`.
        `previous`: what it returned for the last accepted step (or after the last
        action), to start from; None at t0."""
        return aux

    def value(self, t, y, state, args, c) -> Array:
        """φ_c(t, y), the one component `c` (traced) of `values`, which the root-finding
        evaluates ~10 times per located crossing. By default `values(...)[c]`; a trigger
        whose components can be computed apart overrides it (the Filippov mode: one
        example's forward pass instead of the whole network on every example)."""
        return jnp.atleast_1d(self.values(t, y, state, args))[c]

    def init(self, t0, y0, args=None):
        return jnp.atleast_1d(self.values(t0, y0, None, args)) >= 0

    def fires(self, t0, t1, y0, y1, state):
        raise NotImplementedError("an exact trigger is located, not polled")

    def reset(self, t1, y1, state, args=None):
        return jnp.atleast_1d(self.values(t1, y1, state, args)) >= 0

    def noise(self, y) -> Array:
        """The level below which a switching value's sign is rounding, at the state `y`
        (0 by default). `locate` turns it into a time, noise/|φ̇| of the crossing
        component, within which a crossing counts as reached: a step retried to end
        just past a crossing must end where the sign has turned beyond that level.
        Otherwise a crossing that starts a step (a pair that arrived on its surface
        within rounding, after a restart or an action) is found in every long step and
        missed in every short retry, and the solve stalls there: the Filippov mode on
        the 64-32-32-10 digits net, restarted from a state with pairs sliding, spun at
        t = 1.7e-11 until `max_steps`, its retries 3e-26 long."""
        return jnp.zeros((), jnp.result_type(float))

    def here(self, args):
        """`step_args` made at the point where they are used next (the restart after an
        action, the solve's start): a trigger whose args carry a solution there marks
        them, so that nothing is solved again (the Filippov mode's multipliers)."""
        return args

    def locate(self, t0, t1, interp, state, root_finder, args=None):
        """(t_c, next state, τ): the earliest crossing in (t0, t1] (inf if none), the
        eligibility for the next step if the step is accepted without an action, and
        τ = `noise`/|φ̇| of the crossing component (its slope from the root to the
        sample past it; 0 if none), the time within which its sign is rounding."""
        frac = jnp.arange(1, self.samples + 1, dtype=jnp.result_type(t0)) / self.samples
        ts = t0 + (t1 - t0) * frac
        # lax.map, not vmap: a switching function may branch (the Filippov multipliers
        # are solved only while pairs slide), and under vmap both branches would run.
        phi = jax.lax.map(
            lambda t: jnp.atleast_1d(self.values(t, interp.evaluate(t), state, args)), ts)
        crossed = (phi < 0) & state
        any_j = crossed.any(axis=1)
        j = jnp.argmax(any_j)
        lo = jnp.where(j == 0, t0, ts[jnp.maximum(j - 1, 0)])
        hi = ts[j]
        which = crossed[j]

        def root(c):
            # The samples give the component at hi (< 0) and, past the first sample
            # interval, at lo (>= 0: no eligible one was negative there). At lo = t0 it
            # is evaluated first, with this step's `args`: an eligible component can
            # already be a rounding below 0 there. It crossed at the very end of the
            # last step, which judged it >= 0 with that step's `args` (a retry that
            # ended a few ulps short of its crossing); it crossed at t0, and a bracket
            # [t0, hi] would have no sign change (it was then found a sample late: 3e-4
            # on the digits MLP).
            f_lo = jnp.where(j == 0, jnp.nan, phi[jnp.maximum(j - 1, 0), c])
            t_root = root_finder.bracket(
                lambda t: self.value(t, interp.evaluate(t), state, args, c),
                lo, hi, f_lo, phi[j, c])
            # |φ̇| from the root to the sample past it (φ = 0 at the root): no further
            # evaluation of φ, which would be one more copy of it in the program
            past = hi - t_root
            slope = jnp.where(past > 0, jnp.abs(phi[j, c]) / jnp.where(past > 0, past, 1.0),
                              jnp.inf)
            tau = jnp.minimum(self.noise(interp.evaluate(hi)) / slope, 0.5 * (t1 - t0))
            return t_root, jnp.where(jnp.isfinite(tau), tau, 0.5 * (t1 - t0))

        def earliest(carry):
            # One root-find per component that went negative in the sample interval
            # (usually one), on that component alone: the earliest root is the crossing.
            remaining, t_c, tau = carry
            c = jnp.argmax(remaining)
            t_root, tau_c = root(c)
            first = t_root < t_c
            return (remaining.at[c].set(False), jnp.where(first, t_root, t_c),
                    jnp.where(first, tau_c, tau))

        none = jnp.asarray(jnp.inf, hi.dtype)
        _, t_c, tau = jax.lax.while_loop(lambda carry: carry[0].any(), earliest,
                                         (which, none, jnp.zeros_like(none)))
        return t_c, phi[-1] >= 0, tau


class CrossingTrigger(AbstractExactTrigger):
    """When a real condition c(t, y) crosses zero, at the root-found time: upwards
    (`direction` True), downwards (False) or either way (None)."""

    condition: Callable
    direction: bool | None = eqx.field(static=True)
    samples: int = eqx.field(static=True, default=4)

    def values(self, t, y, state, args=None):
        c = jnp.asarray(self.condition(t, y))
        # -c fires when c goes up through 0, c when it goes down.
        return {True: -c[None], False: c[None], None: jnp.stack([c, -c])}[self.direction]
