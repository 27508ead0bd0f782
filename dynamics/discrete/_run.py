"""`dyn.discrete.run`: a discrete optimizer on its flow's time axis.

One `jax.lax.scan` over the save points under `eqx.filter_jit` (with a loop over the
`save_every` steps between them), with the same monitors as `simulate` and
a `Trajectory` of the same shape, so a discrete run and its flow share one time axis.
"""

import warnings
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
from .._trajectory import Trajectory, provenance
from .._tree import all_finite, partition, sqnorm
from .._validate import as_tuple, positive_int
from ..monitors._monitors import AbstractIntegralMonitor, AbstractMonitor, Loss
from ._algorithms import AbstractDiscreteAlgorithm, ExponentiatedGD, State
from ._sgd import AbstractStochasticAlgorithm

_INT32_MAX = 2**31 - 1

# Power iteration for λ_max(∇²L): enough iterations to tell η·λ > limit from η·λ well
# below it; the warning is a diagnostic, not a measurement.
_POWER_ITERATIONS = 30


@eqx.filter_jit
def top_eigenvalue(problem: Problem, w: PyTree, key) -> Scalar:
    """|λ|_max of the Hessian of L at w, by power iteration on Hessian-vector products."""
    grad = jax.grad(problem.loss)

    def hvp(u):
        return jax.jvp(grad, (w,), (u,))[1]

    leaves, treedef = jax.tree.flatten(w)
    keys = jax.random.split(key, len(leaves))
    u0 = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves, strict=True)])

    def body(_, carry):
        u, _ = carry
        u = jax.tree.map(lambda x: x / jnp.sqrt(sqnorm(u) + 1e-300), u)
        hu = hvp(u)
        return hu, jnp.sqrt(sqnorm(hu))

    _, lam = jax.lax.fori_loop(0, _POWER_ITERATIONS, body, (u0, jnp.zeros(())))
    return lam


