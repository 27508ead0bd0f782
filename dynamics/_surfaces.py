"""The switching surfaces of a piecewise-linear MLP on its training inputs.

For σ(z) = z·σ'(z) piecewise linear (ReLU: slopes 0 | 1; LeakyReLU: α | 1), the loss
is smooth on each *piece*, where every pre-activation z_{n,i} of hidden unit i on
example n keeps its sign. Freezing the slopes d_{n,i} (the activation pattern) gives
that piece's loss, a polynomial in the weights defined everywhere: the smooth vector
field "extended past the surface" that mode-frozen integration evaluates. The
surfaces are z_{n,i}(w) = 0, one per (example, hidden unit) pair.

The pair index p runs over hidden layers, then examples, then units:
p = offset_l + n·width_l + i.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from ._models import MLP, LeakyReLU, ReLU
from .losses._losses import (
    AbstractLoss,
    CrossEntropy,
    ExponentialLoss,
    L2Penalty,
    LogisticLoss,
    LpPenalty,
    MeanSquaredError,
    Sum,
)

# Losses whose inputs the surfaces are taken on (they evaluate `vmap(model)(x)`).
DATA_LOSSES = (MeanSquaredError, CrossEntropy, ExponentialLoss, LogisticLoss)


def data_term_index(loss) -> int | None:
    """-1 if `loss` is itself a data loss, j if it is a `Sum` whose term j is its one
    data term and whose other terms are weight penalties, else None."""
    if isinstance(loss, DATA_LOSSES):
        return -1
    if isinstance(loss, Sum):
        found = [j for j, t in enumerate(loss.terms) if isinstance(t, DATA_LOSSES)]
        # Penalties see the weights only; a nested Sum or a user term could hide data.
        others = [t for t in loss.terms if not isinstance(t, DATA_LOSSES)]
        if len(found) == 1 and all(isinstance(t, (L2Penalty, LpPenalty)) for t in others):
            return found[0]
    return None


def low_slope(model: MLP) -> float:
    """σ' on the negative side: 0 for ReLU, α for LeakyReLU."""
    act = model.activation
    return float(act.alpha) if isinstance(act, LeakyReLU) else 0.0


def is_piecewise_linear(model) -> bool:
    return isinstance(model, MLP) and isinstance(model.activation, (ReLU, LeakyReLU))


class _FrozenMLP(eqx.Module):
    """The MLP with its activation slopes read from the input row: a row is
    (x, d_1, …, d_{K−1}), the slopes of each hidden layer on that example. A data
    loss evaluates `vmap(model)(rows)` unchanged, so its formula is not repeated here."""

    model: MLP
    d_in: int = eqx.field(static=True)

    def __call__(self, row):
        m = self.model
        h, offset = row[: self.d_in], self.d_in
        for k, w in enumerate(m.weights):
            h = w @ h
            if m.biases is not None:
                h = h + m.biases[k]
            if k < m.depth - 1:
                width = w.shape[0]
                h = row[offset: offset + width] * h
                offset += width
        return h


