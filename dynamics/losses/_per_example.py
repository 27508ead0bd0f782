"""Per-example losses: a user's own (`PerExample`), and a data loss plus weight penalties
seen as one (`as_data_loss`), for minibatch SGD and the stochastic modified equations.

Both need the loss's examples: SGD averages a subset of them, the SME's diffusion is
the covariance of that average (`dyn.SME`). The four data losses of this package
(`mse`, `cross_entropy`, `exponential`, `logistic`) are `AbstractDataLoss`es already.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Scalar

from ._losses import AbstractDataLoss, AbstractLoss, L2Penalty, LpPenalty, Sum

__all__ = ["PerExample", "Penalized", "as_data_loss"]


class PerExample(AbstractDataLoss):
    """A user's loss given per example: ℓ_i(w) = `fn(params, example_i)`, L = mean_i ℓ_i.

    **Arguments:**

    - `fn`: `fn(params, example) -> scalar`, a pure function of the model and one
      example (one slice of `data` along its first axis), e.g.
      `lambda m, ex: (m(ex["x"])[0] - ex["y"]) ** 2`. It is vmapped over the examples;
      it must not close over arrays that change between calls (it is a static field,
      hashed by identity).
    - `data`: a pytree of arrays (a dict, a tuple, a `dyn.datasets.Dataset`) whose leaves
      all have the same first dimension n ≥ 1, the number of examples.

    **Raises:** `ValueError` if `fn` is not callable, `data` holds no arrays, or its
    leaves disagree on n. A `fn` that does not return one real scalar per example is
    refused where the loss is first used (`dyn.discrete.run`, `dyn.simulate`).
    """

    fn: Callable = eqx.field(static=True)
    data: PyTree

    def __init__(self, fn: Callable, data: PyTree):
        if not callable(fn):
            raise ValueError(
                f"PerExample: `fn` must be a function (params, example) -> scalar, got "
                f"{type(fn).__name__}."
            )
        arrays = [jnp.asarray(x) if not isinstance(x, jax.Array) else x
                  for x in jax.tree.leaves(data)]
        if not arrays:
            raise ValueError(
                "PerExample: `data` holds no arrays; pass the examples as a pytree of arrays "
                "with the example index first, e.g. {'x': x, 'y': y}."
            )
        sizes = {a.shape[0] if a.ndim else None for a in arrays}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError(
                "PerExample: every array in `data` must have the same first dimension n >= 1 "
                f"(the example index), got first dimensions {sorted(map(str, sizes))}."
            )
        self.fn = fn
        self.data = jax.tree.unflatten(jax.tree.structure(data), arrays)

    def example_losses(self, params: PyTree) -> Float[Array, " n"]:
        return jax.vmap(self.fn, in_axes=(None, 0))(params, self.data)

    @property
    def num_examples(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    def subset(self, index: Int[ArrayLike, " b"]) -> "PerExample":
        return eqx.tree_at(lambda s: s.data, self, jax.tree.map(lambda a: a[index], self.data))


class Penalized(AbstractDataLoss):
    """A data loss plus weight penalties, L = mean_i ℓ_i + Σ_j R_j, as per-example losses
    ℓ_i + Σ_j R_j: a minibatch averages the data term over its examples and keeps the
    penalties whole, and the penalties (the same for every example) add no noise.
    Built by `as_data_loss` from `total(data_loss, l2(λ), ...)`."""

    data: AbstractDataLoss
    penalties: tuple[AbstractLoss, ...]

    def _penalty(self, params):
        return sum((p(params) for p in self.penalties), jnp.zeros(()))

    def example_losses(self, params: PyTree) -> Float[Array, " n"]:
        return self.data.example_losses(params) + self._penalty(params)

    def __call__(self, params: PyTree) -> Scalar:
        # The same sum of terms as `Sum`, in its order: the data term where it stood.
        return self.data(params) + self._penalty(params)

    @property
    def num_examples(self) -> int:
        return self.data.num_examples

    def subset(self, index: Int[ArrayLike, " b"]) -> "Penalized":
        return Penalized(self.data.subset(index), self.penalties)


def as_data_loss(loss, owner: str) -> AbstractDataLoss:
    """`loss` as an `AbstractDataLoss`: itself, or a `Sum` of one data loss and weight
    penalties (`l2`, `lp`) as `Penalized`.

    **Raises:** `ValueError` naming `owner` for any other loss (a plain function, a sum
    with no or two data terms): SGD and the SME need the examples of the loss.
    """
    if isinstance(loss, AbstractDataLoss):
        return loss
    if isinstance(loss, Sum):
        data = [t for t in loss.terms if isinstance(t, AbstractDataLoss)]
        others = tuple(t for t in loss.terms if not isinstance(t, AbstractDataLoss))
        if len(data) == 1 and all(isinstance(t, (L2Penalty, LpPenalty)) for t in others):
            return Penalized(data[0], others)
    raise ValueError(
        f"{owner}: the loss must expose its examples: a data loss of dyn.losses (mse, "
        "cross_entropy, exponential, logistic), such a loss plus l2/lp penalties, or a "
        "per-example loss dyn.losses.PerExample(fn, data); got "
        f"{type(loss).__name__}."
    )


def check_example_losses(data: AbstractDataLoss, params: PyTree, owner: str) -> int:
    """n, after checking on shapes alone that `data.example_losses(params)` is one real
    scalar per example. **Raises:** `ValueError` naming `owner` otherwise."""
    try:
        out = jax.eval_shape(data.example_losses, params)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{owner}: the per-example losses could not be evaluated on `params`: {exc}"
        ) from exc
    n = data.num_examples
    if getattr(out, "shape", None) != (n,) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"{owner}: the per-example losses must be one real scalar per example, shape "
            f"({n},), got {jax.tree.map(lambda x: (x.shape, x.dtype), out)!r}; a "
            "PerExample `fn` must return a scalar for one example."
        )
    return int(n)
