"""Weak gaps: how far minibatch SGD's *expectations* stray from a flow's, and the order.

`gap` measures a full-batch run's distance to its flow path by path; SGD's iterates are
random, and its continuous models (the SMEs of Li, Tai & E, JMLR 2019) match it in law,
so the gap is e(η) = E φ(w_K) − E φ(W(t1)) for observables φ (the loss, a charge, a
norm) at a fixed flow time t1 = Kη, estimated over M paths: `weak_gap` at one step
size, `weak_order` over several with the fitted order (`_weak_fit`). Predicted: SGD is
O(η) from gradient flow and from SME-1, O(η²) from SME-2.

The estimate per path, with its variance reduction (each exactly unbiased):

- a control variate: φ(w_K) − cv, cv the first-order response of φ to the path's own
  minibatch noise along gradient flow (`_weak_cv`), which removes the O(√η)
  fluctuation and leaves O(η);
- against a deterministic flow (GF, `ModifiedGradientFlow`): its φ(w(t1)) from
  `simulate` at a tight tolerance (`nonsmooth=dyn.Filippov()` for ReLU nets);
- against an SME: Richardson extrapolation 2X₂ − X₁ of SVAG with ℓ = 1, 2
  (`dyn.discrete.SVAG`, step η/ℓ), an O(η²) reference at a cost independent of the
  data size (Euler–Maruyama of `dyn.SME` gives the same law but costs a full-batch
  pass per step); SVAG ℓ = 1 of order 1 is SGD itself and is not run twice;
- common random numbers: every run draws the batch of its step at time t from the same
  key and time index on a common grid of step h_fine (`Minibatches`), so SGD and its
  reference, and all step sizes, share batches where their grids meet. The estimates
  at different η are then correlated: the fit's interval is a paired bootstrap.
"""

import warnings
from collections.abc import Callable, Sequence

import diffrax
import numpy as np
import xarray as xr
from jaxtyping import PyTree, Scalar

from ._filippov import Filippov
from ._flows import AbstractFlow, AbstractStochasticFlow
from ._problem import Problem
from ._validate import one_of, positive_int, real
from ._weak_fit import fit_weak_order
from ._weak_runs import (
    MIN_PATHS,
    check_divergence,
    estimates,
    grid_stride,
    setup_runs,
    solve_options,
    whole_steps,
)
from .discrete._checks import edge_of_stability
from .discrete._sgd import AbstractStochasticAlgorithm
from .monitors._monitors import AbstractMonitor, Loss


