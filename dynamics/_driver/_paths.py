"""Many paths of a stochastic flow: the compiled solve under `jax.vmap` over the
Brownian keys, chunk by chunk.

Chunks rather than all paths at once: on a CPU a vmapped step over 1,000 paths of a
digits MLP was slower per path than chunks of 100-250 (the batched products leave the
cache; /work/scratch/sme, bench_diffrax2.log: 13.0 s against 7.5 s for 1,000 paths).
Every chunk has the same shape (the last is padded with repeated keys and cut), so all
share one compilation.
"""

import equinox as eqx
import jax
import numpy as np

from ._solve import solve
from ._spec import RawSolution, SolveSpec

# Paths per vmapped solve (see the module docstring).
PATH_CHUNK = 250


@eqx.filter_jit
def _solve_keys(spec: SolveSpec, keys) -> RawSolution:
    return jax.vmap(lambda key: solve(eqx.tree_at(lambda s: s.key, spec, key)))(keys)


def solve_paths(spec: SolveSpec, keys, chunk: int = PATH_CHUNK) -> RawSolution:
    """`solve(spec)` for every key of `keys` (m,), as one `RawSolution` of NumPy arrays
    with a leading path axis."""
    m = keys.shape[0]
    size = min(chunk, m)
    outs = []
    for start in range(0, m, size):
        part = keys[start:start + size]
        if part.shape[0] < size:  # pad: one compiled shape for every chunk
            part = jax.numpy.concatenate([part, keys[: size - part.shape[0]]])
        outs.append(jax.tree.map(np.asarray, _solve_keys(spec, part)))
    return jax.tree.map(lambda *a: np.concatenate(a)[:m], *outs)
