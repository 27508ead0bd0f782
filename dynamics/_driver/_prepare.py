"""`simulate`'s input checks, and the `SolveSpec` they produce.

Everything here runs in Python before anything is traced, and fails with a
`ValueError` that names the argument and says how to fix it. `prepare` returns the
spec of the compiled solve (`_solve.solve`) and the run's provenance; `dyn.sweep` calls
it once per cell.
"""


import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PyTree

from .._flows import (
    AbstractFirstOrderFlow,
    AbstractFlow,
    NesterovFlow,
)
from .._problem import Problem
from .._projection import AbstractProjection, AbstractSchedule, Every, check_output
from .._trajectory import check_variable_name, provenance
from .._tree import is_concrete, partition
from .._validate import as_tuple, class_hint, positive_int, real
from ..events._events import AbstractEvent, Condition, NonFinite
from ..monitors._carrying import all_record_names
from ..monitors._monitors import AbstractIntegralMonitor, AbstractMonitor, Function
from ..solvers._base import AbstractFlowSolver
from ._hooks import AbstractNonsmooth
from ._noise import check_stochastic, stochastic_defaults
from ._solver_checks import check_solver
from ._spec import Prepared, SolveSpec
from ._terms import partitioned


def check_finite(name: str, tree: PyTree) -> None:
    if not is_concrete(tree):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if eqx.is_inexact_array(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            where = jax.tree_util.keystr(path) or "the array"
            raise ValueError(
                f"`{name}` contains NaN or Inf (at {where}); initialise it with finite values."
            )


def strong(tree: PyTree) -> PyTree:
    # `jnp.full(3, 2.0)` is weakly typed and `jnp.zeros(3)` is not: without this the
    # two would compile separately although they are the same problem. Leaves that are
    # strongly typed jax arrays already (most: jax.random's, a model's) are kept as
    # they are: `jnp.asarray` is a dispatch (~30 µs) per leaf.
    def strong(x):
        if isinstance(x, jax.Array) and not x.weak_type:
            return x
        return jnp.asarray(x, dtype=jnp.result_type(x))

    return jax.tree.map(strong, tree)


# One dispatch for all leaves: `jax.tree.map(jnp.zeros_like, w)` is one per leaf
# (~100 µs each, 0.4 ms for a 4-leaf MLP, measured, against ~15 µs jitted).
_zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree))


def _scalar(value: float, dtype) -> np.ndarray:
    # A NumPy 0-d array: traced by `eqx.filter_jit` exactly as a jax one (same shape and
    # dtype, so the same compiled solve) but built without a dispatch (0.5 µs, not 40).
    return np.asarray(value, dtype)


