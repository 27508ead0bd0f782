"""Monitors of the exact discrete charge laws of GD and heavy ball
(`dynamics.symmetries._laws` derives them), on an MLP or any model that states its
rescaling units (`dyn.ConvNet`, `dyn.RNN`, `dyn.ResidualMLP`, a user's model): one value
per unit, concatenated over the families like `RescalingCharges`."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._models import MLP
from .._units import homogeneous_families
from .._validate import traced_scalar
from ..symmetries._laws import charge_inner, gd_charge_drift, heavy_ball_charge_drift
from ._monitors import AbstractMonitor


def homogeneous_model(w, problem, owner: str):
    """(the model, None: each family's own degree p) for a charge-law monitor named
    `owner`: an MLP or any model that states its units (ConvNet, RNN, ResidualMLP, …);
    an error unless every unit is positively homogeneous (the rescaling symmetry)."""
    model = problem.params(w)
    if isinstance(model, MLP) and (model.activation.degree is None
                                   or model.betas is not None):
        raise ValueError(
            f"{owner} needs an MLP with a positively homogeneous activation (ReLU, RePU, "
            f"Polynomial, Identity), got {type(model.activation).__name__}: without the "
            "rescaling symmetry the charges have no such law."
        )
    homogeneous_families(model, owner, "params")
    return model, None


class _ChargeLawMonitor(AbstractMonitor):
    """Shared by the charge-law monitors: the homogeneous MLP, its degree, and ∇L of
    the symmetric loss, i.e. ∇(loss) − λw for a loss that includes (λ/2)‖w‖²."""

    def _parts(self, w, v, problem, weight_decay):
        model, degree = homogeneous_model(w, problem, type(self).__name__)
        grad = jax.tree.map(lambda g, x: g - weight_decay * x, jax.grad(problem.loss)(w), w)
        velocity = None if v is None else eqx.combine(v, problem.static)
        return model, velocity, eqx.combine(grad, problem.static), degree


class GDChargeDrift(_ChargeLawMonitor):
    """The predicted change Q_i(w_{k+1}) − Q_i(w_k) = η²(‖g_in‖² − p‖g_out‖²) of every
    per-neuron rescaling charge in the next GD step of size `eta` (with
    `weight_decay` λ, for a loss that includes (λ/2)‖w‖²: ((1−ηλ)² − 1)Q_i + the same
    η² term), concatenated over hidden layers like `RescalingCharges` (module
    `symmetries._laws`). Saved at every step, its running sum is Q_k − Q_0 exactly, so
    measured and predicted drift can be drawn on top of each other."""

    eta: Array
    weight_decay: Array
    name: ClassVar[str] = "gd_charge_drift"

    def __init__(self, eta, weight_decay=0.0):
        self.eta = traced_scalar(eta, "eta", low=0.0, strict=True)
        self.weight_decay = traced_scalar(weight_decay, "weight_decay", low=0.0)

    def __call__(self, t, w, v, problem):
        model, _, grad, degree = self._parts(w, None, problem, self.weight_decay)
        return jnp.concatenate(gd_charge_drift(grad, self.eta, degree, model,
                                               self.weight_decay))


class HeavyBallChargeDrift(_ChargeLawMonitor):
    """The exact change Q_i(w_{k+1}) − Q_i(w_k) of every per-neuron rescaling charge in
    the next heavy-ball step (`heavy_ball_charge_drift`; `weight_decay` λ for a loss
    that includes (λ/2)‖w‖²), from the iterate and its velocity v_k = (w_k − w_{k−1})/η
    as `dyn.discrete.run(HeavyBall(eta, beta), ...)` records them."""

    eta: Array
    beta: Array
    weight_decay: Array
    name: ClassVar[str] = "heavy_ball_charge_drift"

    def __init__(self, eta, beta, weight_decay=0.0):
        self.eta = traced_scalar(eta, "eta", low=0.0, strict=True)
        self.beta = traced_scalar(beta, "beta", low=0.0, high=1.0)
        self.weight_decay = traced_scalar(weight_decay, "weight_decay", low=0.0)

    def __call__(self, t, w, v, problem):
        if v is None:
            raise ValueError("HeavyBallChargeDrift needs a heavy-ball run (with velocities).")
        model, velocity, grad, degree = self._parts(w, v, problem, self.weight_decay)
        return jnp.concatenate(heavy_ball_charge_drift(
            model, velocity, grad, self.eta, self.beta, degree, self.weight_decay))


class ChargeForcing(_ChargeLawMonitor):
    """F_k = η²(⟨g, g⟩_M − 2β⟨v, g⟩_M) per hidden neuron: the only place where the
    gradient g = ∇L(w_k) enters the exact charge recurrence of GD (β = 0) and heavy ball
    (module `symmetries._laws`); saved at every step, `charge_closed_form` turns it into
    Q_k. `weight_decay` λ for a loss that includes (λ/2)‖w‖² (g is then ∇ of the rest)."""

    eta: Array
    beta: Array
    weight_decay: Array
    name: ClassVar[str] = "charge_forcing"

    def __init__(self, eta, beta=0.0, weight_decay=0.0):
        self.eta = traced_scalar(eta, "eta", low=0.0, strict=True)
        self.beta = traced_scalar(beta, "beta", low=0.0, high=1.0)
        self.weight_decay = traced_scalar(weight_decay, "weight_decay", low=0.0)

    def __call__(self, t, w, v, problem):
        model, velocity, grad, degree = self._parts(w, v, problem, self.weight_decay)
        gg = charge_inner(grad, grad, degree)
        vg = gg if velocity is None else charge_inner(velocity, grad, degree)
        beta = self.beta if velocity is not None else 0.0
        return jnp.concatenate([self.eta**2 * (a - 2 * beta * b)
                                for a, b in zip(gg, vg, strict=True)])
