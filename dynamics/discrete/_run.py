"""`dyn.discrete.run`: a discrete optimizer on its flow's time axis.

One `jax.lax.scan` over the save points under `eqx.filter_jit` (with a loop over the
`save_every` steps between them), with the same monitors as `simulate` and
a `Trajectory` of the same shape, so a discrete run and its flow share one time axis.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree, Scalar

from .._driver._prepare import check_scalar_loss, validate_params
from .._paths import Paths
from .._problem import Problem
from .._projection import AbstractSchedule, Every, check_output
from .._trajectory import Trajectory
from .._tree import all_finite, partition
from .._validate import positive_int
from ..monitors._carrying import init_carries, save_records
from ..monitors._monitors import AbstractMonitor, Loss
from ._algorithms import AbstractDiscreteAlgorithm, ExponentiatedGD, State
from ._checks import (
    check_monitors,
    discrete_trajectory,
    edge_of_stability,
    edge_of_stability_along,
    validate_v0,
    where_ok,
)
from ._sgd import AbstractStochasticAlgorithm
from ._sgd_run import run_stochastic

_INT32_MAX = 2**31 - 1

@eqx.filter_jit
def _run(alg, problem, w0, v0, n_saves, save_every, monitors, projection, proj_every,
         save_params):
    check_scalar_loss(problem, w0)
    value_and_grad = jax.value_and_grad(problem.loss)
    dt = alg.time_step

    def record(k, state: State, carries: dict):
        # (the carrying monitors' new carries, this save's record)
        t = k * dt

        def value(m):
            if isinstance(m, Loss) and state.loss is not None:
                return state.loss  # the step's own value_and_grad
            return m(t, state.w, state.v, problem)

        carries, out = save_records(monitors, carries, t, state.w, state.v, problem, value)
        if not save_params:
            return carries, {"monitors": out, "k": k}
        return carries, {"monitors": out, "w": state.w, "v": state.v, "k": k}

    def project(state, pstate):
        params = problem.params(state.w)
        velocity = None if state.v is None else problem.params(state.v)
        params, velocity = projection(params, velocity, pstate)
        w, _ = partition(params)
        v = None if velocity is None else partition(velocity)[0]
        return alg.init(w, v, value_and_grad)

    def finite_state(state):
        # The iterate, its velocity and the carried gradient, not the carried loss: a
        # check on the loss keeps its value alive in every step of the loop, and XLA
        # then computes it at every step even when nothing records it (~20% of a small
        # NMGD or GD step, benchmarks/bench_nmgd.py), whereas w, v and ∇L are computed
        # anyway. A non-finite loss comes with a non-finite gradient in practice (both
        # overflow together); one with a finite gradient does not stop the run.
        finite = all_finite(state.w)
        if state.v is not None:
            finite = finite & all_finite(state.v)
        if state.grad is not None:
            finite = finite & all_finite(state.grad)
        return finite

    def one_step(_, carry):
        k, state, diverged_at, pstate = carry
        new = alg.step(k, state, value_and_grad)
        if projection is not None:
            due = (k + 1) % proj_every == 0
            new = jax.lax.cond(due, lambda s: project(s, pstate), lambda s: s, new)
        finite = finite_state(new)
        alive = diverged_at < 0
        ok = finite & alive
        # A non-finite iterate freezes the run at the last finite one; the scan goes on
        # (its length is static) but nothing changes after that.
        state = where_ok(ok, new, state)
        diverged_at = jnp.where(alive & ~finite, k + 1, diverged_at)
        return k + 1, state, diverged_at, pstate

    def plain_step(pstate):
        def step(_, carry):
            k, state = carry
            new = alg.step(k, state, value_and_grad)
            if projection is not None:
                due = (k + 1) % proj_every == 0
                new = jax.lax.cond(due, lambda s: project(s, pstate), lambda s: s, new)
            return k + 1, new

        return step

    def outer(carry, _):
        # `save_every` is traced (a while loop inside the scan over save points), so runs
        # that differ only in their number of steps between saves, such as the runs of
        # `gap_order` (start and end saved, steps = t1/Δt), share one compilation.
        # The block runs without the per-step freeze on a non-finite iterate (keeping the
        # previous state alive at every step cost ~50% of a small GD step, see
        # benchmarks/bench_nmgd.py); only when its end is not finite, or the run has
        # already diverged, is it replayed from its start with `one_step`, which finds
        # the step and freezes there. Measured (NMGD, CPU time, 5,000 steps): the replay
        # branch, the traced block length and the extra carry cost nothing; what cost
        # ~20% was the finiteness check reading the carried loss (see `finite_state`).
        # The carrying monitors' carries ride beside the iterate, from save to save.
        (k, state, diverged_at, pstate), carries = carry
        k1, new = jax.lax.fori_loop(0, save_every, plain_step(pstate), (k, state))
        ok = (diverged_at < 0) & finite_state(new)
        carry = jax.lax.cond(
            ok, lambda: (k1, new, diverged_at, pstate),
            lambda: jax.lax.fori_loop(0, save_every, one_step, (k, state, diverged_at,
                                                                pstate)))
        k, state, diverged_at, _ = carry
        carries, saved = record(k, state, carries)
        return (carry, carries), saved

    state0 = alg.init(w0, v0, value_and_grad)
    pstate = None
    if projection is not None:
        pstate = projection.init(problem.params(w0),
                                 None if v0 is None else problem.params(v0))
    k0 = jnp.zeros((), jnp.int32)
    carries, first = record(k0, state0, init_carries(monitors, w0, problem))
    carry = (k0, state0, jnp.full((), -1, jnp.int32), pstate)
    (carry, _), saved = jax.lax.scan(outer, (carry, carries), None, length=n_saves)
    saved = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, saved)
    _, final, diverged_at, _ = carry
    # The final state is the last save's (the scan records after every block of steps),
    # so its monitors are that save's, not evaluated a second time.
    end = {"monitors": jax.tree.map(lambda a: a[-1], saved["monitors"]), "w": final.w,
           "v": final.v, "k": carry[0]}
    return saved, end, diverged_at


def _projection_steps(projection, alg) -> int | None:
    if projection is None:
        return None
    if not isinstance(projection, Every):
        raise ValueError(
            "`projection` must be dyn.Every(projection, steps=k) (or time=Δt, a whole "
            f"number of steps) for a discrete run, got {projection!r}."
        )
    if projection.steps is not None:
        return projection.steps
    ratio = projection.time / float(alg.time_step)
    if abs(ratio - round(ratio)) > 1e-9 * max(1.0, ratio) or round(ratio) < 1:
        raise ValueError(
            f"`projection` time={projection.time} is not a whole number of steps of "
            f"Δt = {float(alg.time_step)}; use dyn.Every(projection, steps=k)."
        )
    return int(round(ratio))


def run(
    alg: AbstractDiscreteAlgorithm,
    params: PyTree,
    loss: Callable[[PyTree], Scalar],
    steps: int,
    v0: PyTree | None = None,
    monitors: Sequence[AbstractMonitor] = (),
    save_every: int = 1,
    projection: AbstractSchedule | None = None,
    *,
    check_stability: bool = True,
    save_params: bool = True,
    key=None,
) -> "Trajectory | Paths":
    """Run `alg` for `steps` iterations from `params` and record a `Trajectory`.

    **Arguments:**

    - `alg`: `GD(eta)`, `Leapfrog(eta)`, `NAGD(s)`, `HeavyBall(eta, beta)`,
      `NesterovMomentum(eta, beta)`, `ExponentiatedGD(eta)`; or a stochastic one,
      `SGD(learning_rate, batch_size)`, `HeavyBallSGD`, `NesterovSGD`, `SVAG`, which
      needs `key`.
    - `params`, `loss`: as for `simulate`; a stochastic algorithm needs a loss that
      exposes its examples (`dyn.losses.AbstractDataLoss`, or one plus `l2`/`lp`).
    - `steps`: the number of iterations; iterate k is recorded at flow time
      t_k = k·`alg.time_step` (kη, or k√η for Leapfrog and NAGD).
    - `v0`: initial velocity in the flow's time units, for momentum algorithms
      (default zero: w_{−1} = w_0).
    - `monitors`: the monitors of `simulate`, evaluated with the counterpart flow
      (`alg.flow`); `Loss` is the value from the step's own `value_and_grad` where the
      gradient is taken at the iterate (GD, Leapfrog, HeavyBall, ExponentiatedGD). A
      carrying monitor (`dyn.monitors.AbstractCarryingMonitor`: the warm-started
      `TopEigenvalues`, `Sharpness`) carries its state in the loop from one save point
      to the next (per path, for a batch of keys).
    - `save_every`: record every k-th iterate (and iterate 0); `steps` must be a
      multiple of it.
    - `projection`: `dyn.Every(projection, steps=k)`: apply the projection to
      (params, velocity) after every k-th step (Baldi et al.'s interleaved balancing).
    - `save_params`: also store params (and velocities) at every save point (False:
      only the monitors, and the final state).
    - `check_stability`: compute η·λ_max at `params` (the `Sharpness` monitor's Lanczos)
      and warn past the edge of stability; with a `Sharpness` or `TopEigenvalues`
      monitor, also warn at the first save where the recorded η·λ_1 passes the limit.
    - `key`: for a stochastic algorithm only, where it is required: the PRNG key the
      minibatches are drawn from inside the compiled loop (step k's batch from
      fold_in(key, k)), or a batch of keys (`jax.random.split(key, m)`) for m
      independent paths, run under `jax.vmap` in chunks of 250 in one compilation.
      `Loss` and every other monitor see the full loss; `dyn.monitors.SGDChargeDrift`
      sees the minibatch gradient of the step about to be taken.

    **Returns:** a `Trajectory`; for a batch of keys, a `dyn.Paths` (monitors with a
    leading path axis, per-path `diverged` and `t_final`; a path's values after it
    diverged are NaN, the other paths are kept).

    A non-finite iterate (position, velocity, or the gradient taken there) stops the
    run: the trajectory keeps the iterates up to the last finite one, `diverged` is
    True, and `event_time` / `meta["diverged_step"]` say at which step it happened.
    """
    if not isinstance(alg, AbstractDiscreteAlgorithm):
        raise ValueError(
            f"`alg` must be a discrete algorithm such as dyn.discrete.GD(eta=0.1), got {alg!r}."
        )
    if not callable(loss):
        raise ValueError("`loss` must be a function params -> scalar.")
    # The iterate counter is an int32 (2**31 raised a raw OverflowError).
    steps = positive_int(steps, "steps", high=_INT32_MAX - 1)
    save_every = positive_int(save_every, "save_every", high=_INT32_MAX - 1)
    if steps % save_every:
        raise ValueError(
            f"`steps` = {steps} must be a multiple of `save_every` = {save_every}."
        )
    if isinstance(alg, AbstractStochasticAlgorithm):

        return run_stochastic(alg, params, loss, steps, v0=v0, monitors=monitors,
                              save_every=save_every, projection=projection, key=key,
                              check_stability=check_stability, save_params=save_params)
    if key is not None:
        raise ValueError(
            f"`key` draws the minibatches of a stochastic algorithm (dyn.discrete.SGD); "
            f"{type(alg).__name__} is deterministic: drop `key`."
        )
    w0, static = validate_params(params)
    if isinstance(alg, ExponentiatedGD) and any(np.any(np.asarray(x) == 0)
                                                for x in jax.tree.leaves(w0)):
        raise ValueError(
            "ExponentiatedGD multiplies each weight by a positive factor, so a zero weight "
            "(e.g. a zero-initialised bias) never moves; initialise all of `params` non-zero "
            "or use dyn.MLP(..., bias=False)."
        )
    v = validate_v0(alg, w0, v0)
    monitors = check_monitors(monitors)
    proj_every = _projection_steps(projection, alg)
    flow = alg.flow
    problem = Problem(flow, loss, static)
    if projection is not None:
        check_output(projection.projection, params,
                     None if v is None else eqx.combine(v, static))
    warned = False
    if check_stability:
        try:
            warned = edge_of_stability(alg, problem, w0) > alg.stability_limit
        except TypeError:
            # The Lanczos iteration differentiates the loss: a non-scalar one raised jax's
            # raw TypeError here. Checked only then, so a call costs no extra trace.
            check_scalar_loss(problem, w0)
            raise
    saved, final, diverged_at = _run(
        alg, problem, w0, v, steps // save_every, jnp.asarray(save_every, jnp.int32), monitors,
        None if projection is None else projection.projection, proj_every, bool(save_params),
    )
    traj = discrete_trajectory(alg, problem, saved, final, int(diverged_at), steps,
                               save_every).with_monitor_coords(monitors, params)
    if check_stability:
        edge_of_stability_along(alg, traj, monitors, initial_warned=warned)
    return traj
