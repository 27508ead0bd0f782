"""Baldi et al.: neural synaptic balancing, one neuron / layer at a time; ENorm."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray

from .._models import MLP
from .._projection import AbstractProjection
from .._validate import float_array, positive_int, real
from ._common import (
    BalanceInfo,
    _apply,
    _check_exponent,
    _check_model,
    _check_schedule,
    _check_velocity_rule,
    sweep_until,
)
from ._unit_balance import units_neuron_balance
from ._units import apply_units, check_units_model


def _lp_log_scale(x, y, p, d, wx=1.0, wy=1.0):
    """log λ* minimizing wx λ^p Σ x^p + wy λ^{-dp} Σ y^p (Baldi sec. 2 for d = 1:
    λ* = (‖out‖_p^p / ‖in‖_p^p)^{1/(2p)}; here λ* = (d wy B / wx A)^{1/(p(1+d))})."""
    a = wx * jnp.sum(x**p)
    b = wy * jnp.sum(y**p)
    ok = (a > 0) & (b > 0)
    s = (jnp.log(jnp.where(ok, d * b, 1.0)) - jnp.log(jnp.where(ok, a, 1.0))) / (p * (1 + d))
    return jnp.where(ok, s, 0.0)


def _g_log_scale(g, x, y, d):
    """log λ* minimizing Σ g(λ x) + Σ g(λ^{-d} y) by Newton on s = log λ (optimistix).

    The stationarity condition Σ g'(e^s x) e^s x − d Σ g'(e^{-ds} y) e^{-ds} y = 0 is
    increasing in s when g is convex and increasing on [0, ∞) (Baldi et al., Thm 26).
    """
    dg = jax.vmap(jax.grad(g))

    def fn(s, _):
        ex, ey = jnp.exp(s) * x, jnp.exp(-d * s) * y
        return jnp.sum(dg(ex) * ex) - d * jnp.sum(dg(ey) * ey)

    ok = (jnp.sum(x) > 0) & (jnp.sum(y) > 0)
    s0 = _lp_log_scale(x, y, 2.0, d)
    # A safe s0 where the unit is left alone: Newton on an all-zero side has no root.
    s0 = jnp.where(ok, s0, 0.0)
    sol = optx.root_find(fn, optx.Newton(rtol=1e-12, atol=1e-14), s0, max_steps=64,
                         throw=False)
    return jnp.where(ok & jnp.isfinite(sol.value), sol.value, 0.0)


def _neuron_log_scales(x, y, p, d, g, wx=1.0, wy=1.0):
    if g is None:
        return _lp_log_scale(x, y, p, d, wx, wy)
    return _g_log_scale(g, x, y, d)


def _objective(abs_w, abs_b, p, g, coef):
    f = (lambda a: a**p) if g is None else (lambda a: jax.vmap(g)(a.ravel()))
    total = 0.0
    for k, a in enumerate(abs_w):
        total = total + coef**k * jnp.sum(f(a))
    if abs_b is not None:
        total = total + sum(jnp.sum(f(b)) for b in abs_b[:-1])
    return total


@eqx.filter_jit
def _balance_scales(abs_w, abs_b, p, d, g, schedule: str, tol, max_sweeps: int, key,
                    coef):
    depth = len(abs_w)
    dtype = abs_w[0].dtype
    sizes = [a.shape[0] for a in abs_w[:-1]]

    def in_out(w, b, h):
        x = w[h]
        if b is not None:
            x = jnp.concatenate([x, b[h][:, None]], axis=1)
        return x, w[h + 1].T

    def scale(w, b, h, s, index=None):
        # Rescale unit(s) `index` of hidden layer h by e^s (all of the layer if None).
        w, b = list(w), None if b is None else list(b)
        lam_in, lam_out = jnp.exp(s), jnp.exp(-d * s)
        if index is None:
            w[h] = w[h] * lam_in[:, None] if jnp.ndim(s) else w[h] * lam_in
            w[h + 1] = w[h + 1] * (lam_out[None, :] if jnp.ndim(s) else lam_out)
            if b is not None:
                b[h] = b[h] * lam_in
        else:
            w[h] = w[h].at[index].multiply(lam_in)
            w[h + 1] = w[h + 1].at[:, index].multiply(lam_out)
            if b is not None:
                b[h] = b[h].at[index].multiply(lam_in)
        return tuple(w), None if b is None else tuple(b)

    def weights_of(h):
        # ENorm's asymmetry: layer k's weights count c^k (c = 1 for neuron balancing).
        return coef**h, coef ** (h + 1)

    def one_neuron(state, h, i):
        w, b, u, delta = state
        x, y = in_out(w, b, h)
        s = _neuron_log_scales(x[i], y[i], p, d, g, *weights_of(h))
        w, b = scale(w, b, h, s, i)
        u = list(u)
        u[h] = u[h].at[i].add(s)
        return w, b, tuple(u), jnp.maximum(delta, jnp.abs(jnp.expm1(s)))

    def sweep(state, key):
        if schedule == "sequential":
            for h in range(depth - 1):
                state = jax.lax.fori_loop(0, sizes[h], lambda i, st, h=h: one_neuron(st, h, i),
                                          state)
            return state
        if schedule == "stochastic":
            # One sweep = as many uniformly random picks as there are hidden units.
            layer_of = jnp.concatenate([jnp.full(n, h) for h, n in enumerate(sizes)])
            index_of = jnp.concatenate([jnp.arange(n) for n in sizes])
            picks = jax.random.randint(key, (sum(sizes),), 0, sum(sizes))
            branches = [lambda st, i, h=h: one_neuron(st, h, i) for h in range(depth - 1)]

            def pick(n, st):
                j = picks[n]
                return jax.lax.switch(layer_of[j], branches, st, index_of[j])

            return jax.lax.fori_loop(0, sum(sizes), pick, state)
        w, b, u, delta = state
        for h in range(depth - 1):
            x, y = in_out(w, b, h)
            wx, wy = weights_of(h)
            if schedule == "layer":
                # Units of one layer share no weight: balancing them all at once is
                # exactly balancing them one after the other.
                if g is None:
                    s = jax.vmap(lambda xi, yi: _lp_log_scale(xi, yi, p, d, wx, wy))(x, y)
                else:
                    s = jax.vmap(lambda xi, yi: _g_log_scale(g, xi, yi, d))(x, y)
                w, b = scale(w, b, h, s)
                u = tuple(uu + s if k == h else uu for k, uu in enumerate(u))
            else:  # tied: one factor for the whole layer (Baldi App. B.7.2)
                s = _neuron_log_scales(x.ravel(), y.ravel(), p, d, g, wx, wy)
                w, b = scale(w, b, h, s)
                u = tuple(uu + s if k == h else uu for k, uu in enumerate(u))
            delta = jnp.maximum(delta, jnp.max(jnp.abs(jnp.expm1(s))))
        return w, b, u, delta

    def run(state, key):
        w, b, u, delta = sweep((*state, jnp.asarray(0.0, dtype)), key)
        return (w, b, u), delta

    u0 = tuple(jnp.zeros(n, dtype) for n in sizes)
    (w, b, u), it, values, delta = sweep_until(
        run, lambda st: _objective(st[0], st[1], p, g, coef), (abs_w, abs_b, u0), tol,
        max_sweeps, key, dtype)
    return u, it, values, delta < tol


def _check_g(regularizer, owner: str):
    if regularizer is None:
        return None
    if not callable(regularizer):
        raise ValueError(
            f"{owner}: `regularizer` must be None (the L_p regularizer) or a callable g "
            f"giving the cost g(|w|) of one weight, e.g. lambda a: a**2; got {regularizer!r}.")
    return regularizer


def neuron_balance(model: MLP, p: float = 2, schedule: str = "sequential",
                   include_bias: bool = False, tol: float = 1e-10, max_sweeps: int = 1000,
                   key: PRNGKeyArray | None = None,
                   regularizer: Callable[[Array], Array] | None = None
                   ) -> tuple[MLP, BalanceInfo]:
    """Neural synaptic balancing (Baldi et al., sec. 2 and App. B).

    Balancing a hidden unit with in-weights x (and its bias when `include_bias`, Baldi's
    convention; Saul's is to leave it out) and out-weights y rescales x by λ* and y by
    λ*^{-d} where λ* minimizes the unit's contribution to R = Σ g(|w|):

    - L_p (g(a) = a^p, `regularizer=None`): λ* = (d ‖y‖_p^p / ‖x‖_p^p)^{1/(p(1+d))},
      Baldi's (‖y‖_p^p/‖x‖_p^p)^{1/(2p)} for d = 1, their BiPU scaling (App. B.5) for
      d = c;
    - any other g (convex, increasing on [0, ∞)): a 1-D Newton root solve (optimistix).

    Schedules: "sequential" (each unit in order, layer by layer), "stochastic" (units
    drawn uniformly at random; needs `key`), "layer" (all units of a layer at once),
    "tied" (one λ per layer). A sweep visits every unit (or layer) once; sweeps repeat
    until every |λ − 1| < `tol`. By Baldi et al.'s Thms 34 and 42 every schedule but
    "tied" reaches the same unique balanced network, which for L_p without bias is
    `min_norm_fix` with q = p; "tied" reaches the layer balance of their Thm 45.
    The biases always rescale with their unit.

    Any other model that states its rescaling units (`dyn.ConvNet`, `dyn.RNN`,
    `dyn.ResidualMLP`, a user's model with `rescaling_units()`) is balanced unit by unit
    in the same way, with R summed over every array (rank ≥ 2, biases if `include_bias`)
    a unit touches (module `balance._unit_balance`). A recurrent unit's row and column of
    W_rec meet on its self-loop, which scales by λ^{1−d}: its share of the L_p objective
    is φ(s) = A e^{ps} + B e^{−pds} + C e^{p(1−d)s} (s = log λ, A the in-, B the out-,
    C the self-loop |w|^p), minimised by damped Newton steps; for d = 1 C is constant,
    λ* = (B/A)^{1/(2p)}, and the self-loop is unchanged: Baldi et al.'s cycle constraint
    (Thm 34, Prop. 37). "layer" then updates a family's units at once (half steps where
    they share weights, as a recurrent layer's do).
    """
    fix = NeuronBalance(p, schedule, include_bias, tol, max_sweeps, key, regularizer,
                        _owner="neuron_balance")
    new, _, info = fix._run(model, None, "neuron_balance")
    return new, info


def enorm(model: MLP, p: float = 2, c: float = 1.0, tol: float = 1e-10,
          max_sweeps: int = 1000) -> tuple[MLP, BalanceInfo]:
    """Equi-normalization (Stock et al. 2019), a baseline: block coordinate descent on

        Σ_k c^k ‖W_k‖_p^p   (biases rescale, not in the objective),

    one block per hidden layer, visited in order; within a block every unit gets its
    closed-form minimizer λ_i = (d c ‖W_{k+1}[:, i]‖_p^p / ‖W_k[i, :]‖_p^p)^{1/(p(1+d))}.
    With c = 1 the fixed point is `min_norm_fix` with q = p (Saul App. A.2).
    """
    new, _, info = ENorm(p, c, tol, max_sweeps, _owner="enorm")._run(model, None, "enorm")
    return new, info


class NeuronBalance(AbstractProjection):
    """`neuron_balance` as a projection (Baldi et al., sec. 2). A "stochastic" schedule
    uses the same `key` at every call."""

    p: Array
    tol: Array
    key: PRNGKeyArray | None
    schedule: str = eqx.field(static=True)
    include_bias: bool = eqx.field(static=True)
    max_sweeps: int = eqx.field(static=True)
    regularizer: Callable | None = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, p: float = 2, schedule: str = "sequential", include_bias: bool = False,
                 tol: float = 1e-10, max_sweeps: int = 1000, key=None, regularizer=None,
                 velocity: str = "pushforward", *, _owner: str = "NeuronBalance"):
        # `_owner`: the public name that error messages give (`neuron_balance` builds one).
        owner = _owner
        self.p = float_array(_check_exponent("p", p, owner))
        self.schedule, self.key, self.include_bias = _check_schedule(schedule, key,
                                                                     include_bias, owner)
        self.tol = float_array(real(tol, "tol", owner, low=0.0, strict=True, high=1.0))
        self.max_sweeps = positive_int(max_sweeps, "max_sweeps", owner)
        self.regularizer = _check_g(regularizer, owner)
        self.velocity = _check_velocity_rule(velocity, owner)

    def _run(self, params, velocity, owner: str):
        if not isinstance(params, MLP):
            families = check_units_model(params, owner)
            u, it, values, conv = units_neuron_balance(
                params, self.p, self.regularizer, self.schedule, self.include_bias, self.tol,
                self.max_sweeps, self.key)
            new, velocity = apply_units(params, velocity, families, u, self.velocity)
            return new, velocity, BalanceInfo(it, values, conv, u)
        d = _check_model(params, owner)
        abs_b = None
        if self.include_bias and params.biases is not None:
            abs_b = tuple(jnp.abs(b) for b in params.biases)
        u, it, values, conv = _balance_scales(
            tuple(jnp.abs(w) for w in params.weights), abs_b, self.p, float_array(d),
            self.regularizer, self.schedule, self.tol, self.max_sweeps, self.key,
            float_array(1.0))
        return *_apply(params, velocity, u, d, self.velocity), BalanceInfo(it, values, conv, u)

    def __call__(self, params, velocity=None, state=None):
        return self._run(params, velocity, "NeuronBalance")[:2]


class ENorm(AbstractProjection):
    """`enorm` as a projection (Stock et al. 2019)."""

    p: Array
    c: Array
    tol: Array
    max_sweeps: int = eqx.field(static=True)
    velocity: str = eqx.field(static=True)

    def __init__(self, p: float = 2, c: float = 1.0, tol: float = 1e-10,
                 max_sweeps: int = 1000, velocity: str = "pushforward", *,
                 _owner: str = "ENorm"):
        owner = _owner
        self.p = float_array(_check_exponent("p", p, owner))
        self.c = float_array(real(c, "c", owner, low=0.0, strict=True))
        self.tol = float_array(real(tol, "tol", owner, low=0.0, strict=True, high=1.0))
        self.max_sweeps = positive_int(max_sweeps, "max_sweeps", owner)
        self.velocity = _check_velocity_rule(velocity, owner)

    def _run(self, params, velocity, owner: str):
        d = _check_model(params, owner)
        u, it, values, conv = _balance_scales(
            tuple(jnp.abs(w) for w in params.weights), None, self.p, float_array(d), None,
            "layer", self.tol, self.max_sweeps, None, self.c)
        return *_apply(params, velocity, u, d, self.velocity), BalanceInfo(it, values, conv, u)

    def __call__(self, params, velocity=None, state=None):
        return self._run(params, velocity, "ENorm")[:2]
