"""`convergence_order`: the observed order of a solver, with a confidence interval."""

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import numpy as np
from jaxtyping import PyTree, Scalar
from scipy import stats

from ._flows import AbstractFirstOrderFlow, AbstractFlow
from ._progress import Progress
from ._simulate import simulate
from ._tree import partition
from ._validate import dtype_eps, positive_int

# The reference when none is given: Dopri8 this tight is ~1e-14 accurate on the smooth
# problems of the tests (its own errors plateau there), ten times below the default floor.
REFERENCE_TOLERANCE = 1e-13
# The widest confidence interval `convergence_order` reports as a measurement (one that
# tells the order p from p ± 1); a wider one is flagged (`reliable` False), with a warning.
MAX_INTERVAL_WIDTH = 2.0


def reference_tolerance(dtype: Any = None) -> float:
    """rtol = atol of a default Dopri8 reference: `REFERENCE_TOLERANCE` (1e-13) in
    float64; in float32, where 1e-13 cannot be met (the controller rejects every step
    for rounding it cannot remove), 100 eps (1.2e-5)."""
    return max(REFERENCE_TOLERANCE, 100 * dtype_eps(dtype))


def dopri8_reference(flow, params, loss, *, t0, t1, v0, max_steps: int | None,
                     owner: str, ts=None, rtol: float | None = None):
    """Dopri8 at `reference_tolerance()` (or `rtol`) from `params` to t1: the final
    state, flat. A run that does not reach t1 within `max_steps` (a badly scaled
    problem, or a tolerance the dtype cannot meet) is a ValueError saying what to pass
    instead of a wait without end."""
    tol = reference_tolerance() if rtol is None else rtol
    traj = simulate(flow, params, loss, solver=diffrax.Dopri8(), t0=t0, t1=t1, v0=v0,
                    save_params=False, max_steps=max_steps, throw=False,
                    **({} if ts is None else {"ts": ts}),
                    stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol))
    if not traj.success or traj.diverged:
        raise ValueError(
            f"{owner}: the default reference (Dopri8 at rtol = atol = {tol:g}) did not "
            f"reach t1 = {t1}: {traj.result} Pass `reference=` (a closed form, or a final "
            "state you computed), a shorter t1, or a larger `max_steps` "
            f"(now {max_steps})."
        )
    leaves = jax.tree.leaves(traj.final_params)
    if not isinstance(flow, AbstractFirstOrderFlow):
        leaves += jax.tree.leaves(traj.final_velocity)
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


@dataclasses.dataclass(frozen=True)
class ConvergenceOrder:
    """What `convergence_order` measured.

    - `order`: the fitted exponent p of e ≈ C dt^p (1 + d dt) over the points used.
    - `interval`: its `confidence` interval (Student t on the slope's standard error).
    - `dts`, `errors`: every step size tried and the final-state error (max norm).
    - `used`: which points entered the fit (the others lie at or below the floor, are
      unstable, or are not yet asymptotic).
    - `floor`: the error below which points were left out.
    - `reliable`: the interval is no wider than `max_width`; when False a warning said
      so, and `order` is no measurement.
    """

    order: float
    interval: tuple[float, float]
    confidence: float
    dts: np.ndarray
    errors: np.ndarray
    used: np.ndarray
    floor: float
    reliable: bool = True

    def __contains__(self, order: float) -> bool:
        return self.interval[0] <= order <= self.interval[1]


def _final_state(traj, first_order: bool) -> np.ndarray:
    leaves = jax.tree.leaves(traj.final_params)
    if not first_order:
        leaves += jax.tree.leaves(traj.final_velocity)
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


def fit_power_law(dts, errors, confidence: float = 0.95):
    """(p, (low, high)): the order p of e ≈ C dt^p (1 + d dt) by least squares on
    log e, with its Student-t `confidence` interval (three points or more)."""
    dts, errors = np.asarray(dts, float), np.asarray(errors, float)
    # log e = log C + p log dt + d·dt: the leading error term C dt^p and its first
    # correction (1 + d dt ≈ e^{d dt}). Without the correction the interval, a few
    # thousandths wide, excludes the nominal order because of the O(dt) bias alone.
    # With three points only the plain power law is fitted (one degree of freedom).
    x = np.log(dts)
    columns = [np.ones_like(x), x]
    if len(x) > 3:
        columns.append(dts / dts.max())
    design = np.stack(columns, axis=1)
    y = np.log(errors)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - design.shape[1]
    residual = y - design @ coef
    sigma2 = residual @ residual / dof
    stderr = float(np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[1, 1]))
    half = stats.t.ppf(0.5 + confidence / 2, dof) * stderr
    order = float(coef[1])
    return order, (float(order - half), float(order + half))


