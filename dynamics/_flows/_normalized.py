"""Theory III's norm-controlled flows: weight normalization, Lagrange multipliers, and
Halpern's vanishing regularization (Banburski, Liao, Miranda, Poggio et al.).

The first two act on `dyn.NormCoordinates` (W_k = ρ_k V_k per layer); the Halpern flow
acts on any parameters. Each is checked numerically against an independent route in
tests/test_theory3.py, since the printed equations have typos (noted where used).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._reparam import check_coordinates
from .._tree import is_concrete, vdot
from .._validate import finite_nonnegative, float_array
from ._base import AbstractFirstOrderFlow, _as_schedule


def _loss_rate(flow, t, w, loss):
    # dL/dt = ⟨∇L, ẇ⟩ along the flow, exactly (the energy identity of a first-order flow).
    return vdot(jax.grad(loss)(w), flow.vector_field(t, w, loss))


class WeightNormFlow(AbstractFirstOrderFlow):
    """Gradient flow in weight-normalized coordinates W_k = ρ_k V_k, ‖V_k‖ = 1.

    The parameters are `dyn.NormCoordinates.from_mlp(model)`: the state holds ρ_k and an
    unnormalized U_k with V_k = U_k/‖U_k‖, so ‖V_k‖ = 1 holds by construction (to
    rounding), whatever the integrator does to ‖U_k‖. With G_k = ∂L/∂W_k:

    - `parametrization="tangent"` (default), Theory III's tangent-gradient method
      (eqs. 42–43 for one layer, App. 21 eqs. 75–85 for deep networks): the dynamics of
      (ρ_k, V_k) induced by gradient flow on W,
          ρ̇_k = −⟨V_k, G_k⟩ − λ_ρ ρ_k,   V̇_k = −(I − V_k V_kᵀ) G_k / ρ_k,
      so W_k = ρ_k V_k follows gradient flow exactly when λ_ρ = 0 (eq. 42's 1/ρ is this
      pull-back; the ρ-regularization −λ_ρ ρ is eq. 86).
    - `parametrization="standard"`: standard weight normalization (Salimans & Kingma
      2016; Theory III sec. 21.1, eqs. 89–95), gradient flow of L(g V/‖V‖) in (g, V):
          ρ̇_k = −⟨V_k, G_k⟩ − λ_ρ ρ_k,   V̇_k = −ρ_k (I − V_k V_kᵀ) G_k   (‖V_k‖ = 1),
      a different metric: the same fixed points, other paths.

    Biases (and trainable Swish β) follow gradient flow. Energy E = L with dL/dt ≤ 0.
    """

    parametrization: str = eqx.field(default="tangent", static=True)
    lambda_rho: float | Array = eqx.field(default=0.0, converter=float_array)

    def __check_init__(self):
        if self.parametrization not in ("tangent", "standard"):
            raise ValueError(
                "WeightNormFlow: `parametrization` must be 'tangent' (gradient flow on W, "
                "Theory III eqs. 42-43) or 'standard' (Salimans & Kingma weight "
                f"normalization), got {self.parametrization!r}."
            )
        finite_nonnegative(self.lambda_rho, "lambda_rho")

    def vector_field(self, t, w, loss):
        check_coordinates(w, "WeightNormFlow", normalize=True)
        # Autodiff through W_k = ρ_k U_k/‖U_k‖ gives ∂L/∂ρ_k = ⟨V_k, G_k⟩ and
        # ∂L/∂U_k = (ρ_k/‖U_k‖)(I − V_k V_kᵀ) G_k; the two parametrizations rescale them.
        grad = jax.grad(loss)(w)
        f = jax.tree.map(lambda g: -g, grad)
        rho_dot = tuple(-g - self.lambda_rho * r for g, r in zip(grad.rho, w.rho, strict=True))
        u_dot = []
        for r, u, g in zip(w.rho, w.directions, grad.directions, strict=True):
            u2 = jnp.sum(u**2)
            if self.parametrization == "tangent":
                # U̇ = −(‖U‖/ρ)(I − VVᵀ)G = −(‖U‖²/ρ²) ∂L/∂U, so V̇ = −(I − VVᵀ)G/ρ.
                u_dot.append(-(u2 / r**2) * g)
            else:
                # U̇ = −∂L/∂U with ‖U‖ = 1: V̇ = −ρ(I − VVᵀ)G (eq. 94 with g = ρ).
                u_dot.append(-g)
        f = eqx.tree_at(lambda c: (c.rho, c.directions), f, (rho_dot, tuple(u_dot)))
        return f

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        return _loss_rate(self, t, w, loss)


class LagrangeMultiplierFlow(AbstractFirstOrderFlow):
    """Gradient flow of Theory III's Lagrangian loss (eq. 12) in the coordinates
    W_k = ρ_k V_k, L = E(W) + Σ_k λ_k(t) ‖V_k‖² (eqs. 13–14):

        ρ̇_k = −∂E/∂ρ_k,    V̇_k = −∂E/∂V_k − 2 λ_k(t) V_k.

    The parameters are `dyn.NormCoordinates.from_mlp(model, normalize=False)`.
    `lam` is a number or a schedule t ↦ λ(t) (the same for every layer), or "unit":
    then λ_k is chosen at every t to hold ‖V_k‖ = 1. Derived again (eq. 15 is the
    discrete-step version): d‖V_k‖²/dt = 2⟨V_k, V̇_k⟩ = 0 gives

        λ_k = −⟨V_k, ∂E/∂V_k⟩ / (2‖V_k‖²),

    and then V̇_k = −(I − V_k V_kᵀ)∂E/∂V_k = −ρ_k (I − V_k V_kᵀ) G_k on ‖V_k‖ = 1: the
    standard weight-normalization flow (`WeightNormFlow(parametrization="standard")`),
    as Theory III sec. 6.2 says the methods coincide. Eq. 15 itself,
    λ = 1 − √(1 − ‖g‖² + (Vᵀg)²) + Vᵀg, is right for one step V ← V + g − λV
    (‖V‖ = 1 before and after; the "+" root). Energy E = L(W) (the data loss alone).
    """

    lam: Any

    def __init__(self, lam: Any = "unit"):
        if isinstance(lam, str):
            if lam != "unit":
                raise ValueError(
                    "LagrangeMultiplierFlow: `lam` must be a number, a function of t, or "
                    f"'unit' (keep every ‖V_k‖ = 1), got {lam!r}."
                )
            self.lam = lam
        else:
            self.lam = _as_schedule("lam", lam)

    def vector_field(self, t, w, loss):
        check_coordinates(w, "LagrangeMultiplierFlow", normalize=False)
        grad = jax.grad(loss)(w)
        f = jax.tree.map(lambda g: -g, grad)
        v_dot = []
        for v, g in zip(w.directions, grad.directions, strict=True):
            if isinstance(self.lam, str):  # "unit"
                lam = -jnp.sum(v * g) / (2.0 * jnp.sum(v**2))
            else:
                lam = self.lam(t)
            v_dot.append(-g - 2.0 * lam * v)
        return eqx.tree_at(lambda c: c.directions, f, tuple(v_dot))

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        return _loss_rate(self, t, w, loss)


class PowerDecay(eqx.Module):
    """λ(t) = (1 + t/scale)^(−a): decays to 0 with ∫λ = ∞ for 0 < a ≤ 1 (Halpern's
    conditions, Theory III App. 12, continuous form of λ_n = n^(−a))."""

    a: Array = eqx.field(converter=float_array)
    scale: Array = eqx.field(default=1.0, converter=float_array)

    def __check_init__(self):
        if is_concrete(self.a) and not (0 < float(self.a) <= 1):
            raise ValueError(
                f"PowerDecay: `a` must be in (0, 1] so that λ → 0 and ∫λ dt = ∞, got {self.a}."
            )
        if is_concrete(self.scale) and not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"PowerDecay: `scale` must be > 0, got {self.scale}.")

    def __call__(self, t):
        return (1.0 + t / self.scale) ** (-self.a)


# Times on which a user schedule is checked: it must stay in [0, 1] and decay.
_GRID = np.concatenate([[0.0], np.logspace(-2, 8, 41)])


def _check_halpern_schedule(schedule: Callable) -> None:
    try:
        values = np.asarray([float(schedule(jnp.asarray(t))) for t in _GRID])
    except Exception as exc:  # noqa: BLE001 - anything the user's function raises
        raise ValueError(
            f"HalpernFlow: `schedule` must map a time t to a number λ(t); calling it failed "
            f"({exc})."
        ) from exc
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        raise ValueError(
            "HalpernFlow: `schedule` must take values in [0, 1] (checked on t in "
            f"[0, 1e8]); got values from {values.min():.3g} to {values.max():.3g}."
        )
    tail = values[_GRID >= 1e4]
    if np.any(np.diff(tail) > 0) or not values[-1] <= 0.5 * values.max():
        raise ValueError(
            "HalpernFlow: `schedule` must decay to 0 (λ(t) → 0 with ∫λ dt = ∞, e.g. "
            "dyn.PowerDecay(0.5)); on t in [0, 1e8] it does not: "
            f"λ(0) = {values[0]:.3g}, λ(1e8) = {values[-1]:.3g}."
        )


class HalpernFlow(AbstractFirstOrderFlow):
    """Gradient flow with vanishing regularization toward an anchor (here 0):

        ẇ = −(1 − λ(t)) ∇L(w) − λ(t) w,    λ(t) → 0,  ∫ λ dt = ∞,

    the continuous counterpart of norm-minimizing descent (NMGD, Theory III eq. 26) and of
    Halpern's iteration x_{n+1} = (1 − s_n) T x_n (eq. 25, Theorem 5). For a convex loss
    with a set of minimizers it converges to the minimizer nearest the anchor, the
    minimum-norm one, independently of the start (for least squares: the pseudo-inverse
    solution). `schedule`: a function t ↦ λ(t) in [0, 1] that decays (checked on a grid
    up to t = 1e8), or a number a for `PowerDecay(a)`, λ(t) = (1 + t)^(−a).
    Energy E = L, with dL/dt = ⟨∇L, ẇ⟩ (not of one sign while λ pulls toward 0).
    """

    schedule: Callable

    def __init__(self, schedule: Any = 0.5):
        if isinstance(schedule, bool):
            raise ValueError("HalpernFlow: `schedule` must be a function or a number a.")
        if not callable(schedule):
            try:
                schedule = PowerDecay(schedule)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    "HalpernFlow: `schedule` must be a function t -> λ(t) or a number a in "
                    f"(0, 1] for λ(t) = (1 + t)^(-a); got {schedule!r} ({exc})."
                ) from None
        elif not isinstance(schedule, PowerDecay) and is_concrete(schedule):
            # (a schedule holding traced values, e.g. inside a vmapped sweep, is trusted)
            _check_halpern_schedule(schedule)
        self.schedule = schedule

    def vector_field(self, t, w, loss):
        lam = self.schedule(t)
        grad = jax.grad(loss)(w)
        return jax.tree.map(lambda g, x: -(1.0 - lam) * g - lam * x, grad, w)

    def vector_field_and_loss(self, t, w, loss):
        lam = self.schedule(t)
        value, grad = jax.value_and_grad(loss)(w)
        return jax.tree.map(lambda g, x: -(1.0 - lam) * g - lam * x, grad, w), value

    def energy(self, t, w, v, loss):
        return loss(w)

    def energy_rate(self, t, w, v, loss):
        return _loss_rate(self, t, w, loss)
