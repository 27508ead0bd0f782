"""`Minibatches`: the oracle a stochastic algorithm asks for its minibatches inside the
compiled loop (drawing and covariance: `dynamics._sampling`)."""

import equinox as eqx
import jax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from .._sampling import draw_batch
from ..losses._losses import AbstractDataLoss


class Minibatches(eqx.Module):
    """One path's minibatch oracle: the batch of step k in slot s (`indices`), and the
    gradient and Hessian-vector product of the loss on a batch (`grad`, `hvp`), on the
    dynamic part `w` of the params."""

    data: AbstractDataLoss
    static: PyTree
    key: PRNGKeyArray
    stride: Array
    batch_size: int = eqx.field(static=True)
    replacement: bool = eqx.field(static=True)

    def indices(self, k, slot: int) -> Int[Array, " b"]:
        key = jax.random.fold_in(jax.random.fold_in(self.key, k * self.stride), slot)
        return draw_batch(key, self.data.num_examples, self.batch_size, self.replacement)

    def loss(self, w: PyTree, index) -> Array:
        return self.data.subset(index)(eqx.combine(w, self.static))

    def grad(self, w: PyTree, index) -> PyTree:
        """ĝ_B(w), the gradient of the mean loss over the examples `index`."""
        return jax.grad(self.loss)(w, index)

    def hvp(self, w: PyTree, index, u: PyTree) -> PyTree:
        """∇²L_B(w) u, the Hessian of the batch loss times u (forward over reverse)."""
        return jax.jvp(lambda x: self.grad(x, index), (w,), (u,))[1]
