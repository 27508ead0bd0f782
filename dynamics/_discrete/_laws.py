"""Exact discrete laws: how GD moves the per-neuron rescaling charges.

Derivation (the discrete counterpart of Głuch & Urbanke eq. 17). For hidden neuron i of
layer h with a p-homogeneous activation let θ_in = (W_h[i, :], b_i) be its in-weights
and bias and θ_out = W_{h+1}[:, i] its out-weights, and Q_i = ‖θ_in‖² − p‖θ_out‖² its
charge (`dyn.charges.rescaling`). The rescaling θ_in → (1+ε)θ_in, θ_out → (1+ε)^{−p}θ_out
leaves L unchanged, so at first order in ε

    ⟨g_in, θ_in⟩ − p⟨g_out, θ_out⟩ = 0,   g = ∇L(w).

One GD step θ ← θ − ηg then changes the two squared norms by −2η⟨θ, g⟩ + η²‖g‖², and
the first-order terms cancel by the identity above, leaving exactly

    Q_i(w_{k+1}) − Q_i(w_k) = η² (‖g_in‖² − p ‖g_out‖²)   at g = ∇L(w_k).

Gradient flow conserves Q (the η² term is the whole discretisation drift), and the
drift is second order in η, which is why GD's charges move so little. The identity is
algebraic: it holds to rounding error at every step, whatever the step size.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._models import MLP
from .._monitors import AbstractMonitor
from .._symmetries._charges import _check_mlp


def gd_charge_drift(grad: MLP, eta, degree) -> tuple[Array, ...]:
    """η²(‖g_in‖² − p‖g_out‖²) per hidden neuron, one array per hidden layer, from the
    gradient `grad` (an `MLP`-shaped pytree): the exact change of each rescaling charge
    in one GD step of size `eta` (module docstring)."""
    out = []
    for h in range(len(grad.weights) - 1):
        g_in = jnp.sum(grad.weights[h] ** 2, axis=-1)
        if grad.biases is not None:
            g_in = g_in + grad.biases[h] ** 2
        g_out = jnp.sum(grad.weights[h + 1] ** 2, axis=-2)
        out.append(eta**2 * (g_in - degree * g_out))
    return tuple(out)


class GDChargeDrift(AbstractMonitor):
    """The predicted change Q_i(w_{k+1}) − Q_i(w_k) = η²(‖g_in‖² − p‖g_out‖²) of every
    per-neuron rescaling charge in the next GD step of size `eta`, concatenated over
    hidden layers like `RescalingCharges` (module `_discrete._laws`). Saved at every
    step, its running sum is Q_k − Q_0 exactly, so measured and predicted drift can be
    drawn on top of each other."""

    eta: Array
    name: ClassVar[str] = "gd_charge_drift"

    def __init__(self, eta):
        eta = jnp.asarray(eta, dtype=jnp.result_type(float))
        if eta.shape != () or not bool(jnp.isfinite(eta) & (eta > 0)):
            raise ValueError(f"`eta` must be a positive, finite step size, got {eta!r}.")
        self.eta = eta

    def __call__(self, t, w, v, problem):
        model = _check_mlp(problem.params(w), "params")
        degree = model.activation.degree
        if degree is None or model.betas is not None:
            raise ValueError(
                "GDChargeDrift needs an MLP with a positively homogeneous activation "
                f"(ReLU, RePU, Polynomial, Identity), got {type(model.activation).__name__}."
            )
        grad = jax.grad(problem.loss)(w)
        grad_model = eqx.combine(grad, problem.static)
        return jnp.concatenate(gd_charge_drift(grad_model, self.eta, degree))


def heavy_ball_charge_drift(params: MLP, velocity: MLP, grad: MLP, eta, beta,
                            degree) -> tuple[Array, ...]:
    """The exact change of each rescaling charge in one heavy-ball step.

    With v_k = (w_k − w_{k−1})/η the step is θ_{k+1} = θ_k + Δ, Δ = η(βv − g); the
    ⟨θ, g⟩ terms cancel by the symmetry identity as for GD, leaving

        Q_{k+1} − Q_k = 2βη(⟨θ_in, v_in⟩ − p⟨θ_out, v_out⟩)
                        + η²(‖βv_in − g_in‖² − p‖βv_out − g_out‖²),

    which is GD's law at β = 0 (module docstring).
    """
    out = []
    for h in range(len(grad.weights) - 1):
        def rows(tree, h=h):
            blocks = [tree.weights[h]]
            if tree.biases is not None:
                blocks.append(tree.biases[h][:, None])
            return jnp.concatenate(blocks, axis=1)  # (neurons, in-weights and bias)

        def cols(tree, h=h):
            return tree.weights[h + 1].T  # (neurons, out-weights)

        th_in, th_out = rows(params), cols(params)
        v_in, v_out = rows(velocity), cols(velocity)
        d_in, d_out = beta * v_in - rows(grad), beta * v_out - cols(grad)
        linear = jnp.sum(th_in * v_in, -1) - degree * jnp.sum(th_out * v_out, -1)
        quadratic = jnp.sum(d_in**2, -1) - degree * jnp.sum(d_out**2, -1)
        out.append(2 * beta * eta * linear + eta**2 * quadratic)
    return tuple(out)


class HeavyBallChargeDrift(AbstractMonitor):
    """The exact change Q_i(w_{k+1}) − Q_i(w_k) of every per-neuron rescaling charge in
    the next heavy-ball step (`heavy_ball_charge_drift`), from the iterate and its
    velocity v_k = (w_k − w_{k−1})/η as `dyn.discrete.run(HeavyBall(eta, beta), ...)`
    records them."""

    eta: Array
    beta: Array
    name: ClassVar[str] = "heavy_ball_charge_drift"

    def __init__(self, eta, beta):
        eta = jnp.asarray(eta, dtype=jnp.result_type(float))
        beta = jnp.asarray(beta, dtype=jnp.result_type(float))
        if eta.shape != () or not bool(jnp.isfinite(eta) & (eta > 0)):
            raise ValueError(f"`eta` must be a positive, finite step size, got {eta!r}.")
        if beta.shape != () or not bool((beta >= 0) & (beta < 1)):
            raise ValueError(f"`beta` must lie in [0, 1), got {beta!r}.")
        self.eta, self.beta = eta, beta

    def __call__(self, t, w, v, problem):
        model = _check_mlp(problem.params(w), "params")
        degree = model.activation.degree
        if degree is None or model.betas is not None or v is None:
            raise ValueError(
                "HeavyBallChargeDrift needs a heavy-ball run (with velocities) of an MLP "
                "with a positively homogeneous activation."
            )
        grad = eqx.combine(jax.grad(problem.loss)(w), problem.static)
        velocity = eqx.combine(v, problem.static)
        return jnp.concatenate(heavy_ball_charge_drift(model, velocity, grad, self.eta,
                                                       self.beta, degree))