def validate_params(params: PyTree) -> tuple[PyTree, PyTree]:
    w, static = partition(params)
    w = strong(w)
    if not jax.tree.leaves(w):
        raise ValueError(
            "`params` holds no floating-point arrays to evolve; pass a model (e.g. "
            "dyn.MLP) or a pytree of float arrays."
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(w):
        if jnp.iscomplexobj(leaf):
            # jax.grad of a real loss in complex z returns the conjugate of ∂L/∂z̄·2, so
            # ẇ = −∇L would climb, not descend; rejected rather than silently wrong.
            where = jax.tree_util.keystr(path) or "the array"
            raise ValueError(
                f"`params` has a complex leaf (at {where}, dtype {leaf.dtype}); flows act "
                "on real parameters: split z into real and imaginary parts, e.g. "
                "{'re': z.real, 'im': z.imag}."
            )
    check_finite("params", w)
    return w, static


def _validate_velocity(flow: AbstractFlow, w: PyTree, v0: PyTree | None, t0: float):
    if isinstance(flow, AbstractFirstOrderFlow):
        if v0 is not None:
            raise ValueError(
                f"`v0` was given but {type(flow).__name__} is a first-order flow with no "
                "velocity; drop `v0` or use a second-order flow (e.g. dyn.NewtonianFlow())."
            )
        return None
    if v0 is None:
        v = _zeros_like(w)
    else:
        v, _ = partition(v0)
        w_struct = jax.tree.structure(w)
        if jax.tree.structure(v) != w_struct:
            raise ValueError(
                "`v0` must have the same structure as the parameters (e.g. a model of "
                "the same shape, or a pytree of arrays matching `params`)."
            )
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(v), strict=True):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"`v0` has a leaf of shape {jnp.shape(b)} where the parameters have "
                    f"shape {jnp.shape(a)}; give one velocity per parameter."
                )
        v = jax.tree.map(lambda a, b: jnp.asarray(b, dtype=a.dtype), w, v)
        check_finite("v0", v)
    if isinstance(flow, NesterovFlow):
        nonzero = is_concrete(v) and any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(v))
        if t0 < 0:
            raise ValueError(
                f"`t0` = {t0} < 0 for NesterovFlow: its damping r/t is singular at t = 0; "
                "start at t0 >= 0."
            )
        if t0 == 0 and nonzero:
            raise ValueError(
                "NesterovFlow started at t0 = 0 with a non-zero `v0`: the damping 3/t is "
                "singular there (Głuch & Urbanke footnote 2). Start at t0 > 0, or pass "
                "v0=None (zero velocity)."
            )
    return v


