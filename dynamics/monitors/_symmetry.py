"""Monitors for symmetries (Głuch & Urbanke secs. 4–7): residuals of eq. 17, charge laws in
integrated form, angular momentum, linear balance, the ND bound (eqs. 32–34) and the
energy law (eq. 35)."""

from typing import ClassVar

import jax
import jax.numpy as jnp

from .._flows import (
    AbstractFirstOrderFlow,
    AbstractKappaFlow,
    AbstractSecondOrderFlow,
    GeneralFlow,
    GradientFlow,
    HeavyBallFlow,
    NesterovFlow,
    NewtonianFlow,
)
from .._flows._base import gauss_integral
from .._models import MLP
from .._tree import sqnorm, vdot
from .._units import unit_families, unit_residuals
from ..symmetries._charges import linear_balance
from ..symmetries._generators import AbstractGenerator, AbstractLinearGenerator
from ._monitors import AbstractIntegralMonitor, AbstractMonitor


def _generator(g, owner: str, linear: bool = False) -> AbstractGenerator:
    base = AbstractLinearGenerator if linear else AbstractGenerator
    if not isinstance(g, base):
        kind = "a linear generator" if linear else "a generator"
        raise ValueError(
            f"{owner}: `generator` must be {kind} from dyn.symmetries, e.g. "
            f"Rescaling(layer=1, neuron=0), got {g!r}."
        )
    return g


def _kappa_flow(problem, owner: str) -> AbstractKappaFlow:
    flow = problem.flow
    if not isinstance(flow, AbstractKappaFlow):
        raise ValueError(
            f"{owner} needs a flow of the form κ2 ẅ + κ1 ẇ + ∇L = 0 (dyn.AbstractKappaFlow: "
            f"GradientFlow, NewtonianFlow, NesterovFlow, HeavyBallFlow, GeneralFlow); got "
            f"{type(flow).__name__}."
        )
    return flow


def _velocity(t, w, v, problem):
    return problem.flow.vector_field(t, w, problem.loss) if v is None else v


def _force(t, w, v, problem, owner: str):
    """κ2 ẅ + κ1 ẇ from the flow's own acceleration (κ1 ẇ for first-order flows)."""
    flow = _kappa_flow(problem, owner)
    k1, k2 = flow.kappas(t)
    v = _velocity(t, w, v, problem)
    if isinstance(flow, AbstractSecondOrderFlow):
        a = flow.acceleration(t, w, v, problem.loss)
        return jax.tree.map(lambda x, y: k2 * x + k1 * y, a, v)
    return jax.tree.map(lambda y: k1 * y, v)


class SymmetryResidual(AbstractMonitor):
    """⟨κ2 ẅ + κ1 ẇ, ξ(w)⟩ / (‖κ2 ẅ + κ1 ẇ‖ ‖ξ(w)‖) (Głuch & Urbanke eq. 17), with ẅ the
    flow's own acceleration (ẇ = −∇L for GF): a relative number, zero when ξ is a
    symmetry of the loss, whatever the state (it tests the symmetry, not the solve)."""

    generator: AbstractGenerator
    name: str = "symmetry_residual"
    reads_velocity: ClassVar[bool] = True  # only through `_force`

    def __check_init__(self):
        _generator(self.generator, "SymmetryResidual")

    def __call__(self, t, w, v, problem):
        force = problem.params(_force(t, w, v, problem, "SymmetryResidual"))
        xi = self.generator(problem.params(w))
        denom = jnp.sqrt(sqnorm(force) * sqnorm(xi))
        return vdot(force, xi) / jnp.maximum(denom, jnp.finfo(denom.dtype).tiny)


class RescalingResiduals(AbstractMonitor):
    """eq. 17 for every rescaling unit at once: r_i = ⟨F, ξ_i⟩ / (‖F_i‖ ‖ξ_i‖) with
    F = κ2 ẅ + κ1 ẇ (the flow's own acceleration; F = −∇L for GF), ξ_i the generator
    of `Rescaling(h, i)` and F_i the part of F on ξ_i's support (for an MLP in-weights,
    bias, out-weights, β), concatenated over the unit families like `RescalingCharges`.
    Zero by construction for homogeneous units; one vectorised pass instead of one
    `SymmetryResidual` per neuron (600 monitors for a 200-200-200 net)."""

    name: ClassVar[str] = "rescaling_residuals"
    reads_velocity: ClassVar[bool] = True  # only through `_force`

    def __call__(self, t, w, v, problem):
        f = problem.params(_force(t, w, v, problem, "RescalingResiduals"))
        m = problem.params(w)
        families = unit_families(m, "RescalingResiduals", "params")
        return jnp.concatenate([unit_residuals(f, m, u) for u in families])


