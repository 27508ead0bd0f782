"""Random MLPs on which the closed-form count holds (`random_alive_mlp`): the nets the
tests, the conservation-laws study and its benchmark draw."""

import equinox as eqx
import jax
import numpy as np
from jaxtyping import ArrayLike, PRNGKeyArray

from .._models import MLP, Identity, ReLU
from .._random import from_numpy, normal
from ._known import _alive, _generic, _patterns


def random_alive_mlp(widths, x: ArrayLike, *, relu: bool, bias: bool, key: PRNGKeyArray,
                     tries: int = 100, require_generic: bool = True) -> MLP:
    """A random `dyn.MLP` (He initialisation; biases N(0, 0.3²) when `bias`) on which
    `known_count` holds (`generic`: every hidden ReLU neuron active on 5–95% of `x` and
    live on some, full-rank live inputs in layers 2..K but for dead connections); the
    first of `tries` draws from `key` that
    qualifies; with `require_generic=False`, the first with every neuron alive when none is
    generic. With `relu=False`, an identity MLP (the first draw)."""
    act = ReLU() if relu else Identity()
    alive = None
    for k in range(tries):
        model = MLP(widths, activation=act, bias=bias, key=jax.random.fold_in(key, k))
        if bias:
            ks = jax.random.split(jax.random.fold_in(key, 1000 + k), len(model.biases))
            model = eqx.tree_at(lambda m: m.biases, model, tuple(
                from_numpy(0.3 * np.asarray(normal(kb, b.shape)))
                for kb, b in zip(ks, model.biases)))
        if not relu:
            return model
        p = _patterns(model, x)
        if _generic(model, p):
            return model
        if alive is None and _alive(p):
            alive = model
    if alive is not None and not require_generic:
        return alive
    raise ValueError(f"random_alive_mlp: none of {tries} draws is generic on `x` (every "
                     "neuron alive, full-rank live inputs in layers 2..K but for dead "
                     "connections).")
