"""ChargeProjection: back along the rescaling orbit to the initial gradient-flow charges."""


import equinox as eqx
import jax.numpy as jnp
import optimistix as optx

from .._models import MLP
from .._projection import AbstractProjection
from ._common import (
    _apply,
    _check_count,
    _check_model,
    _check_tol,
    _check_velocity_rule,
    _multipliers,
    _zeros_log_scales,
)


def _charges_of(model: MLP, d, u):
    """Per-neuron charges b_i² + ‖W_h[i,:]‖² − d ‖W_{h+1}[:,i]‖² after the rescaling u
    (dyn.charges.rescaling, written on the log-scales so Newton can differentiate it)."""
    w_mult, b_mult = _multipliers(u, model.depth, d)
    w = [x * m for x, m in zip(model.weights, w_mult)]
    out = []
    for h in range(model.depth - 1):
        q = jnp.sum(w[h] ** 2, axis=-1) - d * jnp.sum(w[h + 1] ** 2, axis=-2)
        if model.biases is not None:
            q = q + (model.biases[h] * b_mult[h]) ** 2
        out.append(q)
    return tuple(out)


class ChargeProjection(AbstractProjection):
    """Back along the rescaling orbit to the initial gradient-flow charges.

    Finds log-scales u with Q_i(u) = Q_i(init) for every hidden unit, Q the charges of
    `dyn.charges.rescaling` (b_i² + ‖W_h[i,:]‖² − d‖W_{h+1}[:,i]‖²). With

        Φ(u) = ½ Σ_k Σ_ij W_k,ij² e^{2(u_i − d u_j)} + ½ Σ_i b_i² e^{2 u_i},

    Q(u) = ∇Φ(u) and Φ is convex, so the coupled system (a unit's out-weights are the
    next layer's in-weights) has a unique solution, found by Newton's method on all
    hidden log-scales at once (optimistix; dense lineax solve of the Hessian of Φ, so
    meant for networks with up to a few thousand hidden units). Units with all in- or
    all out-weights zero are held at u = 0. The velocity follows `velocity` as for the
    other fixes. `init` returns the charges to restore.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, rtol: float = 1e-14, atol: float = 1e-14, max_steps: int = 64,
                 velocity: str = "pushforward"):
        self.rtol = _check_tol(rtol, "ChargeProjection")
        self.atol = _check_tol(atol, "ChargeProjection")
        self.max_steps = _check_count("max_steps", max_steps, "ChargeProjection")
        self.velocity = _check_velocity_rule(velocity, "ChargeProjection")

    def init(self, params, velocity):
        d = _check_model(params, "ChargeProjection")
        return _charges_of(params, d, _zeros_log_scales(params))

    def __call__(self, params, velocity=None, state=None):
        d = _check_model(params, "ChargeProjection")
        target = self.init(params, velocity) if state is None else state
        live = tuple(
            (jnp.sum(params.weights[h] ** 2, axis=-1) > 0)
            & (jnp.sum(params.weights[h + 1] ** 2, axis=-2) > 0)
            for h in range(params.depth - 1))

        def fn(u, _):
            q = _charges_of(params, d, u)
            # A dead unit's equation is replaced by u_i = 0 so the Jacobian stays regular.
            return tuple(jnp.where(m, a - b, x) for a, b, m, x in zip(q, target, live, u))

        sol = optx.root_find(fn, optx.Newton(rtol=self.rtol, atol=self.atol),
                             _zeros_log_scales(params), max_steps=self.max_steps, throw=False)
        return _apply(params, velocity, sol.value, d, self.velocity)