def edge_of_stability(alg: AbstractDiscreteAlgorithm, problem: Problem, w: PyTree,
                      *, warn: bool = True) -> float:
    """η·λ_max(∇²L(w)) for `alg` at `w`, warning when it exceeds `alg.stability_limit`:
    there the iteration is unstable along the top eigenvector and the modified
    equations (an expansion in η·λ) no longer describe it."""
    lam = float(top_eigenvalue(problem, w, jax.random.key(0)))
    sharpness = float(alg.learning_rate) * lam
    if warn and sharpness > alg.stability_limit:
        warnings.warn(
            f"{type(alg).__name__}: η·λ_max = {sharpness:.3g} exceeds "
            f"{alg.stability_limit:.3g} at the initial parameters (edge of stability): "
            "the iteration is unstable along the top Hessian eigenvector and the flow "
            "and modified equations need not describe it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return sharpness


def _where(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


@eqx.filter_jit
def _run(alg, problem, w0, v0, n_saves, save_every, monitors, projection, proj_every,
         save_params):
    check_scalar_loss(problem, w0)
    value_and_grad = jax.value_and_grad(problem.loss)
    dt = alg.time_step

    def record(k, state: State):
        t = k * dt
        out = {}
        for m in monitors:
            if isinstance(m, Loss) and state.loss is not None:
                out[m.name] = state.loss  # the step's own value_and_grad
            else:
                out[m.name] = m(t, state.w, state.v, problem)
        if not save_params:
            return {"monitors": out, "k": k}
        return {"monitors": out, "w": state.w, "v": state.v, "k": k}

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
        state = _where(ok, new, state)
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
        k, state, diverged_at, pstate = carry
        k1, new = jax.lax.fori_loop(0, save_every, plain_step(pstate), (k, state))
        ok = (diverged_at < 0) & finite_state(new)
        carry = jax.lax.cond(
            ok, lambda: (k1, new, diverged_at, pstate),
            lambda: jax.lax.fori_loop(0, save_every, one_step, carry))
        k, state, diverged_at, _ = carry
        return carry, record(k, state)

    state0 = alg.init(w0, v0, value_and_grad)
    pstate = None
    if projection is not None:
        pstate = projection.init(problem.params(w0),
                                 None if v0 is None else problem.params(v0))
    k0 = jnp.zeros((), jnp.int32)
    first = record(k0, state0)
    carry = (k0, state0, jnp.full((), -1, jnp.int32), pstate)
    carry, saved = jax.lax.scan(outer, carry, None, length=n_saves)
    saved = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, saved)
    _, final, diverged_at, _ = carry
    end = {"monitors": record(carry[0], final)["monitors"], "w": final.w, "v": final.v,
           "k": carry[0]}
    return saved, end, diverged_at


def check_monitors(monitors) -> tuple:
    """`monitors` (one monitor or several) as a tuple of non-integral monitors with
    unique names."""
    monitors = as_tuple(monitors, "monitors", AbstractMonitor, "dyn.monitors.Loss()")
    for m in monitors:
        if isinstance(m, AbstractIntegralMonitor):
            raise ValueError(
                f"`monitors`: {m!r} is an integral monitor, which needs a solver; use "
                "`simulate`."
            )
    names = [m.name for m in monitors]
    if len(set(names)) != len(names):
        raise ValueError(f"`monitors` have repeated names {names}; give each a unique name.")
    return monitors


def validate_v0(alg, w, v0):
    if alg.first_order:
        if v0 is not None:
            raise ValueError(
                f"`v0` was given but {type(alg).__name__} is a first-order algorithm with "
                "no velocity; drop `v0`."
            )
        return None
    if v0 is None:
        return jax.tree.map(jnp.zeros_like, w)
    v, _ = partition(v0)
    if jax.tree.structure(v) != jax.tree.structure(w) or any(
        jnp.shape(a) != jnp.shape(b)
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(v), strict=True)
    ):
        raise ValueError(
            "`v0` must have the same structure and shapes as `params` (one velocity, in "
            "the flow's time units, per parameter)."
        )
    v = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), w, v)
    if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(v)):
        raise ValueError("`v0` contains NaN or Inf; initialise it with finite values.")
    if type(alg).__name__ == "NAGD" and any(np.any(np.asarray(x) != 0)
                                            for x in jax.tree.leaves(v)):
        raise ValueError(
            "NAGD starts at rest (y_0 = x_0, Su, Boyd & Candès); its flow's damping 3/t "
            "is singular at t = 0 with a non-zero velocity. Pass v0=None."
        )
    return v


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
      gradient is taken at the iterate (GD, Leapfrog, HeavyBall, ExponentiatedGD).
    - `save_every`: record every k-th iterate (and iterate 0); `steps` must be a
      multiple of it.
    - `projection`: `dyn.Every(projection, steps=k)`: apply the projection to
      (params, velocity) after every k-th step (Baldi et al.'s interleaved balancing).
    - `save_params`: also store params (and velocities) at every save point (False:
      only the monitors, and the final state).
    - `check_stability`: estimate η·λ_max at `params` by power iteration and warn past
      the edge of stability.
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
        from ._sgd_run import run_stochastic  # (it builds on this module's helpers)

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
    if check_stability:
        try:
            edge_of_stability(alg, problem, w0)
        except TypeError:
            # The power iteration differentiates the loss: a non-scalar one raised jax's
            # raw TypeError here. Checked only then, so a call costs no extra trace.
            check_scalar_loss(problem, w0)
            raise
    saved, final, diverged_at = _run(
        alg, problem, w0, v, steps // save_every, jnp.asarray(save_every, jnp.int32), monitors,
        None if projection is None else projection.projection, proj_every, bool(save_params),
    )
    return _trajectory(alg, problem, saved, final, int(diverged_at), steps,
                       save_every).with_monitor_coords(monitors, params)


def _trajectory(alg, problem, saved, final, diverged_at, steps, save_every) -> Trajectory:
    """A `Trajectory` with the fields `Trajectory.from_solve` fills, for a discrete run."""
    dt = float(alg.time_step)
    ks = np.asarray(saved["k"])
    diverged = diverged_at >= 0
    last_good = diverged_at - 1 if diverged else steps
    n_kept = int(np.sum(ks <= last_good))
    take = jax.tree.map(lambda a: np.asarray(a)[:n_kept], saved)
    if diverged and ks[n_kept - 1] < last_good:
        # Append the last finite iterate, as `simulate` appends where a run stopped.
        end = jax.tree.map(lambda a: np.asarray(a)[None],
                           {k: final[k] for k in take if k != "k"})
        end["k"] = np.asarray([last_good])
        take = jax.tree.map(lambda a, b: np.concatenate([a, b]), take, end)
    ts = np.asarray(take["k"], dtype=float) * dt

    def model(tree):
        return None if tree is None else eqx.combine(tree, problem.static)

    meta = provenance(problem.flow, alg, alg, algorithm=type(alg).__name__,
                      algorithm_repr=eqx.tree_pformat(alg, short_arrays=False),
                      learning_rate=float(alg.learning_rate), time_step=dt, steps=steps,
                      save_every=save_every, stability_limit=float(alg.stability_limit),
                      diverged_step=diverged_at if diverged else -1)
    meta["stepsize_controller"] = "none (discrete iteration)"
    t_final = last_good * dt
    return Trajectory(
        ts=ts,
        params=model(take.get("w")),
        velocities=model(take.get("v")),
        monitors=dict(take["monitors"]),
        t_final=t_final,
        final_params=model(jax.tree.map(np.asarray, final["w"])),
        final_velocity=model(None if final["v"] is None
                             else jax.tree.map(np.asarray, final["v"])),
        event="non_finite" if diverged else None,
        event_time=diverged_at * dt if diverged else None,
        diverged=diverged,
        success=not diverged,
        result=(f"diverged: iterate {diverged_at} is not finite; kept iterates 0..{last_good}"
                if diverged else "successful"),
        stats={"num_steps": steps, "num_accepted_steps": last_good},
        meta=meta,
    )
