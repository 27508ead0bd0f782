"""Minibatch SGD on its flow's time axis, with heavy-ball and Nesterov momentum, and SVAG,
the weak scheme for the same stochastic modified equations.

| algorithm | update (ĝ_B: mean gradient over a fresh minibatch B_k) | flow | Δt |
| SGD | w ← w − η ĝ_B(w) | SME(η, b) | η |
| HeavyBallSGD | v ← βv − ĝ_B(w); w ← w + ηv | SME(η, b, beta=β) (order 1) | η |
| NesterovSGD | y = w + βηv; w' = y − η ĝ_B(y); v ← (w' − w)/η | SME(η, b, beta=β) (order 1) | η |
| SVAG | w ← w − h[a₁ĝ_{B1} + a₂ĝ_{B2} (+ (η/2) H_{B3} ĝ_{B4})], h = η/ℓ | SME(η, b, order) | η/ℓ |

Velocities are in the flow's time units, v_k = (w_k − w_{k−1})/η, as for `HeavyBall`.

A stochastic algorithm advances a `StochasticState` (w, v, grad, batch): for the SGDs
`grad` is the minibatch gradient the next step uses and `batch` its example indices,
drawn at the end of the previous step (first same as last, as `GD` carries ∇L), so n
steps cost n + 1 minibatch gradients and a monitor at iterate k sees the gradient of
step k (`dyn.monitors.SGDChargeDrift`: the exact charge change of that step). Its
`step` also returns the step's noise as weighted batches ((c, B), ...): the step's
deviation from its mean is Σ c (ĝ_B − ∇L), which `dyn.weak_order`'s control variate
pairs with the gradient flow's linear response.
"""

import abc
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._flows import SME
from .._tree import axpy
from .._validate import one_of, positive_int, traced_scalar
from ._algorithms import AbstractDiscreteAlgorithm
from ._minibatch import Minibatches

# The slot of SGD's batch: SVAG's first batch at the same time index is the same batch,
# which couples SGD with its SME reference (common random numbers).
SGD_SLOT = 1


class StochasticState(NamedTuple):
    """w_k, v_k (flow-time velocity or None), and the minibatch gradient of the next
    step with its example indices (None for SVAG, which draws inside the step)."""

    w: PyTree
    v: PyTree | None
    grad: PyTree | None
    batch: Array | None


Noise = tuple[tuple[Array, Array], ...]


def _check_replacement(value, owner):
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `replacement` must be True or False, got {value!r}.")
    return value


class AbstractStochasticAlgorithm(AbstractDiscreteAlgorithm):
    """A discrete optimizer driven by minibatches drawn from a key (`dyn.discrete.run`
    with `key=`). Subclasses give `batch_size`, `replacement`, `flow`, `time_step`,
    `learning_rate`, `init(w, v, batches)` and `step(k, state, batches)` (the new state
    and the step's noise, module docstring), with `batches` a `Minibatches` oracle.
    `skeleton_rate` is κ in the deterministic skeleton ẇ = −κ∇L the control variate
    linearises about (1, or 1/(1−β) with momentum)."""

    batch_size: eqx.AbstractVar[int]
    replacement: eqx.AbstractVar[bool]

    @property
    def skeleton_rate(self) -> Array:
        return jnp.ones(())

    @abc.abstractmethod
    def init(self, w, v, batches: Minibatches) -> StochasticState:
        """The state at step 0."""

    @abc.abstractmethod
    def step(self, k, state: StochasticState, batches: Minibatches
             ) -> tuple[StochasticState, Noise]:
        """One iteration k → k + 1, and its noise as weighted batches."""


class _MinibatchSGD(AbstractStochasticAlgorithm):
    """Shared by SGD, HeavyBallSGD and NesterovSGD: η, b, the sampling, and the carried
    minibatch gradient at the point the next step evaluates it."""

    eta: Array
    batch_size: int = eqx.field(static=True)
    replacement: bool = eqx.field(static=True)

    @property
    def learning_rate(self):
        return self.eta

    @property
    def time_step(self):
        return self.eta

    def _point(self, w, v):
        """Where the step takes its gradient (the iterate; Nesterov: the look-ahead)."""
        return w

    def _carried(self, k, w, v, batches):
        batch = batches.indices(k, SGD_SLOT)
        return StochasticState(w, v, batches.grad(self._point(w, v), batch), batch)

    def init(self, w, v, batches):
        return self._carried(0, w, v, batches)


