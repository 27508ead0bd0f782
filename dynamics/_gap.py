"""The discrete-versus-continuous gap: how far an optimizer strays from its flow.

`gap` integrates a flow from a discrete run's initial state to the run's own save times
(by `simulate` at a tight tolerance) and compares; `gap_order` repeats that over step
sizes at a fixed flow time and fits the order p of ‖w_k − w(t_k)‖ = C hᵖ with a 95%
confidence interval. Backward-error analysis predicts p = 1 for GD against gradient flow
and p = 2 against its modified flow.
"""

import warnings
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jaxtyping import PyTree, Scalar

from ._filippov import Filippov
from ._flows import AbstractFirstOrderFlow, AbstractFlow, AbstractKappaFlow
from ._problem import Problem
from ._progress import Progress
from ._simulate import simulate
from ._trajectory import Trajectory
from ._tree import partition
from .discrete._algorithms import AbstractDiscreteAlgorithm
from .discrete._checks import top_eigenvalue
from .discrete._run import run as discrete_run
from .monitors._monitors import AbstractMonitor

# Algorithms that have no first-order limit: Leapfrog's flow conserves energy and NAGD's
# damping 3/t vanishes, so pairing them with a first-order flow compares unlike things.
_SECOND_ORDER_ONLY = ("Leapfrog", "NAGD")
# Algorithms without a velocity can be paired with a second-order flow only if it has
# friction (κ1 ≠ 0), which has a slow manifold to start on.


def _flat(tree: PyTree) -> np.ndarray:
    """Leaves with a leading time axis → (n, d)."""
    w, _ = partition(tree)
    arrays = [np.asarray(x) for x in jax.tree.leaves(w)]
    return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=1)


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, tree)


def _check_pairing(traj: Trajectory, flow: AbstractFlow) -> str:
    algorithm = traj.meta.get("algorithm")
    if algorithm is None:
        raise ValueError(
            "`discrete_trajectory` must come from dyn.discrete.run (it records the "
            "algorithm and step size), got a trajectory without meta['algorithm']."
        )
    if not isinstance(flow, AbstractFlow):
        raise ValueError(
            f"`flow` must be a catalogue entry such as dyn.GradientFlow(), got {flow!r}."
        )
    first_order_flow = isinstance(flow, AbstractFirstOrderFlow)
    if algorithm in _SECOND_ORDER_ONLY and first_order_flow:
        raise ValueError(
            f"{algorithm} discretises a second-order flow; pair it with one "
            f"(dyn.NewtonianFlow() for Leapfrog, dyn.NesterovFlow() for NAGD), not "
            f"{type(flow).__name__}."
        )
    if traj.velocities is None and not first_order_flow:
        kappa1 = flow.kappas(0.0)[0] if isinstance(flow, AbstractKappaFlow) else 0.0
        if not np.all(np.asarray(kappa1) > 0):
            raise ValueError(
                f"{algorithm} is a first-order algorithm; a second-order flow must have "
                f"friction κ1 > 0 to be its modified flow (e.g. "
                f"dyn.modified_second_order_flow(eta)), not {type(flow).__name__}."
            )
    return algorithm


def sharpness_warning(traj: Trajectory, loss: Callable, params0: PyTree) -> float:
    """η·λ_max(∇²L) at the run's start, with a RuntimeWarning past the algorithm's limit."""
    w, static = partition(params0)
    lam = float(top_eigenvalue(Problem(None, loss, static), w))
    lr = float(traj.meta["learning_rate"])
    limit = float(traj.meta.get("stability_limit", 2.0))
    if lr * lam > limit:
        warnings.warn(
            f"{traj.meta['algorithm']}: η·λ_max = {lr * lam:.3g} exceeds {limit:.3g} "
            "(edge of stability): the flow and the modified equations, expansions in "
            "η·λ, do not describe this run; its gap has no order.",
            RuntimeWarning,
            stacklevel=3,
        )
    return lr * lam


