"""Many paths of a stochastic flow: the compiled solve under `jax.vmap` over the
Brownian keys, chunk by chunk.

Chunks rather than all paths at once: on a CPU a vmapped step over 1,000 paths of a
digits MLP was slower per path than chunks of 100-250 (the batched products leave the
cache: 13.0 s against 7.5 s for 1,000 paths of the 64-16-10 MLP on 256 digits).
A step's work grows with examples × parameters, so a small problem takes more paths per
chunk, up to all of them, where the per-chunk overhead is what counts (a 3-4-3 MLP on 10
examples: 1,000 paths in 0.23 s as one chunk, 0.37 s in chunks of 250). Every chunk has
the same shape (the last is padded with repeated keys and cut), so all share one
compilation.
"""

import equinox as eqx
import jax
import numpy as np

from ._solve import solve
from ._spec import RawSolution, SolveSpec

# Paths per vmapped solve at least (see the module docstring), and the work per chunk
# (examples × parameters × paths) that sets it above that for small problems: 2**26 gives
# ~216 paths for the digits MLP of the measurement (256 × 1,210), so 250 there.
PATH_CHUNK = 250
WORK_PER_CHUNK = 2**26


def chunk_size(paths: int, examples: int, parameters: int) -> int:
    """Paths per vmapped chunk for `paths` paths of a problem of this size."""
    return min(paths, max(PATH_CHUNK, WORK_PER_CHUNK // max(examples * parameters, 1)))


@eqx.filter_jit
def _solve_keys(spec: SolveSpec, keys) -> RawSolution:
    return jax.vmap(lambda key: solve(eqx.tree_at(lambda s: s.key, spec, key)))(keys)


def solve_paths(spec: SolveSpec, keys, examples: int) -> RawSolution:
    """`solve(spec)` for every key of `keys` (m,), as one `RawSolution` of NumPy arrays
    with a leading path axis; `examples`: the Brownian dimension (for `chunk_size`)."""
    m = keys.shape[0]
    size = chunk_size(m, examples, sum(x.size for x in jax.tree.leaves(spec.y0)))
    outs = []
    for start in range(0, m, size):
        part = keys[start:start + size]
        if part.shape[0] < size:  # pad: one compiled shape for every chunk
            part = jax.numpy.concatenate([part, keys[: size - part.shape[0]]])
        outs.append(jax.tree.map(np.asarray, _solve_keys(spec, part)))
    return jax.tree.map(lambda *a: np.concatenate(a)[:m], *outs)
