"""Głuch & Urbanke Tables 3–5 under GF, ND, NAGF: biases, linear layers, Swish β, data rotation.

Four small networks, each with the generators of its table (`dyn.symmetries`), every
charge law recorded in integrated form inside the solve (`dyn.monitors.ChargeLaw`:
½⟨w, ξ(w)⟩ for GF; μ⟨ẇ, ξ(w)⟩ − ∫ μ⟨ẇ, ξ(ẇ)⟩ with μ = 1 for ND and t³ for NAGF) and the
residual of eq. 17 (`dyn.monitors.SymmetryResidual`):

- Table 3 (biases): RePU(2) MLP 4-6-5-2 with random biases; rescaling of neuron 3 of
  layer 2 (charge b² + ‖in‖² − 2‖out‖²) and of all of layer 1;
- Table 4 (linear layers): linear MLP 4-5-5-3 with biases; the GL action on hidden
  layers 1 and 2 for random matrices A (charge ⟨A, W_hW_hᵀ + b_hb_hᵀ − W_{h+1}ᵀW_{h+1}⟩);
- Swish with trainable β (sec. 4.3): MLP 4-6-5-2; β_i scales like (1+ε)⁻¹;
- Table 5 (rotation of the data): an x² (Polynomial(2)) MLP 2-8-1 trained on data
  augmented by the 8 rotations by 2πk/8. The augmented loss is a trigonometric polynomial
  of degree 4 in the rotation angle, which an 8-point equispaced average integrates
  exactly, so it is invariant under every rotation: W1 ↦ W1(I + εP), P ∈ so(2), is a
  symmetry and ND conserves the angular momentum ⟨P, W1ᵀẆ1⟩ (eq. 48), NAGF t³ times it.
  GF has no charge for it (ξ is antisymmetric): only the residual.

The four problems are solved as one product system per flow (the losses are summed over
separate parameter sets, so the flows decouple; the adaptive step serves all four), which
compiles three solves instead of twelve. Activations are smooth, so the laws hold to the
solver's tolerance (rtol = atol = 1e-12; ReLU would chatter on its kinks).

Writes `out/figures/gu_linear_swish_bias.png` and `out/results/gu_linear_swish_bias.nc`
(/gf, /nd, /nagf: `charge_law_<problem>_<generator>`, `residual_…`, `pairing_…`).
"""

from pathlib import Path

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics.symmetries import (
    AbstractLinearGenerator,
    InputRotation,
    LayerRescaling,
    LinearLayer,
    Rescaling,
)

from ._common import folders, require_x64, save_figures, save_tree, timed

__all__ = ["Layout", "Part", "run"]

FULL = {"t1": 4.0, "saves": 81, "tol": 1e-12}
QUICK = {"t1": 1.0, "saves": 11, "tol": 1e-10}
NAGF_T0 = 0.5  # NAGF's 3/t is singular at 0 and we start from a non-zero velocity
ROTATIONS = 8  # > 4, the loss's degree in the rotation angle (see the docstring)
COLORS = {"GF": "tab:blue", "ND": "tab:orange", "NAGF": "tab:green"}
STYLES = ("-", "--", ":")
TITLES = {"bias": "Table 3: RePU(2) with biases", "linear": "Table 4: linear layers",
          "swish": "Swish with trainable β", "rotation": "Table 5: rotation-augmented data"}


class Part(AbstractLinearGenerator):
    """A generator of one network of a product system whose parameters are one flat
    vector θ (the networks' arrays raveled together): ξ(θ) is `generator` applied to
    network `key`, zero on the others. (Flat, because diffrax's compile time grows with
    the number of leaves: one vector compiles ~4x faster than four MLPs' 20 arrays.)"""

    generator: AbstractLinearGenerator
    key: str = eqx.field(static=True)
    layout: "Layout" = eqx.field(static=True)

    def __call__(self, theta):
        params = self.layout.params(theta)
        xi = jax.tree.map(jnp.zeros_like, params)
        return self.layout.flat({**xi, self.key: self.generator(params[self.key])})


class Layout:
    """θ ↔ dict of networks (`ravel_pytree` of their arrays, the rest kept aside)."""

    def __init__(self, models):
        w, self.static = eqx.partition(models, eqx.is_inexact_array)
        self.theta, self._unravel = ravel_pytree(w)

    def params(self, theta):
        return eqx.combine(self._unravel(theta), self.static)

    def flat(self, params):
        return ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[0]


def _mse(model, x, y):
    return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1))


def _with_biases(model, key):
    ks = jax.random.split(key, len(model.biases))
    return eqx.tree_at(lambda m: m.biases, model,
                       tuple(0.3 * jax.random.normal(k, b.shape) for k, b in zip(ks, model.biases)))