def weak_gap(
    algorithm: AbstractStochasticAlgorithm,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    t1: float,
    *,
    flow: AbstractFlow | None = None,
    observables: AbstractMonitor | Sequence[AbstractMonitor] = (Loss(),),
    paths: int = 1000,
    key=0,
    v0: PyTree | None = None,
    control_variate: bool = True,
    on_divergence: str = "raise",
    chunk: int = 250,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    solver: diffrax.AbstractSolver | None = None,
    nonsmooth: Filippov | None = None,
    check_stability: bool = True,
) -> xr.Dataset:
    """The weak gap e = E φ(w_K) − E φ(W(t1)) of a stochastic algorithm at flow time
    t1 = K·Δt against `flow`, over `paths` paths (module docstring).

    **Arguments:**

    - `algorithm`: e.g. `dyn.discrete.SGD(0.1, 16)`.
    - `params`, `loss`: the start and the loss (exposing its examples:
      `dyn.losses.AbstractDataLoss`, or one plus `l2`/`lp`).
    - `t1`: the flow time, a whole number of steps.
    - `flow`: `algorithm.flow` (its SME-1) by default; `dyn.SME(eta, b, order=2)`, or
      a deterministic first-order flow (`dyn.GradientFlow()`,
      `dyn.ModifiedGradientFlow(eta)`); or a dict name -> flow, to measure against
      several references from the same SGD paths (the result then has an `against`
      axis).
    - `observables`: monitors giving one real scalar per path (default the loss), e.g.
      `dyn.monitors.Function(lambda t, p, v: jnp.sum(p.weights[0] ** 2), name="n")`.
    - `paths`, `key`: the number of paths (>= 20) and the key they split from.
    - `v0`: initial velocity for momentum SGD (default at rest).
    - `control_variate`: subtract the linear response to the minibatch noise (exactly
      unbiased; off only to measure what it gains).
    - `on_divergence`: "raise" (default) if any path of any run goes non-finite, or
      "drop" to keep the paths that stay finite in every run (conditioning on survival:
      a biased estimate, reported in `attrs["dropped_paths"]`).
    - `chunk`: paths per vmapped batch.
    - `rtol`, `atol`, `solver`, `nonsmooth`: a deterministic flow's solve, as in `gap`.
    - `check_stability`: warn if the (largest) step size is past the edge of stability.

    **Returns:** an `xarray.Dataset` on `observable`: `gap` (the mean), `se` (its Monte
    Carlo standard error), `discrete` and `reference` (the two means), and `estimate`
    (path, observable), the per-path estimates; attrs name the algorithm, flow,
    reference method and settings (with a dict of flows: every variable on `against`
    too, with `flow` and `reference_method` per reference).

    **Raises:** `ValueError` for a batch size larger than the data, an observable that
    is not scalar per path, fewer than 20 paths, a t1 that is not a whole number of
    steps, or diverged paths (with `on_divergence="raise"`).
    """
    ds = _weak(lambda eta: algorithm, [float(algorithm.learning_rate)], params, loss, t1,
               flow=None if flow is None else (lambda a: flow), observables=observables,
               paths=paths, key=key, v0=v0, control_variate=control_variate,
               on_divergence=on_divergence, chunk=chunk,
               solve_kwargs=solve_options(rtol, atol, solver, nonsmooth), fit=False,
               check_stability=check_stability)
    return ds


def weak_order(
    algorithm: Callable[[float], AbstractStochasticAlgorithm],
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    step_sizes: Sequence[float],
    t1: float,
    *,
    flow: Callable[[AbstractStochasticAlgorithm], AbstractFlow] | None = None,
    observables: AbstractMonitor | Sequence[AbstractMonitor] = (Loss(),),
    paths: int = 1000,
    key=0,
    v0: PyTree | None = None,
    control_variate: bool = True,
    on_divergence: str = "raise",
    confidence: float = 0.95,
    resamples: int = 1000,
    max_width: float | None = None,
    chunk: int = 250,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    solver: diffrax.AbstractSolver | None = None,
    nonsmooth: Filippov | None = None,
    check_stability: bool = True,
) -> xr.Dataset:
    """The weak gap at flow time `t1` over `step_sizes`, and its fitted order per
    observable with a paired-bootstrap interval (`dynamics._weak_fit`).

    **Arguments:** as `weak_gap`, and

    - `algorithm`: step size → algorithm, e.g. `lambda eta: dyn.discrete.SGD(eta, 16)`.
    - `step_sizes`: three or more learning rates that nest (each a whole number of the
      smallest's grid, e.g. halvings: common random numbers need a common grid), each
      dividing t1.
    - `flow`: algorithm → flow (default `alg.flow`, SME-1), e.g.
      `lambda a: dyn.SME(a.eta, a.batch_size, order=2)` or `lambda a: dyn.GradientFlow()`;
      or algorithm → dict name -> flow: every reference from the same SGD paths, the
      result on an `against` axis.
    - `confidence`, `resamples`: the interval's level and bootstrap resamples.
    - `max_width`: warn when an interval is wider, saying how many paths would do.

    **Returns:** an `xarray.Dataset` on (`step_size`, `observable`): `gap`, `se`,
    `discrete`, `reference`; and on `observable`: `order`, `order_low`, `order_high`,
    `chi2`, `dof`, `p_value`, `model` ("power" or "power+linear"), `flips` (bootstrap
    resamples in which a gap changed sign), `resolved`, `paths_needed`. An unresolved
    order (more than 2.5% flips) is NaN, with a RuntimeWarning naming the paths needed.
    """
    sizes = np.asarray(step_sizes, dtype=float)
    if sizes.ndim != 1 or sizes.size < 3 or np.any(~(sizes > 0)) or len(set(sizes)) != sizes.size:
        raise ValueError("`step_sizes` must be three or more distinct positive numbers (a "
                         f"fit with an interval needs n >= 3), got {step_sizes!r}.")
    confidence = real(confidence, "confidence", low=0.0, strict=True, high=1.0)
    resamples = positive_int(resamples, "resamples", low=100)
    return _weak(algorithm, sizes, params, loss, t1, flow=flow, observables=observables,
                 paths=paths, key=key, v0=v0, control_variate=control_variate,
                 on_divergence=on_divergence, chunk=chunk,
                 solve_kwargs=solve_options(rtol, atol, solver, nonsmooth), fit=True,
                 confidence=confidence, resamples=resamples, max_width=max_width,
                 check_stability=check_stability)


