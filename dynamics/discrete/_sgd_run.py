"""The compiled loop of the stochastic algorithms: many paths of minibatch SGD (or SVAG)
under `jax.vmap`, one `lax.scan` over the save points with a loop over the steps between
them, the minibatches drawn inside from each path's key (`Minibatches`).

`dyn.discrete.run` calls `run_stochastic` for an `AbstractStochasticAlgorithm`;
`dyn.weak_order` calls `stochastic_paths` directly, with a stride on the common time
grid and the control variate's vectors. The step size, the number of steps between saves
and the stride are traced, so all step sizes of a weak-order fit share one compilation.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._driver._paths import PATH_CHUNK
from .._paths import Paths, mask_after
from .._tree import all_finite
from ..monitors._carrying import init_carries, save_records
from ..monitors._stochastic import AbstractMinibatchMonitor
from ._checks import check_monitors, discrete_trajectory, edge_of_stability, validate_v0, where_ok
from ._minibatch import Minibatches
from ._sgd import SVAG, AbstractStochasticAlgorithm, StochasticState


def _finite(state: StochasticState):
    finite = all_finite(state.w)
    for part in (state.v, state.grad):
        if part is not None:
            finite = finite & all_finite(part)
    return finite


@eqx.filter_jit
def _paths(alg: AbstractStochasticAlgorithm, problem, data, w0, v0, keys, n_saves: int,
           save_every, stride, noise_vectors, monitors, save_params: bool):
    dt = alg.time_step

    def one(key):
        batches = Minibatches(data, problem.static, key, stride, alg.batch_size,
                              alg.replacement)

        def record(k, state, carries):
            # (the carrying monitors' new carries, this save's record)
            t = k * dt

            def value(m):
                if isinstance(m, AbstractMinibatchMonitor):
                    return m.minibatch_value(t, state.w, state.v, state.grad, problem)
                return m(t, state.w, state.v, problem)

            carries, out = save_records(monitors, carries, t, state.w, state.v, problem,
                                        value)
            saved = {"monitors": out, "k": k}
            if save_params:
                saved.update(w=state.w, v=state.v)
            return carries, saved

        def one_step(k, carry):
            state, diverged_at, cv = carry
            new, noise = alg.step(k, state, batches)
            finite = _finite(new)
            alive = diverged_at < 0
            ok = finite & alive
            # A non-finite step freezes the path at its last finite iterate (recorded
            # as diverged); the loop goes on for the other paths of the vmap.
            state = where_ok(ok, new, state)
            diverged_at = jnp.where(alive & ~finite, k + 1, diverged_at)
            if noise_vectors is not None:
                # The control variate Σ_k Σ_c c·mean_{n∈B} u_{k,n}: mean zero given the
                # past, since E mean_{n∈B} u_n = mean(u) = 0 (u is centred).
                u = noise_vectors[k * stride]
                step_cv = sum(c * jnp.mean(u[:, batch], axis=-1) for c, batch in noise)
                cv = cv + jnp.where(ok, step_cv, 0.0)
            return state, diverged_at, cv

        def outer(carry, _):
            k, state, diverged_at, cv, carries = carry
            state, diverged_at, cv = jax.lax.fori_loop(k, k + save_every, one_step,
                                                       (state, diverged_at, cv))
            k = k + save_every
            carries, saved = record(k, state, carries)
            return (k, state, diverged_at, cv, carries), saved

        state0 = alg.init(w0, v0, batches)
        k0 = jnp.zeros((), jnp.int32)
        cv0 = (jnp.zeros(()) if noise_vectors is None
               else jnp.zeros(noise_vectors.shape[1], noise_vectors.dtype))
        carries, first = record(k0, state0, init_carries(monitors, w0, problem))
        carry = (k0, state0, jnp.full((), -1, jnp.int32), cv0, carries)
        carry, saved = jax.lax.scan(outer, carry, None, length=n_saves)
        saved = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, saved)
        _, final, diverged_at, cv, _ = carry
        return saved, {"w": final.w, "v": final.v}, diverged_at, cv

    return jax.vmap(one)(keys)


def stochastic_paths(alg, problem, data, w0, v0, keys, n_saves: int, save_every: int, *,
                     stride: int = 1, noise_vectors=None, monitors=(),
                     save_params: bool = False, chunk: int = PATH_CHUNK):
    """Run `alg` on every key of `keys` (m,), in vmapped chunks of `chunk` paths (the
    last padded: one compilation), and return NumPy (saved, final, diverged_at, cv)
    with a leading path axis: `saved` the monitors (and w, v) at steps 0, save_every,
    ..., n_saves·save_every, `diverged_at` the first non-finite step or −1, `cv` the
    control variate per observable (0 without `noise_vectors`)."""
    m = keys.shape[0]
    size = min(chunk, m)
    outs = []
    for start in range(0, m, size):
        part = keys[start:start + size]
        if part.shape[0] < size:
            part = jnp.concatenate([part, keys[: size - part.shape[0]]])
        out = _paths(alg, problem, data, w0, v0, part, n_saves,
                     jnp.asarray(save_every, jnp.int32), jnp.asarray(stride, jnp.int32),
                     noise_vectors, tuple(monitors), save_params)
        outs.append(jax.tree.map(np.asarray, out))
    return jax.tree.map(lambda *a: np.concatenate(a)[:m], *outs)


def paths_result(alg, problem, saved, final, diverged_at, steps: int, meta: dict) -> Paths:
    """`Paths` of a batched SGD run: values after a path's divergence are NaN."""
    dt = float(alg.time_step)
    ks = np.asarray(saved["k"])[0]
    diverged = diverged_at >= 0
    last_good = np.where(diverged, diverged_at - 1, steps)
    reached = ks[None, :] <= last_good[:, None]

    def model(tree, fn):
        return None if tree is None else eqx.combine(jax.tree.map(fn, tree), problem.static)

    return Paths(
        ts=ks * dt,
        monitors={k: mask_after(v, reached) for k, v in saved["monitors"].items()},
        params=model(saved.get("w"), lambda a: mask_after(a, reached)),
        velocities=model(saved.get("v"), lambda a: mask_after(a, reached)),
        final_params=model(final["w"], np.asarray),
        final_velocity=model(final["v"], np.asarray),
        diverged=diverged,
        t_final=last_good * dt,
        meta={**meta, "paths": int(diverged.shape[0]), "diverged_paths": int(diverged.sum())},
    )


