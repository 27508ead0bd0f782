"""The contracts between the stages of a run: what `prepare` hands the compiled solve
(`SolveSpec`), and what the solve hands back (`RawSolution`).

Named modules rather than tuples, so that `dyn.sweep` can replace a field by name
(`eqx.tree_at(lambda s: s.y0, spec, y0)`) and a reader of `solve` sees what each value
is. Both are pytrees: the sweep partitions a `SolveSpec` into its arrays (vmapped over
cells) and the rest (shared by the cells of one compiled group).
"""

from typing import Any

import diffrax
import equinox as eqx
import numpy as np
from jaxtyping import Array, PyTree

from .._problem import Problem
from .._projection import AbstractSchedule
from ._hooks import AbstractNonsmooth


class SolveSpec(eqx.Module):
    """Everything the compiled solve needs, validated by `prepare`.

    - `problem`: the flow and the loss, on the dynamic part of the params.
    - `y0`: the initial state, w or (w, v) (dynamic parts).
    - `solver`, `controller`: diffrax's (the controller's tolerances as arrays).
    - `t0`, `t1`, `dt0`, `ts`: times in the solve's dtype (`dt0` may be None).
    - `monitors`, `events`: tuples (`events`: the user's and those a nonsmooth mode
      adds; never `NonFinite`, which the controller's guard handles, `_guard`).
    - `schedule`: the projection and when it acts (`Every`, `OnEvent`), or None.
    - `nonsmooth`: a mode for piecewise-smooth fields (`dyn.Filippov()`), or None.
    - `save_params`, `max_steps`: as `simulate` takes them.
    - `key`: the Brownian motion's PRNG key for a stochastic flow (`dyn.SME`), else
      None; many paths replace it by name under `jax.vmap` (`_driver._paths`).
    """

    problem: Problem
    y0: PyTree
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    t0: Array
    t1: Array
    dt0: Array | None
    ts: Array
    monitors: tuple
    events: tuple
    schedule: AbstractSchedule | None
    nonsmooth: AbstractNonsmooth | None
    save_params: bool = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    key: Any = None


class Prepared(eqx.Module):
    """What `prepare` returns: the `spec` of the solve and the run's provenance
    (`meta`, netCDF-friendly attributes for the Trajectory)."""

    spec: SolveSpec
    meta: dict[str, Any]


class RawSolution(eqx.Module):
    """What the compiled solve returns, before `Trajectory.from_solve` reads it.

    - `ts`: the save times (inf where the run stopped before them); `t_end`: the time
      it stopped at (an array of one element, diffrax's `SubSaveAt(t1=True)`).
    - `saved`, `final`: {"monitors": {name: array}, "w", "v"} at the save times and at
      the end.
    - `result`, `event_mask`, `stats`: diffrax's.
    - `action_count`, `action_times`: how often the user's projection acted and the
      first of its times (None without a projection).
    - `switch_count`, `switch_times`: the same for a nonsmooth mode's switches (None
      without one): not user actions, kept apart from them.
    """

    ts: Array
    t_end: Array
    saved: dict
    final: dict
    result: Any
    event_mask: Any
    stats: dict
    action_count: Array | None = None
    action_times: Array | None = None
    switch_count: Array | None = None
    switch_times: Array | None = None

    def numpy(self) -> "RawSolution":
        """The same, every array as NumPy (one transfer from the device)."""
        import jax

        return jax.tree.map(np.asarray, self)