def _validate_ts(ts: ArrayLike | None, t0: float, t1: float, dtype=np.float64):
    # NumPy arrays throughout: the solve traces them as it would jax ones. Compared with
    # [t0, t1] in the solve's dtype, within a few ulps, and clipped there: in float32
    # jnp.linspace(0, 0.3, 4) ends at 0.30000001 (t1 = 0.3 rounded), which is t1.
    lo, hi = np.asarray(t0, dtype), np.asarray(t1, dtype)
    if ts is None:
        return np.asarray([lo, hi])
    arr = np.asarray(ts, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"`ts` must be a non-empty 1-D array of save times, got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("`ts` contains NaN or Inf.")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("`ts` must be strictly increasing; sort it (and drop repeats).")
    slack = 4 * np.finfo(dtype).eps * max(abs(t0), abs(t1))
    if arr[0] < t0 - slack or arr[-1] > t1 + slack:
        raise ValueError(
            f"`ts` must lie in [t0, t1] = [{t0}, {t1}], got [{arr[0]}, {arr[-1]}]."
        )
    out = np.clip(arr.astype(dtype), lo, hi)
    if np.any(np.diff(out) <= 0):
        raise ValueError(
            f"`ts` has save times that are distinct but equal in {np.dtype(dtype).name} "
            "(the solve's precision); space them further apart, or turn on float64 with "
            "jax.config.update('jax_enable_x64', True)."
        )
    return out


def save_bucket(n: int) -> int:
    """The length `ts` is padded to: n itself up to 8, above that the next m·2^e with
    m in 4..7 (10, 12, 14, 16, 20, 24, 28, 32, 40, ...). A solve compiles for the shape
    of `ts`, so without buckets 101 save times after 100 compiled again (37 s on a
    small Filippov net); with them nearby counts share one solve, at most 25% more save
    slots (never computed: see `pad_ts`)."""
    if n <= 8:
        return n
    e = n.bit_length() - 3  # n < 8·2^e
    return next(m << e for m in (4, 5, 6, 7, 8) if m << e >= n)


def pad_ts(ts: np.ndarray) -> np.ndarray:
    """`ts` padded with NaN to `save_bucket(len(ts))`. diffrax saves ts[i] once a step
    ends at or past it, which a NaN never satisfies: the padding is never saved, its
    slots stay at diffrax's inf, and `Trajectory.from_solve` keeps the finite ones."""
    return np.concatenate([ts, np.full(save_bucket(ts.size) - ts.size, np.nan, ts.dtype)])


def _validate_projection(projection, controller, dt0):
    if projection is None:
        return None
    if isinstance(projection, AbstractProjection):
        return Every(projection, steps=1)  # a bare projection: after every step
    if not isinstance(projection, AbstractSchedule):
        raise ValueError(
            "`projection` must be a projection (dyn.AbstractProjection, applied every "
            "step) or a schedule dyn.Every(proj, steps=k | time=dt) / "
            f"dyn.OnEvent(proj, event), got {projection!r}."
        )
    if isinstance(projection, Every) and projection.time is not None:
        adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        if not adaptive and dt0 is not None and float(dt0) > projection.time:
            raise ValueError(
                f"`projection` Every(time={projection.time}) is shorter than the constant "
                f"step dt0={dt0}: it would be late; use dt0 <= time (ideally time a "
                "multiple of dt0) or Every(steps=k)."
            )
    return projection


def _traced_tolerances(controller: diffrax.AbstractStepSizeController, dtype):
    # PIDController keeps rtol and atol as given; Python floats would be static under
    # jit, so every new tolerance would compile the solve again. As arrays they are
    # traced: a tolerance sweep (a work-precision diagram) compiles once. They enter
    # the controller only through arithmetic, never through Python control flow.
    def convert(c):
        if not isinstance(c, diffrax.PIDController):
            return c
        return eqx.tree_at(lambda c: (c.rtol, c.atol), c,
                           (_scalar(c.rtol, dtype), _scalar(c.atol, dtype)))

    return jax.tree.map(convert, controller,
                        is_leaf=lambda x: isinstance(x, diffrax.PIDController))


def _check_user_functions(problem: Problem, monitors, events, t0: float, w: PyTree,
                          v: PyTree | None) -> None:
    # A user's `Function` monitor or `Condition` event with the wrong signature or
    # output fails deep inside diffrax otherwise. Checked on shapes alone (eval_shape:
    # nothing runs) and on the user's function only, with a stand-in velocity, so the
    # loss is not traced here.
    checks = [(f"the monitor {m.name!r}", m.fn, False) for m in monitors
              if isinstance(m, Function)]
    checks += [(f"the event {e.name!r}", e.fn, True) for e in events
               if isinstance(e, Condition)]
    if not checks:
        return
    params = problem.params(w)
    velocity = problem.params(_zeros_like(w) if v is None else v)
    t = jnp.asarray(t0, jnp.result_type(float))
    for what, fn, scalar in checks:
        try:
            out = jax.eval_shape(fn, t, params, velocity)
        except Exception as exc:
            raise ValueError(
                f"{what}: its function must take (t, params, velocity) and return an "
                f"array; calling it failed with {type(exc).__name__}: {exc}"
            ) from exc
        ok_dtype = hasattr(out, "dtype") and (jnp.issubdtype(out.dtype, jnp.floating)
                                              or jnp.issubdtype(out.dtype, jnp.bool_)
                                              or (not scalar and jnp.issubdtype(
                                                  out.dtype, jnp.integer)))
        if not ok_dtype or (scalar and out.shape != ()):
            want = "a scalar float (or bool)" if scalar else "a real array"
            raise ValueError(
                f"{what}: its function must return {want}, got "
                f"{jax.tree.map(lambda x: (x.shape, x.dtype), out)!r}."
            )


def check_scalar_loss(problem: Problem, w) -> None:
    """A ValueError unless `problem.loss(w)` is a real scalar (on shapes alone)."""
    try:
        out = jax.eval_shape(problem.loss, w)
    except ValueError:  # already says what is wrong (e.g. an MLP given the wrong input)
        raise
    except Exception as exc:  # the user's loss failed on these params: say where
        raise ValueError(f"`loss` could not be evaluated on `params`: {exc}") from exc
    shape = getattr(out, "shape", None)
    if shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`loss` must return a real scalar, got shape {shape} and dtype "
            f"{getattr(out, 'dtype', type(out).__name__)}; reduce it, e.g. with jnp.mean."
        )


