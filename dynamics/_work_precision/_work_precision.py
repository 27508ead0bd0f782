"""`work_precision`: error against cost for methods × tolerances or fixed steps, in the
manner of DifferentialEquations.jl's work-precision diagrams."""

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree, Scalar

from .._convergence import REFERENCE_TOLERANCE
from .._filippov import Filippov
from .._flows import AbstractFirstOrderFlow, AbstractFlow
from .._problem import Problem
from .._simulate import simulate
from .._tree import partition
from ..monitors._monitors import AbstractMonitor

_SCIPY_METHODS = ("RK45", "DOP853", "LSODA", "RK23", "Radau", "BDF")


class ScipyMethod(eqx.Module):
    """`scipy.integrate.solve_ivp` with `method` (RK45, DOP853, LSODA, ...) as a method of
    `work_precision`: the flow's vector field is one jitted JAX function on the flat
    state, called from SciPy's Python loop (what a user of solve_ivp would write).
    Adaptive only: swept over the tolerances."""

    method: str = eqx.field(static=True)

    def __check_init__(self):
        if self.method not in _SCIPY_METHODS:
            raise ValueError(
                f"ScipyMethod: `method` must be one of {_SCIPY_METHODS}, got {self.method!r}."
            )


_TORCHDIFFEQ_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class TorchdiffeqMethod(eqx.Module):
    """`torchdiffeq.odeint` with an adaptive `method` (dopri5, dopri8, bosh3, fehlberg2,
    adaptive_heun) as a method of `work_precision`, swept over the tolerances.

    The state is the tuple of the flow state's array leaves (in `jax.tree.leaves`
    order) as float64 torch tensors, as a torchdiffeq user passes a model's parameters.
    `vector_field(t, state) -> tuple of tensors` is the right-hand side written in
    torch (e.g. `-torch.autograd.grad(loss, params)`); without it the flow's own JAX
    vector field is called through DLPack (no copies), which times torchdiffeq's
    stepping around the same evaluations `dynamics` makes. Needs torch and torchdiffeq
    (`pip install 'dynamics[bench]'`)."""

    method: str = eqx.field(static=True)
    vector_field: Callable | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.method not in _TORCHDIFFEQ_METHODS:
            raise ValueError(
                f"TorchdiffeqMethod: `method` must be one of {_TORCHDIFFEQ_METHODS} (the "
                f"adaptive ones), got {self.method!r}."
            )
        if self.vector_field is not None and not callable(self.vector_field):
            raise ValueError(
                "TorchdiffeqMethod: `vector_field` must be a function (t, state) -> tuple "
                f"of torch tensors, or None for the flow's own field; got {self.vector_field!r}."
            )


class NonsmoothMethod(eqx.Module):
    """A diffrax solver run in a piecewise-smooth mode, `simulate(..., nonsmooth=...)`, as
    a method of `work_precision` (swept over the tolerances): e.g.
    `NonsmoothMethod(diffrax.Dopri5(), dyn.Filippov())` on a ReLU network, where the
    plain solvers chatter on the kinks, so both enter one diagram."""

    solver: diffrax.AbstractERK
    nonsmooth: Filippov

    def __check_init__(self):
        # explicit Runge–Kutta: its cost is counted as steps × new stages (`_new_stages`)
        if not (isinstance(self.solver, diffrax.AbstractERK)
                and isinstance(self.solver, diffrax.AbstractAdaptiveSolver)):
            raise ValueError(
                "NonsmoothMethod: `solver` must be an adaptive explicit Runge–Kutta solver "
                f"such as diffrax.Dopri5(); got {self.solver!r}."
            )
        if not isinstance(self.nonsmooth, Filippov):
            raise ValueError(
                f"NonsmoothMethod: `nonsmooth` must be dyn.Filippov(...), got {self.nonsmooth!r}."
            )


def _flat_field(flow: AbstractFlow, problem: Problem, y0: PyTree):
    flat0, unravel = ravel_pytree(y0)
    first_order = isinstance(flow, AbstractFirstOrderFlow)

    @jax.jit
    def field(t, y):
        y = unravel(y)
        if first_order:
            return ravel_pytree(flow.vector_field(t, y, problem.loss))[0]
        w, v = y
        return ravel_pytree((v, flow.acceleration(t, w, v, problem.loss)))[0]

    return np.asarray(flat0), unravel, field


def _monitor_values(monitors, problem, flow, ts, states, unravel):
    out = {}
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    for m in monitors:
        values = []
        for t, y in zip(ts, states, strict=True):
            y = unravel(jnp.asarray(y))
            w, v = (y, None) if first_order else y
            values.append(np.asarray(m(t, w, v, problem)))
        out[m.name] = np.stack(values)
    return out


