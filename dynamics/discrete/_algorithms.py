"""Discrete optimizers, each with its continuous counterpart and its time map.

Every algorithm advances a `State` (w, v, loss, grad): the position w_k, the velocity
v_k in the *flow's* time units (None for first-order algorithms), and, for algorithms
whose gradient is taken at the position itself, L(w_k) and ∇L(w_k) from the same
`jax.value_and_grad`. Those two are carried to the next step (first same as last, as
`LossCarryingEuler` does), so n steps cost n + 1 gradient evaluations and the loss at
every iterate is free.

The algorithms and their flows:

| algorithm | update | flow | Δt per step |
| GD | w ← w − η∇L | GF | η |
| Leapfrog | w_{k+2} = 2w_{k+1} − w_k − η∇L(w_{k+1}) (G&U eq. 21) | ND | √η |
| NAGD | x_k = y_{k−1} − s∇L(y_{k−1}); y_k = x_k + (k−1)/(k+2)(x_k − x_{k−1}) (eq. 20) | NAGF | √s |
| HeavyBall | w_{k+1} = w_k − η∇L(w_k) + β(w_k − w_{k−1}) | η(1+β)/2 ẅ + (1−β)ẇ + ∇L = 0 | η |
| NesterovMomentum | y_k = w_k + β(w_k − w_{k−1}); w_{k+1} = y_k − η∇L(y_k) | modified flow | η |
| ExponentiatedGD | w ← w ⊙ exp(−η sign(w) ⊙ ∇L) | ẇ = −|w| ⊙ ∇L | η |
"""

import abc
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from .._flows import (
    AbstractFlow,
    GradientFlow,
    MirrorFlow,
    ModifiedNesterovMomentumFlow,
    NesterovFlow,
    NewtonianFlow,
    modified_second_order_flow,
)
from .._tree import axpy, scale
from .._validate import traced_scalar

ValueAndGrad = Callable[[PyTree], tuple[Scalar, PyTree]]


class State(NamedTuple):
    """w_k, v_k (flow-time velocity or None), and L(w_k), ∇L(w_k) when carried."""

    w: PyTree
    v: PyTree | None
    loss: Scalar | None
    grad: PyTree | None


def _step_size(name: str):
    """A converter to a step size: a number > 0 stored as an array (traced, not hashed:
    a sweep over it compiles once), checked where it is concrete."""
    return lambda x: traced_scalar(x, name, low=0.0, strict=True)


def _momentum(x):
    return traced_scalar(x, "beta", low=0.0, high=1.0)


class AbstractDiscreteAlgorithm(eqx.Module):
    """A discrete optimizer that knows the flow it discretises and its time map.

    - `time_step`: the flow time Δt of one iteration (t_k = k Δt).
    - `flow`: the continuous counterpart (the module docstring's table).
    - `init(w, v, value_and_grad)`: the state at k = 0; `v` is the initial velocity in
      flow time (None for first-order algorithms, or to start at rest).
    - `step(k, state, value_and_grad)`: state k → state k + 1.
    - `stability_limit`: the bound on η·λ_max(∇²L) below which the iteration is
      linearly stable on a quadratic; past it `run` and `gap` warn.
    """

    first_order: ClassVar[bool]

    @property
    @abc.abstractmethod
    def time_step(self) -> Array:
        """Δt: the flow time of one step."""

    @property
    @abc.abstractmethod
    def flow(self) -> AbstractFlow:
        """The continuous counterpart."""

    @property
    @abc.abstractmethod
    def learning_rate(self) -> Array:
        """The step size η (s for NAGD) that multiplies the gradient."""

    @property
    @abc.abstractmethod
    def stability_limit(self) -> float:
        """η·λ_max above which the iteration is unstable on a quadratic."""

    @abc.abstractmethod
    def init(self, w: PyTree, v: PyTree | None, value_and_grad: ValueAndGrad) -> State:
        """The state at step 0."""

    @abc.abstractmethod
    def step(self, k, state: State, value_and_grad: ValueAndGrad) -> State:
        """One iteration, from step k to k + 1."""


def _carried_init(w, v, value_and_grad):
    loss, grad = value_and_grad(w)
    return State(w, v, loss, grad)