def _weight(flow, t):
    """μ(t) = exp(∫ κ1/κ2) up to a constant factor: 1 (ND), t^r (Nesterov), e^{γt}
    (heavy ball), Gauss–Legendre from t_ref for `GeneralFlow`."""
    if isinstance(flow, NewtonianFlow):
        return jnp.ones_like(t)
    if isinstance(flow, NesterovFlow):
        return jnp.asarray(t) ** flow.r
    if isinstance(flow, HeavyBallFlow):
        return jnp.exp(flow.gamma * t)
    if isinstance(flow, GeneralFlow):
        return jnp.exp(gauss_integral(lambda s: flow.kappa1(s) / flow.kappa2(s), flow.t_ref, t))
    raise ValueError(
        f"ChargeLaw: no integrating factor exp(∫κ1/κ2) is known for {type(flow).__name__}; "
        "use GradientFlow, NewtonianFlow, NesterovFlow, HeavyBallFlow or GeneralFlow."
    )


class ChargeLaw(AbstractIntegralMonitor):
    """The Noether charge law of a linear symmetry ξ(w) = A w, in integrated form.

    Along κ2 ẅ + κ1 ẇ + ∇L = 0 with ⟨∇L, ξ⟩ = 0, J = ⟨ẇ, A w⟩ obeys
    κ2 J̇ + κ1 J = κ2 ⟨ẇ, A ẇ⟩ (Głuch & Urbanke eq. 17 plus d/dt of A w), so with
    μ(t) = exp(∫ κ1/κ2):

        d/dt (μ J) = μ ⟨ẇ, A ẇ⟩,   i.e.   C = μ(t)⟨ẇ, A w⟩ − ∫_{t0}^t μ⟨ẇ, A ẇ⟩ ds

    is constant (derived here, checked numerically in tests/test_symmetry_monitors.py).
    For A symmetric J = Q̇ with Q = ½⟨w, A w⟩, which is the charge law
    κ2 Q̈ + κ1 Q̇ = κ2⟨ẇ, A ẇ⟩; for A antisymmetric (`InputRotation`) the integrand
    vanishes and μJ (the angular momentum, times t³ for Nesterov) is itself conserved.
    μ: 1 (ND), t^r (Nesterov: t³⟨w, Aẇ⟩ − ∫ t³⟨ẇ, Aẇ⟩ dt), e^{γt} (heavy ball). For gradient flow
    (κ2 = 0) the recorded value is Q = ½⟨w, A w⟩ itself, constant when ξ is a symmetry.
    """

    generator: AbstractLinearGenerator
    name: str = "charge_law"

    def __check_init__(self):
        _generator(self.generator, "ChargeLaw", linear=True)

    def integrand(self, t, w, v, problem):
        flow = _kappa_flow(problem, "ChargeLaw")
        if isinstance(flow, GradientFlow) or v is None:
            return jnp.zeros(())
        vv = problem.params(v)
        return _weight(flow, t) * vdot(vv, self.generator(vv))

    def value(self, t, w, v, problem, integral):
        flow = _kappa_flow(problem, "ChargeLaw")
        params = problem.params(w)
        if isinstance(flow, GradientFlow) or v is None:
            return 0.5 * vdot(params, self.generator(params))
        return _weight(flow, t) * vdot(problem.params(v), self.generator(params)) - integral


class LinearBalance(AbstractMonitor):
    """W_h W_hᵀ + b_h b_hᵀ − W_{h+1}ᵀ W_{h+1} of a linear network (`dyn.charges.
    linear_balance`; Głuch & Urbanke Table 4): the matrix of hidden layer `layer`
    (1..K−1), or with `layer=None` all of them raveled and concatenated."""

    layer: int | None = None
    name: str = "linear_balance"

    def __call__(self, t, w, v, problem):
        mats = linear_balance(problem.params(w))
        if self.layer is None:
            return jnp.concatenate([jnp.ravel(m) for m in mats])
        if not 1 <= self.layer <= len(mats):
            raise ValueError(f"LinearBalance: `layer` must be in 1..{len(mats)}, got {self.layer}.")
        return mats[self.layer - 1]


