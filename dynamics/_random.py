"""Normal draws whose sampler compiles once per size bucket instead of once per shape.

XLA compiles JAX's threefry sampler for every output shape (~0.35 s each on a CPU), and
building models of many sizes (a sweep over widths, a test suite) spent most of its time
there. With JAX's partitionable threefry (the default since 0.5) element i of a draw
depends only on the key and i, so `normal(key, (n,))` is the first n elements of
`normal(key, (N,))` for any N ≥ n, and a shape is a reshape of that prefix: drawing a
power-of-two size and cutting gives exactly the numbers `jax.random.normal` gives.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_MIN_BUCKET = 1024


@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def _draw(key, size: int, dtype):
    return jax.random.normal(key, (size,), dtype)


def _bucketable(key) -> bool:
    return (not isinstance(key, jax.core.Tracer)
            and jax.config.jax_threefry_partitionable
            and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(key)) == "threefry2x32")


def normal(key, shape: tuple[int, ...], dtype=None) -> jax.Array:
    """`jax.random.normal(key, shape, dtype)`, the same numbers, from a sampler compiled
    for a power-of-two size (at least 1024). Falls back to `jax.random.normal` under a
    transformation (a traced key), for raw uint32 keys and other PRNG implementations."""
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
    if not _bucketable(key):
        return jax.random.normal(key, shape, dtype)
    n = math.prod(shape)
    size = max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    # Cut and reshape in NumPy: as jax ops each new shape would compile again.
    return from_numpy(np.asarray(_draw(key, size, dtype))[:n].reshape(shape))


def from_numpy(a: np.ndarray) -> jax.Array:
    """A NumPy array on the device, as `jnp.asarray(a)` gives it (dtype canonicalised),
    without compiling: `jnp.asarray` of a NumPy array stages a small jit per new shape
    (~18 ms each on this CPU: 150 of them were 3 s of drawing 100 random nets), where
    `jax.device_put` only copies."""
    return jax.device_put(np.asarray(a))