def _drift(values: np.ndarray) -> float:
    return float(np.max(np.abs(values - values[0])))


def _final(traj, first_order):
    tree = traj.final_params if first_order else (traj.final_params, traj.final_velocity)
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _count_evaluations(loss):
    calls = []

    def counted(params):
        jax.debug.callback(lambda: calls.append(1))
        return loss(params)

    return counted, calls


def work_precision(
    flow: AbstractFlow,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    methods: Mapping[str, Any],
    *,
    t1: float,
    t0: float = 0.0,
    v0: PyTree | None = None,
    tolerances: Sequence[float] = (1e-4, 1e-6, 1e-8, 1e-10),
    dts: Sequence[float] | None = None,
    reference: Callable[[float], Any] | None = None,
    monitors: Sequence[AbstractMonitor] = (),
    n_save: int = 11,
    repeats: int = 3,
    max_steps: int | None = None,
) -> xr.Dataset:
    """Error against cost for each method at each tolerance (or fixed step).

    **Arguments:**

    - `flow`, `params`, `loss`, `t0`, `t1`, `v0`: as in `simulate`.
    - `methods`: name -> a diffrax solver or one of `dyn.solvers` (adaptive ones are
      swept over `tolerances` with `PIDController(rtol=tol, atol=tol)`, the others
      over `dts` with fixed steps), `ScipyMethod("RK45" | "DOP853" | "LSODA")` or
      `TorchdiffeqMethod("dopri5" | "dopri8" | ...)` or
      `NonsmoothMethod(solver, dyn.Filippov())` (swept over `tolerances`).
    - `tolerances`: rtol = atol values, each > 0.
    - `dts`: fixed step sizes for solvers without an error estimate (required then).
    - `reference`: t1 -> exact final state (`params`, or `(params, velocity)` for a
      second-order flow); default Dopri8 at rtol = atol = 1e-13.
    - `monitors`: each gives a drift max_t |m(t) − m(t0)| over `n_save` save times,
      e.g. `Energy()` on Newtonian flow or `RescalingCharges()` on gradient flow.
    - `repeats`: timed runs per setting (after one compiling run at a method's first
      setting); the minimum is kept.
    - `max_steps`: a budget per run (None: unbounded). A diffrax run that uses it up, or
      an external one that evaluates the field more than 12 × `max_steps` times (12: a
      DOP853 step), has not finished: its `finished` is False, its error NaN, and it is
      not repeated. What a ReLU network needs: plain adaptive solvers chatter on its
      kinks at tight tolerances and would run for hours.

    **Returns:** an `xarray.Dataset` on dims (solver, setting), one `solver` per
    method, with `error` (max norm of the final state against the reference),
    `wall_time` (s, min over repeats),
    `grad_evals` (loss-gradient evaluations: counted in a separate run for diffrax
    solvers, by the external library's own count otherwise), `tolerance` or
    `dt` (NaN where the other applies), `finished`, `drift_<monitor>`, and per solver
    `compile_time` (s; first call minus the fastest: a tolerance or step sweep of a
    diffrax solver compiles once, as `simulate` traces both).
    """
    if not isinstance(flow, AbstractFlow):
        raise ValueError(
            f"`flow` must be a catalogue entry such as dyn.GradientFlow(), got {flow!r}."
        )
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("`methods` must be a non-empty mapping name -> solver or ScipyMethod.")
    tolerances = np.asarray(tolerances, dtype=float)
    if tolerances.ndim != 1 or tolerances.size == 0 or np.any(~(tolerances > 0)):
        raise ValueError(
            f"`tolerances` must be a non-empty list of numbers > 0, got {tolerances}."
        )
    if dts is not None:
        dts = np.asarray(dts, dtype=float)
        if dts.ndim != 1 or dts.size == 0 or np.any(~(dts > 0)):
            raise ValueError(f"`dts` must be a non-empty list of step sizes > 0, got {dts}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive int, got {repeats!r}.")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}.")
    for name, m in methods.items():
        if not isinstance(m, (diffrax.AbstractSolver, ScipyMethod, TorchdiffeqMethod,
                              NonsmoothMethod)):
            raise ValueError(
                f"`methods[{name!r}]` must be a diffrax solver, a dyn.solvers one, "
                f"dyn.ScipyMethod(...), dyn.TorchdiffeqMethod(...) or "
                f"dyn.NonsmoothMethod(...), got {m!r}."
            )
        if isinstance(m, TorchdiffeqMethod):
            try:
                import torch  # noqa: F401
                import torchdiffeq  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"`methods[{name!r}]` is a TorchdiffeqMethod but torch/torchdiffeq are "
                    "not installed; pip install 'dynamics[bench]' (a pinned CPU torch), or "
                    "leave that method out."
                ) from None
        if (isinstance(m, diffrax.AbstractSolver)
                and not isinstance(m, diffrax.AbstractAdaptiveSolver) and dts is None):
            raise ValueError(
                f"`methods[{name!r}]` has no error estimate and runs at fixed steps: "
                "pass `dts`, e.g. dts=[0.1, 0.05, 0.025]."
            )
    monitors = tuple(monitors)
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    ts = np.linspace(t0, t1, n_save)
    run = dict(t0=t0, t1=t1, v0=v0, ts=ts, save_params=False, max_steps=max_steps)

    if reference is None:
        exact = _final(simulate(flow, params, loss, solver=diffrax.Dopri8(),
                                **dict(run, max_steps=None),
                                stepsize_controller=diffrax.PIDController(
                                    rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE)),
                       first_order)
    else:
        exact = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(reference(t1))])

    n_settings = max(len(tolerances), 0 if dts is None else len(dts))
    shape = (len(methods), n_settings)
    data = {k: np.full(shape, np.nan) for k in ("error", "wall_time", "grad_evals",
                                                 "tolerance", "dt")}
    finished = np.zeros(shape, bool)
    drifts = {m.name: np.full(shape, np.nan) for m in monitors}
    compile_time = np.full(len(methods), np.nan)

    for i, (name, method) in enumerate(methods.items()):
        if isinstance(method, ScipyMethod | TorchdiffeqMethod):
            settings = [("tolerance", tol) for tol in tolerances]
            make = _scipy_runner if isinstance(method, ScipyMethod) else _torch_runner
            budget = None if max_steps is None else 12 * max_steps
            runner = make(flow, params, loss, v0, t0, t1, ts, monitors, method, budget)
        else:
            nonsmooth = None
            if isinstance(method, NonsmoothMethod):
                method, nonsmooth = method.solver, method.nonsmooth
            adaptive = isinstance(method, diffrax.AbstractAdaptiveSolver)
            settings = ([("tolerance", tol) for tol in tolerances] if adaptive
                        else [("dt", dt) for dt in dts])
            runner = _diffrax_runner(flow, params, loss, dict(run, nonsmooth=nonsmooth),
                                     monitors, method, first_order)
        for j, (kind, value) in enumerate(settings):
            if j == 0:
                # The first call compiles (diffrax: the solve, once for the whole sweep,
                # tolerances and step sizes being traced; scipy, torchdiffeq: the jitted
                # field); later settings reuse it, so only this one is warmed up.
                start = time.perf_counter()
                runner(kind, value, False)
                elapsed = time.perf_counter() - start
            # Timed runs compute the solution only: monitors, when asked for, and the
            # evaluation count of a diffrax solver come from separate runs, so neither
            # is charged to the method.
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = runner(kind, value, False)
                times.append(time.perf_counter() - start)
                if not out[2]:  # not finished (budget, failure): no point in repeating
                    break
            if j == 0:
                compile_time[i] = max(elapsed - min(times), 0.0)
            if monitors and out[2]:
                out = runner(kind, value, True)
            state, monitor_values, ok, nfev = out
            data[kind][i, j] = value
            finished[i, j] = ok
            data["wall_time"][i, j] = min(times)
            if not ok:
                nfev = np.nan  # the cost of a run that did not finish is not its cost
            elif nfev is None:
                nfev = runner.count(kind, value)
            data["grad_evals"][i, j] = nfev
            data["error"][i, j] = float(np.max(np.abs(state - exact))) if ok else np.nan
            for m in monitors:
                drifts[m.name][i, j] = _drift(monitor_values[m.name]) if ok else np.nan

    # "solver", not "method": ds.sel(method=...) is xarray's own `method` argument.
    dims = ("solver", "setting")
    variables = {k: (dims, v) for k, v in data.items()}
    variables.update({f"drift_{k}": (dims, v) for k, v in drifts.items()})
    variables["finished"] = (dims, finished)
    variables["compile_time"] = (("solver",), compile_time)
    return xr.Dataset(
        variables,
        coords={"solver": list(methods), "setting": np.arange(n_settings)},
        attrs=dict(flow=type(flow).__name__, t0=float(t0), t1=float(t1), repeats=repeats,
                   reference="Dopri8 rtol=atol=1e-13" if reference is None else "given"),
    )


