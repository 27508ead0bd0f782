"""What a flow, a monitor and an event see of a run: the flow, the loss, the model's
static parts. Kept apart from `_simulate` so monitors and events need not import it."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import PyTree, Scalar

from ._flows import AbstractFlow


class Problem(eqx.Module):
    """A flow together with its loss, on the dynamic (inexact-array) part of the params.

    `w` and `v` throughout are the dynamic parts; `params(w)` puts the static parts of
    the model (activations, widths) back so that user code sees an ordinary model.
    """

    flow: AbstractFlow
    user_loss: Callable[[PyTree], Scalar]
    static: PyTree

    def params(self, w: PyTree) -> PyTree:
        return eqx.combine(w, self.static)

    def loss(self, w: PyTree) -> Scalar:
        return self.user_loss(self.params(w))
