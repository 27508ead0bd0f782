"""Small pytree helpers shared by the flows, monitors and the driver.

Parameters are arbitrary pytrees (an `MLP`, a plain array, a dict of arrays). The
dynamic part that diffrax integrates holds only the inexact arrays; everything else
(activations, static widths) is kept aside and recombined before the loss is called.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar


def partition(params: PyTree) -> tuple[PyTree, PyTree]:
    """Split `params` into (inexact arrays, everything else), as `eqx.partition` does."""
    return eqx.partition(params, eqx.is_inexact_array)


def leaves(tree: PyTree) -> list[Array]:
    return [x for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]


def vdot(a: PyTree, b: PyTree) -> Scalar:
    """⟨a, b⟩ summed over all leaves."""
    terms = [jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b), strict=True)]
    return sum(terms, start=jnp.zeros(()))


def sqnorm(a: PyTree) -> Scalar:
    """‖a‖² summed over all leaves."""
    return sum((jnp.sum(x**2) for x in leaves(a)), start=jnp.zeros(()))


def axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y, leafwise."""
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def scale(alpha, x: PyTree) -> PyTree:
    return jax.tree.map(lambda a: alpha * a, x)


def zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def is_concrete(tree: PyTree) -> bool:
    """True when no leaf is a tracer: values can be inspected for input validation."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def all_finite(x: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves(x)]))
