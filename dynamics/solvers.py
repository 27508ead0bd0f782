"""Structure-preserving solvers that `simulate` accepts beside diffrax's:
`dyn.solvers.VelocityVerlet()`, `Yoshida4()`, `ConformalSymplectic()`, `GaussLegendre(s)`."""

from ._solvers import (
    AbstractFlowSolver as AbstractFlowSolver,
    ConformalSymplectic as ConformalSymplectic,
    GaussLegendre as GaussLegendre,
    VelocityVerlet as VelocityVerlet,
    Yoshida4 as Yoshida4,
)
