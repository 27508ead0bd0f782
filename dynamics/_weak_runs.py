"""The runs behind `dyn.weak_gap` / `dyn.weak_order` (`dynamics/_weak.py` describes the
estimator): what the runs share (`Setup`), the checks of their inputs, one algorithm's
per-path values with its control variate (`estimates`), and the references: a
deterministic flow by `simulate`, an SME by SVAG Richardson extrapolation."""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._driver._prepare import validate_params
from ._flows import AbstractFirstOrderFlow, AbstractStochasticFlow
from ._problem import Problem
from ._sampling import check_batch_size
from ._simulate import simulate
from ._validate import as_tuple, positive_int, prng_key, real
from ._weak_cv import noise_vectors
from .discrete._checks import validate_v0
from .discrete._sgd import SGD, SVAG, AbstractStochasticAlgorithm
from .discrete._sgd_run import stochastic_paths
from .losses._per_example import as_data_loss, check_example_losses
from .monitors._monitors import AbstractMonitor

# Fewer paths cannot give a standard error worth a fit (or a bootstrap).
MIN_PATHS = 20


class Setup(eqx.Module):
    """What every run of a weak gap shares: the problem, the data, the start, the
    observables, the path keys and the common time grid."""

    loss: Callable
    data: object
    w0: PyTree
    v0: PyTree | None
    static: PyTree
    params: PyTree
    observables: tuple
    keys: jax.Array
    t1: float
    h_fine: float
    chunk: int


def check_observables(observables, problem, w0, t1) -> tuple:
    observables = as_tuple(observables, "observables", AbstractMonitor, "dyn.monitors.Loss()")
    names = [m.name for m in observables]
    if not observables or len(set(names)) != len(names):
        raise ValueError(f"`observables` must be one or more monitors with distinct names, "
                         f"got {names}.")
    for m in observables:
        out = jax.eval_shape(lambda w, m=m: m(t1, w, None, problem), w0)
        if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                f"`observables`: {m.name!r} gives shape {out.shape} per path; a weak gap "
                "needs one real scalar per path: reduce it, e.g. dyn.monitors.Function("
                "lambda t, p, v: jnp.sum(...), name='...')."
            )
    return observables


def whole_steps(alg, t1) -> int:
    dt = float(alg.time_step)
    steps = int(round(t1 / dt))
    if steps < 1 or abs(steps * dt - t1) > 1e-9 * t1:
        raise ValueError(f"`t1` = {t1} is not a whole number of steps Δt = {dt} "
                         f"({type(alg).__name__}); choose step sizes that divide it.")
    return steps


def grid_stride(dt: float, h_fine: float) -> int:
    ratio = dt / h_fine
    if abs(ratio - round(ratio)) > 1e-9 * ratio:
        raise ValueError(
            f"step sizes must nest for common random numbers: Δt = {dt} is not a whole "
            f"number of the common grid step {h_fine}; use halvings, e.g. 1/8, 1/16, 1/32.")
    return int(round(ratio))


def run_paths(setup: Setup, alg, u, v0=None):
    """(φ(w_K) − cv (paths, observables), diverged (paths,)) for `alg` to t1."""
    problem = Problem(alg.flow, setup.loss, setup.static)
    steps = whole_steps(alg, setup.t1)
    saved, _, diverged_at, cv = stochastic_paths(
        alg, problem, setup.data, setup.w0, v0, setup.keys, 1, steps,
        stride=grid_stride(float(alg.time_step), setup.h_fine), noise_vectors=u,
        monitors=setup.observables)
    phi = np.stack([saved["monitors"][m.name][:, -1] for m in setup.observables], -1)
    return phi - (0.0 if u is None else cv), diverged_at >= 0


