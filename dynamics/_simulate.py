"""`simulate`: the one entry point that drives diffrax.

It joins the rooms: a flow from the catalogue, a model and a loss, a diffrax solver and
step-size controller, monitors evaluated inside the solve, events, a projection applied
inside the solve, and a nonsmooth mode. Validation happens in `_driver._prepare`, in
Python, before anything is traced; the solve itself (`_driver._solve`) is one
`eqx.filter_jit`-compiled function, so a second call with the same flow, loss, solver
and shapes reuses the compiled code (studies and sweeps depend on it).
"""

from collections.abc import Callable, Sequence

import diffrax
from jaxtyping import ArrayLike, PRNGKeyArray, PyTree, Scalar

from ._driver._hooks import AbstractNonsmooth
from ._driver._paths import solve_paths
from ._driver._prepare import prepare
from ._driver._solve import solve
from ._filippov import warn_if_chattering
from ._flows import AbstractFlow
from ._paths import Paths, paths_from_solves
from ._progress import SolveMeter
from ._projection import AbstractProjection, AbstractSchedule
from ._trajectory import Trajectory
from ._validate import prng_keys
from .events._events import AbstractDivergenceEvent, AbstractEvent
from .losses._per_example import as_data_loss
from .monitors._monitors import AbstractMonitor


