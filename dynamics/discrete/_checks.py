"""What `dyn.discrete.run` and its stochastic branch share: the input checks, the
edge-of-stability test, and the `Trajectory` of a finished run."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree, Scalar

from .._problem import Problem
from .._trajectory import Trajectory, provenance
from .._tree import partition, sqnorm
from .._validate import as_tuple
from ..monitors._carrying import all_record_names
from ..monitors._monitors import AbstractIntegralMonitor, AbstractMonitor
from ..monitors._spectrum import Sharpness, TopEigenvalues
from ._algorithms import AbstractDiscreteAlgorithm

# Power iterations for the start check: enough to tell η·λ > limit from η·λ well below
# it; the warning is a diagnostic, not a measurement (the `Sharpness` monitor measures).
# Its Lanczos compiles for ~1 s per problem shape, which every `discrete.run` would pay.
_POWER_ITERATIONS = 30


@eqx.filter_jit
def top_eigenvalue(problem: Problem, w: PyTree) -> Scalar:
    """λ_max(∇²L(w)), the algebraically largest Hessian eigenvalue, to a few digits: power
    iteration on Hessian-vector products gives the dominant eigenvalue λ_d (signed, by
    its Rayleigh quotient); if λ_d < 0, a second power iteration on ∇²L + |λ_d| I (whose
    spectrum is ≥ 0) gives λ_max + |λ_d|. The algebraic, not the absolute, maximum: a
    negative eigenvalue makes GD drift away along its eigenvector, not oscillate across
    the valley."""
    grad = jax.grad(problem.loss)
    leaves, treedef = jax.tree.flatten(w)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    u0 = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves, strict=True)])

    def power(shift):
        def body(_, carry):
            u, _ = carry
            u = jax.tree.map(lambda x: x / jnp.sqrt(sqnorm(u) + 1e-300), u)
            hu = jax.tree.map(lambda a, b: a + shift * b, jax.jvp(grad, (w,), (u,))[1], u)
            return hu, sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(u),
                                                          jax.tree.leaves(hu), strict=True))

        _, rayleigh = jax.lax.fori_loop(0, _POWER_ITERATIONS, body, (u0, jnp.zeros(())))
        return rayleigh - shift

    dominant = power(0.0)
    return jax.lax.cond(dominant >= 0, lambda: dominant, lambda: power(-dominant))


def edge_of_stability(alg: AbstractDiscreteAlgorithm, problem: Problem, w: PyTree,
                      *, warn: bool = True) -> float:
    """η·λ_max(∇²L(w)) for `alg` at `w`, warning when it exceeds `alg.stability_limit`:
    there the iteration is unstable along the top eigenvector and the modified
    equations (an expansion in η·λ) no longer describe it."""
    lam = float(top_eigenvalue(problem, w))
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


def edge_of_stability_along(alg: AbstractDiscreteAlgorithm, traj: Trajectory,
                            monitors: tuple, *, initial_warned: bool) -> float | None:
    """The first save time at which a recorded `Sharpness` or `TopEigenvalues` shows
    η·λ_1 past `alg.stability_limit`, warning there, or None. The check at the start
    sees only w_0; with such a monitor the run is checked at every save for free, and
    progressive sharpening (λ_1 rising to 2/η, Cohen et al. 2021) is caught where it
    happens. No second warning when the start was already past the limit."""
    for m in monitors:
        if not isinstance(m, (Sharpness, TopEigenvalues)):
            continue
        lam = np.asarray(traj.monitors[m.name], dtype=float).reshape(len(traj.ts), -1)[:, 0]
        past = np.flatnonzero(float(alg.learning_rate) * lam > alg.stability_limit)
        if past.size == 0:
            return None
        t = float(traj.ts[past[0]])
        if not initial_warned and past[0] > 0:
            warnings.warn(
                f"{type(alg).__name__}: η·λ_max (monitor {m.name!r}) reaches "
                f"{float(alg.learning_rate) * lam[past[0]]:.3g} > {alg.stability_limit:.3g} "
                f"at t = {t:.6g} (edge of stability): from there the flow and the modified "
                "equations need not describe the run.",
                RuntimeWarning,
                stacklevel=3,
            )
        return t
    return None


def where_ok(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)



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
    names = all_record_names(monitors)  # with the records a carrying monitor adds
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


def discrete_trajectory(alg, problem, saved, final, diverged_at, steps, save_every) -> Trajectory:
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
