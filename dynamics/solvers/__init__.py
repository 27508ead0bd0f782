"""Structure-preserving solvers that `simulate` accepts beside diffrax's:
`dyn.solvers.VelocityVerlet()`, `Yoshida4()`, `ConformalSymplectic()`, `GaussLegendre(s)`."""

from ._base import AbstractFlowSolver as AbstractFlowSolver
from ._conformal import ConformalSymplectic as ConformalSymplectic
from ._gauss_legendre import GaussLegendre as GaussLegendre
from ._verlet import VelocityVerlet as VelocityVerlet, Yoshida4 as Yoshida4
