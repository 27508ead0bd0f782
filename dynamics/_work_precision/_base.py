"""What every method of `work_precision` provides: its settings and a runner.

A method (a diffrax solver, `NonsmoothMethod`, `ScipyMethod`, `TorchdiffeqMethod`) says
which settings it is swept over (tolerances, or fixed steps for a solver without an
error estimate) and makes a runner for one problem; the runner solves the problem at
one setting and reports the final state, the monitors, whether it finished and what
it cost. `work_precision` only loops over methods and settings and times the runs.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


class WorkProblem(eqx.Module):
    """The problem every method of one diagram solves: `simulate`'s arguments, the save
    times `ts` of the monitors, and the step budget `max_steps` (None: unbounded)."""

    flow: Any
    params: PyTree
    loss: Callable
    v0: PyTree | None
    t0: float
    t1: float
    ts: np.ndarray
    monitors: tuple
    max_steps: int | None


class RunResult(eqx.Module):
    """One run: the final state (flat), the monitors at `ts` ({name: values}, empty when
    not asked for), whether it `finished` (reached t1 within its budget), and the number
    of gradient evaluations when the library counts them itself (else None)."""

    state: np.ndarray
    monitors: dict
    finished: bool
    grad_evals: int | None


class AbstractRunner:
    """`runner(kind, value, with_monitors) -> RunResult` at the setting `kind` =
    "tolerance" or "dt" with that value; `count(kind, value)`: the gradient evaluations
    of that run, by a counting run (only called when the result's count is None)."""

    @abc.abstractmethod
    def __call__(self, kind: str, value: float, with_monitors: bool) -> RunResult:
        ...

    def count(self, kind: str, value: float) -> int:
        raise NotImplementedError


class AbstractMethod(eqx.Module):
    """A method of `work_precision`."""

    def check(self, name: str, dts) -> None:
        """A ValueError naming `methods[name]` if the method cannot run in this diagram
        (a missing optional dependency, fixed steps without `dts`)."""

    def settings(self, tolerances, dts) -> list[tuple[str, float]]:
        """[(kind, value)] the method is swept over; by default the tolerances."""
        return [("tolerance", float(tol)) for tol in tolerances]

    @abc.abstractmethod
    def runner(self, problem: WorkProblem) -> AbstractRunner:
        """A runner for `problem`; it may compile on its first call."""


def flat(tree: PyTree) -> np.ndarray:
    """The leaves of `tree` as one flat NumPy vector."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