def _rotated(x: jax.Array, n: int) -> jax.Array:
    """Every point of x (N, 2) rotated by 2πk/n, k = 0..n−1: (nN, 2)."""
    a = 2 * np.pi * np.arange(n) / n
    rot = np.stack([np.stack([np.cos(a), -np.sin(a)], -1), np.stack([np.sin(a), np.cos(a)], -1)],
                   -2)  # (n, 2, 2)
    return jnp.einsum("kij,nj->kni", rot, x).reshape(-1, 2)


def _problems():
    """(models, loss parts, generators) of the four problems, as dicts keyed by problem."""
    k = jax.random.split(jax.random.key(0), 12)
    models = {
        "bias": _with_biases(dyn.MLP((4, 6, 5, 2), dyn.RePU(2), key=k[0], init="lecun"), k[1]),
        "linear": _with_biases(dyn.MLP((4, 5, 5, 3), dyn.Identity(), key=k[2], init="lecun"),
                               k[3]),
        "swish": _with_biases(dyn.MLP((4, 6, 5, 2), dyn.Swish(trainable=True), key=k[4],
                                      init="lecun"), k[5]),
        "rotation": _with_biases(dyn.MLP((2, 8, 1), dyn.Polynomial(2), key=k[6], init="lecun"),
                                 k[7]),
    }
    x = jax.random.normal(k[8], (32, 4))
    base = jax.random.normal(k[9], (12, 2))
    xr_ = _rotated(base, ROTATIONS)
    yr = jnp.tile(jax.random.normal(k[10], (12, 1)), (ROTATIONS, 1))
    data = {name: (x, jax.random.normal(jax.random.fold_in(k[11], i), (32, m.widths[-1])))
            for i, (name, m) in enumerate(models.items()) if name != "rotation"}
    data["rotation"] = (xr_, yr)
    a1, a2 = (np.asarray(jax.random.normal(jax.random.fold_in(k[11], 100 + i), (5, 5)))
              for i in range(2))
    gens = {
        "bias": {"n2_3": Rescaling(2, 3), "layer1": LayerRescaling(1)},
        "linear": {"A1": LinearLayer(1, a1), "A2": LinearLayer(2, a2)},
        "swish": {"n1_0": Rescaling(1, 0)},
        "rotation": {"P": InputRotation(np.array([[0.0, 1.0], [-1.0, 0.0]]))},
    }
    return models, data, gens


def _loss(data):
    def loss(params):
        return sum(_mse(params[k], *data[k]) for k in sorted(data))
    return loss


def _monitors(parts):
    # Only the integrated laws run inside the solve (they need its running integral);
    # the residuals and pairings are functions of the saved state, evaluated after it.
    return (dyn.monitors.Loss(),) + tuple(dyn.monitors.ChargeLaw(part, name=f"charge_law_{k}")
                                          for k, part in parts.items())


def _post(loss, parts):
    """A function traj ↦ None adding to `traj.monitors`, for every generator:
    `residual_<key>`, eq. 17's ⟨κ2ẅ + κ1ẇ, ξ⟩/(‖κ2ẅ + κ1ẇ‖‖ξ‖) = −⟨∇L, ξ⟩/(‖∇L‖‖ξ‖)
    (the flow equation makes κ2ẅ + κ1ẇ = −∇L for every flow here), and `pairing_<key>`
    = ⟨ẇ, ξ(w)⟩. Compiled once for the three runs."""

    @jax.jit
    @jax.vmap
    def at(theta, v):
        grad = jax.grad(loss)(theta)
        out = {}
        for key, part in parts.items():
            xi = part(theta)
            denom = jnp.linalg.norm(grad) * jnp.linalg.norm(xi)
            out[f"residual_{key}"] = -jnp.vdot(grad, xi) / jnp.maximum(denom, 1e-300)
            out[f"pairing_{key}"] = jnp.vdot(v, xi)
        return out

    def post(traj):
        v = traj.params if traj.velocities is None else traj.velocities  # (unused for GF)
        traj.monitors.update({k: np.asarray(x) for k, x in at(traj.params, v).items()})

    return post


