"""Projections and the schedules on which `simulate` applies them.

A projection maps a state (params, velocity) to a new state, e.g. a balancing fix that
rescales the weights without changing the network function (Saul, Alg. 1; Baldi et al.
sec. 2). `simulate` applies it on a schedule, then *continues* the solve from the new
state: every k accepted steps, every Δt of time, or when an event fires. Diffrax has
no post-step hook (its issues #277, #699) and its events only stop a solve, so the
driver wraps the solver: the projection is applied at the end of the step on which the
schedule fires, and the wrapped solver restarts from the projected state (see
`_actions`). Every schedule fires at step ends: `Every(time=Δt)` makes an adaptive
controller land on t0 + jΔt (with constant steps it fires at the nearest step end), and
`OnEvent` fires at the end of the step in which the event's condition crossed zero.

The same mechanism serves any action that maps the state and goes on; the projection
here is its most common user-facing form.
"""

import abc

import equinox as eqx
import jax
from jaxtyping import Array, PyTree

from ._validate import positive_int, traced_scalar
from .events._events import AbstractEvent


class AbstractProjection(eqx.Module):
    """A map (params, velocity) -> (params, velocity) applied between solver steps.

    `params` is the full model (an `MLP` or any pytree, static parts included), so a
    projection can read e.g. the activation's homogeneity degree. `velocity` is None
    for first-order flows; second-order flows get it and return the mapped velocity
    (for a linear rescaling of the weights, the push-forward by the same map).

    `init(params, velocity)` is called once with the initial state; whatever it returns
    is handed back as `state` on every call (e.g. the initial charges that
    `ChargeProjection` restores). Used on its own, `projection(params, velocity)` with
    no state behaves as if `init` had been called on those params.
    """

    def init(self, params: PyTree, velocity: PyTree | None) -> PyTree:
        """Reference data computed once from the initial state (default: none)."""
        return None

    @abc.abstractmethod
    def __call__(
        self, params: PyTree, velocity: PyTree | None, state: PyTree = None
    ) -> tuple[PyTree, PyTree | None]:
        """The projected (params, velocity)."""


def check_output(projection: AbstractProjection, params: PyTree,
                 velocity: PyTree | None) -> None:
    """A ValueError unless `projection` maps (params, velocity) to a pair of the same
    structure, shapes and dtypes (checked on shapes alone: nothing runs). Inside a solve
    a wrong output failed deep in `lax.cond` ("branches must have equal output types")."""
    name = type(projection).__name__
    try:
        state = eqx.filter_eval_shape(projection.init, params, velocity)
        out = eqx.filter_eval_shape(projection, params, velocity, state)
    except Exception as exc:
        raise ValueError(
            f"`projection` {name}: calling it on the initial (params, velocity) failed with "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, tuple | list) or len(out) != 2:
        got = (f"a {type(out).__name__} of {len(out)}" if isinstance(out, tuple | list)
               else "a single pytree")
        raise ValueError(
            f"`projection` {name} must return the pair (params, velocity) (velocity None "
            f"for a first-order flow), got {got}."
        )

    def arrays(tree):
        return eqx.filter(tree, lambda x: isinstance(x, jax.ShapeDtypeStruct)
                          or eqx.is_array(x))

    for what, new, old in (("params", out[0], params), ("velocity", out[1], velocity)):
        if old is None:  # (a velocity returned for a first-order run is not used)
            continue
        new_arrays, old_arrays = arrays(new), arrays(old)
        if jax.tree.structure(new_arrays) != jax.tree.structure(old_arrays):
            raise ValueError(f"`projection` {name} returned {what} of another structure than "
                             f"the {what} it was given; return the same pytree, mapped.")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new_arrays),
                                jax.tree.leaves(old_arrays), strict=True):
            if a.shape != b.shape:
                raise ValueError(
                    f"`projection` {name} returned {what} with shape {a.shape} at "
                    f"{jax.tree_util.keystr(path) or 'the array'} where it was given "
                    f"{b.shape}; a projection maps the state to one of the same shapes."
                )


def _check_projection(projection) -> None:
    if not isinstance(projection, AbstractProjection):
        raise ValueError(
            "`projection` must be an AbstractProjection such as "
            f"dyn.balance.MinNormFix(p=2, q=2), got {projection!r}."
        )


class AbstractSchedule(eqx.Module):
    """When a projection is applied inside a solve (`Every`, `OnEvent`)."""

    projection: eqx.AbstractVar[AbstractProjection]


class Every(AbstractSchedule):
    """Apply `projection` every `steps` accepted solver steps, or every `time` units of
    time (at t0 + k·time), then continue the solve. Give exactly one of the two.

    `time` is stored as an array, so runs that differ only in the period share one
    compiled solve; `steps` is static (it decides the control flow).
    """

    projection: AbstractProjection
    steps: int | None = eqx.field(static=True)
    time: Array | None

    def __init__(self, projection: AbstractProjection, *, steps: int | None = None,
                 time: float | None = None):
        _check_projection(projection)
        if (steps is None) == (time is None):
            raise ValueError(
                "Every: give exactly one of `steps` (apply every k accepted steps) or "
                "`time` (apply every Δt of time), e.g. dyn.Every(fix, steps=50)."
            )
        self.projection = projection
        self.steps = None if steps is None else positive_int(steps, "steps", "Every")
        self.time = None if time is None else traced_scalar(time, "time", "Every", low=0.0,
                                                               strict=True)


class OnEvent(AbstractSchedule):
    """Apply `projection` whenever `event` fires (its condition crosses zero, or turns
    True), then continue the solve instead of stopping it."""

    projection: AbstractProjection
    event: AbstractEvent

    def __init__(self, projection: AbstractProjection, event: AbstractEvent):
        _check_projection(projection)
        if not isinstance(event, AbstractEvent):
            raise ValueError(
                "OnEvent: `event` must be a dyn.events object such as "
                f"dyn.events.Condition(fn), got {event!r}."
            )
        self.projection = projection
        self.event = event