class AbstractFirstOrderAlgorithm(AbstractDiscreteAlgorithm):
    """A one-step method w_{k+1} = Φ_k(w_k, ∇L(w_k)) with no velocity, on its flow's
    time axis t = kη (η = `learning_rate`): GD, ExponentiatedGD, NMGD.

    Subclasses give `learning_rate`, `flow` and `update(k, w, grad)` (the new iterate);
    the state carries L(w_k) and ∇L(w_k) from one `value_and_grad`, so the gradient of
    each step is the one evaluated at the end of the previous one. Linearly stable on a
    quadratic (for GD) while η·λ_max < 2.
    """

    first_order: ClassVar[bool] = True

    @property
    def time_step(self):
        return self.learning_rate

    @property
    def stability_limit(self):
        return 2.0

    @abc.abstractmethod
    def update(self, k, w: PyTree, grad: PyTree) -> PyTree:
        """w_{k+1} from w_k and ∇L(w_k) at step k."""

    def init(self, w, v, value_and_grad):
        return _carried_init(w, None, value_and_grad)

    def step(self, k, state, value_and_grad):
        return _carried_init(self.update(k, state.w, state.grad), None, value_and_grad)


class GD(AbstractFirstOrderAlgorithm):
    """Gradient descent w_{k+1} = w_k − η∇L(w_k); gradient flow at t = kη."""

    eta: Array = eqx.field(converter=_step_size("eta"))

    @property
    def learning_rate(self):
        return self.eta

    @property
    def flow(self):
        return GradientFlow()

    def update(self, k, w, grad):
        return axpy(-self.eta, grad, w)


class Leapfrog(AbstractDiscreteAlgorithm):
    """Newtonian leapfrog w_{k+2} = 2w_{k+1} − w_k − η∇L(w_{k+1}) (Głuch & Urbanke
    eq. 21); Newtonian dynamics ẅ = −∇L at t = k h with h = √η.

    Run in its velocity-Verlet form, w_{k+1} = w_k + h v_k − (η/2)∇L(w_k),
    v_{k+1} = v_k − (h/2)(∇L(w_k) + ∇L(w_{k+1})), which eliminates v to exactly eq. 21
    and starts it from (w_0, v_0) with the second-order w_1 above. Order 2 in h.
    """

    eta: Array = eqx.field(converter=_step_size("eta"))
    first_order: ClassVar[bool] = False

    @property
    def time_step(self):
        return jnp.sqrt(self.eta)

    @property
    def learning_rate(self):
        return self.eta

    @property
    def flow(self):
        return NewtonianFlow()

    @property
    def stability_limit(self):
        # Störmer–Verlet on ẅ = −λw is stable for h²λ < 4.
        return 4.0

    def init(self, w, v, value_and_grad):
        return _carried_init(w, v, value_and_grad)

    def step(self, k, state, value_and_grad):
        h = jnp.sqrt(self.eta)
        w = axpy(h, state.v, axpy(-0.5 * self.eta, state.grad, state.w))
        loss, grad = value_and_grad(w)
        v = jax.tree.map(lambda v0, g0, g1: v0 - 0.5 * h * (g0 + g1), state.v, state.grad, grad)
        return State(w, v, loss, grad)


class NAGD(AbstractDiscreteAlgorithm):
    """Nesterov's accelerated gradient descent in Su, Boyd & Candès' form (Głuch &
    Urbanke eq. 20): x_0 = y_0 = w_0, x_k = y_{k−1} − s∇L(y_{k−1}),
    y_k = x_k + (k−1)/(k+2)(x_k − x_{k−1}); Nesterov's flow ẅ + (3/t)ẇ + ∇L = 0 at
    t = k√s, where ‖x_k − w(k√s)‖ = O(√s).

    The state is x_k with v_k = (x_k − x_{k−1})/√s; it starts at rest.
    """

    s: Array = eqx.field(converter=_step_size("s"))
    first_order: ClassVar[bool] = False

    @property
    def time_step(self):
        return jnp.sqrt(self.s)

    @property
    def learning_rate(self):
        return self.s

    @property
    def flow(self):
        return NesterovFlow()

    @property
    def stability_limit(self):
        return 2.0

    def init(self, w, v, value_and_grad):
        return State(w, v, None, None)

    def step(self, k, state, value_and_grad):
        h = jnp.sqrt(self.s)
        # From x_k (k = step index) to x_{k+1}: y_k = x_k + (k−1)/(k+2) h v_k.
        y = axpy((k - 1.0) / (k + 2.0) * h, state.v, state.w)
        _, grad = value_and_grad(y)
        x = axpy(-self.s, grad, y)
        v = jax.tree.map(lambda a, b: (a - b) / h, x, state.w)
        return State(x, v, None, None)