def gap(
    discrete_trajectory: Trajectory,
    flow: AbstractFlow,
    loss: Callable[[PyTree], Scalar],
    *,
    monitors: Sequence[AbstractMonitor] = (),
    rtol: float = 1e-10,
    atol: float = 1e-12,
    solver: diffrax.AbstractSolver | None = None,
    nonsmooth: Filippov | None = None,
    check_stability: bool = True,
) -> xr.Dataset:
    """Integrate `flow` from the discrete run's first iterate to its save times and
    compare.

    **Arguments:**

    - `discrete_trajectory`: from `dyn.discrete.run` with `params` saved.
    - `flow`: the continuous flow to compare with (e.g. `alg.flow`, or a modified flow).
      A second-order flow starts from the run's first velocity, or, after a first-order
      algorithm, on its slow manifold v(0) = −∇L(w_0)/κ1.
    - `loss`: the loss the run used.
    - `monitors`: the monitors the run recorded (by name) to difference as well.
    - `rtol`, `atol`, `solver`: the flow's integration (default Tsit5, adaptive).
    - `nonsmooth`: `dyn.Filippov()` for a ReLU or LeakyReLU `dyn.MLP`: the flow is then
      integrated exactly through its kinks (see `simulate`), so the reference holds
      `rtol` where a plain adaptive solve chatters.

    **Returns:** an `xarray.Dataset` on `time` with `distance` = ‖w_k − w(t_k)‖ (all
    parameters flattened) and, for every monitor m, `m_discrete`, `m_flow` and
    `m_gap` = discrete − flow; attrs name the algorithm, flow and tolerances.
    """
    if not isinstance(discrete_trajectory, Trajectory):
        raise ValueError(
            "`discrete_trajectory` must be a dyn.Trajectory from dyn.discrete.run, got "
            f"{type(discrete_trajectory).__name__}."
        )
    traj = discrete_trajectory
    algorithm = _check_pairing(traj, flow)
    if traj.params is None or len(traj.ts) < 2:
        raise ValueError("`discrete_trajectory` must hold params at two or more save times.")
    monitors = tuple(monitors)
    for m in monitors:
        if not isinstance(m, AbstractMonitor) or m.name not in traj.monitors:
            raise ValueError(
                f"`monitors` must be the dyn.monitors objects the run recorded "
                f"({sorted(traj.monitors)}), got {m!r}."
            )
    params0 = _first(traj.params)
    if check_stability:
        sharpness_warning(traj, loss, params0)
    v0 = None
    if not isinstance(flow, AbstractFirstOrderFlow):
        if traj.velocities is not None:
            v0 = _first(traj.velocities)
        else:
            # The slow manifold of κ2ẅ + κ1ẇ + ∇L = 0 to leading order: ẇ = −∇L/κ1.
            # The O(η) mismatch in velocity moves w by κ2/κ1 · O(η) = O(η²).
            kappa1 = flow.kappas(0.0)[0]
            w0, static = partition(params0)
            grad = jax.grad(lambda w: loss(eqx.combine(w, static)))(w0)
            v0 = eqx.combine(jax.tree.map(lambda g: -g / kappa1, grad), static)
    ts = np.asarray(traj.ts, dtype=float)
    # The flow is solved without monitors and they are evaluated afterwards on its saved
    # states: every `gap` with the same flow, loss and number of save times then shares
    # one compiled solve, whatever monitors it compares.
    ref = simulate(
        flow, params0, loss, t1=float(ts[-1]), ts=ts, v0=v0,
        solver=diffrax.Tsit5() if solver is None else solver,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=1_000_000, nonsmooth=nonsmooth,
    )
    distance = np.linalg.norm(_flat(traj.params) - _flat(ref.params), axis=1)
    data = {"distance": ("time", distance)}
    flow_values = _evaluate_monitors(monitors, flow, loss, ref)
    for m in monitors:
        a, b = np.asarray(traj.monitors[m.name]), flow_values[m.name]
        dims = ("time",) + tuple(f"{m.name}_dim{i}" for i in range(1, a.ndim))
        data[f"{m.name}_discrete"] = (dims, a)
        data[f"{m.name}_flow"] = (dims, b)
        data[f"{m.name}_gap"] = (dims, a - b)
    attrs = {
        "algorithm": algorithm,
        "learning_rate": float(traj.meta["learning_rate"]),
        "time_step": float(traj.meta["time_step"]),
        "flow": type(flow).__name__,
        "flow_repr": eqx.tree_pformat(flow, short_arrays=False),
        "solver": type(solver or diffrax.Tsit5()).__name__,
        "rtol": rtol,
        "atol": atol,
        "nonsmooth": "none" if nonsmooth is None else repr(nonsmooth),
    }
    return xr.Dataset(data, coords={"time": ts}, attrs=attrs)


@eqx.filter_jit
def _monitor_values(monitors, problem, ts, w, v):
    def one(t, w, v):
        return {m.name: m(t, w, v, problem) for m in monitors}

    return jax.vmap(one)(ts, w, v)


def _evaluate_monitors(monitors, flow, loss, ref: Trajectory) -> dict[str, np.ndarray]:
    """The monitors on the flow's saved states (what `simulate` would have recorded)."""
    if not monitors:
        return {}
    w, static = partition(ref.params)
    v = None if ref.velocities is None else partition(ref.velocities)[0]
    values = _monitor_values(monitors, Problem(flow, loss, static), jnp.asarray(ref.ts), w, v)
    return {k: np.asarray(a) for k, a in values.items()}


def fit_order(h: np.ndarray, error: np.ndarray, confidence: float = 0.95):
    """Least-squares slope of log(error) on log(h) with its two-sided `confidence`
    interval from Student's t with n − 2 degrees of freedom: (slope, low, high)."""
    import scipy.stats  # here, not at the top: it adds ~0.5 s to `import dynamics`

    h, error = np.asarray(h, float), np.asarray(error, float)
    fit = scipy.stats.linregress(np.log(h), np.log(error))
    n = len(h)
    half = scipy.stats.t.ppf(0.5 + confidence / 2, n - 2) * fit.stderr if n > 2 else np.inf
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half)


