"""Saul's weight-balancing flows (Saul 2023, *Weight-balancing fixes and flows for deep
learning*, TMLR; Theorems 4–6, eqs. 16–28, App. B; arXiv v1 eqs. 54–59)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array

from .._tree import is_concrete, vdot
from .._units import leaf_at, put_weight_matrices, weight_matrices
from .._validate import finite_nonnegative, float_array
from ..regularizers._regularizers import (
    AbstractRegularizer,
    Lpq,
    as_regularizer,
    balanced_weights,
)
from ._base import AbstractFirstOrderFlow


def _lpq_velocity(reg: Lpq, w: Array, g: Array) -> Array:
    """Ẇ of one layer for the ℓp,q regularizer, given g = ∂L/∂W of that layer.

    Saul's flow in V = W ⊙ ∂R/∂W is V̇ = −W ⊙ ∂L/∂W (arXiv v1 eq. 58, written there as
    V̇ + λV = −W ⊙ ∂E/∂W). With ω = log|W| the correspondence of eqs. 55–57 differentiates
    to V̇_ij = V_ij [p ω̇_ij + (q − p) Σ_k π_ik ω̇_ik]   (Saul App. B eq. 53): per row a
    diagonal plus a rank-one term, inverted in closed form. With r = V̇/V, taking
    Σ_j π_ij gives s_i = Σ_k π_ik ω̇_ik = Σ_k π_ik r_ik / q = −⟨W_i, g_i⟩ / (q ρ_i), and

        Ẇ_ij = W_ij ω̇_ij = (1/p) [−|W_ij|^{2−p} S_i^{1−q/p} g_ij + (q − p)/q ⟨W_i, g_i⟩/ρ_i W_ij]

    (S_i = Σ_j |W_ij|^p, ρ_i = S_i^{q/p}), using W_ij²/V_ij = |W_ij|^{2−p} S_i^{1−q/p}.
    Finite at W_ij = 0 for p ≤ 2. Checked against the implicit form (eq. 24) in
    tests/test_weight_balancing.py.
    """
    p, q = reg.p, reg.q
    s = jnp.sum(jnp.abs(w) ** p, axis=-1, keepdims=True)
    rho = s ** (q / p)
    row = jnp.sum(w * g, axis=-1, keepdims=True)
    return (-(jnp.abs(w) ** (2.0 - p)) * s ** (1.0 - q / p) * g + (q - p) / q * row / rho * w) / p


class WeightBalancingFlow(AbstractFirstOrderFlow):
    """Saul's weight-balancing flow for a regularizer R and L = E + λR:

        d/dt (W_ij ∂R/∂W_ij) = −W_ij ∂L/∂W_ij          (Saul 2023 eq. 16)

    on the weights of a `dyn.MLP` with a positively homogeneous activation, or of any
    model that states its rescaling units (`dyn.ConvNet`, `dyn.RNN`, `dyn.ResidualMLP`, a
    user's model), every unit positively homogeneous; E is the `loss` given to
    `simulate`. For a model with units, W is every array of rank ≥ 2 a unit touches, read
    as a matrix with rows = axis 0 (a kernel (out, in, kh, kw) as (out, in·kh·kw): a
    row is what feeds one output channel) and R is a function of those matrices.
    Biases that rescale with a unit are frozen (Theorem 4 needs them at zero: start from
    zero hidden biases, e.g. `bias=False` or the default zero initialisation); every
    parameter no unit touches (the output bias) follows gradient flow ḃ = −∂L/∂b
    (arXiv v1 Cor. 3.5).

    The imbalance Q_i (eq. 17, `dyn.monitors.Imbalance(R)`; for units,
    Σ_S e_S Σ V_S[i] over the unit's weight slices) then decays as
    Q_i(t) = Q_i(0) e^{−λt} (eq. 20): V̇ = −W ⊙ ∂E/∂W − λV, and Euler's identity for the
    unit's rescaling, with its biases at zero, makes the first term sum to zero. L
    descends wherever the Hessian of R in ω = log|W| is positive definite (Theorem 5):
    dL/dt = −(∂L/∂ω)ᵀ H⁻¹ ∂L/∂ω − ‖∂L/∂b_out‖².

    - `dyn.regularizers.Lpq(p, q)` (eq. 26) is integrated in closed form from the
      V-coordinates of arXiv v1 eq. 58 (O(#weights), no linear solve). p = q = 2 is
      R = ½‖W‖² and gives Ẇ = −½ ∂L/∂W: gradient flow at half speed (Saul's factor ½,
      below eq. 26); p = q = 1 gives Ẇ = −|W| ⊙ ∂L/∂W (eq. 28's flow).
    - Any other differentiable R (an `AbstractRegularizer` or a function of the tuple of
      weight matrices) uses the implicit form ω̇ = −H(ω)⁻¹ ∂L/∂ω (eq. 24), H the Hessian
      of R in ω = log|W| taken by autodiff and solved by lineax (dense: O(n³) in the
      number of weights; pass `linear_solver=lx.CG(rtol, atol)` for large models).

    The flow lives in an open orthant: a weight never crosses zero, and weights at zero
    make H singular (where R has a kink there, e.g. p = 1, it is not differentiable).
    Energy E = L = E + λR, with dL/dt ≤ 0 under the conditions of Theorem 5 / 6.

    **Arguments:** `regularizer`; `lam`: λ >= 0; `linear_solver`: for the implicit form.
    """

    regularizer: AbstractRegularizer
    lam: Array = eqx.field(converter=float_array)
    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=True)

    def __init__(self, regularizer, lam=0.0, *, linear_solver=None):
        self.regularizer = as_regularizer(regularizer)
        self.lam = lam
        self.linear_solver = (
            lx.AutoLinearSolver(well_posed=True) if linear_solver is None else linear_solver
        )

    def __check_init__(self):
        finite_nonnegative(self.lam, "lam")

    def total_loss(self, w, loss):
        """L = E + λR (Saul eq. 13)."""
        _, paths = balanced_weights(w, "params")
        return loss(w) + self.lam * self.regularizer(weight_matrices(w, paths))

    def _weight_velocity(self, weights, grads):
        reg = self.regularizer
        if isinstance(reg, Lpq):
            return tuple(_lpq_velocity(reg, w, g) for w, g in zip(weights, grads, strict=True))
        # Eq. 24. R̃(u) = R(W ⊙ e^u) has ∂R̃/∂u = V and ∂²R̃/∂u∂u = H(ω) at u = 0, which
        # avoids log|W| and the signs; a zero weight makes H singular, as it should.
        u0 = tuple(jnp.zeros_like(w) for w in weights)

        def grad_u(u, _):
            return jax.grad(lambda u: reg(tuple(w * jnp.exp(a) for w, a in zip(weights, u))))(u)

        hessian = lx.JacobianLinearOperator(
            grad_u, u0, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
        )
        # ∂L/∂ω = W ⊙ ∂L/∂W (eq. 22).
        rhs = tuple(-w * g for w, g in zip(weights, grads, strict=True))
        omega_dot = lx.linear_solve(hessian, rhs, self.linear_solver).value
        return tuple(w * o for w, o in zip(weights, omega_dot, strict=True))

    def _check(self, w):
        families, paths = balanced_weights(w, "params")
        weights = weight_matrices(w, paths)
        if is_concrete(weights):
            self.regularizer.check(weights)
        return families, paths, weights

    def vector_field_and_loss(self, t, w, loss):
        families, paths, weights = self._check(w)
        value, grad = jax.value_and_grad(loss)(w)
        grad_r = jax.grad(self.regularizer)(weights)
        # ∂L/∂W = ∂E/∂W + λ ∂R/∂W: eq. 58's right side and its decay term λV together.
        grads = tuple(ge + self.lam * gr for ge, gr in
                      zip(weight_matrices(grad, paths), grad_r, strict=True))
        # Parameters no unit touches by gradient flow (arXiv v1 Cor. 3.5), the unit
        # biases (rank 1) frozen (Theorem 4), the weights by Saul's flow.
        out = jax.tree.map(jnp.negative, grad)
        for u in families:
            for s in u.slices:
                leaf = leaf_at(out, s.path)
                if (s.ndim if s.ndim is not None else leaf.ndim) == 1:
                    out = eqx.tree_at(lambda m, p=s.path: leaf_at(m, p), out,
                                      jnp.zeros_like(leaf))
        return put_weight_matrices(out, paths, self._weight_velocity(weights, grads)), value

    def vector_field(self, t, w, loss):
        return self.vector_field_and_loss(t, w, loss)[0]

    def energy(self, t, w, v, loss):
        return self.total_loss(w, loss)

    def energy_rate(self, t, w, v, loss):
        return vdot(jax.grad(lambda x: self.total_loss(x, loss))(w), self.vector_field(t, w, loss))
