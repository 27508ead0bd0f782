"""What our solvers share: the hook by which a solver builds its own diffrax terms,
and the dense output they use."""

import abc

import diffrax
import jax
from jaxtyping import PyTree

from .._flows import AbstractFlow, Loss


class AbstractFlowSolver(diffrax.AbstractSolver):
    """A solver that needs more of the flow than one vector field (e.g. the damping
    coefficients κ1, κ2 of `ConformalSymplectic`).

    `simulate` hands such a solver the flow and the loss and integrates the terms it
    returns; the solver also says there which flows it accepts.
    """

    @abc.abstractmethod
    def make_terms(self, flow: AbstractFlow, loss: Loss) -> PyTree[diffrax.AbstractTerm]:
        """The diffrax terms of `flow` under `loss`; raises ValueError for a flow it
        cannot integrate."""


def hermite_info(t0, t1, y0, y1, f0, f1) -> dict:
    """Dense info for `diffrax.ThirdOrderHermitePolynomialInterpolation`: the states and
    their time derivatives f at both step ends. A third-order dense output at no extra
    evaluation (every solver here has f at the step ends anyway)."""
    h = t1 - t0
    scale = lambda tree: jax.tree.map(lambda x: h * x, tree)  # noqa: E731
    return dict(y0=y0, y1=y1, k0=scale(f0), k1=scale(f1))
