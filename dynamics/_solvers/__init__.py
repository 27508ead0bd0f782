"""Solvers of our own, beside diffrax's, one file each (as diffrax's `_solver/`).

- `_loss_carrying`: `LossCarryingEuler`, what `simulate` runs for Euler with the loss
  monitored on a first-order flow.
- `_verlet`: `VelocityVerlet`, `Yoshida4` (symplectic, separable second-order flows).
- `_conformal`: `ConformalSymplectic` (damped flows κ2 ẅ + κ1 ẇ + ∇L = 0).
- `_gauss_legendre`: `GaussLegendre(s)` (implicit collocation, any flow).
"""

from ._base import AbstractFlowSolver as AbstractFlowSolver
from ._conformal import ConformalSymplectic as ConformalSymplectic
from ._gauss_legendre import GaussLegendre as GaussLegendre
from ._loss_carrying import LossCarryingEuler as LossCarryingEuler
from ._verlet import VelocityVerlet as VelocityVerlet, Yoshida4 as Yoshida4