def asymptotic_range(errors: np.ndarray, floor: float, window: int,
                     ceiling: float = np.inf) -> np.ndarray:
    """The points to fit, as a mask over steps ordered from largest to smallest (or
    costs from smallest to largest): the `window` smallest steps above the floor over
    which the error keeps falling by √2 or more per halving. An error of `ceiling` or
    more (the size of the solution itself: an unstable step) ends the range, as a
    failed run does."""
    n = len(errors)
    finite = np.isfinite(errors) & (errors < ceiling)
    below = np.flatnonzero(finite & (errors < floor))
    end = int(below[0]) if below.size else n
    # A plateau just above the floor is rounding too: drop points that fell by < √2.
    while end >= 2 and finite[end - 2] and errors[end - 1] > errors[end - 2] / np.sqrt(2):
        end -= 1
    used = np.zeros(n, dtype=bool)
    j = end - 1
    while j >= 0 and finite[j] and used.sum() < window:
        if j < end - 1 and not errors[j] > np.sqrt(2) * errors[j + 1]:
            break  # a larger step that is no worse: unstable or pre-asymptotic
        used[j] = True
        j -= 1
    return used


def convergence_order(
    flow: AbstractFlow,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    *,
    solver: diffrax.AbstractSolver,
    t1: float,
    t0: float = 0.0,
    v0: PyTree | None = None,
    dts: Any = None,
    reference: Callable[[float], Any] | None = None,
    floor: float | None = None,
    confidence: float = 0.95,
    window: int = 5,
    max_width: float = MAX_INTERVAL_WIDTH,
    max_steps: int | None = 100_000,
    progress: bool = True,
) -> ConvergenceOrder:
    """The observed order of `solver` on `flow` from `params` over [t0, t1].

    Runs fixed steps dt = (t1 − t0)·2^−k (k = 3..14 unless `dts` is given, all in one
    compiled solve: `simulate` traces dt) and measures the final-state error e(dt),
    max norm over parameters (and velocities for second-order flows), against
    `reference`. Only the asymptotic regime is fitted. It ends below at the floor: the
    first error below `floor`, and any point before it that fell by less than √2 when
    dt halved (rounding, not truncation, decides there). From there it takes the
    `window` next-larger steps over which the error keeps falling by √2 or more per
    halving; an unstable step (an error as large as the solution itself), a failed run
    or a larger step that is no worse ends it. The order p is the coefficient of log dt
    in a least-squares fit of log e = log C + p log dt + d·dt (the power law and its
    first correction, which would otherwise bias p by more than the interval's width),
    with a Student-t `confidence` interval from its standard error (at least three
    points are needed, else a ValueError; with three the plain power law is fitted).
    An interval wider than `max_width` is no measurement: the result is flagged
    (`reliable` False) and a RuntimeWarning says so.

    **Arguments:**

    - `flow`, `params`, `loss`, `t0`, `t1`, `v0`: as in `simulate`.
    - `solver`: a diffrax solver or one of `dyn.solvers`.
    - `dts`: the step sizes to try (default as above).
    - `reference`: a function t1 -> the exact final state (`params` for a first-order
      flow, `(params, velocity)` for a second-order one), e.g. a closed form; default
      `diffrax.Dopri8()` at rtol = atol = 1e-13 (float32: 100 eps, ~1e-5), whose own
      error is estimated against a run at ten times that tolerance.
    - `floor`: default relative to the final state: 1e4·eps·‖y(t1)‖∞ (rounding) and,
      with the default reference, no lower than that reference's estimated error. (An
      absolute floor dropped every asymptotic point of a solution that decays to 1e-22.)
    - `confidence`: of the interval, in (0, 1).
    - `window`: the most points fitted, at least 3.
    - `max_width`: the widest interval reported as reliable (default 2.0: one that tells
      p from p ± 1).
    - `max_steps`: the step budget of every run (the reference's too): a fixed step that
      needs more is refused before anything runs, a reference that needs more is a
      ValueError instead of a wait without end.
    - `progress`: a line per quarter of the runs (a tqdm bar on a terminal).

    **Returns:** a `ConvergenceOrder`; `p in result` tests p against the interval.
    """
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"`solver` must be a diffrax solver or a dyn.solvers one, got {solver!r}.")
    if not 0 < float(confidence) < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 3:
        raise ValueError(f"`window` must be an int >= 3 (points fitted), got {window!r}.")
    if reference is not None and not callable(reference):
        raise ValueError("`reference` must be a function t1 -> final state, or None for Dopri8.")
    if not float(max_width) > 0:
        raise ValueError(f"`max_width` must be > 0 (the widest reliable interval), got "
                         f"{max_width!r}.")
    if max_steps is not None:
        max_steps = positive_int(max_steps, "max_steps", "convergence_order")
    span = float(t1) - float(t0)
    if not span > 0:
        raise ValueError(f"`t1` = {t1} must be greater than `t0` = {t0}.")
    dts = span * 2.0 ** -np.arange(3, 15) if dts is None else np.asarray(dts, dtype=float)
    if dts.ndim != 1 or dts.size < 3 or not np.all(np.isfinite(dts)) or np.any(dts <= 0):
        raise ValueError(
            f"`dts` must be at least three positive step sizes, got {dts!r}; e.g. "
            "(t1 - t0) * 2.0 ** -np.arange(3, 15)."
        )
    dts = np.sort(dts)[::-1]
    if max_steps is not None and span / dts[-1] > max_steps:
        raise ValueError(
            f"`dts`: the smallest step {dts[-1]:g} needs {span / dts[-1]:.0f} steps over "
            f"[t0, t1], more than `max_steps` = {max_steps}; pass larger `dts` or raise "
            "max_steps."
        )
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    run = dict(t0=t0, t1=t1, v0=v0, save_params=False)
    y0 = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(
        partition(params if first_order or v0 is None else (params, v0))[0])])
    bar = Progress(len(dts) + (2 if reference is None else 0), "convergence_order",
                   unit="runs", enabled=progress)
    with bar:
        if reference is None:
            tol = reference_tolerance()
            finals = []
            for rtol in (tol, 10 * tol):  # one compiled solve: the tolerance is traced
                finals.append(dopri8_reference(flow, params, loss, t0=t0, t1=t1, v0=v0,
                                               max_steps=max_steps, rtol=rtol,
                                               owner="convergence_order"))
                bar.update()
            exact = finals[0]
            # Its error is below the looser run's, which the difference measures.
            reference_error = float(np.max(np.abs(finals[0] - finals[1])))
        else:
            exact = np.concatenate([np.ravel(np.asarray(x))
                                    for x in jax.tree.leaves(reference(t1))])
            reference_error = 0.0
        size = float(np.max(np.abs(exact))) if exact.size else 0.0
        rounding = 1e4 * np.finfo(exact.dtype).eps * size
        floor = max(rounding, reference_error) if floor is None else float(floor)
        # An error as large as the solution (its start or its end) is no truncation
        # error: an unstable step.
        ceiling = max(size, float(np.max(np.abs(y0))) if y0.size else 0.0)
        ceiling = ceiling if ceiling > 0 else np.inf

        errors = []
        for dt in dts:
            traj = simulate(flow, params, loss, solver=solver, dt0=float(dt), throw=False,
                            stepsize_controller=diffrax.ConstantStepSize(), max_steps=None,
                            **run)
            bar.update()
            if not traj.success or traj.diverged:  # unstable, or a stage solve failed
                errors.append(np.nan)
                continue
            state = _final_state(traj, first_order)
            if state.shape != exact.shape:
                raise ValueError(
                    f"`reference` returned {exact.size} numbers where the state has "
                    f"{state.size}; return params (first-order) or (params, velocity)."
                )
            errors.append(float(np.max(np.abs(state - exact))))
    errors = np.asarray(errors)

    used = asymptotic_range(errors, floor, window, ceiling)
    if used.sum() < 3:
        raise ValueError(
            f"only {int(used.sum())} step sizes lie in the asymptotic regime: above the "
            f"floor {floor:.1e}"
            + (f" (the default reference's own error, ~{reference_error:.1e})"
               if reference_error >= rounding and reference_error > 0 else "")
            + f", below the size of the solution ({ceiling:.1e}) and falling as dt halves "
            f"(errors {np.array2string(errors, precision=1)}); pass other `dts` (smaller, "
            "where larger ones are unstable), a closed-form `reference`, a longer t1, or a "
            "lower `floor`."
        )
    order, interval = fit_power_law(dts[used], errors[used], float(confidence))
    reliable = bool(interval[1] - interval[0] <= float(max_width))
    if not reliable:
        warnings.warn(
            f"convergence_order: the fitted order {order:.3g} has the {confidence:.0%} "
            f"interval [{interval[0]:.3g}, {interval[1]:.3g}], wider than max_width = "
            f"{max_width:g}: no measurement (flagged reliable=False). {int(used.sum())} "
            "points were fitted; more step sizes in the asymptotic regime (e.g. spaced "
            "by √2 rather than 2, above the floor) narrow it.",
            RuntimeWarning, stacklevel=2)
    return ConvergenceOrder(order, interval, float(confidence), dts, errors, used, floor,
                            reliable)