def simulate(
    flow: AbstractFlow,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    *,
    t1: float,
    t0: float = 0.0,
    v0: PyTree | None = None,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    ts: ArrayLike | None = None,
    monitors: AbstractMonitor | Sequence[AbstractMonitor] = (),
    events: AbstractEvent | Sequence[AbstractEvent] = (),
    projection: AbstractProjection | AbstractSchedule | None = None,
    nonsmooth: AbstractNonsmooth | None = None,
    progress: bool = False,
    max_steps: int | None = 100_000,
    throw: bool = True,
    save_params: bool = True,
    key: PRNGKeyArray | None = None,
) -> "Trajectory | Paths":
    """Integrate `flow` from `params` under `loss` on [t0, t1] and record a Trajectory.

    **Arguments:**

    - `flow`: a catalogue entry, e.g. `dyn.GradientFlow()`, `dyn.NesterovFlow()`.
    - `params`: the initial parameters, any pytree (an Equinox model, a plain array).
      Its inexact arrays evolve; everything else is held fixed.
    - `loss`: a function params -> scalar.
    - `t0`, `t1`: the time interval, t1 > t0.
    - `v0`: the initial velocity for second-order flows (default zero), same structure
      as `params`.
    - `solver`: any diffrax solver (default `diffrax.Tsit5()`); partitioned solvers
      such as `diffrax.SemiImplicitEuler()` need a separable flow (`NewtonianFlow`).
      Tsit5 is the default because at equal final-state error it needs no more gradient
      evaluations than Dopri5 on a smooth network (GF on a Tanh digits MLP: 34, 49, 88
      against 38, 57, 92 for errors 1e-4, 1e-6, 1e-8; benchmarks/bench_equal_accuracy.py).
      On ReLU networks it takes ~2.5x Dopri5's steps at equal rtol (its larger error
      weights react to the kinks), so pass `diffrax.Dopri5()` there; measured against an
      exact reference (the Filippov mode; ReLU 64-16-10 on 256 digits, integrators study)
      every plain method falls to first order and none gets below ~1e-5 within 5,000
      steps, so for tighter accuracy pass `nonsmooth=dyn.Filippov()` (rounding level at
      every tolerance there).
      `diffrax.Euler()` on a first-order flow with the `Loss` monitor (or one that reads
      ẇ, such as the symmetry residuals) runs as `LossCarryingEuler`: the same steps,
      with L(w) and ẇ at a save on a step end taken from that step's `value_and_grad`
      instead of a second forward pass or gradient.
    - `dt0`, `stepsize_controller`: as in `diffrax.diffeqsolve` (default an adaptive
      `PIDController(rtol=1e-7, atol=1e-9)`, in float32 `rtol=1e-5, atol=1e-7`; fixed
      steps need `diffrax.ConstantStepSize()` and `dt0`, `diffrax.StepTo(ts)` steps to
      the given times, from t0 to t1, and takes no `dt0`). A `PIDController`'s rtol and
      atol are passed as arrays, so runs that differ only in tolerance share one
      compiled solve; an rtol below the dtype's resolution warns.
      Tight tolerances (conservation checks to ~1e-10) need float64
      (`jax.config.update("jax_enable_x64", True)`); everything runs in float32.
    - `ts`: save times in [t0, t1], strictly increasing (default [t0, t1]); compared with
      [t0, t1] in the solve's dtype (float32: within 4 ulps, then clipped). Their number
      is padded to a bucket (10, 12, 14, 16, 20, 24, ...: at most 25% more, never
      computed), so that nearby counts share one compiled solve.
    - `monitors`: quantities recorded at `ts`, computed inside the solve: one monitor
      or a sequence; names must be unique, and not "time" or "param_…"/"velocity_…"
      (those name the parameters in `to_xarray`). A carrying monitor
      (`dyn.monitors.AbstractCarryingMonitor`, e.g. the warm-started `TopEigenvalues`
      and `Sharpness`) is evaluated after the solve, in the same compiled function, by
      one scan over the states at the save times in time order; its extra records
      (`<name>_hvps`) count among the names.
    - `events`: stopping conditions (`dyn.events.*`), one or a sequence; a non-finite
      state always stops.
    - `projection`: an action applied inside the solve, after which the solve goes on
      from the new state: `dyn.Every(proj, steps=k)` (after every k-th accepted step),
      `dyn.Every(proj, time=Δt)` (at t0 + jΔt; an adaptive controller is made to step
      there exactly, a constant step size acts at the step end nearest to it), or
      `dyn.OnEvent(proj, event)` (at the end of the step in which the event's
      condition crosses zero, or turns True). A bare `AbstractProjection` means every
      step. The solver restarts from the projected state (an FSAL solver re-evaluates
      its derivative there); a save at an action time records the state after the
      action. `Trajectory.actions` holds the action times. With `nonsmooth` the mode is
      derived again from the projected state. With an adaptive controller
      a real event condition is acted on where it crosses zero (root-found on the
      dense output; the step is retried to end there); a boolean one, or constant
      steps, act at the end of the step.
    - `nonsmooth`: `dyn.Filippov()` integrates a flow on a ReLU / LeakyReLU `dyn.MLP`
      exactly through its kinks: the activation pattern is frozen between crossings
      (so the solver keeps its order), crossings are root-found and the solve restarts
      there, and pairs whose two sides both push into the surface slide along it.
      It adds the monitors `crossings`, `sliding_entries`, `sliding_exits`,
      `sliding_overflow` and `sliding_pairs`, and its switch times on
      `Trajectory.switches` (not actions); float64 only. Without it, a run on such a network that
      rejects more than a third of its steps warns (the solver is chattering at kinks).
    - `progress`: show progress over [t0, t1]: a tqdm bar on a terminal, a line at each
      quarter elsewhere (a pipe, a log file); a run that stops short of t1 says where.
    - `max_steps`, `throw`: as in diffrax, but `max_steps` defaults to 100 000: flows
      on ReLU networks cross kinks all the time and need more than diffrax's 4096, and
      only save times are stored, so the bound costs no memory. With `throw=True` a
      failed solve (other than an event) raises `RuntimeError`; with `throw=False` it is
      reported on the result. An adaptive controller is bounded besides: a vector
      field that is not finite (every step rejected with a NaN error estimate, down to
      a step of 100 eps of the time span) stops the run as the `non_finite` event,
      flagged `diverged`;
      100 rejections in a row of any kind end the solve with a message that says what
      to pass (e.g. a smaller `dt0` when no step was accepted at all).
    - `save_params`: also store params (and velocities) at every save time; set False
      to keep memory proportional to the monitors only. With a carrying monitor the
      solve keeps the states at the save times anyway (it scans them), so the memory of
      the parameters at every save is needed during the solve even then; they are
      dropped before the result comes back.
    - `key`: for a stochastic flow (`dyn.SME`) only, where it is required: the PRNG key
      of the Brownian motion (an int seed is accepted), or a batch of keys
      (`jax.random.split(key, m)`) for m independent paths, solved under `jax.vmap`
      in one compiled solve, in chunks of at least 250 paths (more for small problems,
      `_driver/_paths.py`). A stochastic flow defaults to
      `diffrax.Euler()` (Euler–Maruyama, the Itô scheme) at constant steps
      (`diffrax.ConstantStepSize()`, so `dt0` is required); each step draws an
      independent normal increment from the key and the step's end times
      (`diffrax.UnsafeBrownianPath`), so a solve is reproducible for a given key and
      step grid, and cannot be differentiated. Put the save times `ts` on step ends
      (between them diffrax interpolates linearly, which is not the SDE's law).

    **Returns:** a `Trajectory`; for a batch of keys, a `dyn.Paths` (the same fields
    with a leading path axis, and per-path `diverged` flags: a path that goes
    non-finite stops there and the others are kept).

    **Raises:** `ValueError` for invalid input, naming the argument; `RuntimeError`
    for a failed solve when `throw` is True.
    """
    if not isinstance(throw, bool):
        raise ValueError(f"`throw` must be True or False, got {throw!r}.")
    if not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True or False, got {progress!r}.")
    keys, batched = (None, False) if key is None else prng_keys(key, "simulate")
    prepared = prepare(
        flow, params, loss, t1=t1, t0=t0, v0=v0, solver=solver, dt0=dt0,
        stepsize_controller=stepsize_controller, ts=ts, monitors=monitors, events=events,
        projection=projection, nonsmooth=nonsmooth, max_steps=max_steps,
        save_params=save_params, key=keys[0] if batched else keys,
    )
    spec = prepared.spec
    if batched:
        examples = as_data_loss(loss, "simulate").num_examples
        return paths_from_solves(spec.problem, spec.events,
                                 solve_paths(spec, keys, examples), spec.ts,
                                 throw=throw, meta=prepared.meta,
                                 divergence=AbstractDivergenceEvent)
    meter = SolveMeter() if progress else diffrax.NoProgressMeter()
    traj = Trajectory.from_solve(spec.problem, spec.events, solve(spec, meter), throw=throw,
                                 meta=prepared.meta, divergence=AbstractDivergenceEvent)
    if spec.nonsmooth is None:
        warn_if_chattering(traj, params)
    else:
        traj = spec.nonsmooth.finish(traj, throw=throw)
    return traj.with_monitor_coords(spec.monitors, params)
