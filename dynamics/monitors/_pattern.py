"""The activation pattern of a piecewise-linear network along a run."""

from typing import ClassVar

from .._models import MLP
from .._surfaces import Surfaces, data_term_index
from ._monitors import AbstractMonitor


class ActiveFraction(AbstractMonitor):
    """Fraction of (example, unit) pairs with a positive pre-activation, per hidden
    layer, on the inputs of the loss (a data loss of `dyn.losses`): how much of a ReLU
    network is switched on along a run. One value per hidden layer."""

    name: ClassVar[str] = "active_fraction"

    def __call__(self, t, w, v, problem):
        model = problem.params(w)
        if not isinstance(model, MLP):
            raise ValueError(
                f"ActiveFraction: needs a dyn.MLP, got {type(model).__name__}."
            )
        if data_term_index(problem.user_loss) is None:
            raise ValueError(
                "ActiveFraction: reads the inputs of the loss, which must be a data loss "
                "of dyn.losses (mse, cross_entropy, exponential, logistic), alone or plus "
                f"penalties; got {type(problem.user_loss).__name__}."
            )
        if model.depth < 2:
            raise ValueError("ActiveFraction: the MLP has no hidden layer.")
        return Surfaces(problem.user_loss, model).active_fraction(model)