def _weak(make, sizes, params, loss, t1, *, flow, observables, paths, key, v0,
          control_variate, on_divergence, chunk, solve_kwargs, fit, confidence=0.95,
          resamples=1000, max_width=None, check_stability=True):
    if not callable(make):
        raise ValueError("`algorithm` must be a function step size -> stochastic algorithm.")
    on_divergence = one_of(on_divergence, "on_divergence", ("raise", "drop"))
    algs = [make(float(eta)) for eta in sizes]
    for alg in algs:
        if not isinstance(alg, AbstractStochasticAlgorithm):
            raise ValueError(f"`algorithm` must give a stochastic algorithm such as "
                             f"dyn.discrete.SGD(eta, 16), got {alg!r}.")
    flows = [_flow_dict(alg.flow if flow is None else flow(alg)) for alg in algs]
    stochastic = any(isinstance(f, AbstractStochasticFlow) for d in flows for f in d.values())
    setup = setup_runs(algs[0], params, loss, t1, observables, paths, key, v0, chunk,
                   2 if stochastic else 1, min(float(a.time_step) for a in algs))
    for alg, targets in zip(algs, flows, strict=True):  # every grid, before any run
        whole_steps(alg, setup.t1)
        dts = [float(alg.time_step)]
        for target in targets.values():
            if isinstance(target, AbstractStochasticFlow):
                dts += [float(target.eta) / ell for ell in (1, 2)]
        for dt in dts:
            grid_stride(dt, setup.h_fine)
    if check_stability:
        edge_of_stability(algs[int(np.argmax(sizes))],
                          Problem(algs[0].flow, loss, setup.static), setup.w0)
    cache, runs = {}, []
    for eta, alg, targets in zip(sizes, algs, flows, strict=True):
        y, diverged, refs = estimates(setup, alg, targets, control_variate, cache,
                                       solve_kwargs)
        for _, ref_diverged, _ in refs.values():
            diverged = diverged | ref_diverged
        check_divergence(diverged, on_divergence, eta)
        runs.append((y, diverged, refs))
    keep = ~np.any([r[1] for r in runs], axis=0)
    if not keep.sum() >= MIN_PATHS:
        raise ValueError(f"only {int(keep.sum())} paths stayed finite at every step size; "
                         "use smaller step sizes.")
    disc = np.stack([y[keep] for y, _, _ in runs], 1)  # (paths, step sizes, observables)
    against = list(flows[0])
    ref = np.stack([np.stack([refs[a][0][keep] for _, _, refs in runs], 1) for a in against])
    est = disc[None] - ref  # (against, paths, step sizes, observables)
    names = [m.name for m in setup.observables]
    m = est.shape[1]
    dims = ("against", "step_size", "observable")
    data = {"gap": (dims, est.mean(1)), "se": (dims, est.std(1, ddof=1) / np.sqrt(m)),
            "discrete": (dims, np.broadcast_to(disc.mean(0), est.shape[:1] + disc.shape[1:])),
            "reference": (dims, ref.mean(1)),
            "reference_method": (("against",), [runs[0][2][a][2] for a in against]),
            "flow": (("against",), [type(flows[0][a]).__name__ for a in against])}
    attrs = {"t1": float(t1), "paths": m, "dropped_paths": int((~keep).sum()),
             "algorithm": type(algs[0]).__name__, "control_variate": int(bool(control_variate)),
             "common_grid_step": setup.h_fine, "batch_size": algs[0].batch_size}
    coords = {"against": against, "step_size": sizes, "observable": names}
    if not fit:
        data = {k: (v[0][:1] + v[0][2:], v[1][:, 0]) if len(v[0]) == 3 else v
                for k, v in data.items()}
        data["estimate"] = (("against", "path", "observable"), est[:, :, 0, :])
        del coords["step_size"]
        return _squeeze(xr.Dataset(data, coords=coords, attrs=attrs), flow)
    fits = {(a, n): fit_weak_order(sizes, est[i, :, :, j], confidence=confidence,
                                   resamples=resamples)
            for i, a in enumerate(against) for j, n in enumerate(names)}
    for key_, var in (("order", "order"), ("low", "order_low"), ("high", "order_high"),
                      ("chi2", "chi2"), ("dof", "dof"), ("p_value", "p_value"),
                      ("model", "model"), ("flips", "flips"), ("resolved", "resolved"),
                      ("paths_needed", "paths_needed")):
        data[var] = (("against", "observable"),
                     np.asarray([[fits[a, n][key_] for n in names] for a in against]))
    for (a, name), f in fits.items():
        what = repr(name) if a == _SINGLE else f"{name!r} against {a!r}"
        if not f["resolved"]:
            warnings.warn(
                f"weak_order: the gap of {what} is not resolved from the Monte Carlo noise "
                f"at every step size ({f['flips']} of {resamples} bootstrap resamples change "
                f"its sign): no order reported. About {f['paths_needed']} paths would resolve "
                "it at 3σ, or use larger step sizes.", RuntimeWarning, stacklevel=3)
        elif max_width is not None and f["high"] - f["low"] > max_width:
            need = int(np.ceil(m * ((f["high"] - f["low"]) / max_width) ** 2))
            warnings.warn(
                f"weak_order: the {confidence:.0%} interval of {what} is "
                f"{f['high'] - f['low']:.3f} wide, above max_width = {max_width}: about "
                f"{need} paths would narrow it enough.", RuntimeWarning, stacklevel=3)
    attrs.update(confidence=confidence, resamples=resamples)
    return _squeeze(xr.Dataset(data, coords=coords, attrs=attrs), flow)


# The name of the one reference when `flow` gives a single flow (the `against` axis is
# then dropped from the result).
_SINGLE = "_flow"


def _flow_dict(flows) -> dict:
    if isinstance(flows, dict):
        if not flows or not all(isinstance(f, AbstractFlow) for f in flows.values()):
            raise ValueError("`flow` must give a flow, or a dict name -> flow, got "
                             f"{flows!r}.")
        return dict(flows)
    if not isinstance(flows, AbstractFlow):
        raise ValueError(f"`flow` must give a flow such as dyn.GradientFlow(), got {flows!r}.")
    return {_SINGLE: flows}


def _squeeze(ds: xr.Dataset, flow) -> xr.Dataset:
    """Without a dict of flows, the result has no `against` axis; its reference's name
    and method become attrs."""
    if list(ds["against"].values) != [_SINGLE]:
        return ds
    ds.attrs.update(flow=str(ds["flow"].values[0]),
                    reference_method=str(ds["reference_method"].values[0]))
    return ds.drop_vars(["flow", "reference_method"]).isel(against=0, drop=True)
