"""Weight regularizers R(W) of an MLP and the imbalance Q_i they define (Saul 2023).

A regularizer is a function of the weight matrices alone (never the biases: Saul's
balancedness is defined by a regularizer that penalizes weights, not biases, which is
why Theorem 4 freezes the hidden biases at zero). Weight matrices follow `dyn.MLP`:
`weights[h]` has shape (out, in), so row i holds the *incoming* weights of unit i of
layer h+1, the rows of Saul's W_ij (i receives from j).

The central quantity is V = W ⊙ ∂R/∂W (Saul 2023 eq. 16's left side, and the
coordinates of eq. 58 in the earlier version, arXiv v1), from which the imbalance
Q_i of eq. 17 is read off.
"""

import abc
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Scalar

from .._models import MLP
from .._tree import is_concrete
from .._units import (
    Units,
    homogeneous_families,
    leaf_at,
    unit_charges,
    weight_matrices,
    weight_paths,
)
from .._validate import float_array

Weights = Sequence[Array]


class AbstractRegularizer(eqx.Module):
    """A differentiable regularizer R(W) of the weight matrices of an MLP."""

    @abc.abstractmethod
    def __call__(self, weights: Weights) -> Scalar:
        """R(W) for a sequence of weight matrices (shape (out, in) each)."""

    def v(self, weights: Weights) -> tuple[Array, ...]:
        """V = W ⊙ ∂R/∂W, one array per layer (Saul eq. 16, left side; the V of eq. 58)."""
        grads = jax.grad(lambda ws: self(ws))(tuple(weights))
        return tuple(w * g for w, g in zip(weights, grads, strict=True))

    def check(self, weights: Weights) -> None:
        """Raise ValueError where R is not differentiable at these (concrete) weights."""
        if not is_concrete(tuple(weights)):
            return
        grads = jax.grad(lambda ws: self(ws))(tuple(jnp.asarray(w) for w in weights))
        if not all(np.all(np.isfinite(np.asarray(g))) for g in grads):
            raise ValueError(
                f"the regularizer {type(self).__name__} is not differentiable at these "
                "weights (its gradient is NaN or Inf); use a regularizer that is smooth "
                "where the weights are, or move the weights off its kinks."
            )


class Lpq(AbstractRegularizer):
    """The ℓp,q regularizer R(W) = (1/q) Σ_i (Σ_j |W_ij|^p)^{q/p}   (Saul 2023 eq. 26),

    summed over the rows (incoming weights of each unit) of every layer. p = q = 2 is
    R = ½‖W‖², p = q = 1 is Σ|W_ij|. Its V = W ⊙ ∂R/∂W = π_ij ρ_i with ρ_i = (Σ_j
    |W_ij|^p)^{q/p}, π_ij = |W_ij|^p / Σ_k |W_ik|^p (Saul eqs. 6–7; arXiv v1 eq. 54).

    **Arguments:** `p`, `q`: exponents >= 1 (Saul's updates and flows need p, q >= 1).
    """

    p: Array = eqx.field(converter=float_array)
    q: Array = eqx.field(converter=float_array)

    def __check_init__(self):
        for name in ("p", "q"):
            value = getattr(self, name)
            if is_concrete(value):
                arr = np.asarray(value)
                if arr.shape != () or not np.isfinite(arr) or arr < 1:
                    raise ValueError(
                        f"Lpq: `{name}` must be a finite number >= 1 (the ℓp,q norm is not "
                        f"a norm, and its balancing flow not defined, below 1), got {value}."
                    )

    def __call__(self, weights):
        total = jnp.zeros(())
        for w in weights:
            s = jnp.sum(jnp.abs(w) ** self.p, axis=-1)
            total = total + jnp.sum(s ** (self.q / self.p)) / self.q
        return total

    def v(self, weights):
        # Closed form, eq. 54 of arXiv v1: |W|^p S^{q/p − 1} with S the row sums of |W|^p.
        out = []
        for w in weights:
            a = jnp.abs(w) ** self.p
            s = jnp.sum(a, axis=-1, keepdims=True)
            out.append(a * s ** (self.q / self.p - 1.0))
        return tuple(out)

    def check(self, weights):
        if not is_concrete(tuple(weights)):
            return
        p, q = float(self.p), float(self.q)
        for k, w in enumerate(weights):
            w = np.asarray(w)
            if p == 1.0 and np.any(w == 0):
                raise ValueError(
                    f"Lpq(p=1, q={q:g}) is not differentiable where a weight is zero "
                    f"(|W_ij| has a kink there), and weights[{k}] has zero entries; "
                    "perturb the initial weights off zero or use p > 1."
                )
            if q < p and np.any(np.all(w == 0, axis=-1)):
                raise ValueError(
                    f"Lpq(p={p:g}, q={q:g}) with q < p is not differentiable at a row of "
                    f"zeros, and weights[{k}] has one (a unit with no incoming weight); "
                    "remove the unit or use q >= p."
                )

    def norm(self, weights: Weights) -> Scalar:
        """‖W‖_{p,q} = (Σ_i (Σ_j |W_ij|^p)^{q/p})^{1/q}   (Saul eq. 1)."""
        return (self.q * self(weights)) ** (1.0 / self.q)