class AngularMomentum(AbstractMonitor):
    """Angular momentum of a second-order flow: Ẇ_1ᵀ W_1 − W_1ᵀ Ẇ_1 (a d_x × d_x
    antisymmetric matrix) for an MLP, whose pairing with P ∈ so(d_x) is the Noether
    charge of `InputRotation(P)` (Głuch & Urbanke Table 5, ND); w × ẇ when the parameters
    are a single 3-vector (the rotational toy, their Figs. 3–6)."""

    name: ClassVar[str] = "angular_momentum"

    def __call__(self, t, w, v, problem):
        if isinstance(problem.flow, AbstractFirstOrderFlow) or v is None:
            raise ValueError(
                "AngularMomentum needs a second-order flow: under a first-order flow ẇ is "
                "fixed by w (ẇ = −∇L for GF), and ⟨ẇ, P w⟩ = 0 identically for a rotation "
                "symmetry, so there is no angular momentum to record."
            )
        params, vel = problem.params(w), problem.params(v)
        if isinstance(params, MLP):
            w1, v1 = params.weights[0], vel.weights[0]
            return v1.T @ w1 - w1.T @ v1
        x, y = jnp.asarray(params), jnp.asarray(vel)
        if x.shape != (3,):
            raise ValueError(
                "AngularMomentum: params must be an MLP or a 3-vector, got shape "
                f"{x.shape}."
            )
        return jnp.cross(x, y)


def _norm_gaps(model: MLP):
    sq = [jnp.sum(wk**2) for wk in model.weights]
    return jnp.sum(jnp.abs(jnp.stack([a - b for a, b in zip(sq[:-1], sq[1:])])))


class NDBound(AbstractMonitor):
    """Table 2's ND bound (Głuch & Urbanke eqs. 32–34), recorded as [S(t), B(t)] with

        S(t) = Σ_h |‖W_h‖² − ‖W_{h+1}‖²|,   B(t) = 4 (H − L*) (t − t0)²,

    where H = ½‖ẇ‖² + L is conserved by ND and equals L(w(0)) when ẇ(0) = 0, so that
    S(t) − S(t0) ≤ B(t). (Eq. 34 with its constant: d²/dt² ½(‖W_h‖² − ‖W_{h+1}‖²) =
    ‖Ẇ_h‖² − ‖Ẇ_{h+1}‖², summed ≤ 2‖ẇ‖² ≤ 4(L(0) − L*), integrated twice from ẇ(0) = 0
    gives 2·(L(0) − L*)t² for ½-norms, i.e. 4(L(0) − L*)t² for S.) `l_star` is inf L
    (0 for the usual losses)."""

    l_star: float = 0.0
    t0: float = 0.0
    name: ClassVar[str] = "nd_bound"

    def __call__(self, t, w, v, problem):
        if not isinstance(problem.flow, NewtonianFlow):
            raise ValueError(
                f"NDBound holds for NewtonianFlow (its energy is conserved), got "
                f"{type(problem.flow).__name__}."
            )
        params = problem.params(w)
        if not isinstance(params, MLP):
            raise ValueError("NDBound needs an MLP.")
        energy = 0.5 * sqnorm(v) + problem.loss(w)
        bound = 4.0 * (energy - self.l_star) * (t - self.t0) ** 2
        return jnp.stack([_norm_gaps(params), bound])


class EnergyLaw(AbstractIntegralMonitor):
    """The flow's energy law in integrated form, recorded as [E(t), E(t) − ∫_{t0}^t Ė ds]
    with Ė the flow's closed-form `energy_rate`: the second entry is constant (= E(t0))
    and bounds the first when Ė ≤ 0. For NAGF, E = ½‖ẇ‖² + L and Ė = −(3/t)‖ẇ‖²
    (Głuch & Urbanke eq. 35)."""

    name: ClassVar[str] = "energy_law"

    def integrand(self, t, w, v, problem):
        return problem.flow.energy_rate(t, w, v, problem.loss)

    def value(self, t, w, v, problem, integral):
        energy = problem.flow.energy(t, w, v, problem.loss)
        return jnp.stack([energy, energy - integral])
