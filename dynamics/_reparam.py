"""Layer-wise norm coordinates W_k = ρ_k V_k of an MLP (Banburski et al., *Theory III*).

Theory III writes a deep network in the coordinates ρ_k = ‖W_k‖ and V_k = W_k/‖W_k‖
(its eqs. 11–15 and App. 21): the normalized network f̃ = f(V) carries the margin and
ρ = Π_k ρ_k its scale, f = ρ f̃ for a bias-free network of 1-homogeneous units. The
flows that act in these coordinates (`WeightNormFlow`, `LagrangeMultiplierFlow`) take a
`NormCoordinates` model as their parameters. It is called like the MLP it stands for,
so every loss of `dyn.losses` works on it unchanged.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._models import MLP
from ._tree import is_concrete


class NormCoordinates(eqx.Module):
    """An `MLP` in the coordinates W_k = ρ_k V_k/‖V_k‖ (`normalize=True`, weight
    normalization: the weights depend on V_k only through its direction) or
    W_k = ρ_k V_k (`normalize=False`: the Lagrange-multiplier form of Theory III eq. 12,
    where a penalty λ_k‖V_k‖² holds ‖V_k‖ near 1).

    Build with `NormCoordinates.from_mlp(mlp)`, which sets ρ_k = ‖W_k‖ (Frobenius) and
    V_k = W_k/‖W_k‖, and go back with `.to_mlp()`. `weights` gives the W_k, so monitors
    such as `LayerNorms` read ρ_k‖V_k‖/‖V_k‖ = ρ_k directly.
    """

    rho: tuple[Float[Array, ""], ...]
    directions: tuple[Float[Array, "out in"], ...]
    mlp: MLP  # biases, betas and activation, with `weights` None (see `to_mlp`)
    normalize: bool = eqx.field(static=True)

    @classmethod
    def from_mlp(cls, model: MLP, *, normalize: bool = True) -> "NormCoordinates":
        if not isinstance(model, MLP):
            raise ValueError(
                f"NormCoordinates: `model` must be a dyn.MLP, got {type(model).__name__}."
            )
        if not isinstance(normalize, bool):
            raise ValueError(f"NormCoordinates: `normalize` must be True or False, got "
                             f"{normalize!r}.")
        rho = tuple(jnp.sqrt(jnp.sum(w**2)) for w in model.weights)
        if is_concrete(rho):
            for k, r in enumerate(rho):
                if not float(r) > 0:
                    raise ValueError(
                        f"NormCoordinates: layer {k} of `model` has all-zero weights, whose "
                        "direction V_k = W_k/‖W_k‖ is undefined; initialise it with "
                        "non-zero weights."
                    )
        directions = tuple(w / r for w, r in zip(model.weights, rho, strict=True))
        # The MLP keeps biases, betas and the activation; its weights are emptied so that
        # the state holds each layer once (as ρ_k and V_k), with no dead copies to integrate.
        rest = eqx.tree_at(lambda m: m.weights, model, replace=None)
        return cls(rho, directions, rest, normalize)

    @property
    def weights(self) -> tuple[Array, ...]:
        """W_k = ρ_k V_k/‖V_k‖ (or ρ_k V_k without normalization)."""
        out = []
        for r, v in zip(self.rho, self.directions, strict=True):
            if self.normalize:
                v = v / jnp.sqrt(jnp.sum(v**2, axis=(-2, -1), keepdims=True))
            out.append(r[..., None, None] * v)
        return tuple(out)

    @property
    def biases(self):
        return self.mlp.biases

    @property
    def activation(self):
        return self.mlp.activation

    @property
    def depth(self) -> int:
        return len(self.rho)

    def to_mlp(self) -> MLP:
        """The MLP with weights W_k, for anything that needs a plain model."""
        return eqx.tree_at(lambda m: m.weights, self.mlp, self.weights,
                           is_leaf=lambda x: x is None)

    def __call__(self, x):
        return self.to_mlp()(x)


def check_coordinates(w, owner: str, *, normalize: bool) -> None:
    if not isinstance(w, NormCoordinates):
        raise ValueError(
            f"{owner} acts on layer norms and directions: pass the parameters as "
            f"dyn.NormCoordinates.from_mlp(model, normalize={normalize}), got "
            f"{type(w).__name__}."
        )
    if w.normalize != normalize:
        raise ValueError(
            f"{owner} needs dyn.NormCoordinates.from_mlp(model, normalize={normalize}); "
            f"got normalize={w.normalize}."
        )