class SGD(_MinibatchSGD):
    """Minibatch SGD w_{k+1} = w_k − η ĝ_{B_k}(w_k), B_k a fresh minibatch of size b
    at every step; its SME (`dyn.SME(eta, b)`, order 1 and 2) at t = kη.

    **Arguments:**

    - `learning_rate`: η > 0.
    - `batch_size`: b, an int in [1, n] (n: the loss's examples; checked by `run`).
    - `replacement`: draw b indices with replacement, or (default) a uniform b-subset,
      independently at every step (not epoch reshuffling).
    """

    first_order = True

    def __init__(self, learning_rate, batch_size: int, replacement: bool = False):
        self.eta = traced_scalar(learning_rate, "learning_rate", "SGD", low=0.0, strict=True)
        self.batch_size = positive_int(batch_size, "batch_size", "SGD")
        self.replacement = _check_replacement(replacement, "SGD")

    @property
    def flow(self):
        return SME(self.eta, self.batch_size, self.replacement)

    @property
    def stability_limit(self):
        return 2.0

    def step(self, k, state, batches):
        w = axpy(-self.eta, state.grad, state.w)
        return self._carried(k + 1, w, None, batches), ((-self.eta, state.batch),)


class _MomentumSGD(_MinibatchSGD):
    """Shared by the momentum SGDs: β, the order-1 SME with momentum (`dyn.SME(eta, b,
    beta=β)`: dW = −∇L/(1−β) dt + √η Σ_b^{1/2}/(1−β) dB, derived by matching one step's
    moments, docs/guides/sgd-sme.md), and the skeleton rate 1/(1−β)."""

    beta: Array
    first_order = False

    def __init__(self, learning_rate, batch_size: int, beta, replacement: bool = False):
        name = type(self).__name__
        self.eta = traced_scalar(learning_rate, "learning_rate", name, low=0.0, strict=True)
        self.batch_size = positive_int(batch_size, "batch_size", name)
        self.beta = traced_scalar(beta, "beta", name, low=0.0, high=1.0)
        self.replacement = _check_replacement(replacement, name)

    @property
    def skeleton_rate(self):
        return 1.0 / (1.0 - self.beta)

    @property
    def flow(self):
        return SME(self.eta, self.batch_size, self.replacement, beta=self.beta)


class HeavyBallSGD(_MomentumSGD):
    """Heavy ball on minibatch gradients, w_{k+1} = w_k − η ĝ_{B_k}(w_k) + β(w_k − w_{k−1}),
    at t = kη. Arguments as `SGD`, and the momentum `beta` in [0, 1)."""

    @property
    def stability_limit(self):
        return float(2.0 * (1.0 + self.beta))

    def step(self, k, state, batches):
        v = axpy(self.beta, state.v, jax.tree.map(jnp.negative, state.grad))
        w = axpy(self.eta, v, state.w)
        noise = ((-self.eta * self.skeleton_rate, state.batch),)
        return self._carried(k + 1, w, v, batches), noise


class NesterovSGD(_MomentumSGD):
    """Nesterov momentum on minibatch gradients: y_k = w_k + β(w_k − w_{k−1}),
    w_{k+1} = y_k − η ĝ_{B_k}(y_k), at t = kη; its order-1 SME is that of
    `HeavyBallSGD`. Arguments as `HeavyBallSGD`."""

    @property
    def stability_limit(self):
        return float(2.0 * (1.0 + self.beta) / (1.0 + 2.0 * self.beta))

    def _point(self, w, v):
        return axpy(self.beta * self.eta, v, w)

    def step(self, k, state, batches):
        w = axpy(-self.eta, state.grad, self._point(state.w, state.v))
        v = jax.tree.map(lambda a, b: (a - b) / self.eta, w, state.w)
        noise = ((-self.eta * self.skeleton_rate, state.batch),)
        return self._carried(k + 1, w, v, batches), noise


