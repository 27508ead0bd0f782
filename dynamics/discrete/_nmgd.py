"""Norm-minimizing gradient descent (NMGD), Theory III eq. 26: gradient descent with a
Halpern term that pulls toward 0 with a vanishing weight λ_n = n^(−a)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._flows import HalpernFlow
from ._algorithms import AbstractFirstOrderAlgorithm, _step_size


def _exponent(value) -> np.ndarray:
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"NMGD: `a` must be a number in (0, 1), got {value!r}.") from None
    if out.shape != () or not (0 < out < 1):
        raise ValueError(
            "NMGD: `a` must lie in (0, 1): λ_n = n^(-a) must vanish (a > 0) with a divergent "
            f"sum (a ≤ 1; Halpern's Theorem 5 asks a < 1), got {value!r}."
        )
    return out


def _first_index(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) \
            or value < 1 or int(value) != value:
        raise ValueError(f"NMGD: `n0` must be an int >= 1 (λ_n = n^(-a)), got {value!r}.")
    return int(value)


class _ShiftedPowerDecay(eqx.Module):
    """λ(t) = (n0 + t/γ)^(−a): NMGD's λ_n at t = (n − n0)γ."""

    a: Array
    gamma: Array
    n0: Array

    def __call__(self, t):
        return (self.n0 + t / self.gamma) ** (-self.a)


class NMGD(AbstractFirstOrderAlgorithm):
    """Norm-minimizing gradient descent (Theory III eq. 26, App. 12):

        w_{n+1} − w_n = −(1 − λ_n) γ ∇L(w_n) − λ_n w_n,    λ_n = n^(−a),

    with n counted from `n0` (the k-th step of a run uses n = n0 + k). Halpern's
    Theorem 5 (their eq. 25): for 0 < a < 1 the iterates converge to the minimizer of
    smallest norm (the fixed point of T = I − γ∇L nearest the anchor 0), for least
    squares the pseudo-inverse solution, from any start.

    With the paper's n0 = 1, λ_1 = 1 and the first step lands exactly at w_1 = 0: the
    start is erased, and "independent of the initial point" is then trivial. Take
    n0 > 1 to see that the limit is still the minimum-norm solution because of the
    vanishing pull toward 0, not because of the erased start (tests/test_theory3.py).

    Time map t = (n − n0) γ. The continuous counterpart, `flow`, is the Halpern flow
    ẇ = −(1 − λ(t))∇L − λ(t) w with λ(t) = (n0 + t/γ)^(−a): the same gradient weight,
    but the discrete pull λ_n w_n per step is a rate λ_n/γ, so the two share their
    limit, not their path (no gap order in γ is claimed).
    """

    gamma: Array = eqx.field(converter=_step_size("gamma"))
    a: Array = eqx.field(converter=_exponent)
    # An array, not a static int: continuing a run from step n (n0 = n) reuses the compiled loop.
    n0: Array = eqx.field(default=1, converter=lambda v: np.float64(_first_index(v)))

    @property
    def learning_rate(self):
        return self.gamma

    @property
    def flow(self):
        return HalpernFlow(_ShiftedPowerDecay(self.a, self.gamma, self.n0))

    def update(self, k, w, grad):
        lam = (self.n0 + jnp.asarray(k, jnp.result_type(float))) ** (-self.a)
        return jax.tree.map(lambda x, g: x - (1.0 - lam) * self.gamma * g - lam * x, w, grad)
