"""The number of conservation laws of linear and ReLU MLPs in closed form, and when it
applies (`known_count`, `generic`): the reference `count_conservation_laws` is tested
against. The patterns of one forward pass (inputs, pre-activations, live masks) feed
every check."""

from typing import NamedTuple

import numpy as np
from jaxtyping import ArrayLike

from .._models import MLP, Identity, ReLU
from ._blas import single_threaded_blas
from ._count import _rank
from ._unit_laws import unit_laws


def _balance_jacobian(model: MLP) -> np.ndarray:
    """Jacobian of the entries of every M_h = W_h W_hᵀ − W_{h+1}ᵀ W_{h+1} with respect to
    the flat weights, in closed form (numpy: `jax.jacfwd` would compile once per
    architecture, and that cost more than the count it checks):
    ∂(W Wᵀ)_ij/∂W_ab = δ_ia W_jb + δ_ja W_ib and ∂(VᵀV)_ij/∂V_rc = δ_ci V_rj + δ_cj V_ri."""
    ws = [np.asarray(w, dtype=np.float64) for w in model.weights]
    offsets = np.cumsum([0] + [w.size for w in ws])
    blocks = []
    for k in range(len(ws) - 1):
        a, b = ws[k], ws[k + 1]
        n = a.shape[0]
        eye = np.eye(n)
        rows = np.zeros((n, n, offsets[-1]))
        da = np.einsum("ia,jb->ijab", eye, a) + np.einsum("ja,ib->ijab", eye, a)
        db = np.einsum("ci,rj->ijrc", eye, b) + np.einsum("cj,ri->ijrc", eye, b)
        rows[:, :, offsets[k]:offsets[k + 1]] = da.reshape(n, n, -1)
        rows[:, :, offsets[k + 1]:offsets[k + 2]] = -db.reshape(n, n, -1)
        blocks.append(rows.reshape(n * n, -1))
    return np.concatenate(blocks)


def _layers(model: MLP, x):
    """(inputs h, pre-activations z) of every layer on the samples x, in float64 NumPy
    (ReLU between layers)."""
    h = np.asarray(x, dtype=np.float64)
    for k, wk in enumerate(model.weights):
        z = h @ np.asarray(wk, dtype=np.float64).T
        if model.biases is not None:
            z = z + np.asarray(model.biases[k], dtype=np.float64)
        yield h, z
        h = np.maximum(z, 0.0)


def _live(model: MLP, zs: list[np.ndarray]) -> list[np.ndarray]:
    """Per layer k (0-based), from the pre-activations `zs` of `_layers`, a boolean
    (samples, width) mask: neuron i of layer k is *live* on sample n if the outputs depend
    on its pre-activation there: it is active (always, for the linear output layer) and a
    path of live neurons leads from it to the output. Only live samples move a neuron's
    in-weights: where every neuron of a later layer is off (common behind a width-2
    layer), the sample's outputs do not depend on the earlier layers at all. (Structural:
    a weight is taken to be nonzero, which holds for every random draw.)"""
    live = [np.ones(zs[-1].shape, bool)]
    for k in range(len(zs) - 2, -1, -1):
        reach = live[0].astype(np.float64) @ (np.asarray(model.weights[k + 1]) != 0)
        live.insert(0, (zs[k] > 0) & (reach > 0))
    return live


class _Patterns(NamedTuple):
    """One forward pass over the samples: every layer's inputs `hs` and pre-activations
    `zs` (`_layers`) and its live mask (`_live`); the closed-form helpers below all read
    it, so `known_count` and `generic` run the network once."""

    hs: list[np.ndarray]
    zs: list[np.ndarray]
    live: list[np.ndarray]


def _patterns(model: MLP, x) -> _Patterns:
    hs, zs = (list(a) for a in zip(*_layers(model, x), strict=True))
    return _Patterns(hs, zs, _live(model, zs))


