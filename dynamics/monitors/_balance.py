"""Monitors of weight balance: Saul's imbalance Q_i and the ℓp,q norm of the weights."""

from typing import Any

import jax.numpy as jnp

from ..regularizers._regularizers import AbstractRegularizer, Lpq, as_regularizer, imbalance
from ._monitors import AbstractMonitor


class Imbalance(AbstractMonitor):
    """Per-neuron imbalance Q_i = Σ_j W_ij ∂R/∂W_ij − d Σ_k W_ki ∂R/∂W_ki of a
    regularizer R (Saul 2023 eq. 17; d the activation's homogeneity degree, 1 in Saul),
    concatenated over hidden layers. Under `dyn.WeightBalancingFlow(R, λ)` it decays as
    Q_i(0) e^{−λt} (eq. 20); zero means balanced with respect to R (Lemma 3).

    **Arguments:** `regularizer`: a `dyn.regularizers` object or a function of the
    tuple of weight matrices; `name` (default "imbalance").
    """

    regularizer: AbstractRegularizer
    name: str = "imbalance"

    def __init__(self, regularizer: Any, name: str = "imbalance"):
        self.regularizer = as_regularizer(regularizer)
        self.name = name

    def __call__(self, t, w, v, problem):
        return jnp.concatenate(imbalance(problem.params(w), self.regularizer))


class LpqNorm(AbstractMonitor):
    """‖W‖_{p,q} = (Σ_i (Σ_j |W_ij|^p)^{q/p})^{1/q} over all weight matrices of an MLP,
    rows being the incoming weights of each unit (Saul 2023 eq. 1); biases excluded.

    **Arguments:** `p`, `q` >= 1; `name` (default "lpq_norm").
    """

    regularizer: Lpq
    name: str = "lpq_norm"

    def __init__(self, p: Any = 2.0, q: Any = 2.0, name: str = "lpq_norm"):
        self.regularizer = Lpq(p, q)
        self.name = name

    def __call__(self, t, w, v, problem):
        return self.regularizer.norm(problem.params(w).weights)
