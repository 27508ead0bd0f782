"""Monitors of the rescaling charges under minibatch noise: the exact change in one SGD
step (with the step's own minibatch gradient), and the two parts of the expected rate.

For hidden neuron i with a p-homogeneous activation let A_i = diag(+1 on its in-weights
and bias, −p on its out-weights, 0 elsewhere), so Q_i = ⟨w, A_i w⟩, ∇Q_i = 2A_i w and
∇²Q_i = 2A_i. Every per-example loss is invariant under the rescaling, hence
⟨g_i, A_i w⟩ = 0 for every example, and (differentiating once more) H A_i w = −A_i ∇L.
Itô's formula then gives, pathwise (no dB term):

    SME-1:  dQ_i = (η/2) tr(∇²Q_i Σ_b) dt = η c_b tr(A_i Σ_1) dt        (noise part)
    SME-2:  dQ_i = η [⟨∇L, A_i ∇L⟩ + c_b tr(A_i Σ_1)] dt                (+ gradient part)
    SGD:    E[Q_{k+1} − Q_k | w_k] = η² [⟨∇L, A_i ∇L⟩ + c_b tr(A_i Σ_1)]

The issue behind this module stated the first law for SGD ("drift and noise orthogonal
to ∇Q"): that holds for SME-1 only. SME-2's drift correction −(η/4)∇‖∇L‖² is not
orthogonal to ∇Q, and SGD's expected change carries GD's gradient part η²⟨∇L, A∇L⟩, of
the same order as the noise part (a third of the full law on the ReLU 64-16-10 net over
256 digits at η = 0.05, t = 2: the noise part alone is rejected at up to 110 standard
errors per neuron over 1,000 paths; docs/guides/sgd-sme.md). The two parts are
therefore two monitors; their sum is SGD's and SME-2's rate.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._sampling import batch_factor
from .._validate import positive_int, traced_scalar
from ..losses._per_example import as_data_loss
from ..symmetries._laws import charge_inner, heavy_ball_charge_drift, nesterov_charge_drift
from ._charge_laws import homogeneous_model
from ._monitors import AbstractMonitor

# Examples per vmapped chunk of per-example gradients (memory ∝ chunk × parameters).
_EXAMPLE_CHUNK = 64


class AbstractMinibatchMonitor(AbstractMonitor):
    """A monitor of an SGD run that reads the minibatch gradient of the step about to be
    taken (`minibatch_value`), which `dyn.discrete.run` passes for a stochastic
    algorithm; elsewhere (`simulate`, a full-batch run) there is none and it raises."""

    def minibatch_value(self, t, w, v, grad, problem) -> Array:
        """The recorded value at (t, w, v), given the minibatch gradient `grad` (of the
        dynamic parameters) of the next step."""
        raise NotImplementedError

    def __call__(self, t, w, v, problem):
        raise ValueError(
            f"{type(self).__name__} reads the minibatch gradient of an SGD step: record it "
            "in dyn.discrete.run with dyn.discrete.SGD, HeavyBallSGD or NesterovSGD."
        )


class SGDChargeDrift(AbstractMinibatchMonitor):
    """The exact change Q_i(w_{k+1}) − Q_i(w_k) of every per-neuron rescaling charge in
    the next step of minibatch SGD, from that step's own minibatch gradient ĝ
    (`dynamics.symmetries._laws`): η²⟨ĝ, ĝ⟩_M for SGD, `heavy_ball_charge_drift` with
    g = ĝ for heavy ball (`beta`), `nesterov_charge_drift` for Nesterov
    (`nesterov=True`; ĝ at the look-ahead). `weight_decay` λ for a loss that includes
    (λ/2)‖w‖² (the law uses ĝ − λw), not with Nesterov. Concatenated over hidden layers
    like `RescalingCharges`; saved at every step, its running sum is Q_k − Q_0 on every
    path to rounding."""

    eta: Array
    beta: Array
    weight_decay: Array
    nesterov: bool = eqx.field(static=True)
    name: ClassVar[str] = "sgd_charge_drift"

    def __init__(self, learning_rate, beta=0.0, nesterov: bool = False, weight_decay=0.0):
        self.eta = traced_scalar(learning_rate, "learning_rate", "SGDChargeDrift", low=0.0,
                                 strict=True)
        self.beta = traced_scalar(beta, "beta", "SGDChargeDrift", low=0.0, high=1.0)
        self.weight_decay = traced_scalar(weight_decay, "weight_decay", "SGDChargeDrift",
                                          low=0.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"SGDChargeDrift: `nesterov` must be True or False, got {nesterov!r}.")
        if nesterov and float(self.weight_decay) > 0:
            raise ValueError("SGDChargeDrift: the Nesterov law is for weight_decay = 0.")
        self.nesterov = nesterov

    def minibatch_value(self, t, w, v, grad, problem):
        model, degree = homogeneous_model(w, problem, "SGDChargeDrift")
        g = eqx.combine(jax.tree.map(lambda a, x: a - self.weight_decay * x, grad, w),
                        problem.static)
        velocity = None if v is None else eqx.combine(v, problem.static)
        if self.nesterov:
            law = nesterov_charge_drift(model, velocity, g, self.eta, self.beta, degree)
        else:
            law = heavy_ball_charge_drift(model, velocity, g, self.eta, self.beta, degree,
                                          self.weight_decay)
        return jnp.concatenate(law)


class _RateMonitor(AbstractMonitor):
    eta: Array
    batch_size: int = eqx.field(static=True)
    replacement: bool = eqx.field(static=True)

    def __init__(self, learning_rate, batch_size: int = 1, replacement: bool = False):
        owner = type(self).__name__
        self.eta = traced_scalar(learning_rate, "learning_rate", owner, low=0.0, strict=True)
        self.batch_size = positive_int(batch_size, "batch_size", owner)
        if not isinstance(replacement, bool):
            raise ValueError(f"{owner}: `replacement` must be True or False, got {replacement!r}.")
        self.replacement = replacement


class ChargeGradientRate(_RateMonitor):
    """η⟨∇L, A_i ∇L⟩ = η(‖∇_in L‖² − p‖∇_out L‖²) per hidden neuron: the gradient part of
    the charges' rate under SME-2 and (in expectation) SGD, module docstring; GD's
    drift per unit flow time. Concatenated over hidden layers. (`batch_size` and
    `replacement` are accepted for symmetry with `ChargeNoiseRate` and not used.)"""

    name: ClassVar[str] = "charge_gradient_rate"

    def __call__(self, t, w, v, problem):
        _, degree = homogeneous_model(w, problem, type(self).__name__)
        grad = eqx.combine(jax.grad(problem.loss)(w), problem.static)
        return self.eta * jnp.concatenate(charge_inner(grad, grad, degree))


class ChargeNoiseRate(_RateMonitor):
    """η c_b tr(A_i Σ_1) = η c_b [mean_n ⟨g_n, A_i g_n⟩ − ⟨∇L, A_i ∇L⟩] per hidden neuron:
    the noise part of the charges' rate, (η/2) tr(∇²Q_i Σ_b), which alone is the SME-1
    law dQ_i/dt (pathwise); SME-2 and SGD add `ChargeGradientRate` (module docstring).
    c_b is the minibatch factor of `batch_size` and `replacement`
    (`dyn.discrete.batch_factor`). Exact: the per-example gradients g_n are computed in
    vmapped chunks of 64 examples (no D×D or D×n matrix), so it costs about one
    full-batch gradient per evaluation. The loss must expose its examples (a data loss
    of `dyn.losses`, or `PerExample`); it is read as symmetric (no weight decay)."""

    name: ClassVar[str] = "charge_noise_rate"

    def __call__(self, t, w, v, problem):
        owner = type(self).__name__
        _, degree = homogeneous_model(w, problem, owner)
        data = as_data_loss(problem.user_loss, owner)
        n = data.num_examples

        def per_example(i):
            g = jax.grad(lambda x: data.subset(i[None])(problem.params(x)))(w)
            g = eqx.combine(g, problem.static)
            return jnp.concatenate(charge_inner(g, g, degree))

        mean_gg = jnp.mean(jax.lax.map(per_example, jnp.arange(n),
                                       batch_size=min(_EXAMPLE_CHUNK, n)), axis=0)
        grad = eqx.combine(jax.grad(problem.loss)(w), problem.static)
        trace = mean_gg - jnp.concatenate(charge_inner(grad, grad, degree))
        return self.eta * batch_factor(n, self.batch_size, self.replacement) * trace