def _input_deficits(model: MLP, p: _Patterns) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer k (0-based) and neuron i, from the inputs it receives (with a 1 for the
    bias) on the samples where it is live (`_live`), what its in-weights' gradients are
    made of:

    - the deficit: fan_in (+1 with a bias) minus the rank of those inputs, the
      directions of its in-weights that the data does not see at θ;
    - the dead inputs: how many of them are zero on every such sample (a connection
      from a neuron that is never on when this one matters). Such a weight gets no
      gradient from any loss of the outputs on a neighbourhood of θ (the patterns are
      locally constant), so it is itself a conservation law."""
    bias = model.biases is not None
    deficits, dead = [], []
    for h, live in zip(p.hs, p.live, strict=True):
        inputs = np.concatenate([h, np.ones((h.shape[0], 1))], 1) if bias else h
        seen = [inputs[live[:, i]] for i in range(live.shape[1])]
        deficits.append(np.array([inputs.shape[1] - (np.linalg.matrix_rank(a) if a.size else 0)
                                  for a in seen]))
        dead.append(np.array([int(np.sum(~np.any(a != 0, axis=0))) for a in seen]))
    return deficits, dead


def _only_dead_connections(deficits, dead) -> bool:
    """Whether every deficiency of layers 2..K is a dead connection (the closed form's
    condition)."""
    return all(np.all(d == z) for d, z in zip(deficits[1:], dead[1:], strict=True))


def _shared_patterns(p: _Patterns) -> list[int]:
    """The sizes (≥ 2) of the groups of neurons of one hidden layer that are live on
    exactly the same samples of x, over all hidden layers."""
    out = []
    for live in p.live[:-1]:
        _, sizes = np.unique(live, axis=1, return_counts=True)
        out += [int(n) for n in sizes if n > 1]
    return out


def _alive(p: _Patterns) -> bool:
    """Every hidden neuron active on 5–95% of the samples and live on some."""
    for z, live in zip(p.zs[:-1], p.live[:-1], strict=True):
        on = np.mean(z > 0, axis=0)
        if not np.all((on > 0.05) & (on < 0.95) & np.any(live, axis=0)):
            return False
    return True


def _generic(model: MLP, p: _Patterns) -> bool:
    return _alive(p) and _only_dead_connections(*_input_deficits(model, p))


def _check_inputs(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.shape[0] == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"known_count: `x` must be a non-empty, finite batch of inputs, got "
                         f"shape {x.shape}.")
    return x


def _units_count(model, x, threshold: float) -> int:
    laws = unit_laws(model, x, threshold)
    if laws.deficient:
        raise ValueError(
            f"known_count: {laws.deficient} unit(s) of `model` see, through their "
            "in-weights, inputs of deficient rank on the data (a unit live on too few "
            "examples, positions or steps); no closed form for that case: use more or "
            "more varied `x`, or count_conservation_laws alone."
        )
    return laws.count


@single_threaded_blas
def known_count(model, x: ArrayLike, threshold: float = 1e-9) -> int:
    """The number of conservation laws known in closed form for a linear or ReLU `dyn.MLP`
    on inputs `x` (the reference `count_conservation_laws` is tested against), or for any
    model that states its rescaling units (`dyn.ConvNet`, `dyn.RNN`, `dyn.ResidualMLP`, a
    user's Equinox model with `rescaling_units()`).

    **Models with units** (not `dyn.MLP`): the rank of the gradients of the laws the units
    give, computed from one Jacobian J of the outputs on `x`
    (`dynamics/symmetries/_unit_laws.py`): each unit's rescaling charge
    M_ii = Σ_S e_S ‖w_S[i]‖², each mixing charge M_ij = Σ_S e_S ⟨w_S[i], w_S[j]⟩ whose
    generator A_E w (E = e_i e_jᵀ + e_j e_iᵀ: unit j's slices added to unit i's and back)
    is tangent, J A_E w = 0 (a linear family such as a linear net's layer or a residual
    stream, where GL(n) acts, gives all of them; ReLU units give them for pairs live on
    exactly the same examples, positions and steps), and every parameter whose column of
    J is zero (a kernel tap that only ever reads padding, a weight read only where its
    unit is off). Weight sharing adds nothing else on generic data: a conv channel or a
    recurrent unit is one unit however many positions or steps share it, so a ReLU conv
    net or RNN with every unit seeing full-rank inputs has one law per hidden channel or
    unit plus its dead parameters (measured against `count_conservation_laws` on random
    nets: tests/test_unit_laws.py).

    **`dyn.MLP`**:

    - identity activation, no biases: the functionally independent entries of the balance
      matrices W_h W_hᵀ − W_{h+1}ᵀ W_{h+1} (`independent_functions`, Marcotte et al. 2023);
    - ReLU: one per hidden neuron (rescaling; Marcotte et al.'s theorem for two layers, their
      experiments for more);
    - plus k(k − 1)/2 for every group of k neurons of one layer that are live (`_live`:
      active, with a path of active neurons to the output) on exactly the same samples: on
      the data the group is a linear block, so GL(k) acts on it (A on the group's
      in-weights and biases, A⁻¹ on its out-weights; near θ every sample keeps its side),
      and its laws are the k(k + 1)/2 entries of U Uᵀ + b bᵀ − Vᵀ V (U, b the group's
      in-weights and biases, V its out-weights: the linear-layer charge of Głuch &
      Urbanke's Table 4) instead of the k diagonal ones (measured: the three random nets
      that once counted one more than one law per neuron each had one pair of neurons with
      equal patterns, and no other net did);
    - plus, for each neuron of the first layer, d_in (+1 with a bias) minus the rank of the
      inputs x (with a 1) on which it is live: its in-weights along directions those fixed
      inputs do not span never move;
    - plus, in layers 2..K, one for every connection whose input is zero wherever the
      neuron it feeds is live (`_input_deficits`): that weight never gets a gradient.

    This needs every hidden neuron alive (active on 5–95% of the inputs, live on some)
    and, in layers 2..K, no other deficiency: every neuron's live inputs spanning its
    fan_in (+1) apart from the dead connections. Otherwise (typically behind a width-2
    layer, or with 2-D inputs) further laws appear whose number has no closed form here,
    and this raises a ValueError (the 4-2-4-5-8 net of the tests, once such a case, is
    all dead connections: 11 + 5). Why live and not merely active samples: on a
    bias-free ReLU net 2-6-8-2-5 (an earlier draw of the conservation-laws study, once
    its one unexplained count), neuron 7 of layer 2 is active where neurons 3 and 5 of
    layer 1 are, but only on samples where both neurons of the width-2 layer 3 are off;
    those two weights never move. On inputs covering all 27 of its linear regions it
    counts 19 = 16 + 2 dead connections + 1 for a further rank-deficient direction (no
    closed form: `generic` is False for it).

    **Arguments:** `model`; `x`, a batch of its inputs (N, …); `threshold`, the relative
    singular-value threshold of the ranks.

    **Returns:** the number of laws (int).

    **Raises:** ValueError for a model of neither kind, an empty or non-finite `x`, or a
    case with no closed form (above; for units: a unit of a non-linear family whose live
    in-weights see inputs of deficient rank, `generic` False).
    """
    x = _check_inputs(x)
    if not isinstance(model, MLP) and callable(getattr(model, "rescaling_units", None)):
        return _units_count(model, x, threshold)
    if not isinstance(model, MLP) or not isinstance(model.activation, (ReLU, Identity)):
        raise ValueError("known_count: `model` must be a dyn.MLP with ReLU or Identity "
                         "activation, or a model that states its rescaling units.")
    if isinstance(model.activation, Identity):
        if model.biases is not None:
            raise ValueError("known_count: for linear networks only bias=False is known.")
        return _rank(_balance_jacobian(model), threshold)[0]
    p = _patterns(model, x)
    if not _alive(p):
        raise ValueError("known_count: a hidden neuron is active on fewer than 5% or more "
                         "than 95% of `x`, or live on none; the closed form needs every "
                         "neuron alive.")
    deficits, dead = _input_deficits(model, p)
    if not _only_dead_connections(deficits, dead):
        raise ValueError("known_count: a neuron of layers 2..K sees inputs of deficient rank on "
                         "the samples where it is live; no closed form for that case.")
    shared = sum(k * (k - 1) // 2 for k in _shared_patterns(p))
    return (sum(model.widths[1:-1]) + shared + int(deficits[0].sum())
            + sum(int(z.sum()) for z in dead[1:]))


def generic(model, x: ArrayLike) -> bool:
    """Whether `known_count` covers a ReLU `model` on `x`: every hidden neuron alive and
    every neuron of layers 2..K seeing full-rank inputs where it is live, but for dead
    connections; for a model with units, every unit of a non-linear family seeing
    full-rank inputs through its live in-weights."""
    if not isinstance(model, MLP):
        return unit_laws(model, _check_inputs(x)).deficient == 0
    return _generic(model, _patterns(model, x))
