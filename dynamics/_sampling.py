"""Minibatches: how they are drawn, the covariance of their mean gradient, and the
oracle a stochastic algorithm asks for them inside the compiled loop.

Sampling (`draw_batch`): with replacement, b independent uniform indices; without, a
uniform b-subset by Floyd's algorithm (b integer draws; the law of `top_k` of n
uniforms at ~1/80 of its cost under vmap on a CPU), drawn *independently at every
step*. That is the process the SME describes; epoch-wise reshuffling is another one (the
minibatch noise of an epoch sums to zero at fixed w; Smith et al., ICLR 2021) and is not
offered.

Covariance (`batch_factor`): with Σ_1(w) = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ the population
covariance of the per-example gradients g_i = ∇ℓ_i and ĝ_B the mean over the batch,
E ĝ_B = ḡ = ∇L and Cov ĝ_B = c_b Σ_1 with

    c_b = 1/b                    (with replacement),
    c_b = (n − b) / (b (n − 1))  (without: the finite-population correction).

Keys (`Minibatches.indices`): the batch of step k in slot s is drawn from
fold_in(fold_in(path_key, k·stride), s). `stride` places the step on a common time grid
(`dyn.weak_order` sets it to Δt / h_fine), so that runs at different step sizes, and
SGD and its SME reference, draw the same batches where their grids meet (common random
numbers), while each run's own law stays exact.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

from ._validate import positive_int


def batch_factor(num_examples: int, batch_size: int, replacement: bool) -> float:
    """c_b with Cov ĝ_B = c_b Σ_1 (module docstring): 1/b with replacement,
    (n − b)/(b(n − 1)) without (0 at b = n: full-batch GD has no noise)."""
    n, b = int(num_examples), int(batch_size)
    if replacement:
        return 1.0 / b
    return 0.0 if n == 1 else (n - b) / (b * (n - 1.0))


def check_batch_size(batch_size, num_examples: int, owner: str) -> int:
    """`batch_size` as an int in [1, n]. **Raises:** `ValueError` naming `owner` and
    the number of examples otherwise."""
    b = positive_int(batch_size, "batch_size", owner)
    if b > num_examples:
        raise ValueError(
            f"{owner}: `batch_size` = {b} is larger than the data ({num_examples} "
            f"examples); use batch_size <= {num_examples} (batch_size = "
            f"{num_examples} without replacement is full-batch GD)."
        )
    return b


def draw_batch(key: PRNGKeyArray, num_examples: int, batch_size: int,
               replacement: bool) -> Int[Array, " b"]:
    """b example indices: i.i.d. uniform (`replacement`), or a uniform b-subset by
    Floyd's algorithm: for j = 0..b−1 draw t uniform in [0, n−b+j] and insert t, or
    n−b+j if t is already in (n−b+j cannot be: every earlier entry is below it)."""
    n, b = num_examples, batch_size
    if replacement:
        return jax.random.randint(key, (b,), 0, n)
    draws = jax.random.randint(key, (b,), 0, jnp.arange(n - b, n) + 1)

    def insert(j, chosen):
        t = draws[j]
        return chosen.at[j].set(jnp.where(jnp.any(chosen == t), n - b + j, t))

    return jax.lax.fori_loop(0, b, insert, jnp.full((b,), -1, draws.dtype))
