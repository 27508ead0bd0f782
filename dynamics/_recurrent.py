"""The Elman recurrent network and the residual MLP, each stating its rescaling units."""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._architectures import check_flag, int_tuple, positive_count, zeros_array
from ._models import AbstractActivation, ReLU, check_activation, draw_weights, init_gain
from ._units import Slice, Units
from ._validate import one_of, prng_key

__all__ = ["RNN", "ResidualMLP"]


class RNN(eqx.Module):
    """A stacked Elman network (Elman 1990) on one sequence x_1..x_T:

        h^l_t = σ(W^l_in h^{l−1}_t + W^l_rec h^l_{t−1} + b^l),  h^0_t = x_t,  h^l_0 = 0,
        f(x) = W_out h^L_T + b_out   (or W_out h^L_t + b_out for every t),

    for layers l = 1..L of widths `hidden`. With a mask m_t ∈ {0, 1} a padded step keeps
    the state, h_t = m_t σ(…) + (1 − m_t) h_{t−1}: linear in h, so the rescaling symmetry
    stays exact (Baldi et al. sec. 3, recurrent balancing).

    Rescaling unit i of layer l by λ scales W^l_in[i, :], b^l[i] and the row W^l_rec[i, :]
    by λ, and the column W^l_rec[:, i] and what reads the unit (W^{l+1}_in[:, i] or
    W_out[:, i]) by λ^{−p}: h^l_i then scales by λ^p at every step, since h_0 = 0. The
    self-loop W^l_rec[i, i] is in both, so it scales by λ^{1−p}: unchanged for p = 1, the
    cycle constraint of Baldi et al. (Prop. 37). Its charge Σ_S e_S‖w_S‖² counts it with
    exponent 1 − p.

    **Arguments:**

    - `input_size`: features per step.
    - `hidden`: the widths of the recurrent layers, e.g. (32, 32, 32).
    - `output_size`: outputs of the read-out.
    - `activation`: an `AbstractActivation` or a name (default ReLU).
    - `bias`: whether the layers and the read-out have biases (zero at init).
    - `readout`: "last" (f of h_T, shape (output_size,)) or "all" (shape (T, output_size)).
    - `masked`: if True the input carries one more feature, the mask m_t, last: a batch of
      padded sequences then fits a `Dataset` and the losses (`dyn.datasets.Sequences.
      dataset`).
    - `key`: PRNG key (keyword-only, required).
    - `init`: "he" or "lecun": entries N(0, gain/fan_in), fan_in = n_{l−1} + n_l for a
      unit's input and recurrent weights together, n_L for the read-out.
    """

    input_weights: tuple[Float[Array, "n m"], ...]
    recurrent_weights: tuple[Float[Array, "n n"], ...]
    output_weight: Float[Array, "out n"]
    biases: tuple[Float[Array, " n"], ...] | None
    activation: AbstractActivation
    input_size: int = eqx.field(static=True)
    hidden: tuple[int, ...] = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    readout: str = eqx.field(static=True)
    masked: bool = eqx.field(static=True)

    def __init__(self, input_size: int, hidden: Sequence[int], output_size: int, *,
                 activation=ReLU(), bias: bool = True, readout: str = "last",
                 masked: bool = False, key: PRNGKeyArray | None = None, init: str = "he"):
        owner = "RNN"
        self.input_size = positive_count(input_size, "input_size", owner)
        self.hidden = int_tuple(hidden, "hidden", owner, "(32, 32, 32)")
        self.output_size = positive_count(output_size, "output_size", owner)
        self.activation = check_activation(activation, owner)
        check_flag(bias, "bias", owner)
        self.readout = one_of(readout, "readout", ("last", "all"), owner)
        self.masked = check_flag(masked, "masked", owner)
        key = prng_key(key, owner)
        widths = (self.input_size, *self.hidden)
        shapes, fans = [], []
        for m, n in zip(widths[:-1], widths[1:]):
            shapes += [(n, m), (n, n)]
            fans += [m + n, m + n]
        shapes.append((self.output_size, widths[-1]))
        fans.append(widths[-1])
        drawn = draw_weights(key, shapes, fans, init_gain(init, owner))
        self.input_weights = drawn[0:-1:2]
        self.recurrent_weights = drawn[1:-1:2]
        self.output_weight = drawn[-1]
        dtype = drawn[0].dtype
        self.biases = (tuple(zeros_array(n, dtype) for n in (*self.hidden, self.output_size))
                       if bias else None)

    @property
    def degree(self) -> int | float | None:
        """Homogeneity degree of the activation (None when not homogeneous)."""
        return self.activation.degree

    def rescaling_units(self) -> tuple[Units, ...]:
        """One family per recurrent layer (see the class docstring)."""
        out, depth = [], len(self.hidden)
        for layer, n in enumerate(self.hidden):
            reader = (("input_weights", layer + 1) if layer + 1 < depth
                      else ("output_weight",))
            slices = [Slice(("input_weights", layer), 0, 1.0, 2),
                      Slice(("recurrent_weights", layer), 0, 1.0, 2),
                      Slice(("recurrent_weights", layer), 1, "-p", 2),
                      Slice(reader, 1, "-p", 2)]
            if self.biases is not None:
                slices.append(Slice(("biases", layer), 0, 1.0, 1))
            out.append(Units(f"recurrent {layer + 1}", n, slices, self.activation.degree))
        return tuple(out)

    def __call__(self, x: Float[ArrayLike, "T in"], mask: ArrayLike | None = None) -> Array:
        """Map one sequence of shape (T, input_size) (one more feature, the mask, when
        `masked`) to the read-out; `mask` (T,) of 0/1 marks the valid steps."""
        h = jnp.asarray(x)
        width = self.input_size + self.masked
        if h.ndim != 2 or h.shape[1] != width:
            raise ValueError(
                f"RNN: input `x` must have shape (T, {width}), got {h.shape}; use "
                "jax.vmap(model)(X) for a batch of equal-length (padded) sequences."
            )
        if self.masked:
            if mask is not None:
                raise ValueError("RNN: `mask` is the last input feature of a masked RNN; "
                                 "do not pass it again.")
            h, mask = h[:, :-1], h[:, -1]
        if mask is not None:
            mask = jnp.asarray(mask, h.dtype)
            if mask.shape != (h.shape[0],):
                raise ValueError(f"RNN: `mask` must have shape ({h.shape[0]},), one 0/1 per "
                                 f"step, got {mask.shape}.")
        for layer, (w_in, w_rec) in enumerate(zip(self.input_weights, self.recurrent_weights)):
            drive = h @ w_in.T
            if self.biases is not None:
                drive = drive + self.biases[layer]

            def step(state, inputs, w_rec=w_rec):
                z, m = inputs
                new = self.activation(z + w_rec @ state)
                if m is not None:
                    new = m * new + (1 - m) * state
                return new, new

            state0 = jnp.zeros(w_rec.shape[0], drive.dtype)
            _, h = jax.lax.scan(step, state0, (drive, mask))
        if self.readout == "last":
            h = h[-1]
        out = h @ self.output_weight.T
        return out if self.biases is None else out + self.biases[-1]