def _runs(cfg):
    models, data, gens = _problems()
    layout = Layout(models)
    parts = {f"{p}_{g}": Part(gen, p, layout) for p, table in gens.items()
             for g, gen in table.items()}
    loss_tree = _loss(data)

    def loss(theta):
        return loss_tree(layout.params(theta))

    theta = layout.theta
    v0 = 0.3 * jax.random.normal(jax.random.key(2), theta.shape)
    controller = diffrax.PIDController(rtol=cfg["tol"], atol=cfg["tol"])
    monitors = _monitors(parts)
    t1, n = cfg["t1"], cfg["saves"]
    post, runs = _post(loss, parts), {}
    for name, flow, t0, v in (("GF", dyn.GradientFlow(), 0.0, None),
                              ("ND", dyn.NewtonianFlow(), 0.0, v0),
                              ("NAGF", dyn.NesterovFlow(), NAGF_T0, v0)):
        runs[name] = timed(f"{name} (Tsit5, rtol = atol = {cfg['tol']:g})", dyn.simulate, flow,
                           theta, loss, t0=t0, t1=t0 + t1, v0=v,
                           ts=jnp.linspace(t0, t0 + t1, n),
                           stepsize_controller=controller, monitors=monitors,
                           max_steps=100_000)
        post(runs[name])
    return runs, gens


def drift(ts, monitors, flow: str, key: str) -> np.ndarray:
    """|C(t) − C(t0)| / scale of the charge law `key` (e.g. "bias_n1_0") along a run,
    scale = max(|C(t0)|, max_t |μ⟨ẇ, ξ(w)⟩|), the size of the law's largest term."""
    t = np.asarray(ts)
    c = np.asarray(monitors[f"charge_law_{key}"])
    if flow == "GF":  # ⟨ẇ, ξ(w)⟩ = −⟨∇L, ξ⟩ = 0: the charge itself is the scale
        return np.abs(c - c[0]) / abs(c[0])
    mu = t**3 if flow == "NAGF" else np.ones_like(t)
    scale = max(abs(c[0]), np.abs(mu * np.asarray(monitors[f"pairing_{key}"])).max())
    return np.abs(c - c[0]) / scale


def _figure(runs, gens, cfg) -> Figure:
    fig = Figure(figsize=(17.0, 8.0), layout="constrained")
    axes = fig.subplots(2, 4)
    tiny = 1e-18  # log-axis floor: exact zeros (t0, and GF's rotation law) would vanish
    for j, (prob, table) in enumerate(gens.items()):
        for (g, _), style in zip(table.items(), STYLES):
            key = f"{prob}_{g}"
            for flow, traj in runs.items():
                t = np.asarray(traj.ts)
                label = f"{flow}, {g}"
                if not (prob == "rotation" and flow == "GF"):  # no GF charge there
                    d = drift(t, traj.monitors, flow, key)
                    axes[0, j].semilogy(t[1:], np.maximum(d[1:], tiny), color=COLORS[flow],
                                        ls=style, label=label)
                r = np.abs(np.asarray(traj.monitors[f"residual_{key}"]))
                axes[1, j].semilogy(t, np.maximum(r, tiny), color=COLORS[flow], ls=style,
                                    label=label)
        axes[0, j].set_title(TITLES[prob])
        axes[0, j].set_ylabel("relative drift of the charge law")
        axes[1, j].set_ylabel("|residual of eq. 17| (relative)")
        for a in axes[:, j]:
            a.set_xlabel("time $t$ (NAGF from $t_0 = 0.5$)")
            a.grid(True, which="both", alpha=0.3)
            a.legend(fontsize=8, ncol=2, loc="upper left")
            a.text(0.98, 0.02, f"Tsit5, rtol = atol = {cfg['tol']:g}", ha="right",
                   transform=a.transAxes, fontsize=8)
    fig.suptitle("Głuch & Urbanke Tables 3–5: charge laws in integrated form "
                 r"(GF: $\frac{1}{2}\langle w, \xi(w)\rangle$; ND, NAGF: "
                 r"$\mu\langle\dot w, \xi(w)\rangle - \int\mu\langle\dot w, \xi(\dot w)\rangle$, "
                 r"$\mu = 1, t^3$)" "\nand symmetry residuals of eq. 17 (regression, MSE; ND and "
                 "NAGF from a random velocity)")
    return fig


def run(out: Path, quick: bool = False) -> dict[str, Path]:
    """Run the study, write figures and results under `out`; return what was written."""
    require_x64("gu-linear-swish-bias", quick)
    cfg = QUICK if quick else FULL
    figures, results = folders(out)
    runs, gens = _runs(cfg)
    written = save_figures(figures, "gu_linear_swish_bias",
                           {"laws": lambda: _figure(runs, gens, cfg)})
    written["results"] = save_tree(
        {f"/{k.lower()}": v.to_xarray() for k, v in runs.items()},
        results / "gu_linear_swish_bias.nc", study="gu-linear-swish-bias", quick=quick,
        tol=cfg["tol"], nagf_t0=NAGF_T0, rotations=ROTATIONS,
    )
    return written
