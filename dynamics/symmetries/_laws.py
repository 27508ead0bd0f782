"""Exact discrete laws: how GD and heavy ball move the per-neuron rescaling charges,
with and without weight decay, step by step and in closed form.

Written below for a hidden neuron of an MLP; the derivation uses only that the charge
is ⟨θ, θ⟩_M for a diagonal A with ⟨θ, A g⟩ = 0, so it holds verbatim for every unit a
model states (`dyn.symmetries.Units`: a conv channel, a recurrent unit, a residual
stream coordinate), with ⟨a, b⟩_M = Σ_S e_S ⟨a_S[i], b_S[i]⟩ over the unit's slices.

Derivation (the discrete counterpart of Głuch & Urbanke eq. 17). For hidden neuron i of
layer h with a p-homogeneous activation let θ_in = (W_h[i, :], b_i) be its in-weights
and bias and θ_out = W_{h+1}[:, i] its out-weights, and write
⟨a, b⟩_M = ⟨a_in, b_in⟩ − p⟨a_out, b_out⟩ per neuron, so that its charge
(`dyn.charges.rescaling`) is Q_i = ⟨θ, θ⟩_M. The rescaling θ_in → (1+ε)θ_in,
θ_out → (1+ε)^{−p}θ_out leaves L unchanged, so at first order in ε

    ⟨θ, g⟩_M = 0,   g = ∇L(w).

One GD step θ ← θ − ηg changes Q by 2⟨θ, Δ⟩_M + ⟨Δ, Δ⟩_M with Δ = −ηg; the first
term vanishes by the identity, leaving exactly

    Q_i(w_{k+1}) − Q_i(w_k) = η² (‖g_in‖² − p ‖g_out‖²)   at g = ∇L(w_k).

Weight decay λ (the run minimises L + (λ/2)‖w‖², every parameter decayed; the identity
is for the symmetric L alone). The recurrence is w_{k+1} = a w_k − β w_{k−1} − η g_k
with a = 1 + β − ηλ (β = 0: GD; heavy ball w_{k+1} = w_k − η(g_k + λw_k) + β(w_k − w_{k−1})).
With S_k = ⟨w_{k+1}, w_k⟩_M, expanding ⟨w_{k+1}, w_{k+1}⟩_M and using ⟨w_k, g_k⟩_M = 0
and ⟨w_{k−1}, g_k⟩_M = −η⟨v_k, g_k⟩_M (v_k = (w_k − w_{k−1})/η) gives the exact linear
system, derived here from the update (Kunin et al. 2021 give its continuous limits):

    Q_{k+1} = a² Q_k + β² Q_{k−1} − 2aβ S_{k−1} + F_k,   F_k = η²(⟨g_k, g_k⟩_M − 2β⟨v_k, g_k⟩_M)
    S_k     = a Q_k − β S_{k−1}.

Its matrix has eigenvalues μ ∈ {r₁², r₁r₂ = β, r₂²}, r₁,₂ the roots of r² − a r + β = 0,
so Q_k = Σ_μ c_μ μ^k + Σ_{j<k} G_{k−1−j} F_j with G the same kind of sum
(`charge_closed_form`). GD (β = 0): Q_k = (1−ηλ)^{2k} Q_0 + η² Σ_j (1−ηλ)^{2(k−1−j)} D_j,
whose decay (1−ηλ)^{2k} → e^{−2λt} at t = kη is Kunin et al.'s gradient-flow law. Heavy
ball with a² < 4β (ηλ ≳ (1−√β)²): r₁,₂ = √β e^{±iφ}, cos φ = a/(2√β), and the charge is a
damped oscillator, Q_k = β^k (c₀ + c₁ cos 2kφ + c₂ sin 2kφ) plus the η²-forcing.

Gradient flow conserves Q without decay (the η² terms are the whole discretisation
drift). The identities are algebraic: they hold to rounding error at every step,
whatever the step size.

Minibatch SGD. The rescaling leaves every per-example loss ℓ_i unchanged, so
⟨θ, g_i⟩_M = 0 for each example and hence for any minibatch gradient ĝ_B. All the laws
above therefore hold on every path with ĝ_B in place of ∇L: one SGD step changes Q by
exactly η²⟨ĝ_B, ĝ_B⟩_M, heavy ball by `heavy_ball_charge_drift` with g = ĝ_B, and
Nesterov momentum (y = w + βηv, w' = y − ηĝ_B(y), using ⟨y, ĝ_B(y)⟩_M = 0) by

    Q_{k+1} − Q_k = 2βη⟨θ, v⟩_M + β²η²⟨v, v⟩_M + η²⟨ĝ, ĝ⟩_M   (`nesterov_charge_drift`).

In expectation over the batch, E⟨ĝ_B, ĝ_B⟩_M = ⟨∇L, ∇L⟩_M + c_b tr(A Σ_1)
(`dyn.monitors.ChargeNoiseRate`: the gradient part is GD's drift, the noise part the
SME-1 law; SGD follows their sum, not the noise part alone).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._models import MLP
from .._units import homogeneous_families, unit_inner


def charge_inner(a, b, degree=None) -> tuple[Array, ...]:
    """⟨a, b⟩_M = ⟨a_in, b_in⟩ − p⟨a_out, b_out⟩ per hidden neuron, one array per layer;
    for any model with units, Σ_S e_S ⟨a_S[i], b_S[i]⟩ per unit, one array per family
    (a conv channel's in-kernel and bias against its out-columns, a recurrent unit's
    self-loop with 1 − p). `degree` overrides each family's p (None: the family's own)."""
    return unit_inner(a, b, degree)


def heavy_ball_charge_drift(params: MLP, velocity: MLP | None, grad: MLP, eta, beta,
                            degree, weight_decay=0.0) -> tuple[Array, ...]:
    """The exact change Q_{k+1} − Q_k of each rescaling charge in one heavy-ball step
    (GD when `velocity` is None or β = 0), one array per hidden layer.

    `grad` is ∇L of the symmetric loss (without the decay term). With
    Δ = η(βv − g − λθ) the step changes Q by 2⟨θ, Δ⟩_M + ⟨Δ, Δ⟩_M, and ⟨θ, g⟩_M = 0:

        Q_{k+1} − Q_k = 2η(β⟨θ, v⟩_M − λQ) + η²⟨βv − g − λθ, βv − g − λθ⟩_M.
    """
    if velocity is None:
        velocity, beta = jax.tree.map(jnp.zeros_like, params), 0.0
    step = jax.tree.map(lambda v, g, x: beta * v - g - weight_decay * x, velocity, grad,
                        params)
    linear = charge_inner(params, velocity, degree)
    q = charge_inner(params, params, degree)
    quadratic = charge_inner(step, step, degree)
    return tuple(2 * eta * (beta * lin - weight_decay * qq) + eta**2 * quad
                 for lin, qq, quad in zip(linear, q, quadratic, strict=True))


def nesterov_charge_drift(params: MLP, velocity: MLP, grad: MLP, eta, beta,
                          degree) -> tuple[Array, ...]:
    """The exact change Q_{k+1} − Q_k of each rescaling charge in one Nesterov-momentum
    step from (w, v): 2βη⟨θ, v⟩_M + β²η²⟨v, v⟩_M + η²⟨g, g⟩_M, with `grad` g the
    gradient at the look-ahead y = w + βηv of the symmetric loss or of a minibatch of
    it (module docstring), one array per hidden layer."""
    wv = charge_inner(params, velocity, degree)
    vv = charge_inner(velocity, velocity, degree)
    gg = charge_inner(grad, grad, degree)
    return tuple(2 * beta * eta * a + (beta * eta) ** 2 * b + eta**2 * c
                 for a, b, c in zip(wv, vv, gg, strict=True))


def gd_charge_drift(grad: MLP, eta, degree, params: MLP | None = None,
                    weight_decay=0.0) -> tuple[Array, ...]:
    """η²(‖g_in‖² − p‖g_out‖²) per hidden neuron, one array per hidden layer, from the
    gradient `grad` (an `MLP`-shaped pytree): the exact change of each rescaling charge
    in one GD step of size `eta` (module docstring). With `weight_decay` λ (then
    `params` are needed) it is ((1−ηλ)² − 1)Q + η²(‖g_in‖² − p‖g_out‖²)."""
    if params is not None:
        return heavy_ball_charge_drift(params, None, grad, eta, 0.0, degree, weight_decay)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        raise ValueError("gd_charge_drift: pass `params` along with a `weight_decay`.")
    return tuple(eta**2 * d for d in charge_inner(grad, grad, degree))


def charge_start(params: MLP, velocity: MLP | None, eta) -> tuple[Array, Array, Array]:
    """(Q_0, Q_{−1}, S_{−1} = ⟨w_0, w_{−1}⟩_M) per hidden neuron, concatenated over
    layers, with w_{−1} = w_0 − η v_0 (v_0 = 0, or None, for GD or a start at rest): the
    initial state of `charge_closed_form`."""
    homogeneous_families(params, "charge_start", "params")
    model, degree = params, None
    w0 = eqx.filter(model, eqx.is_inexact_array)
    prev = w0 if velocity is None else jax.tree.map(
        lambda x, v: x - eta * v, w0, eqx.filter(velocity, eqx.is_inexact_array))
    prev = eqx.combine(prev, eqx.filter(model, eqx.is_inexact_array, inverse=True))
    return tuple(jnp.concatenate(charge_inner(a, b, degree))
                 for a, b in ((model, model), (prev, prev), (model, prev)))


def charge_closed_form(q0: ArrayLike, forcing: ArrayLike, eta, beta=0.0, weight_decay=0.0,
                       q_prev: ArrayLike | None = None,
                       s_prev: ArrayLike | None = None) -> np.ndarray:
    """Q_k, k = 0..K, of every neuron from its start and the forcing F_0..F_{K−1}
    (`ChargeForcing`), by the closed-form solution of the exact recurrence (module
    docstring): Q_k = Σ_μ c_μ μ^k + Σ_{j<k} G_{k−1−j} F_j over the eigenvalues
    μ ∈ {r₁², β, r₂²} of the recurrence, r₁,₂ = (a ± √(a² − 4β))/2, a = 1 + β − ηλ.
    Pass `forcing` = 0 for the symmetry-and-decay part alone (Kunin et al.'s damped
    oscillator). `q_prev`, `s_prev` (from `charge_start`) are needed when β > 0.

    Shapes: `q0` (neurons,), `forcing` (K, neurons); returns (K + 1, neurons).
    """
    q0 = np.asarray(q0, dtype=float)
    forcing = np.asarray(forcing, dtype=float)
    if forcing.ndim != 2 or forcing.shape[1:] != q0.shape:
        raise ValueError(
            f"`forcing` must have shape (steps, neurons) = (K, {q0.shape}), got "
            f"{forcing.shape}.")
    eta, beta, lam = float(eta), float(beta), float(weight_decay)
    a = 1.0 + beta - eta * lam
    steps = np.arange(forcing.shape[0] + 1)
    lag = steps[:, None] - 1 - steps[None, :-1]  # k − 1 − j
    if beta == 0.0:
        mu = a * a
        homogeneous = mu ** steps[:, None] * q0
        green = np.where(lag >= 0, mu ** np.maximum(lag, 0), 0.0)
        return homogeneous + green @ forcing
    if q_prev is None or s_prev is None:
        raise ValueError("charge_closed_form: β > 0 needs `q_prev` and `s_prev` "
                         "(dyn.discrete.charge_start).")
    disc = complex(a * a - 4.0 * beta)
    r1, r2 = (a + np.sqrt(disc)) / 2, (a - np.sqrt(disc)) / 2
    mu = np.asarray([r1 * r1, beta, r2 * r2], dtype=complex)
    if min(abs(mu[0] - mu[1]), abs(mu[1] - mu[2]), abs(mu[0] - mu[2])) < 1e-9 * abs(a) ** 2:
        raise ValueError(
            "charge_closed_form: a² = 4β or a = 0 (repeated eigenvalues; the closed form "
            "then has k·μ^k terms): change eta, beta or weight_decay slightly.")
    # Eigenvectors (μ, 1, aμ/(μ + β)) of [[a², β², −2aβ], [1, 0, 0], [a, 0, −β]] acting
    # on (Q_k, Q_{k−1}, S_{k−1}).
    vecs = np.stack([mu, np.ones(3), a * mu / (mu + beta)])
    start = np.stack([q0, np.asarray(q_prev, float), np.asarray(s_prev, float)])
    coeff = np.linalg.solve(vecs, start.astype(complex))  # (3, neurons)
    homogeneous = (mu[None, :] ** steps[:, None]) @ (vecs[0][:, None] * coeff)
    # G_m = e₁ᵀ A^m e₁, the response of Q to a unit F one step earlier.
    g_coeff = vecs[0] * np.linalg.solve(vecs, np.asarray([1.0, 0.0, 0.0], complex))
    green_m = (mu[None, :] ** np.maximum(lag, 0)[..., None]) @ g_coeff
    green = np.where(lag >= 0, green_m, 0.0)
    return np.real(homogeneous + green @ forcing)
