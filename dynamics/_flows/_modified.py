"""Modified equations: the flows that discrete optimizers follow to higher order.

Backward-error analysis (Barrett & Dherin 2021; Kunin et al. 2021) finds, for a discrete
algorithm with step η, a flow whose time-η map agrees with one step to O(η³), so the
iterates stay O(η²) from it over a fixed time, where they are O(η) from the plain flow.

Derivations (each checked numerically in tests/test_gap.py by a fitted gap order of 2):

- GD, w_{k+1} = w_k − η∇L(w_k). Expanding w(t + η) = w + ηẇ + (η²/2)ẅ gives the
  second-order modified flow (η/2)ẅ + ẇ + ∇L = 0; on its slow manifold
  ẅ = H∇L + O(η), so ẇ = −∇L − (η/2)H∇L = −∇(L + (η/4)‖∇L‖²) (Barrett & Dherin's
  implicit gradient regularisation).
- Heavy ball, w_{k+1} = w_k − η∇L + β(w_k − w_{k−1}): the same expansion of both
  differences gives η(1+β)/2 ẅ + (1−β)ẇ + ∇L = 0 (Kunin et al. 2021), and its slow
  manifold ẇ = −(1/(1−β))∇[L + η(1+β)/(4(1−β)²)‖∇L‖²].
- Nesterov momentum with fixed β, y_k = w_k + β(w_k − w_{k−1}),
  w_{k+1} = y_k − η∇L(y_k): the gradient at y_k adds ηβHẇ to the left-hand side,
  η(1+β)/2 ẅ + (1−β)ẇ + ηβHẇ + ∇L = 0; with ẇ = −∇L/(1−β) + O(η) and
  ẅ = H∇L/(1−β)² + O(η) this is ẇ = −(1/(1−β))∇[L + η(1−β+2β²)/(4(1−β)²)‖∇L‖²].
  At β = 0 both momentum coefficients reduce to GD's η/4.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._tree import is_concrete, scale, sqnorm, vdot
from .._validate import finite_nonnegative, float_array
from ._base import AbstractFirstOrderFlow
from ._classical import GeneralFlow


def _check_eta(name, value):
    finite_nonnegative(value, name)


def _check_beta(value):
    if is_concrete(value):
        b = np.asarray(value)
        if not np.all(np.isfinite(b)) or np.any(b < 0) or np.any(b >= 1):
            raise ValueError(f"`beta` must lie in [0, 1), got {value}.")


class AbstractModifiedFlow(AbstractFirstOrderFlow):
    """ẇ = −c ∇(L + a‖∇L‖²): a rescaled gradient flow on a regularised loss.

    Subclasses give the rate c and the regulariser's coefficient a. Energy E = L̃ =
    L + a‖∇L‖², which decreases as dL̃/dt = −c‖∇L̃‖².
    """

    @abc.abstractmethod
    def _rate_and_coefficient(self) -> tuple[Array, Array]:
        """(c, a)."""

    def modified_loss(self, w, loss):
        """L̃(w) = L(w) + a‖∇L(w)‖²."""
        _, a = self._rate_and_coefficient()
        return loss(w) + a * sqnorm(jax.grad(loss)(w))

    def vector_field(self, t, w, loss):
        c, _ = self._rate_and_coefficient()
        return scale(-c, jax.grad(lambda x: self.modified_loss(x, loss))(w))

    def energy(self, t, w, v, loss):
        return self.modified_loss(w, loss)

    def energy_rate(self, t, w, v, loss):
        grad = jax.grad(lambda x: self.modified_loss(x, loss))(w)
        return vdot(grad, self.vector_field(t, w, loss))


class ModifiedGradientFlow(AbstractModifiedFlow):
    """GD's first-order modified flow, ẇ = −∇(L + (η/4)‖∇L‖²) (Barrett & Dherin 2021,
    implicit gradient regularisation). GD stays O(η²) from it at times t = kη.

    **Arguments:** `eta`: GD's learning rate (> 0), stored as an array so a sweep over η
    compiles once.
    """

    eta: Array = eqx.field(converter=float_array)

    def __check_init__(self):
        _check_eta("eta", self.eta)

    def _rate_and_coefficient(self):
        return jnp.ones(()), 0.25 * self.eta


class ModifiedHeavyBallFlow(AbstractModifiedFlow):
    """Heavy ball's first-order modified flow (Kunin et al. 2021),

        ẇ = −(1/(1−β)) ∇[L + η(1+β)/(4(1−β)²) ‖∇L‖²],

    the slow manifold of η(1+β)/2 ẅ + (1−β)ẇ + ∇L = 0; heavy ball started on it
    (w_{−1} = w_0 + η∇L(w_0)/(1−β)) stays O(η²) from it at t = kη.
    """

    eta: Array = eqx.field(converter=float_array)
    beta: Array = eqx.field(converter=float_array)

    def __check_init__(self):
        _check_eta("eta", self.eta)
        _check_beta(self.beta)

    def _rate_and_coefficient(self):
        one_minus = 1.0 - self.beta
        return 1.0 / one_minus, self.eta * (1.0 + self.beta) / (4.0 * one_minus**2)


class ModifiedNesterovMomentumFlow(AbstractModifiedFlow):
    """Nesterov momentum's (fixed β) first-order modified flow,

        ẇ = −(1/(1−β)) ∇[L + η(1−β+2β²)/(4(1−β)²) ‖∇L‖²],

    derived in this module's docstring (the look-ahead gradient lowers heavy ball's
    coefficient 1+β by 2β(1−β)) and verified by a fitted gap order of 2.
    """

    eta: Array = eqx.field(converter=float_array)
    beta: Array = eqx.field(converter=float_array)

    def __check_init__(self):
        _check_eta("eta", self.eta)
        _check_beta(self.beta)

    def _rate_and_coefficient(self):
        one_minus = 1.0 - self.beta
        coefficient = 1.0 - self.beta + 2.0 * self.beta**2
        return 1.0 / one_minus, self.eta * coefficient / (4.0 * one_minus**2)


def modified_second_order_flow(eta, beta=0.0) -> GeneralFlow:
    """The second-order modified flow of GD (β = 0) or heavy ball (Kunin et al. 2021):

        η(1+β)/2 ẅ + (1−β) ẇ + ∇L = 0,   t = kη,

    as a `GeneralFlow` with κ2 = η(1+β)/2 and κ1 = 1 − β.
    """
    _check_beta(beta)
    try:
        eta_f = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"`eta` must be a positive number, got {eta!r}.") from None
    if not eta_f > 0 or eta_f == float("inf"):
        raise ValueError(f"`eta` must be a positive, finite number, got {eta!r}.")
    beta_f = float(beta)
    return GeneralFlow(kappa1=1.0 - beta_f, kappa2=eta_f * (1.0 + beta_f) / 2.0)
