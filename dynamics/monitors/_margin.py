"""Monitors for Theory III's claims: the normalized margin, the product of layer norms,
and the null-space component of a linear model (Banburski et al., secs. 6, 14, 22)."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..datasets._datasets import Dataset
from ..losses._losses import binary_signs, check_dataset
from ._monitors import AbstractMonitor, layer_arrays, layer_norms


class Margin(AbstractMonitor):
    """The margin of the normalized network, min_n ỹ_n f(x_n) / Π_k ‖W_k‖ (Theory III
    eq. 11: f = ρ f̃ with ρ = Π_k ρ_k for a bias-free network of 1-homogeneous units, so
    this is min_n ỹ_n f̃(x_n)). For a linear model w it is min_n ỹ_n wᵀx_n / ‖w‖, the
    quantity a hard-margin SVM maximizes. Labels {0, 1} or {−1, +1}, as for
    `dyn.losses.exponential`. With biases or other units it is still recorded, but it
    is then not the margin of a scale-free network.
    """

    x: Float[Array, "n d"]
    signs: Float[Array, " n"]
    name: str = "margin"

    def __init__(self, data: Dataset, name: str = "margin"):
        data = check_dataset(data, "Margin")
        self.x = data.x
        self.signs = binary_signs(data, "Margin")
        self.name = name

    def __call__(self, t, w, v, problem):
        params = problem.params(w)
        if callable(params):
            out = jax.vmap(params)(self.x).reshape(self.x.shape[0])
        else:  # a bare weight vector: the linear model x ↦ wᵀx
            out = self.x @ jnp.ravel(jnp.asarray(params))
        return jnp.min(self.signs * out) / jnp.prod(layer_norms(params))


class NormProduct(AbstractMonitor):
    """ρ = Π_k ‖W_k‖, the product of the layers' Frobenius norms (Theory III sec. 22:
    log t growth for one layer, faster for deeper networks). Per-layer norms are
    `LayerNorms`."""

    name: ClassVar[str] = "norm_product"

    def __call__(self, t, w, v, problem):
        return jnp.prod(layer_norms(problem.params(w)))


class NullSpaceComponent(AbstractMonitor):
    """‖(I − X⁺X) w‖: the part of a linear model's weights that no example sees
    (Theory III sec. 14.1). Gradient descent on a loss of Xw never changes it, so GD
    keeps whatever the start put there; Halpern / NMGD iterations drive it to 0.

    `x` is the (n, d) input matrix; the parameters must be a vector of length d, or an
    MLP with a single (1, d) weight matrix.
    """

    projector: Float[Array, "d d"]
    name: ClassVar[str] = "null_space_component"

    def __init__(self, x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(
                f"NullSpaceComponent: `x` must be an (n, d) input matrix, got shape {x.shape}."
            )
        self.projector = np.eye(x.shape[1]) - np.linalg.pinv(x) @ x

    def __call__(self, t, w, v, problem):
        weights = layer_arrays(problem.params(w))
        d = self.projector.shape[0]
        if len(weights) != 1 or weights[0].size != d:
            raise ValueError(
                "NullSpaceComponent is for linear models: the parameters must be one "
                f"weight vector of length {d}, got arrays of shapes "
                f"{[a.shape for a in weights]}."
            )
        vec = weights[0].reshape(d)
        return jnp.linalg.norm(jnp.asarray(self.projector, vec.dtype) @ vec)
