"""How a feature takes part in the compiled solve without the driver knowing it.

`simulate(..., nonsmooth=mode)` hands the solve a mode for piecewise-smooth fields
(`dyn.Filippov()`, in `dynamics/_filippov/`). The driver calls it at three points and
knows nothing else of it:

1. before tracing (`prepare`): `check` the run's arguments, add its `events`, and refuse
   monitor names it records itself (`record_names`);
2. while tracing (`solve`): `build` the traced part, an `AbstractSwitchedField`, which
   carries a discrete mode in the solver state, gives the field of the current mode,
   wraps the solver and controller (its switches are actions of `_actions`), records the
   mode at the saves, decides its own events, and re-derives the mode after an outside
   action (a projection) moved the state;
3. after the solve (`simulate`): `finish` the Trajectory (casts, messages, raising).
"""

import abc

import equinox as eqx
from jaxtyping import Array, PyTree

from ..events._events import AbstractEvent


class AbstractSwitchedField(eqx.Module):
    """The traced part of a nonsmooth mode: a field that depends on a discrete `mode`
    carried in the solver state next to (w, v), with zero derivative."""

    @abc.abstractmethod
    def init(self, t0, w0: PyTree, v0: PyTree | None) -> PyTree:
        """The mode at the start."""

    @abc.abstractmethod
    def rate(self, t, w: PyTree, v: PyTree | None, mode: PyTree, args) -> PyTree:
        """ẇ (first-order flows) or (ẇ, v̇) in `mode`; `args` are the solver step's
        (whatever the wrapped solver passes its terms)."""

    @abc.abstractmethod
    def wrap(self, solver, controller, unpack, pack, n_record: int, saves=None):
        """(solver, controller) that switch the mode inside the solve. `unpack(y)` gives
        (w, v, mode) of a state y, `pack(y, w, v, mode)` y with those three replaced
        (the rest of y kept); at most `n_record` switch times are kept. `saves`: the
        save times where the mode's solver is the outermost acting one (its steps
        may then be cut at crossings: `ActingSolver`), else None."""

    @abc.abstractmethod
    def record(self, mode: PyTree) -> dict[str, Array]:
        """Values recorded at every save, by name (`AbstractNonsmooth.record_names`)."""

    @abc.abstractmethod
    def stops(self, event: AbstractEvent, mode: PyTree) -> Array | None:
        """The condition of one of the mode's own events (`AbstractNonsmooth.events`)
        read from the mode, or None for any other event."""

    @abc.abstractmethod
    def reset(self, t, w: PyTree, v: PyTree | None, mode: PyTree) -> PyTree:
        """The mode after an outside action (a projection) moved the state to (w, v)
        from the state `mode` was right for."""


class AbstractNonsmooth(eqx.Module):
    """A mode for flows whose field is piecewise smooth: `simulate(..., nonsmooth=...)`.
    See the module docstring for when the driver calls each method."""

    @abc.abstractmethod
    def check(self, *, params, loss, solver, controller, monitors) -> None:
        """Raise a ValueError naming the argument that the mode cannot run with."""

    def events(self) -> tuple[AbstractEvent, ...]:
        """Events the mode adds to every run (e.g. one that stops a stalled run)."""
        return ()

    def record_names(self) -> tuple[str, ...]:
        """The names `AbstractSwitchedField.record` writes (no monitor may take them)."""
        return ()

    @abc.abstractmethod
    def build(self, problem, first_order: bool, w0: PyTree) -> AbstractSwitchedField:
        """The traced part, for this problem and initial (dynamic) parameters."""

    def finish(self, traj, *, throw: bool):
        """The Trajectory as the user gets it (the mode's records cast, a stall raised
        or reported)."""
        return traj
