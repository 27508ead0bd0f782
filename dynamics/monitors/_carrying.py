"""Monitors that carry state from one save to the next (`AbstractCarryingMonitor`), and
the one mechanism that evaluates them for `simulate` and `dyn.discrete.run`.

A plain monitor is a function of one save. Some quantities are far cheaper computed
from the previous saves' results: the Hessian's top eigenvectors move little between
nearby saves, so `TopEigenvalues(10)` warm-started from them took 14–20 HVPs per save
where a cold Lanczos took 40–55 (26k-parameter MLP, gradient flow, saves 0.02 apart;
see `TopEigenvalues`). A carrying monitor is a pure pair
`init(w, problem) -> carry`, `step(carry, t, w, v, problem) -> (carry, value)`; the
drivers thread the carry through the saves in time order:

- `dyn.discrete.run` (and its stochastic branch) carries it in the loop over save points,
  beside the iterate (`save_records`).
- `simulate` cannot: diffrax's `SaveAt(fn=...)` is a function of one state and carries
  nothing from one save to the next, and a carry inside the solver state would be
  interpolated, rejected with failed steps and stepped by the solver. So the solve
  keeps the states at the save times (even with `save_params=False`: the memory of the
  parameters at every save, inside the compiled solve only), and after diffrax returns,
  one `jax.lax.scan` over them in time order evaluates the carrying monitors, then the
  final state (`scan_carries`), in the same compiled function: a second identical call
  reuses it.
"""

import abc
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._problem import Problem
from ._monitors import AbstractMonitor


class AbstractCarryingMonitor(AbstractMonitor):
    """A monitor whose value at a save may use what it computed at earlier saves.

    Subclasses implement `init` and `step`, both pure (traced inside the compiled run);
    the carry is a pytree of arrays of fixed shape and dtype (an `eqx.Module`). The
    drivers call `init` once at the initial state and then `step` at every save in time
    order, the final state last, and record `step`'s value under `name`, plus any
    `side_records` of the new carry (e.g. the cost of the save) under `side_names`.

    Saves the run did not reach (a `simulate` that stopped at an event) are skipped: the
    carry is left as it was and the records there are dropped. Under `jax.vmap` (a
    sweep, many paths) the skip is a select, so `step` runs there too on a non-finite
    state: one whose cost depends on its input should stop early on a non-finite `w`,
    as the spectrum monitors do.

    Called alone (`monitor(t, w, v, problem)`), it is `step(init(w, problem), ...)`'s
    value: the cold evaluation at one point.
    """

    @abc.abstractmethod
    def init(self, w: PyTree, problem: Problem) -> PyTree:
        """The carry before the first save (`w`: the initial dynamic parameters, for
        shapes and dtypes)."""

    @abc.abstractmethod
    def step(self, carry: PyTree, t, w: PyTree, v: PyTree | None,
             problem: Problem) -> tuple[PyTree, Array]:
        """(the new carry, the value recorded at this save)."""

    def side_names(self) -> tuple[str, ...]:
        """Names of the records besides `name` (default none)."""
        return ()

    def side_records(self, carry: PyTree) -> dict[str, Array]:
        """The records besides `name`, read off the carry after a step, keyed by
        `side_names` (default none)."""
        return {}

    def __call__(self, t, w, v, problem):
        return self.step(self.init(w, problem), t, w, v, problem)[1]


def record_names(monitor: AbstractMonitor) -> tuple[str, ...]:
    """Every record a monitor adds to a trajectory: its `name`, then its side records."""
    if isinstance(monitor, AbstractCarryingMonitor):
        return (monitor.name, *monitor.side_names())
    return (monitor.name,)


def all_record_names(monitors) -> list[str]:
    """`record_names` of every monitor, in order (for the uniqueness checks)."""
    return [name for m in monitors for name in record_names(m)]


def carrying(monitors) -> tuple[AbstractCarryingMonitor, ...]:
    return tuple(m for m in monitors if isinstance(m, AbstractCarryingMonitor))


def init_carries(monitors, w: PyTree, problem: Problem) -> dict[str, Any]:
    """The carries of the carrying monitors among `monitors`, by name."""
    return {m.name: m.init(w, problem) for m in carrying(monitors)}


def step_carries(monitors, carries: dict, t, w, v, problem: Problem) -> tuple[dict, dict]:
    """One save: (the new carries, the records of the carrying monitors by name)."""
    new, records = {}, {}
    for m in carrying(monitors):
        new[m.name], records[m.name] = m.step(carries[m.name], t, w, v, problem)
        side = m.side_records(new[m.name])
        if tuple(side) != m.side_names():
            raise TypeError(f"{type(m).__name__}: side_records gave {tuple(side)}, but "
                            f"side_names says {m.side_names()}.")
        records.update(side)
    return new, records


def save_records(monitors, carries: dict, t, w, v, problem: Problem,
                 value: Callable[[AbstractMonitor], Array]) -> tuple[dict, dict]:
    """One save of a loop that carries the carries itself (`dyn.discrete.run`): (the new
    carries, every monitor's records in the order of `monitors`), a carrying monitor's
    from `step_carries`, any other's `value(monitor)`."""
    carries, carried = step_carries(monitors, carries, t, w, v, problem)
    out = {}
    for m in monitors:
        if isinstance(m, AbstractCarryingMonitor):
            out.update({name: carried[name] for name in record_names(m)})
        else:
            out[m.name] = value(m)
    return carries, out


def scan_carries(monitors, carries: dict, ts: Array, ws: PyTree, vs: PyTree | None,
                 problem: Problem) -> tuple[dict, dict]:
    """`step_carries` at every save of a time axis (a leading axis on `ts`, `ws`, `vs`),
    in order: (the carries after the last, the records stacked on that axis). A save
    whose time is not finite (diffrax's mark of one the run never reached) leaves the
    carries as they were and records inf (0 for integer records); `lax.cond` spares
    its work, except under `jax.vmap` (see `AbstractCarryingMonitor`)."""

    def body(carries, x):
        t, w, v = x

        def run():
            return step_carries(monitors, carries, t, w, v, problem)

        def skip():
            shapes = jax.eval_shape(run)[1]
            return carries, jax.tree.map(
                lambda s: jnp.full(s.shape, jnp.inf if jnp.issubdtype(s.dtype, jnp.inexact)
                                   else 0, s.dtype), shapes)

        return jax.lax.cond(jnp.isfinite(t), run, skip)

    return jax.lax.scan(body, carries, (ts, ws, vs))
