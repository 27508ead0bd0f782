"""Stochastic flows: Itô SDEs on the parameters, and the stochastic modified equations of
minibatch SGD (Li, Tai & E, "Stochastic modified equations and dynamics of stochastic
gradient algorithms I: mathematical foundations", JMLR 20 (2019); arXiv 1811.01558).

The Brownian motion B lives on R^n, one coordinate per example of the loss, which is
what lets the diffusion act without a D×n matrix: with J = ∂ℓ/∂w (n×D, never formed),
P = I − 11ᵀ/n and c_b the minibatch covariance factor (`dyn.discrete.batch_factor`),

    G(w) dB = √(η c_b / n) · Jᵀ P dB = √(η c_b / n) Σ_i (g_i − ḡ) dB_i,

whose covariance per unit time is (η c_b/n) JᵀPJ = η c_b Σ_1 = η Σ_b. It is not the
symmetric root Σ_b^{1/2}, but it has the same generator, so the same law (weak
equivalence); paths differ. Drift and noise together are ONE vector-Jacobian product
of the per-example loss vector ℓ(w) ∈ R^n with the cotangent dt/n·1 + √(ηc_b/n)·P dB
(`SME.increment`), which `simulate` feeds from a single control (t, B_t): one backward
pass per Euler–Maruyama step, as in a hand-written loop (benchmarks/bench_sme.py).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._sampling import batch_factor
from .._tree import is_concrete, scale, sqnorm
from .._validate import one_of, positive_int, traced_scalar
from ._base import AbstractFirstOrderFlow, Loss

ExampleLosses = Callable[[PyTree], Array]


class AbstractStochasticFlow(AbstractFirstOrderFlow):
    """An Itô SDE dW = f(t, W) dt + G(t, W) dB_t, B a standard Brownian motion on R^n
    (n: the loss's number of examples).

    `vector_field` is the drift f, so monitors and `energy` see the flow as they see a
    first-order one. `increment(t, w, dt, db, examples)` is f(t, w) dt + G(t, w) db in
    one evaluation, from the per-example loss vector `examples(w)` ∈ R^n: what
    Euler–Maruyama adds in a step. `simulate` integrates it with `key=` (the Brownian
    path's key; a batch of keys runs independent paths) and `diffrax.Euler()` at
    constant steps.
    """

    @abc.abstractmethod
    def increment(self, t: ArrayLike, w: PyTree, dt: ArrayLike, db: Array,
                  examples: ExampleLosses) -> PyTree:
        """f(t, w) dt + G(t, w) db, for a Brownian increment db ∈ R^n."""


class SME(AbstractStochasticFlow):
    """The stochastic modified equation of minibatch SGD with learning rate η and batch
    size b (Li, Tai & E 2019), at flow time t = kη:

        order 1:  dW = −∇L dt + √η Σ_b(W)^{1/2} dB
        order 2:  dW = −∇(L + (η/4)‖∇L‖²) dt + √η Σ_b(W)^{1/2} dB

    with Σ_b = c_b Σ_1 the covariance of the minibatch gradient for the sampling used
    (`replacement`; `dyn.discrete.batch_factor`). SGD is O(η) from order 1 and O(η²)
    from order 2 in the weak sense (expectations of smooth observables at a fixed
    time), under smooth per-example losses (Tanh, not ReLU). The order-2 drift is GD's
    modified flow (`ModifiedGradientFlow`); the diffusion is *not* corrected at order 2:
    matching one step's moments to O(η³) leaves it unchanged (its correction enters the
    second moment at O(η³)). With momentum β (heavy ball or Nesterov SGD), order 1 only:
    dW = −∇L/(1−β) dt + √η Σ_b^{1/2}/(1−β) dB, SME-1 with η/(1−β) on the time
    t/(1−β).

    The diffusion is realised as √(η c_b/n) Jᵀ P dB (module docstring), weakly
    equivalent to Σ_b^{1/2} dB. Itô form: integrate with `diffrax.Euler()`
    (Euler–Maruyama, weak order 1; `dyn.weak_order` extrapolates for order 2).

    **Arguments:**

    - `learning_rate`: η > 0 (an array: a sweep over η compiles once).
    - `batch_size`: b ≥ 1; checked against the loss's examples when it is used.
    - `replacement`: minibatches drawn with replacement (c_b = 1/b) or as independent
      uniform b-subsets at every step (c_b = (n−b)/(b(n−1)); not epoch reshuffling).
    - `order`: 1 or 2.
    - `beta`: SGD's momentum β in [0, 1), with order 1.

    **Raises:** `ValueError` for a non-positive η or b, an order other than 1 or 2, or
    β > 0 with order 2 (not derived).
    """

    eta: Array
    batch_size: int = eqx.field(static=True)
    replacement: bool = eqx.field(static=True)
    order: int = eqx.field(static=True)
    beta: Array

    def __init__(self, learning_rate, batch_size: int, replacement: bool = False,
                 order: int = 1, beta=0.0):
        if not isinstance(replacement, bool):
            raise ValueError(f"SME: `replacement` must be True or False, got {replacement!r}.")
        self.order = one_of(order, "order", (1, 2), "SME",
                            "the SME's weak order: 1, or 2 with the drift correction")
        self.batch_size = positive_int(batch_size, "batch_size", "SME")
        self.replacement = replacement
        self.eta = traced_scalar(learning_rate, "learning_rate", "SME", low=0.0, strict=True)
        beta = traced_scalar(beta, "beta", "SME", low=0.0, high=1.0)
        if order != 1 and (not is_concrete(beta) or float(beta) > 0):
            raise ValueError(
                "SME: momentum `beta` > 0 has an order-1 SME only (its order-2 noise is not "
                "derived here); use order=1."
            )
        self.beta = beta

    @property
    def learning_rate(self) -> Array:
        return self.eta

    def _rate(self):
        # 1/(1−β): heavy ball's terminal velocity factor, on drift and noise alike.
        return 1.0 / (1.0 - self.beta)

    def batch_factor(self, num_examples: int) -> float:
        """c_b for n = `num_examples` (Cov ĝ_B = c_b Σ_1)."""
        return batch_factor(num_examples, self.batch_size, self.replacement)

    def modified_loss(self, w: PyTree, loss: Loss) -> Scalar:
        """L for order 1; L + (η/4)‖∇L‖² for order 2 (the drift's potential)."""
        if self.order == 1:
            return loss(w)
        value, grad = jax.value_and_grad(loss)(w)
        return value + 0.25 * self.eta * sqnorm(grad)

    def vector_field(self, t, w, loss):
        return scale(-self._rate(), jax.grad(self.modified_loss)(w, loss))

    def vector_field_and_loss(self, t, w, loss):
        if self.order == 1:
            value, grad = jax.value_and_grad(loss)(w)
            return scale(-self._rate(), grad), value
        return self.vector_field(t, w, loss), loss(w)

    def energy(self, t, w, v, loss):
        """The drift's potential: L, or L + (η/4)‖∇L‖² at order 2."""
        return self.modified_loss(w, loss)

    def energy_rate(self, t, w, v, loss):
        """Its rate along the drift alone, −‖∇E‖²/(1−β); the Itô term
        (η/2) tr(∇²E Σ_b) of the noise is not included."""
        return -self._rate() * sqnorm(jax.grad(self.modified_loss)(w, loss))

    def increment(self, t, w, dt, db, examples):
        n = db.shape[0]
        noise = jnp.sqrt(self.eta * self.batch_factor(n) / n)
        # One cotangent for drift and noise: Jᵀ(dt/n·1) = dt ∇L, Jᵀ P db = Σ (g_i − ḡ) db_i.
        cotangent = dt / n + noise * (db - jnp.mean(db))
        if self.order == 1:
            _, vjp = jax.vjp(examples, w)
            return scale(-self._rate(), vjp(cotangent.astype(db.dtype))[0])

        def potential(x):
            # ⟨cot, ℓ(x)⟩ + dt (η/4)‖∇L(x)‖²: its gradient is the whole increment.
            grad = jax.grad(lambda y: jnp.mean(examples(y)))(x)
            return jnp.dot(cotangent, examples(x)) + dt * 0.25 * self.eta * sqnorm(grad)

        return scale(-1.0, jax.grad(potential)(w))