class FromFunction(AbstractRegularizer):
    """Any differentiable regularizer given as a function `fn(weights) -> scalar` of the
    tuple of weight matrices, e.g. `FromFunction(lambda ws: sum(jnp.sum(w**4) for w in ws))`."""

    fn: Callable[[Weights], Scalar]

    def __check_init__(self):
        if not callable(self.fn):
            raise ValueError(
                "`fn` must be a function of the tuple of weight matrices returning a "
                f"scalar, got {type(self.fn).__name__}."
            )

    def __call__(self, weights):
        return self.fn(tuple(weights))


def as_regularizer(regularizer, name: str = "regularizer") -> AbstractRegularizer:
    """An `AbstractRegularizer` as is, a plain function wrapped in `Function`."""
    if isinstance(regularizer, AbstractRegularizer):
        return regularizer
    if callable(regularizer):
        return FromFunction(regularizer)
    raise ValueError(
        f"`{name}` must be a dyn.regularizers object (e.g. dyn.regularizers.Lpq(2, 2)) or "
        f"a function of the tuple of weight matrices, got {type(regularizer).__name__}."
    )


def check_homogeneous_mlp(model, name: str = "params") -> float:
    """The homogeneity degree of an MLP's activation, or a ValueError naming the fix."""
    if not isinstance(model, MLP):
        raise ValueError(
            f"`{name}` must be a dyn.MLP (weight-balancing acts on its weight matrices), "
            f"got {type(model).__name__}."
        )
    degree = model.activation.degree
    if degree is None or model.betas is not None:
        raise ValueError(
            f"`{name}` has activation {type(model.activation).__name__}, which is not "
            "positively homogeneous, so rescaling is not a symmetry and weight balancing "
            "does not apply; use ReLU, LeakyReLU, RePU, Polynomial or Identity."
        )
    return float(degree)


def balanced_weights(model, name: str = "params", owner: str = "WeightBalancingFlow"
                     ) -> tuple[tuple[Units, ...], list]:
    """(the unit families, the paths of the weight arrays a regularizer reads) of a model
    whose units are all positively homogeneous: a `dyn.MLP` (its `weights`) or any model
    with `rescaling_units()` (every array of rank ≥ 2 a unit touches, read as a matrix
    with rows = axis 0 by `weight_matrices`); else a ValueError naming `name`."""
    if isinstance(model, MLP):
        check_homogeneous_mlp(model, name)
        return model.rescaling_units(), [("weights", k) for k in range(model.depth)]
    families = homogeneous_families(model, owner, name)
    return families, weight_paths(model, families)


def imbalance(model, regularizer) -> tuple[Array, ...]:
    """Per-unit imbalance, one array per family of units (per hidden layer of an MLP):

        Q_i = Σ_j V_h[i, j] − d Σ_k V_{h+1}[k, i],   V = W ⊙ ∂R/∂W,

    Saul 2023 eq. 17 (incoming minus outgoing), with the outgoing sum weighted by the
    activation's homogeneity degree d: the rescaling "in ×a, out ×a^{−d}" leaves the
    error invariant, so Σ_j W_ij ∂E/∂W_ij − d Σ_k W_ki ∂E/∂W_ki = 0 (Euler's identity)
    and under the weight-balancing flow Q_i(t) = Q_i(0) e^{−λt} (eq. 20) for any d; d = 1
    is Saul's case. For R = ½‖W‖² it is the gradient-flow rescaling charge without the
    bias term (`dyn.charges.rescaling`). For a model that states its units (ConvNet, RNN,
    ResidualMLP, …) the same sum over each unit's weight slices, Q_i = Σ_S e_S Σ V_S[i],
    R reading every weight array a unit touches as a matrix (rows = axis 0; biases
    excluded). Leading batch axes are not supported.

    **Raises:** ValueError for a model without units or with a non-homogeneous unit.
    """
    families, paths = balanced_weights(model, "model", "imbalance")
    reg = as_regularizer(regularizer)
    values = {p: jnp.reshape(v, leaf_at(model, p).shape)
              for p, v in zip(paths, reg.v(weight_matrices(model, paths)), strict=True)}
    return tuple(unit_charges(model, u, None, "imbalance", values) for u in families)
