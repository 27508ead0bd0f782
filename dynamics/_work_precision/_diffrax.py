"""Methods of `work_precision` that run through `simulate`: any diffrax solver (or one
of `dyn.solvers`), and a solver in a nonsmooth mode (`NonsmoothMethod`)."""

import diffrax
import jax
import numpy as np

from .._driver._hooks import AbstractNonsmooth
from .._flows import AbstractFirstOrderFlow
from .._simulate import simulate
from ._base import AbstractMethod, AbstractRunner, RunResult, WorkProblem, flat


def _controller(kind: str, value: float) -> dict:
    if kind == "tolerance":
        return dict(stepsize_controller=diffrax.PIDController(rtol=value, atol=value))
    return dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=value)


def _final(traj, first_order: bool) -> np.ndarray:
    return flat(traj.final_params if first_order
                else (traj.final_params, traj.final_velocity))


class _SimulateRunner(AbstractRunner):
    """`simulate` at each setting; a tolerance or step sweep compiles once, both being
    traced. Gradient evaluations are counted by a run of a loss that calls back on
    every evaluation, or (nonsmooth mode) as steps × new stages."""

    def __init__(self, problem: WorkProblem, solver, nonsmooth):
        p = problem
        self.first_order = isinstance(p.flow, AbstractFirstOrderFlow)
        self.problem, self.solver, self.nonsmooth = p, solver, nonsmooth
        self.run = dict(t0=p.t0, t1=p.t1, v0=p.v0, ts=p.ts, save_params=False,
                        max_steps=p.max_steps, nonsmooth=nonsmooth)
        self.calls: list = []

        def counted(params):
            jax.debug.callback(lambda: self.calls.append(1))
            return p.loss(params)

        self.counted = counted

    def __call__(self, kind, value, with_monitors):
        p = self.problem
        traj = simulate(p.flow, p.params, p.loss, solver=self.solver, throw=False,
                        **self.run, **_controller(kind, value),
                        monitors=p.monitors if with_monitors else ())
        values = ({m.name: np.asarray(traj.monitors[m.name]) for m in p.monitors}
                  if with_monitors else {})
        nfev = None
        if self.nonsmooth is not None:
            # The mode needs the loss itself (it reads the data), so no counting wrapper:
            # steps × new stages per step, the field evaluations of the steps (not those
            # of crossing root finds and multiplier solves; `wall_time` has all)
            nfev = int(traj.stats["num_steps"]) * new_stages(self.solver)
        return RunResult(_final(traj, self.first_order), values, traj.success, nfev)

    def count(self, kind, value):
        p = self.problem
        self.calls.clear()
        simulate(p.flow, p.params, self.counted, solver=self.solver, throw=False,
                 **self.run, **_controller(kind, value))
        return len(self.calls)


def new_stages(solver) -> int:
    """Field evaluations per step of an explicit Runge–Kutta solver (FSAL: one fewer)."""
    tableau = solver.tableau
    return len(tableau.c) + 1 - int(bool(getattr(tableau, "fsal", False)))


class DiffraxMethod(AbstractMethod):
    """A diffrax solver (or one of `dyn.solvers`) as a method: adaptive ones are swept
    over the tolerances with `PIDController(rtol=tol, atol=tol)`, the others over `dts`
    with fixed steps. `work_precision` wraps a bare solver in this."""

    solver: diffrax.AbstractSolver

    @property
    def adaptive(self) -> bool:
        return isinstance(self.solver, diffrax.AbstractAdaptiveSolver)

    def check(self, name, dts):
        if not self.adaptive and dts is None:
            raise ValueError(
                f"`methods[{name!r}]` has no error estimate and runs at fixed steps: "
                "pass `dts`, e.g. dts=[0.1, 0.05, 0.025]."
            )

    def settings(self, tolerances, dts):
        if self.adaptive:
            return super().settings(tolerances, dts)
        return [("dt", float(dt)) for dt in dts]

    def runner(self, problem):
        return _SimulateRunner(problem, self.solver, None)


class NonsmoothMethod(AbstractMethod):
    """A diffrax solver run in a piecewise-smooth mode, `simulate(..., nonsmooth=...)`, as
    a method of `work_precision` (swept over the tolerances): e.g.
    `NonsmoothMethod(diffrax.Dopri5(), dyn.Filippov())` on a ReLU network, where the
    plain solvers chatter on the kinks, so both enter one diagram."""

    solver: diffrax.AbstractERK
    nonsmooth: AbstractNonsmooth

    def __check_init__(self):
        # explicit Runge–Kutta: its cost is counted as steps × new stages (`new_stages`)
        if not (isinstance(self.solver, diffrax.AbstractERK)
                and isinstance(self.solver, diffrax.AbstractAdaptiveSolver)):
            raise ValueError(
                "NonsmoothMethod: `solver` must be an adaptive explicit Runge–Kutta solver "
                f"such as diffrax.Dopri5(); got {self.solver!r}."
            )
        if not isinstance(self.nonsmooth, AbstractNonsmooth):
            raise ValueError(
                "NonsmoothMethod: `nonsmooth` must be a nonsmooth mode such as "
                f"dyn.Filippov(), got {self.nonsmooth!r}."
            )

    def runner(self, problem):
        return _SimulateRunner(problem, self.solver, self.nonsmooth)