class _Runner:
    """run(kind, value, with_monitors) -> (final state, monitor values, success, number of
    gradient evaluations or None); count(kind, value) -> evaluations by a counting run."""

    def __init__(self, run, count=None):
        self.run, self.count = run, count

    def __call__(self, kind, value, with_monitors):
        return self.run(kind, value, with_monitors)


def _new_stages(solver) -> int:
    """Field evaluations per step of an explicit Runge–Kutta solver (FSAL: one fewer)."""
    tableau = solver.tableau
    return len(tableau.c) + 1 - int(bool(getattr(tableau, "fsal", False)))


def _diffrax_runner(flow, params, loss, run, monitors, solver, first_order):
    counted, calls = _count_evaluations(loss)

    def settings(kind, value):
        if kind == "tolerance":
            return dict(stepsize_controller=diffrax.PIDController(rtol=value, atol=value))
        return dict(stepsize_controller=diffrax.ConstantStepSize(), dt0=value)

    def count(kind, value):
        calls.clear()
        simulate(flow, params, counted, solver=solver, throw=False, **run,
                 **settings(kind, value))
        return len(calls)

    def solve(kind, value, with_monitors):
        traj = simulate(flow, params, loss, solver=solver, throw=False, **run,
                        **settings(kind, value), monitors=monitors if with_monitors else ())
        values = {m.name: np.asarray(traj.monitors[m.name]) for m in monitors} \
            if with_monitors else {}
        nfev = None
        if run["nonsmooth"] is not None:
            # The mode needs the loss itself (it reads the data), so no counting wrapper:
            # steps × new stages per step, the field evaluations of the steps (not those
            # of crossing root finds and multiplier solves; `wall_time` has all)
            nfev = int(traj.stats["num_steps"]) * _new_stages(solver)
        return _final(traj, first_order), values, traj.success, nfev

    return _Runner(solve, count)