class SVAG(AbstractStochasticAlgorithm):
    """SVAG (Li, Malladi & Arora, "On the validity of modeling SGD with stochastic
    differential equations", NeurIPS 2021, arXiv 2102.12470): a weak scheme for the SME
    of SGD(η, b) with step h = η/ℓ built from minibatch gradients only,

        w ← w − h κ [a₁ ĝ_{B1} + a₂ ĝ_{B2}],  a₁,₂ = (1 ± r)/2, r = √(2ℓ − 1),

    whose increment has mean −hκ∇L and covariance h·η κ² Σ_b (a₁² + a₂² = ℓ), the
    SME's (κ = 1/(1−β)). Order 2 adds −h(η/2) H_{B3} ĝ_{B4} with two further,
    independent batches: unbiased for the drift correction −h(η/4)∇‖∇L‖², and
    uncorrelated with the noise (reusing B1 or B2 would add an O(η²) covariance error).
    Weak order 1 in h; ℓ = 1, order 1 *is* SGD. `dyn.weak_order` extrapolates ℓ = 1, 2
    (2X₂ − X₁) for a reference with an O(η²) error.

    **Arguments:** `learning_rate` η and `batch_size` b of the SGD it models, `ell` ≥ 1
    (steps per SGD step), `order` 1 or 2, `replacement`, `beta` (order 1 only).
    """

    eta: Array
    beta: Array
    batch_size: int = eqx.field(static=True)
    replacement: bool = eqx.field(static=True)
    ell: int = eqx.field(static=True)
    order: int = eqx.field(static=True)
    first_order = True

    def __init__(self, learning_rate, batch_size: int, ell: int = 2, order: int = 1,
                 replacement: bool = False, beta=0.0):
        self.eta = traced_scalar(learning_rate, "learning_rate", "SVAG", low=0.0, strict=True)
        self.batch_size = positive_int(batch_size, "batch_size", "SVAG")
        self.ell = positive_int(ell, "ell", "SVAG")
        self.order = one_of(order, "order", (1, 2), "SVAG")
        self.replacement = _check_replacement(replacement, "SVAG")
        self.beta = traced_scalar(beta, "beta", "SVAG", low=0.0, high=1.0)
        # Raises for beta > 0 with order 2, as the SME does.
        SME(self.eta, self.batch_size, replacement, order, self.beta)

    @property
    def learning_rate(self):
        return self.eta

    @property
    def time_step(self):
        return self.eta / self.ell

    @property
    def skeleton_rate(self):
        return 1.0 / (1.0 - self.beta)

    @property
    def flow(self):
        return SME(self.eta, self.batch_size, self.replacement, self.order, self.beta)

    @property
    def stability_limit(self):
        return 2.0 * self.ell

    def init(self, w, v, batches):
        return StochasticState(w, None, None, None)

    def step(self, k, state, batches):
        r = jnp.sqrt(2.0 * self.ell - 1.0)
        h = self.time_step * self.skeleton_rate
        a1 = (1.0 + r) / 2
        first = batches.indices(k, 1)
        direction = jax.tree.map(lambda g: a1 * g, batches.grad(state.w, first))
        noise = ((-h * a1, first),)
        if self.ell > 1:  # (ℓ = 1: a₂ = 0)
            a2 = (1.0 - r) / 2
            second = batches.indices(k, 2)
            direction = axpy(a2, batches.grad(state.w, second), direction)
            noise = noise + ((-h * a2, second),)
        if self.order == 2:
            toward = batches.grad(state.w, batches.indices(k, 4))
            curvature = batches.hvp(state.w, batches.indices(k, 3), toward)
            direction = axpy(0.5 * self.eta, curvature, direction)
        w = axpy(-h, direction, state.w)
        return StochasticState(w, None, None, None), noise
