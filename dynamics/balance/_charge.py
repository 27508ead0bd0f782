"""ChargeProjection: back along the rescaling orbit to the initial gradient-flow charges."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._models import MLP
from .._projection import AbstractProjection
from .._units import unit_charges
from .._validate import positive_int, real
from ._common import _apply, _check_model, _check_velocity_rule
from ._units import apply_units, check_units_model, units_charge_scales


def _squares(model: MLP):
    """|W_k|² of every weight matrix and b_h² of every hidden bias (zeros without biases)."""
    m = tuple(w**2 for w in model.weights)
    if model.biases is None:
        b2 = tuple(jnp.zeros(n, m[0].dtype) for n in model.widths[1:-1])
    else:
        b2 = tuple(b**2 for b in model.biases[:-1])
    return m, b2


def _charges(m, b2, u, d):
    """Charges Q_h = b² e^{2u} + rows_h − d cols_h after the rescaling u, with the
    rescaled squares S_k = M_k e^{2(u_i − d u_j)} (returned too, for the Hessian)."""
    depth = len(m)
    s = []
    for k in range(depth):
        x = m[k]
        if k < depth - 1:
            x = x * jnp.exp(2 * u[k])[:, None]
        if k > 0:
            x = x * jnp.exp(-2 * d * u[k - 1])[None, :]
        s.append(x)
    rows = [jnp.sum(s[h], axis=-1) for h in range(depth - 1)]
    cols = [jnp.sum(s[h + 1], axis=-2) for h in range(depth - 1)]
    bias = [b * jnp.exp(2 * uh) for b, uh in zip(b2, u)]
    q = tuple(r - d * c + b for r, c, b in zip(rows, cols, bias))
    return q, s, rows, cols, bias


def _block_tridiagonal_solve(diag, off, rhs):
    """Solve H x = rhs for the SPD block-tridiagonal H with diagonal blocks diag(diag[g])
    and sub-diagonal blocks off[g] (n_g × n_{g−1}, g ≥ 1), by block elimination (block
    Thomas / block Cholesky): the first pivot is diagonal, the others are the Schur
    complements diag(diag[g]) − off[g] P_{g−1}^{-1} off[g]ᵀ, Cholesky-factored. Costs
    Σ_g n_g³ instead of (Σ_g n_g)³ for a dense solve."""
    n = len(diag)
    pivots = [None] * n  # None: the diagonal first pivot

    def solve(g, x):
        if pivots[g] is None:
            return x / (diag[g] if x.ndim == 1 else diag[g][:, None])
        return jsl.cho_solve(pivots[g], x)

    r = [rhs[0]]
    for g in range(1, n):
        y = solve(g - 1, off[g].T)
        pivots[g] = jsl.cho_factor(jnp.diag(diag[g]) - off[g] @ y)
        r.append(rhs[g] - off[g] @ solve(g - 1, r[g - 1]))
    x = [None] * n
    x[n - 1] = solve(n - 1, r[n - 1])
    for g in range(n - 2, -1, -1):
        x[g] = solve(g, r[g] - off[g + 1].T @ x[g + 1])
    return x


@eqx.filter_jit
def _charge_scales(m, b2, target, live, d, rtol, atol, max_steps: int):
    """Newton's method on Q(u) = target over the live hidden log-scales.

    Q = ∇Φ with Φ(u) = ½ Σ_k Σ_ij M_k,ij e^{2(u_i − d u_j)} + ½ Σ_i b_i² e^{2u_i} convex,
    so the Hessian ∇²Φ is SPD and block tridiagonal, written in closed form:
    ∂Q_i/∂u_i = 2 rows_i + 2 d² cols_i + 2 b_i² e^{2u_i}, ∂Q_i/∂u_j = −2d S_ij for a
    weight S_ij from unit j of the previous hidden layer. Dead units (no in- or no
    out-weights) keep u = 0: their rows of the system are the identity.
    Stops when every Newton step |δu_i| <= atol + rtol |u_i| (quadratic convergence: the
    residual is then at rounding) or after `max_steps`.
    """
    depth = len(m)
    dtype = m[0].dtype
    if depth == 1:  # no hidden unit, nothing to rescale
        return ()

    def newton_step(u):
        q, s, rows, cols, bias = _charges(m, b2, u, d)
        diag = [jnp.where(lv, 2 * (r + d * d * c + b), 1.0)
                for lv, r, c, b in zip(live, rows, cols, bias)]
        off = [None] + [-2 * d * s[g] * (live[g][:, None] & live[g - 1][None, :])
                        for g in range(1, depth - 1)]
        rhs = [jnp.where(lv, t - x, 0.0) for lv, t, x in zip(live, target, q)]
        return _block_tridiagonal_solve(diag, off, rhs)

    def cond(carry):
        _, it, done = carry
        return (it < max_steps) & ~done

    def body(carry):
        u, it, _ = carry
        step = newton_step(u)
        u = tuple(a + b for a, b in zip(u, step))
        done = jnp.array(True)
        for a, b in zip(u, step):
            done = done & jnp.all(jnp.abs(b) <= atol + rtol * jnp.abs(a))
        return u, it + 1, done

    u0 = tuple(jnp.zeros(x.shape[0], dtype) for x in m[:-1])
    u, _, _ = jax.lax.while_loop(cond, body, (u0, jnp.asarray(0), jnp.asarray(False)))
    return u


class ChargeProjection(AbstractProjection):
    """Back along the rescaling orbit to the initial gradient-flow charges.

    Finds log-scales u with Q_i(u) = Q_i(init) for every hidden unit, Q the charges of
    `dyn.charges.rescaling` (b_i² + ‖W_h[i,:]‖² − d‖W_{h+1}[:,i]‖²). With

        Φ(u) = ½ Σ_k Σ_ij W_k,ij² e^{2(u_i − d u_j)} + ½ Σ_i b_i² e^{2 u_i},

    Q(u) = ∇Φ(u) and Φ is convex, so the coupled system (a unit's out-weights are the
    next layer's in-weights) has a unique solution, found by Newton's method on all
    hidden log-scales at once with the Hessian of Φ in closed form (block tridiagonal,
    solved layer by layer: one hidden layer costs elementwise work only, deeper networks
    a Cholesky factorization per hidden layer after the first, so meant for layers of
    up to a few thousand units). Newton stops when every step |δu_i| <= atol + rtol|u_i|
    or after `max_steps`. Units with all in- or all out-weights zero are held at u = 0.
    The velocity follows `velocity` as for the other fixes. `init` returns the charges
    to restore.

    Any other model that states its rescaling units (`dyn.ConvNet`, `dyn.RNN`,
    `dyn.ResidualMLP`, a user's model) restores the charges of `dyn.charges.rescaling`,
    Q_i = Σ_S e_S ‖w_S[i]‖², the same way: Φ(u) = ½ Σ_e w_e² e^{2 L_e(u)} over every
    entry a unit touches (L_e(u) = Σ_S e_S u_{S,i(e)}: a recurrent self-loop counts
    (1 − p) u_i) is convex with ∇Φ = Q, solved by damped Newton steps with the Hessian
    by autodiff (dense in the number of units: meant for up to a few hundred).

    **Arguments:** `rtol`, `atol`: Newton's stopping rule on the log-scales; `max_steps`;
    `velocity`: "pushforward", "keep" or "zero".

    **Raises:** ValueError for a model without units, a non-homogeneous unit, a NaN
    weight, or a bad option.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, rtol: float = 1e-14, atol: float = 1e-14, max_steps: int = 64,
                 velocity: str = "pushforward"):
        self.rtol = real(rtol, "rtol", "ChargeProjection", low=0.0, strict=True, high=1.0)
        self.atol = real(atol, "atol", "ChargeProjection", low=0.0, strict=True, high=1.0)
        self.max_steps = positive_int(max_steps, "max_steps", "ChargeProjection")
        self.velocity = _check_velocity_rule(velocity, "ChargeProjection")

    def init(self, params, velocity):
        if not isinstance(params, MLP):
            families = check_units_model(params, "ChargeProjection")
            return tuple(unit_charges(params, u, None, "ChargeProjection") for u in families)
        d = _check_model(params, "ChargeProjection")
        m, b2 = _squares(params)
        u0 = tuple(jnp.zeros_like(b) for b in b2)
        return _charges(m, b2, u0, d)[0]

    def __call__(self, params, velocity=None, state=None):
        target = self.init(params, velocity) if state is None else state
        if not isinstance(params, MLP):
            families = check_units_model(params, "ChargeProjection")
            u, _ = units_charge_scales(params, target, self.rtol, self.atol, self.max_steps)
            return apply_units(params, velocity, families, u, self.velocity)
        d = _check_model(params, "ChargeProjection")
        m, b2 = _squares(params)
        live = tuple((jnp.sum(m[h], axis=-1) > 0) & (jnp.sum(m[h + 1], axis=-2) > 0)
                     for h in range(params.depth - 1))
        u = _charge_scales(m, b2, target, live, d, self.rtol, self.atol, self.max_steps)
        return _apply(params, velocity, u, d, self.velocity)
