"""The convolutional network, and the argument checks the architectures share.

Each model is a final Equinox module like `dyn.MLP`, called on ONE example (use
`jax.vmap` for a batch), and its `rescaling_units()` lists the parameter slices that scale
together (`dyn.symmetries.Units`), which is all the charges, generators, residual monitors
and `min_norm_fix` read.
"""

import numbers
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._models import AbstractActivation, ReLU, check_activation, draw_weights, init_gain
from ._random import from_numpy
from ._units import Slice, Units
from ._validate import prng_key

__all__ = ["ConvNet", "positive_count", "int_tuple", "per_layer", "check_flag", "zeros_array"]


def positive_count(value, name: str, owner: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{owner}: `{name}` must be an int >= {low}, got {value!r}.")
    return int(value)


def int_tuple(value, name: str, owner: str, example: str, low: int = 1) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ValueError(
            f"{owner}: `{name}` must be a non-empty tuple of ints, e.g. {example}, got "
            f"{value!r}."
        )
    return tuple(positive_count(v, name, owner, low) for v in value)


def per_layer(value, n: int, name: str, owner: str, low: int) -> tuple[int, ...]:
    """An int for every layer, or a tuple of n ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (positive_count(value, name, owner, low),) * n
    out = int_tuple(value, name, owner, f"(1,) * {n}", low)
    if len(out) != n:
        raise ValueError(f"{owner}: `{name}` must be an int or one int per layer ({n}), got "
                         f"{value!r}.")
    return out


def check_flag(value, name: str, owner: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}.")
    return value


def zeros_array(shape, dtype):
    return from_numpy(np.zeros(shape, dtype))


class ConvNet(eqx.Module):
    """A 2-D convolutional network without pooling, then a dense head:

        h_l = σ(K_l ⋆ h_{l−1} + b_l),  l = 1..L,   f(x) = W_head · vec(h_L) + b_head,

    with ⋆ the cross-correlation (as `torch.nn.Conv2d` and `lax.conv` compute it) at stride
    s_l with symmetric zero padding p_l on each side, so a map of size H becomes
    ⌊(H + 2p_l − k_l)/s_l⌋ + 1. Zero padding keeps the channel rescaling exact (a padded
    zero scales like any entry); the default p = k//2 keeps the size at stride 1 for odd k
    (PyTorch's `padding=k//2`).

    `weights` holds the kernels K_l of shape (C_l, C_{l−1}, k_l, k_l) (out, in, kh, kw) and,
    last, the head's weight of shape (num_classes, C_L, H_L, W_L): a dense layer on the
    flattened final map, stored unflattened so that channel c's columns are an index of
    axis 1. `biases` (zero at init) likewise, or None.

    The two Theory III nets (Banburski et al., Figs. 2–3 and Fig. 8) on CIFAR-10:

    ```python
    five = dyn.ConvNet(3, (16,) * 5, 3, 10, stride=2, padding=1, image_size=32, key=key)
    fig8 = dyn.ConvNet(3, (16, 32, 64, 128), 3, 10, stride=2, padding=1, image_size=32,
                       key=key)
    ```

    (9,898 and 102,570 parameters with biases; in the first, 5 of the 9 taps of the last
    kernel only ever read padding, since it sees a 2×2 map.)

    **Arguments:**

    - `in_channels`: C_0 of the input image.
    - `channels`: (C_1, ..., C_L), the hidden conv layers' channel counts.
    - `kernel_size`: k, an int for every layer or one per layer (square kernels).
    - `num_classes`: outputs of the dense head.
    - `stride`, `padding`: an int for every layer or one per layer.
    - `image_size`: H, or (H, W), of the input (the head's size depends on it).
    - `activation`: an `AbstractActivation` or a name (default ReLU).
    - `bias`: whether the layers have biases.
    - `key`: PRNG key (keyword-only, required).
    - `init`: "he", entries N(0, 2/fan_in), or "lecun", N(0, 1/fan_in), with fan_in =
      C_{l−1} k_l² for a kernel and C_L H_L W_L for the head.

    **Raises:** ValueError naming the argument for a bad count, a kernel larger than the
    padded map, or an input of the wrong shape.
    """

    weights: tuple[Float[Array, "..."], ...]
    biases: tuple[Float[Array, " out"], ...] | None
    activation: AbstractActivation
    in_channels: int = eqx.field(static=True)
    channels: tuple[int, ...] = eqx.field(static=True)
    kernel_size: tuple[int, ...] = eqx.field(static=True)
    stride: tuple[int, ...] = eqx.field(static=True)
    padding: tuple[int, ...] = eqx.field(static=True)
    image_size: tuple[int, int] = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(self, in_channels: int, channels: Sequence[int], kernel_size, num_classes: int,
                 *, stride=1, padding=None, image_size, activation=ReLU(), bias: bool = True,
                 key: PRNGKeyArray | None = None, init: str = "he"):
        owner = "ConvNet"
        self.in_channels = positive_count(in_channels, "in_channels", owner)
        self.channels = int_tuple(channels, "channels", owner, "(16,) * 5")
        n = len(self.channels)
        self.kernel_size = per_layer(kernel_size, n, "kernel_size", owner, 1)
        self.stride = per_layer(stride, n, "stride", owner, 1)
        if padding is None:
            padding = tuple(k // 2 for k in self.kernel_size)
        self.padding = per_layer(padding, n, "padding", owner, 0)
        self.num_classes = positive_count(num_classes, "num_classes", owner)
        if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
            image_size = (image_size, image_size)
        image_size = int_tuple(image_size, "image_size", owner, "32 or (32, 32)")
        if len(image_size) != 2:
            raise ValueError(f"{owner}: `image_size` must be H or (H, W), got {image_size!r}.")
        self.image_size = image_size
        self.activation = check_activation(activation, owner)
        check_flag(bias, "bias", owner)
        key = prng_key(key, owner)
        gain = init_gain(init, owner)
        shapes, fans, c_in = [], [], self.in_channels
        for c, k in zip(self.channels, self.kernel_size):
            shapes.append((c, c_in, k, k))
            fans.append(c_in * k * k)
            c_in = c
        h, w = self.feature_size
        shapes.append((self.num_classes, c_in, h, w))
        fans.append(c_in * h * w)
        self.weights = draw_weights(key, shapes, fans, gain)
        dtype = self.weights[0].dtype
        self.biases = (tuple(zeros_array(s[0], dtype) for s in shapes) if bias else None)

    @property
    def feature_size(self) -> tuple[int, int]:
        """(H_L, W_L), the size of the last conv layer's maps."""
        size = list(self.image_size)
        for layer, (k, s, p) in enumerate(zip(self.kernel_size, self.stride, self.padding)):
            for d in range(2):
                if size[d] + 2 * p < k:
                    raise ValueError(
                        f"ConvNet: conv layer {layer + 1} has a {k}x{k} kernel but its padded "
                        f"input is {size[d] + 2 * p} wide; lower `stride` or `kernel_size`, "
                        "raise `padding`, or use fewer `channels` layers."
                    )
                size[d] = (size[d] + 2 * p - k) // s + 1
        return size[0], size[1]

    @property
    def degree(self) -> int | float | None:
        """Homogeneity degree of the activation (None when not homogeneous)."""
        return self.activation.degree

    def rescaling_units(self) -> tuple[Units, ...]:
        """One family per conv layer l: channel c scales K_l[c] and b_l[c] by λ and the
        next kernel's K_{l+1}[:, c] (or the head's columns that read channel c) by λ^{−p}
        (convolution is linear per input channel and zero padding stays zero)."""
        out = []
        for layer, c in enumerate(self.channels):
            slices = [Slice(("weights", layer), 0, 1.0, 4),
                      Slice(("weights", layer + 1), 1, "-p", 4)]
            if self.biases is not None:
                slices.append(Slice(("biases", layer), 0, 1.0, 1))
            out.append(Units(f"conv {layer + 1}", c, slices, self.activation.degree))
        return tuple(out)

    def __call__(self, x: Float[ArrayLike, "C H W"]) -> Float[Array, " classes"]:
        """Map one image of shape (in_channels, H, W) to num_classes outputs."""
        h = jnp.asarray(x)
        want = (self.in_channels, *self.image_size)
        if h.shape != want:
            raise ValueError(f"ConvNet: input `x` must have shape {want}, got {h.shape}; use "
                             "jax.vmap(model)(X) for a batch.")
        for layer, (s, p) in enumerate(zip(self.stride, self.padding)):
            h = jax.lax.conv_general_dilated(
                h[None], self.weights[layer], window_strides=(s, s), padding=[(p, p), (p, p)],
                dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
            if self.biases is not None:
                h = h + self.biases[layer][:, None, None]
            h = self.activation(h)
        out = jnp.tensordot(self.weights[-1], h, axes=3)
        return out if self.biases is None else out + self.biases[-1]