def gap_order(
    algorithm: Callable[[float], AbstractDiscreteAlgorithm],
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    step_sizes: Sequence[float],
    t1: float,
    *,
    flow: Callable[[AbstractDiscreteAlgorithm], AbstractFlow] | None = None,
    v0: PyTree | None = None,
    against: str = "learning_rate",
    rtol: float = 1e-10,
    atol: float = 1e-12,
    solver: diffrax.AbstractSolver | None = None,
    nonsmooth: Filippov | None = None,
    check_stability: bool = True,
    progress: bool = True,
) -> xr.Dataset:
    """The gap at flow time `t1` over `step_sizes`, and its fitted order.

    **Arguments:**

    - `algorithm`: step size → algorithm, e.g. `dyn.discrete.GD` or
      `lambda eta: dyn.discrete.HeavyBall(eta, 0.5)`.
    - `params`, `loss`, `v0`: the start and loss of every run.
    - `step_sizes`: three or more learning rates; t1 must be a whole number of steps
      of each (t1 = k·η, or k·√η for Leapfrog and NAGD).
    - `flow`: algorithm → flow to compare with (default `alg.flow`), e.g.
      `lambda a: dyn.ModifiedGradientFlow(a.eta)`. Coefficients are arrays, so the
      flow compiles once for all step sizes.
    - `against`: fit against the "learning_rate" (η, s) or the "time_step" (Δt).
    - `rtol`, `atol`, `solver`, `nonsmooth`: the flow's integration, as in `gap`.
    - `check_stability`: warn if the largest step size is past the edge of stability.
    - `progress`: a line per quarter of the step sizes (a tqdm bar on a terminal). Each
      flow integration has a budget of 1,000,000 steps (`gap`'s).

    **Returns:** an `xarray.Dataset` on `step_size` with `gap` (‖w_K − w(t1)‖) and
    `time_step`; attrs `order`, `order_ci_low`, `order_ci_high` (95%).
    """
    if not callable(algorithm):
        raise ValueError("`algorithm` must be a function step size -> discrete algorithm.")
    if against not in ("learning_rate", "time_step"):
        raise ValueError(f"`against` must be 'learning_rate' or 'time_step', got {against!r}.")
    sizes = np.asarray(step_sizes, dtype=float)
    if sizes.ndim != 1 or sizes.size < 3 or np.any(~(sizes > 0)) or len(set(sizes)) != sizes.size:
        raise ValueError(
            "`step_sizes` must be three or more distinct positive numbers (a fit with a "
            f"confidence interval needs n >= 3), got {step_sizes!r}."
        )
    if not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True or False, got {progress!r}.")
    with Progress(len(sizes), "gap_order", unit="step sizes", enabled=progress) as bar:
        gaps, dts, alg, target = _gaps(algorithm, params, loss, sizes, t1, flow, v0, rtol,
                                       atol, solver, nonsmooth, check_stability, bar)
    return _order_dataset(sizes, gaps, dts, against, alg, target, t1, solver, rtol, atol,
                          nonsmooth)


def _gaps(algorithm, params, loss, sizes, t1, flow, v0, rtol, atol, solver, nonsmooth,
          check_stability, bar):
    gaps, dts = [], []
    for i, eta in enumerate(sizes):
        alg = algorithm(float(eta))
        if not isinstance(alg, AbstractDiscreteAlgorithm):
            raise ValueError(f"`algorithm` must return a discrete algorithm, got {alg!r}.")
        dt = float(alg.time_step)
        steps = int(round(t1 / dt))
        if steps < 1 or abs(steps * dt - t1) > 1e-9 * t1:
            raise ValueError(
                f"`t1` = {t1} is not a whole number of steps Δt = {dt} (step size {eta}); "
                "choose step sizes that divide it."
            )
        # Save only the start and the end: the flow's save times then have one shape
        # for every step size, and the flow compiles once.
        traj = discrete_run(alg, params, loss, steps, v0=v0, save_every=steps,
                            check_stability=check_stability and i == int(np.argmax(sizes)))
        target = alg.flow if flow is None else flow(alg)
        ds = gap(traj, target, loss, rtol=rtol, atol=atol, solver=solver,
                 nonsmooth=nonsmooth, check_stability=False)
        gaps.append(float(ds["distance"][-1]))
        dts.append(dt)
        bar.update()
    return gaps, dts, alg, target


def _order_dataset(sizes, gaps, dts, against, alg, target, t1, solver, rtol, atol,
                   nonsmooth) -> xr.Dataset:
    x = sizes if against == "learning_rate" else np.asarray(dts)
    order, low, high = fit_order(x, np.asarray(gaps))
    return xr.Dataset(
        {"gap": ("step_size", np.asarray(gaps)), "time_step": ("step_size", np.asarray(dts))},
        coords={"step_size": sizes},
        attrs={"order": order, "order_ci_low": low, "order_ci_high": high, "t1": float(t1),
               "against": against, "algorithm": type(alg).__name__,
               "flow": type(target).__name__, "solver": type(solver or diffrax.Tsit5()).__name__,
               "rtol": rtol, "atol": atol,
               "nonsmooth": "none" if nonsmooth is None else repr(nonsmooth)},
    )