def prepare(flow, params, loss, *, t1, t0, v0, solver, dt0, stepsize_controller, ts,
            monitors, events, projection, max_steps, save_params,
            nonsmooth=None, key=None) -> Prepared:
    """`simulate`'s validation, apart from the solve: the `SolveSpec` of the compiled
    solve and the run's provenance. `dyn.sweep` calls it per cell and runs the solve under
    `jax.vmap` over the cells of one structure.

    **Raises:** `ValueError`, naming the argument and the fix, for anything the solve
    could not run or would run wrongly."""
    if not isinstance(flow, AbstractFlow):
        raise ValueError(
            f"`flow` must be a catalogue entry such as dyn.GradientFlow(), got "
            f"{flow!r}{class_hint(flow, AbstractFlow)}."
        )
    if not callable(loss):
        raise ValueError("`loss` must be a function params -> scalar.")
    t0, t1 = real(t0, "t0"), real(t1, "t1")
    if t1 <= t0:
        raise ValueError(f"`t1` = {t1} must be greater than `t0` = {t0}.")
    dtype = jnp.result_type(float)
    if not np.asarray(t1, dtype) > np.asarray(t0, dtype):
        # The solve runs in `dtype`: there the interval is empty, and diffrax would
        # report success having integrated nothing.
        raise ValueError(
            f"`t0` = {t0} and `t1` = {t1} are equal in {jnp.dtype(dtype).name}, the "
            "solve's precision: nothing would be integrated. Shift the time origin "
            "(t0 = 0), or turn on float64 with jax.config.update('jax_enable_x64', True)."
        )
    w0, static = validate_params(params)
    v0 = _validate_velocity(flow, w0, v0, t0)
    ts_given = ts
    ts = _validate_ts(ts, t0, t1, dtype)
    solver, stepsize_controller = stochastic_defaults(flow, solver, stepsize_controller)
    solver, stepsize_controller = check_solver(flow, solver, stepsize_controller, dtype)
    split = partitioned(solver)
    adaptive = isinstance(stepsize_controller, diffrax.AbstractAdaptiveStepSizeController)
    if isinstance(stepsize_controller, diffrax.StepTo):
        if dt0 is not None:
            raise ValueError(
                "`dt0` must be None with diffrax.StepTo: the steps are its `ts`; drop dt0."
            )
        steps = np.asarray(stepsize_controller.ts, dtype=float)
        if steps.ndim != 1 or steps.size < 2 or not np.allclose(steps[[0, -1]], [t0, t1]):
            raise ValueError(
                f"diffrax.StepTo(ts) must have ts[0] = t0 = {t0} and ts[-1] = t1 = {t1}, got "
                f"ts from {steps[:1]} to {steps[-1:]}; e.g. StepTo(jnp.linspace(t0, t1, n))."
            )
        # diffrax compares t0, t1 with ts[0], ts[-1] exactly; hand it the same numbers.
        t0, t1 = float(steps[0]), float(steps[-1])
        ts = _validate_ts(None if ts_given is None else ts_given, t0, t1, dtype)
    elif dt0 is None and not adaptive:
        raise ValueError("`dt0` is required with a constant step size; pass e.g. dt0=1e-2.")
    if dt0 is not None:
        # A plain float: provenance (netCDF attributes) must hold plain numbers.
        dt0 = real(dt0, "dt0", low=0.0, strict=True)
    if max_steps is not None:
        max_steps = positive_int(max_steps, "max_steps")
        # diffrax counts steps in JAX's default int (int32 unless float64 is on)
        limit = int(jnp.iinfo(jnp.result_type(int)).max) - 1
        if max_steps > limit:
            raise ValueError(
                f"`max_steps` = {max_steps} does not fit JAX's {jnp.dtype(jnp.result_type(int))}"
                f" step counter (at most {limit}); pass max_steps=None for no bound, or "
                "turn on 64-bit with jax.config.update('jax_enable_x64', True)."
            )
    if not isinstance(save_params, bool):
        raise ValueError(f"`save_params` must be True or False, got {save_params!r}.")
    monitors = as_tuple(monitors, "monitors", AbstractMonitor, "dyn.monitors.Loss()")
    events = as_tuple(events, "events", AbstractEvent, "dyn.events.LossBelow(1e-3)")
    names = all_record_names(monitors)  # with the records a carrying monitor adds
    if len(set(names)) != len(names):
        raise ValueError(f"`monitors` have repeated names {names}; give each a unique name.")
    for name in names:
        check_variable_name(name, "monitors")
    # Every run stops at a non-finite state through its controller's guard
    # (`_driver/_guard.py`), which reports the `NonFinite` event: as a diffrax event it
    # would only cost tracing.
    events = tuple(e for e in events if not isinstance(e, NonFinite))
    schedule = _validate_projection(projection, stepsize_controller, dt0)
    if schedule is not None:  # its output, on shapes alone (else a raw lax.cond error)
        check_output(schedule.projection, params,
                     None if v0 is None else eqx.combine(v0, static))
    own_terms = split or isinstance(solver, AbstractFlowSolver)
    if own_terms and any(isinstance(m, AbstractIntegralMonitor) for m in monitors):
        raise ValueError(
            f"integral monitors carry their integral in the state, which the "
            f"`solver` {type(solver).__name__} (a partitioned or flow-specific scheme) "
            "cannot; use a Runge–Kutta solver such as diffrax.Tsit5(), or drop the "
            "integral monitor."
        )

    key = check_stochastic(flow, key, params, loss, monitors, projection, nonsmooth)
    if nonsmooth is not None:
        nonsmooth = _validate_nonsmooth(nonsmooth, params, loss, solver,
                                        stepsize_controller, monitors)
        events = events + nonsmooth.events()
    problem = Problem(flow, loss, static)
    y0 = w0 if v0 is None else (w0, v0)
    _check_user_functions(problem, monitors, events, t0, w0, v0)
    spec = SolveSpec(
        problem=problem,
        y0=y0,
        solver=solver,
        controller=_traced_tolerances(stepsize_controller, dtype),
        t0=_scalar(t0, dtype),
        t1=_scalar(t1, dtype),
        dt0=None if dt0 is None else _scalar(dt0, dtype),
        ts=pad_ts(ts.astype(dtype)),
        monitors=monitors,
        events=events,
        schedule=schedule,
        nonsmooth=nonsmooth,
        save_params=save_params,
        max_steps=max_steps,
        key=key,
    )
    meta = provenance(flow, solver, stepsize_controller, t0=t0, t1=t1, dt0=dt0,
                      max_steps=max_steps,
                      projection=None if schedule is None
                      else eqx.tree_pformat(schedule, short_arrays=False),
                      nonsmooth=None if nonsmooth is None else repr(nonsmooth))
    return Prepared(spec, meta)


def _validate_nonsmooth(nonsmooth, params, loss, solver, controller, monitors):
    if not isinstance(nonsmooth, AbstractNonsmooth):
        raise ValueError(
            f"`nonsmooth` must be a nonsmooth mode such as dyn.Filippov() or None, got "
            f"{nonsmooth!r}{class_hint(nonsmooth, AbstractNonsmooth)}."
        )
    nonsmooth.check(params=params, loss=loss, solver=solver, controller=controller,
                    monitors=monitors)
    clash = [name for name in all_record_names(monitors)
             if name in nonsmooth.record_names()]
    if clash:
        raise ValueError(
            f"`monitors` {clash}: these names are the nonsmooth mode's own records "
            f"{nonsmooth.record_names()}; rename your monitor."
        )
    return nonsmooth