class Surfaces(eqx.Module):
    """Pre-activations of every hidden unit on every input of the data loss, and the
    loss of the piece selected by a slope vector d (one entry per pair)."""

    loss: AbstractLoss
    index: int = eqx.field(static=True)
    hidden: tuple[int, ...] = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __init__(self, loss, model: MLP):
        index = data_term_index(loss)
        if index is None:
            raise ValueError("no data term")  # callers validate first, with a message
        self.loss = loss
        self.index = index
        self.hidden = tuple(model.widths[1:-1])
        self.alpha = low_slope(model)

    @property
    def term(self) -> AbstractLoss:
        return self.loss if self.index < 0 else self.loss.terms[self.index]

    @property
    def x(self) -> Float[Array, "n d"]:
        return self.term.x

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.num_examples * sum(self.hidden)

    def slopes(self, high: Array) -> Array:
        """d = α + (1 − α)·high: the slope of each pair on its side."""
        return self.alpha + (1.0 - self.alpha) * high

    def _layers(self, flat: Array) -> list[Array]:
        n, out, offset = self.num_examples, [], 0
        for width in self.hidden:
            out.append(flat[offset: offset + n * width].reshape(n, width))
            offset += n * width
        return out

    def preactivations(self, model: MLP, d: Array) -> Array:
        """z_p for all pairs (flat), on the piece with slopes d."""
        h, zs = self.x, []
        for k, (w, dl) in enumerate(zip(model.weights, self._layers(d), strict=False)):
            z = h @ w.T
            if model.biases is not None:
                z = z + model.biases[k]
            zs.append(z.reshape(-1))
            h = dl * z
        return jnp.concatenate(zs)

    def _offsets(self) -> list[int]:
        """Where each hidden layer's pairs start in the flat index, and the end."""
        out = [0]
        for width in self.hidden:
            out.append(out[-1] + self.num_examples * width)
        return out

    def locate(self, p: Array) -> tuple[Array, Array]:
        """(hidden layer, example) of traced flat pair indices `p` (any shape)."""
        offsets = self._offsets()
        layer = sum((p >= o).astype(int) for o in offsets[1:-1])
        start = jnp.asarray(offsets[:-1])[layer]
        width = jnp.asarray(self.hidden)[layer]
        return layer, (p - start) // width

    def preactivation(self, model: MLP, d: Array, p: Array) -> Array:
        """z_p alone (p traced): the forward pass of p's example up to p's layer, on the
        piece with slopes d; what `preactivations(model, d)[p]` gives, at 1/N of the cost
        (one example's matrix–vector products instead of every example's)."""
        layer, n = self.locate(p)
        offsets = self._offsets()

        def upto(l):
            def z_of():
                h = self.x[n]
                for k in range(l + 1):
                    z = model.weights[k] @ h
                    if model.biases is not None:
                        z = z + model.biases[k]
                    if k < l:
                        width = self.hidden[k]
                        h = jax.lax.dynamic_slice(d, (offsets[k] + n * width,), (width,)) * z
                return z[p - offsets[l] - n * self.hidden[l]]
            return z_of

        return jax.lax.switch(layer, [upto(l) for l in range(len(self.hidden))])

    def rows(self, d: Array, examples: Array | None = None) -> Array:
        """The frozen network's input rows (x_n, d_{n,1}, …) of the traced example
        indices `examples` (any length, repeats allowed; all examples if None), on the
        piece with slopes d."""
        pick = (lambda a: a) if examples is None else (lambda a: a[examples])
        return jnp.concatenate(
            [pick(self.x)] + [pick(dl) for dl in self._layers(d.astype(self.x.dtype))], axis=1)

    def pair_preactivations(self, model: MLP, d: Array, pairs: Array) -> Array:
        """z_p for the traced flat pair indices `pairs` (a vector), each from its own
        example's forward pass on the piece with slopes d: `preactivations(model, d)
        [pairs]` at len(pairs)/N of the cost."""
        layer, example = self.locate(pairs)
        offsets, layers = self._offsets(), self._layers(d)
        h, out = self.x[example], jnp.zeros(pairs.shape, self.x.dtype)
        for k, width in enumerate(self.hidden):
            z = h @ model.weights[k].T
            if model.biases is not None:
                z = z + model.biases[k]
            unit = jnp.clip(pairs - offsets[k] - example * width, 0, width - 1)
            out = jnp.where(layer == k, jnp.take_along_axis(z, unit[:, None], 1)[:, 0], out)
            h = layers[k][example] * z
        return out

    def data_loss_on_rows(self, params: PyTree, rows: Array, examples: Array,
                          weights: Array):
        """Σ_k weights_k ℓ_{examples_k}(params) on the frozen rows `rows` of those
        examples (`rows(d, examples)`): the data term's share of a few examples (with
        weights 1/N, the part of L they make; penalties left out)."""
        frozen = _FrozenMLP(params, self.x.shape[1])
        term = eqx.tree_at(lambda t: t.x, self.term.subset(examples), rows)
        return jnp.dot(weights, term.example_losses(frozen))

    def signs(self, model: MLP) -> Array:
        """1.0 where the pair's pre-activation under the network's own activation is
        > 0, else 0.0: the pattern a solve starts from."""
        h, out = self.x, []
        for k, w in enumerate(model.weights[:-1]):
            z = h @ w.T
            if model.biases is not None:
                z = z + model.biases[k]
            out.append((z > 0).reshape(-1))
            h = model.activation(z)
        return jnp.concatenate(out).astype(self.x.dtype)

    def loss_on_piece(self, params: PyTree, d: Array):
        """L(params) on the piece with slopes d: the data term evaluates the frozen
        network on rows (x, d); penalties see the weights as usual."""
        rows = self.rows(d)
        frozen = _FrozenMLP(params, self.x.shape[1])
        term = eqx.tree_at(lambda t: t.x, self.term, rows)
        if self.index < 0:
            return term(frozen)
        total = jnp.zeros((), self.x.dtype)
        for j, t in enumerate(self.loss.terms):
            total = total + (term(frozen) if j == self.index else t(params))
        return total

    def active_fraction(self, model: MLP) -> Array:
        """Fraction of (example, unit) pairs with z > 0, per hidden layer."""
        pattern = self._layers(self.signs(model))
        return jnp.stack([jnp.mean(p) for p in pattern])


def pair_location(surfaces: Surfaces, p: int) -> tuple[int, int, int]:
    """(hidden layer, example, unit) of the flat pair index p."""
    n = surfaces.num_examples
    for layer, width in enumerate(surfaces.hidden):
        if p < n * width:
            return layer, p // width, p % width
        p -= n * width
    raise IndexError(p)
