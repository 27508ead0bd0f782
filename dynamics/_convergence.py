"""`convergence_order`: the observed order of a solver, with a confidence interval."""

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import numpy as np
from jaxtyping import PyTree, Scalar
from scipy import stats

from ._flows import AbstractFirstOrderFlow, AbstractFlow
from ._simulate import simulate

# The reference when none is given: Dopri8 this tight is ~1e-14 accurate on the smooth
# problems of the tests (its own errors plateau there), ten times below the default floor.
REFERENCE_TOLERANCE = 1e-13


@dataclasses.dataclass(frozen=True)
class ConvergenceOrder:
    """What `convergence_order` measured.

    - `order`: the fitted exponent p of e ≈ C dt^p (1 + d dt) over the points used.
    - `interval`: its `confidence` interval (Student t on the slope's standard error).
    - `dts`, `errors`: every step size tried and the final-state error (max norm).
    - `used`: which points entered the fit (the others lie at or below the floor).
    - `floor`: the error below which points were left out.
    """

    order: float
    interval: tuple[float, float]
    confidence: float
    dts: np.ndarray
    errors: np.ndarray
    used: np.ndarray
    floor: float

    def __contains__(self, order: float) -> bool:
        return self.interval[0] <= order <= self.interval[1]


def _final_state(traj, first_order: bool) -> np.ndarray:
    leaves = jax.tree.leaves(traj.final_params)
    if not first_order:
        leaves += jax.tree.leaves(traj.final_velocity)
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


def _fit(dts, errors, confidence):
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


def _asymptotic_range(errors: np.ndarray, floor: float, window: int) -> np.ndarray:
    """The points to fit, as a mask over dts ordered from largest to smallest: the
    `window` smallest steps above the floor over which the error keeps falling."""
    n = len(errors)
    finite = np.isfinite(errors)
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
) -> ConvergenceOrder:
    """The observed order of `solver` on `flow` from `params` over [t0, t1].

    Runs fixed steps dt = (t1 − t0)·2^−k (k = 3..14 unless `dts` is given, all in one
    compiled solve: `simulate` traces dt) and measures the final-state error e(dt),
    max norm over parameters (and velocities for second-order flows), against
    `reference`. The fit stops at the floating-point floor: the first error below
    `floor`, and any point before it that fell by less than √2 when dt halved
    (rounding, not truncation, decides there). From there it takes the `window`
    next-larger steps over which the error keeps falling (the smallest steps are the
    most asymptotic; an unstable or failed run ends the window). The order p is the
    coefficient of log dt in a least-squares fit of log e = log C + p log dt + d·dt
    (the power law and its first correction, which would otherwise bias p by more
    than the interval's width), with a Student-t `confidence` interval from its
    standard error (at least three points are needed; with three the plain power law
    is fitted).

    **Arguments:**

    - `flow`, `params`, `loss`, `t0`, `t1`, `v0`: as in `simulate`.
    - `solver`: a diffrax solver or one of `dyn.solvers`.
    - `dts`: the step sizes to try (default as above).
    - `reference`: a function t1 -> the exact final state (`params` for a first-order
      flow, `(params, velocity)` for a second-order one), e.g. a closed form; default
      `diffrax.Dopri8()` at rtol = atol = 1e-13.
    - `floor`: default 1e4·eps (≈2e-12 in float64) with a closed form, 100× the
      reference tolerance (1e-12) with Dopri8, both times max(1, ‖y(t1)‖∞).
    - `confidence`: of the interval, in (0, 1).
    - `window`: the most points fitted, at least 3.

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
    first_order = isinstance(flow, AbstractFirstOrderFlow)
    run = dict(t0=t0, t1=t1, v0=v0, save_params=False)
    if reference is None:
        ref_traj = simulate(flow, params, loss, solver=diffrax.Dopri8(), **run,
                            stepsize_controller=diffrax.PIDController(
                                rtol=REFERENCE_TOLERANCE, atol=REFERENCE_TOLERANCE))
        exact = _final_state(ref_traj, first_order)
        default_floor = 10 * REFERENCE_TOLERANCE
    else:
        exact = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(reference(t1))])
        default_floor = 1e4 * np.finfo(exact.dtype).eps
    scale = max(1.0, float(np.max(np.abs(exact))))
    floor = default_floor * scale if floor is None else float(floor)

    errors = []
    for dt in dts:
        traj = simulate(flow, params, loss, solver=solver, dt0=float(dt), throw=False,
                        stepsize_controller=diffrax.ConstantStepSize(), max_steps=None, **run)
        if not traj.success:  # e.g. unstable, or an implicit stage solve failed: no point
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

    used = _asymptotic_range(errors, floor, window)
    if used.sum() < 3:
        raise ValueError(
            f"only {int(used.sum())} step sizes lie above the floating-point floor "
            f"{floor:.1e} (errors {np.array2string(errors, precision=1)}); pass larger "
            "`dts`, a longer t1, or a lower `floor`."
        )
    order, interval = _fit(dts[used], errors[used], float(confidence))
    return ConvergenceOrder(order, interval, float(confidence), dts, errors, used, floor)