def reference(setup: Setup, flow, u, cache, solve_kwargs):
    """Per-path reference estimates (or one row) for `flow`, and a description."""
    if isinstance(flow, AbstractStochasticFlow):
        levels = []
        for ell in (1, 2):
            svag = SVAG(flow.eta, flow.batch_size, ell, flow.order, flow.replacement,
                        flow.beta)
            key = ("svag", ell, flow.order, float(flow.eta), flow.batch_size,
                   flow.replacement, float(flow.beta))
            if key not in cache:
                cache[key] = run_paths(setup, svag, u)
            levels.append(cache[key])
        (x1, d1), (x2, d2) = levels
        return 2.0 * x2 - x1, d1 | d2, "SVAG Richardson 2X(ell=2) - X(ell=1)"
    if not isinstance(flow, AbstractFirstOrderFlow):
        raise ValueError(f"`flow` must be a first-order flow or dyn.SME, got "
                         f"{type(flow).__name__}.")
    key = ("flow", eqx.tree_pformat(flow, short_arrays=False))
    if key not in cache:
        ref = simulate(flow, setup.params, setup.loss, t1=setup.t1, ts=[0.0, setup.t1],
                       monitors=setup.observables, max_steps=1_000_000, **solve_kwargs)
        cache[key] = np.stack([ref.monitors[m.name][-1] for m in setup.observables])
    return cache[key][None, :], np.zeros(1, bool), f"{type(flow).__name__} by simulate"


def _reuses_sgd(alg, flow) -> bool:
    # SVAG with ℓ = 1 at order 1 is SGD itself: same batches, same update.
    return (isinstance(alg, SGD) and isinstance(flow, AbstractStochasticFlow)
            and flow.order == 1 and float(flow.beta) == 0.0
            and flow.batch_size == alg.batch_size and flow.replacement == alg.replacement
            and float(flow.eta) == float(alg.eta))


def estimates(setup, alg, flows: dict, control_variate, cache, solve_kwargs):
    """For one algorithm: its per-path values (φ − cv), whether each path diverged, and
    per reference name (per-path reference values, diverged, description)."""
    u = None
    if control_variate:
        rate = float(alg.skeleton_rate)
        if ("u", rate) not in cache:
            problem = Problem(alg.flow, setup.loss, setup.static)
            grid = int(round(setup.t1 / setup.h_fine))
            cache[("u", rate)] = noise_vectors(problem, setup.data, setup.w0,
                                               setup.observables, setup.t1, grid, rate)
        u = cache[("u", rate)]
    y, diverged = run_paths(setup, alg, u, setup.v0)
    refs = {}
    for name, flow in flows.items():
        if _reuses_sgd(alg, flow):
            key = ("svag", 1, 1, float(flow.eta), flow.batch_size, flow.replacement, 0.0)
            cache[key] = (y, diverged)
        ref, ref_diverged, how = reference(setup, flow, u, cache, solve_kwargs)
        if ref.shape[0] == 1:
            ref, ref_diverged = np.broadcast_to(ref, y.shape), np.zeros_like(diverged)
        refs[name] = (ref, ref_diverged, how)
    return y, diverged, refs


def setup_runs(alg, params, loss, t1, observables, paths, key, v0, chunk, lmax, min_dt):
    if not isinstance(alg, AbstractStochasticAlgorithm):
        raise ValueError(
            f"`algorithm` must give a stochastic algorithm such as dyn.discrete.SGD(eta, "
            f"16), got {alg!r}; for full-batch algorithms use dyn.gap / dyn.gap_order.")
    t1 = real(t1, "t1", low=0.0, strict=True)
    paths = positive_int(paths, "paths")
    if paths < MIN_PATHS:
        raise ValueError(f"`paths` = {paths} is too few for a standard error (and a "
                         f"bootstrap interval); use paths >= {MIN_PATHS}, ideally 1000s.")
    w0, static = validate_params(params)
    data = as_data_loss(loss, "weak_gap")
    check_example_losses(data, params, "weak_gap")
    check_batch_size(alg.batch_size, data.num_examples, type(alg).__name__)
    problem = Problem(alg.flow, loss, static)
    observables = check_observables(observables, problem, w0, t1)
    v = validate_v0(alg, w0, v0)
    keys = jax.random.split(prng_key(key, "weak_gap"), paths)
    return Setup(loss, data, w0, v, static, params, observables, keys, t1,
                 min_dt / lmax, positive_int(chunk, "chunk"))


def check_divergence(diverged, on_divergence, eta):
    if not diverged.any():
        return
    if on_divergence == "raise":
        raise ValueError(
            f"{int(diverged.sum())} of {diverged.size} paths diverged at step size {eta:g}: "
            "E[φ] is not defined there. Use smaller step sizes, or "
            "on_divergence='drop' to condition on the paths that stay finite (biased).")


def solve_options(rtol, atol, solver, nonsmooth):
    return dict(solver=diffrax.Tsit5() if solver is None else solver, nonsmooth=nonsmooth,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol))