class ResidualMLP(eqx.Module):
    """A residual MLP (He et al. 2016, pre-activation-free form) on one input:

        z_0 = E x + e,   z_k = z_{k−1} + V_k σ(U_k z_{k−1} + c_k) + d_k  (k = 1..B),
        f(x) = W z_B + b.

    Which rescalings are symmetries (derived here, checked in tests/test_architectures.py):

    - **Hidden neurons of a block** (U_k[i, :], c_k[i] ×λ; V_k[:, i] ×λ^{−p}): as in an
      MLP, for a p-homogeneous σ.
    - **Stream coordinates**, *tied across all blocks*: coordinate i of the stream scales
      by λ everywhere, i.e. E[i, :], e_i, every V_k[i, :] and d_k[i] ×λ, and what reads it,
      every U_k[:, i] and W[:, i], ×λ^{−1}. The stream passes only through linear maps
      (z ↦ D z commutes with the identity skip), so this holds for every σ (degree 1).
    - Not symmetries: rescaling the stream in one block only (the skip z_{k−1} ↦ z_k
      carries the old scale into the next block, so the function changes), and any stream
      rescaling without the embedding E (the data cannot rescale).

    So a skip connection ties the per-layer rescalings of the stream into one per
    coordinate: B·width unit families of a plain MLP of the same depth become `width`.

    **Arguments:** `in_size`, `width` (the stream), `hidden` (each block's hidden width),
    `num_blocks` B, `out_size`; keyword `activation` (default ReLU), `bias`, `key`,
    `init` ("he" or "lecun", entries N(0, gain/fan_in)).
    """

    embedding: Float[Array, "width in"]
    weights_in: tuple[Float[Array, "hidden width"], ...]
    weights_out: tuple[Float[Array, "width hidden"], ...]
    head: Float[Array, "out width"]
    embedding_bias: Float[Array, " width"] | None
    biases_in: tuple[Float[Array, " hidden"], ...] | None
    biases_out: tuple[Float[Array, " width"], ...] | None
    head_bias: Float[Array, " out"] | None
    activation: AbstractActivation
    in_size: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    num_blocks: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)

    def __init__(self, in_size: int, width: int, hidden: int, num_blocks: int, out_size: int,
                 *, activation=ReLU(), bias: bool = True, key: PRNGKeyArray | None = None,
                 init: str = "he"):
        owner = "ResidualMLP"
        self.in_size = positive_count(in_size, "in_size", owner)
        self.width = positive_count(width, "width", owner)
        self.hidden = positive_count(hidden, "hidden", owner)
        self.num_blocks = positive_count(num_blocks, "num_blocks", owner)
        self.out_size = positive_count(out_size, "out_size", owner)
        self.activation = check_activation(activation, owner)
        check_flag(bias, "bias", owner)
        key = prng_key(key, owner)
        b, d, n = self.num_blocks, self.width, self.hidden
        shapes = [(d, self.in_size)] + [(n, d), (d, n)] * b + [(self.out_size, d)]
        fans = [s[1] for s in shapes]
        drawn = draw_weights(key, shapes, fans, init_gain(init, owner))
        self.embedding, self.head = drawn[0], drawn[-1]
        self.weights_in, self.weights_out = drawn[1:-1:2], drawn[2:-1:2]
        dtype = drawn[0].dtype
        if bias:
            self.embedding_bias = zeros_array(d, dtype)
            self.biases_in = tuple(zeros_array(n, dtype) for _ in range(b))
            self.biases_out = tuple(zeros_array(d, dtype) for _ in range(b))
            self.head_bias = zeros_array(self.out_size, dtype)
        else:
            self.embedding_bias = self.biases_in = self.biases_out = self.head_bias = None

    @property
    def degree(self) -> int | float | None:
        """Homogeneity degree of the activation (None when not homogeneous)."""
        return self.activation.degree

    def rescaling_units(self) -> tuple[Units, ...]:
        """One family per block's hidden neurons, then the stream (class docstring)."""
        bias = self.embedding_bias is not None
        out = []
        for k in range(self.num_blocks):
            slices = [Slice(("weights_in", k), 0, 1.0, 2), Slice(("weights_out", k), 1, "-p", 2)]
            if bias:
                slices.append(Slice(("biases_in", k), 0, 1.0, 1))
            out.append(Units(f"block {k + 1}", self.hidden, slices, self.activation.degree))
        stream = [Slice(("embedding",), 0, 1.0, 2), Slice(("head",), 1, "-p", 2)]
        for k in range(self.num_blocks):
            stream += [Slice(("weights_in", k), 1, "-p", 2), Slice(("weights_out", k), 0, 1.0, 2)]
        if bias:
            stream += [Slice(("embedding_bias",), 0, 1.0, 1)]
            stream += [Slice(("biases_out", k), 0, 1.0, 1) for k in range(self.num_blocks)]
        # degree 1: the stream is carried by linear maps only, whatever σ is
        out.append(Units("stream", self.width, stream, 1.0))
        return tuple(out)

    def __call__(self, x: Float[ArrayLike, " in"]) -> Float[Array, " out"]:
        """Map one input of shape (in_size,) to out_size outputs."""
        z = jnp.asarray(x)
        if z.shape != (self.in_size,):
            raise ValueError(f"ResidualMLP: input `x` must have shape ({self.in_size},), got "
                             f"{z.shape}; use jax.vmap(model)(X) for a batch.")
        z = self.embedding @ z
        if self.embedding_bias is not None:
            z = z + self.embedding_bias
        for k in range(self.num_blocks):
            pre = self.weights_in[k] @ z
            if self.biases_in is not None:
                pre = pre + self.biases_in[k]
            z = z + self.weights_out[k] @ self.activation(pre)
            if self.biases_out is not None:
                z = z + self.biases_out[k]
        out = self.head @ z
        return out if self.head_bias is None else out + self.head_bias