class HeavyBall(AbstractDiscreteAlgorithm):
    """Polyak's heavy ball w_{k+1} = w_k − η∇L(w_k) + β(w_k − w_{k−1}); at t = kη it
    follows η(1+β)/2 ẅ + (1−β)ẇ + ∇L = 0 (Kunin et al. 2021) to O(η²) when started on
    that flow's slow manifold. v_k = (w_k − w_{k−1})/η.
    """

    eta: Array = eqx.field(converter=_step_size("eta"))
    beta: Array = eqx.field(converter=_momentum)
    first_order: ClassVar[bool] = False

    @property
    def time_step(self):
        return self.eta

    @property
    def learning_rate(self):
        return self.eta

    @property
    def flow(self):
        return modified_second_order_flow(self.eta, self.beta)

    @property
    def stability_limit(self):
        return float(2.0 * (1.0 + self.beta))

    def init(self, w, v, value_and_grad):
        return _carried_init(w, v, value_and_grad)

    def step(self, k, state, value_and_grad):
        v = axpy(self.beta, state.v, scale(-1.0, state.grad))
        w = axpy(self.eta, v, state.w)
        loss, grad = value_and_grad(w)
        return State(w, v, loss, grad)


class NesterovMomentum(AbstractDiscreteAlgorithm):
    """Nesterov momentum with fixed β (Sutskever et al. 2013):
    y_k = w_k + β(w_k − w_{k−1}), w_{k+1} = y_k − η∇L(y_k); at t = kη it follows
    `ModifiedNesterovMomentumFlow(eta, beta)` to O(η²). v_k = (w_k − w_{k−1})/η.
    """

    eta: Array = eqx.field(converter=_step_size("eta"))
    beta: Array = eqx.field(converter=_momentum)
    first_order: ClassVar[bool] = False

    @property
    def time_step(self):
        return self.eta

    @property
    def learning_rate(self):
        return self.eta

    @property
    def flow(self):
        return ModifiedNesterovMomentumFlow(self.eta, self.beta)

    @property
    def stability_limit(self):
        # On a quadratic with curvature λ the iteration is stable for ηλ < 2(1+β)/(1+2β).
        return float(2.0 * (1.0 + self.beta) / (1.0 + 2.0 * self.beta))

    def init(self, w, v, value_and_grad):
        return State(w, v, None, None)

    def step(self, k, state, value_and_grad):
        y = axpy(self.beta * self.eta, state.v, state.w)
        _, grad = value_and_grad(y)
        w = axpy(-self.eta, grad, y)
        v = jax.tree.map(lambda a, b: (a - b) / self.eta, w, state.w)
        return State(w, v, None, None)


def _signed_entropy(w):
    # φ(w) = Σ |w| log|w| − |w|: ∇φ = sign(w) log|w| and ∇²φ = diag(1/|w|), so the
    # mirror flow is ẇ = −|w| ⊙ ∇L and mirror descent on it is exponentiated GD.
    return sum(jnp.sum(jnp.abs(x) * jnp.log(jnp.abs(x)) - jnp.abs(x))
               for x in jax.tree.leaves(w))


class ExponentiatedGD(AbstractFirstOrderAlgorithm):
    """Exponentiated gradient descent W ← W ⊙ exp(−η sign(W) ⊙ ∂L/∂W): mirror descent
    with φ(w) = Σ|w| log|w| − |w|, the discretisation of the p = q = 1 weight-balancing
    flow ẇ = −|w| ⊙ ∇L (a `MirrorFlow` of that φ) at t = kη. Signs never change, so
    every weight must start non-zero.
    """

    eta: Array = eqx.field(converter=_step_size("eta"))

    @property
    def learning_rate(self):
        return self.eta

    @property
    def flow(self):
        return MirrorFlow(_signed_entropy)

    def update(self, k, w, grad):
        return jax.tree.map(lambda x, g: x * jnp.exp(-self.eta * jnp.sign(x) * g), w, grad)
