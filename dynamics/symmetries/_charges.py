"""Symmetries of networks and the Noether charges they give.

A symmetry is a generator ξ(w) with ⟨∇L(w), ξ(w)⟩ = 0 for every w. For a linear
generator ξ(w) = A w with A symmetric, Q = ½⟨w, A w⟩ satisfies dQ/dt = −⟨ξ(w), ∇L⟩ = 0
under gradient flow (Głuch & Urbanke eq. 17 with κ2 = 0, κ1 = 1; their Tables 2–4 and
Du et al. 2018 for ReLU). The charges below are 2Q, per hidden neuron or per layer.
"""

import jax.numpy as jnp
from jaxtyping import Array

from .._models import MLP, Identity
from .._units import unit_charges, unit_families


def check_mlp(model, name: str = "model") -> MLP:
    if not isinstance(model, MLP):
        raise ValueError(f"`{name}` must be a dyn.MLP, got {type(model).__name__}.")
    return model


def rescaling(model) -> tuple[Array, ...]:
    """Per-unit rescaling charges, one array per family of `model.rescaling_units()` (for
    an MLP, per hidden layer h = 1..K−1):

        Q_i = Σ_S e_S ‖w_S[i]‖²,   for an MLP  b_i² + ‖W_h[i, :]‖² − p ‖W_{h+1}[:, i]‖²
                                                 (− β_i² for trainable Swish)

    from the generator in ×(1+ε), out ×(1+ε)^{−p} of a p-homogeneous unit (Głuch &
    Urbanke Table 2 for p = 1, Table 3 for x^p, and Table 4 for Swish, where β_i scales by
    (1+ε)^{−1}; `dyn.symmetries.Units` for conv channels and recurrent units). Conserved
    by gradient flow. Leading batch axes on the weights (a saved trajectory) are kept.

    **Raises:** ValueError when `model` states no units or a family's activation is not
    positively homogeneous.
    """
    families = unit_families(model, "rescaling")
    return tuple(unit_charges(model, u, None, "rescaling") for u in families)


def linear_balance(model: MLP) -> tuple[Array, ...]:
    """Layer balance matrices of a linear network, one per hidden layer h:

        W_h W_hᵀ + b_h b_hᵀ − W_{h+1}ᵀ W_{h+1}

    from W_h → (I+εA)W_h, b_h → (I+εA)b_h, W_{h+1} → W_{h+1}(I+εA)⁻¹ for any A
    (Arora et al. 2018; Głuch & Urbanke Table 2, linear case). Conserved by gradient
    flow when the activation is the identity.
    """
    model = check_mlp(model)
    if not isinstance(model.activation, Identity):
        raise ValueError(
            "`model` must be a linear network (activation=dyn.Identity()) for the "
            f"layer balance matrices to be conserved; got {type(model.activation).__name__}."
        )
    out = []
    for h in range(model.depth - 1):
        w, w_next = model.weights[h], model.weights[h + 1]
        q = w @ jnp.swapaxes(w, -1, -2) - jnp.swapaxes(w_next, -1, -2) @ w_next
        if model.biases is not None:
            b = model.biases[h]
            q = q + b[..., :, None] * b[..., None, :]
        out.append(q)
    return tuple(out)