def _external_problem(flow, params, loss, v0):
    w, static = partition(params)
    problem = Problem(flow, loss, static)
    y0 = w if isinstance(flow, AbstractFirstOrderFlow) else (
        w, jax.tree.map(jnp.zeros_like, w) if v0 is None else partition(v0)[0])
    return problem, y0


class _OverBudget(Exception):
    pass


def _scipy_runner(flow, params, loss, v0, t0, t1, ts, monitors, method, budget=None):
    from scipy.integrate import solve_ivp

    problem, y0 = _external_problem(flow, params, loss, v0)
    flat0, unravel, field = _flat_field(flow, problem, y0)
    calls = [0]

    def rhs(t, y):
        calls[0] += 1
        if budget is not None and calls[0] > budget:
            raise _OverBudget  # solve_ivp has no step limit of its own
        return np.asarray(field(t, y))

    def solve(kind, tol, with_monitors):
        calls[0] = 0
        try:
            sol = solve_ivp(rhs, (t0, t1), flat0, method=method.method, rtol=tol, atol=tol,
                            t_eval=ts)
        except _OverBudget:
            return flat0 * np.nan, {}, False, calls[0]
        values = {}
        if with_monitors and sol.success:
            values = _monitor_values(monitors, problem, flow, sol.t, sol.y.T, unravel)
        return sol.y[:, -1], values, bool(sol.success), int(sol.nfev)

    return _Runner(solve)


def _torch_runner(flow, params, loss, v0, t0, t1, ts, monitors, method, budget=None):
    import torch
    import torchdiffeq

    problem, y0 = _external_problem(flow, params, loss, v0)
    flat0, unravel, field = _flat_field(flow, problem, y0)
    leaves = [np.asarray(x) for x in jax.tree.leaves(y0)]
    sizes = np.cumsum([x.size for x in leaves])[:-1]
    state0 = tuple(torch.tensor(x) for x in leaves)
    calls = [0]
    if method.vector_field is None:
        def vector_field(t, state):
            # DLPack both ways: torch tensors in, JAX's jitted field, torch tensors out.
            flat = jnp.concatenate([jnp.from_dlpack(x.contiguous()).ravel() for x in state])
            out = torch.from_dlpack(field(float(t), flat))
            return tuple(p.reshape(x.shape) for p, x in
                         zip(torch.tensor_split(out, tuple(sizes)), state, strict=True))
    else:
        vector_field = method.vector_field

    def counted(t, state):
        calls[0] += 1
        if budget is not None and calls[0] > budget:
            raise _OverBudget
        return vector_field(t, state)

    def solve(kind, tol, with_monitors):
        calls[0] = 0
        with torch.no_grad():
            try:
                out = torchdiffeq.odeint(counted, state0, torch.as_tensor(ts),
                                         method=method.method, rtol=tol, atol=tol)
                ok = all(bool(torch.isfinite(x).all()) for x in out)
            except (AssertionError, RuntimeError, _OverBudget):  # "underflow in dt"
                return flat0 * np.nan, {}, False, calls[0]
        flat = np.concatenate([x.reshape(len(ts), -1).numpy() for x in out], axis=1)
        values = {}
        if with_monitors and ok:
            values = _monitor_values(monitors, problem, flow, ts, flat, unravel)
        return flat[-1], values, ok, calls[0]

    return _Runner(solve)