def run_stochastic(alg, params, loss, steps, *, v0, monitors, save_every, projection, key,
                   check_stability: bool, save_params: bool):
    """`dyn.discrete.run` for an `AbstractStochasticAlgorithm` (its checks are `run`'s,
    plus the loss's examples, the batch size and the key)."""
    from .._driver._prepare import validate_params
    from .._problem import Problem
    from .._sampling import check_batch_size
    from .._trajectory import provenance
    from .._validate import prng_keys
    from ..losses._per_example import as_data_loss, check_example_losses

    name = type(alg).__name__
    if projection is not None:
        raise ValueError(f"`projection` is not supported with {name}; drop it.")
    if key is None:
        raise ValueError(
            f"{name} draws its minibatches from a PRNG key: pass key=jax.random.key(0) "
            "(one path) or key=jax.random.split(jax.random.key(0), m) (m paths).")
    keys, batched = prng_keys(key, f"run with {name}")
    w0, static = validate_params(params)
    data = as_data_loss(loss, f"run with {name}")
    check_example_losses(data, params, f"run with {name}")
    check_batch_size(alg.batch_size, data.num_examples, name)
    v = validate_v0(alg, w0, v0)
    monitors = check_monitors(monitors)
    if isinstance(alg, SVAG) and any(isinstance(m, AbstractMinibatchMonitor) for m in monitors):
        raise ValueError(
            "SVAG draws several minibatches inside each step and carries no gradient: "
            "minibatch monitors (SGDChargeDrift) are for SGD, HeavyBallSGD, NesterovSGD.")
    problem = Problem(alg.flow, loss, static)
    if check_stability:
        edge_of_stability(alg, problem, w0)
    saved, final, diverged_at, _ = stochastic_paths(
        alg, problem, data, w0, v, keys if batched else keys[None], steps // save_every,
        save_every, monitors=monitors, save_params=save_params)
    if not batched:
        one = jax.tree.map(lambda a: a[0], (saved, final))
        return discrete_trajectory(alg, problem, one[0], one[1], int(diverged_at[0]), steps,
                           save_every)
    meta = provenance(problem.flow, alg, alg, algorithm=name,
                      algorithm_repr=eqx.tree_pformat(alg, short_arrays=False),
                      learning_rate=float(alg.learning_rate),
                      time_step=float(alg.time_step), steps=steps, save_every=save_every,
                      batch_size=alg.batch_size, replacement=int(alg.replacement))
    meta["stepsize_controller"] = "none (discrete iteration)"
    return paths_result(alg, problem, saved, final, diverged_at, steps, meta)
