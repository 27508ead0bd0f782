"""count_conservation_laws and known_count on models that state their rescaling units
(ConvNet, RNN, ResidualMLP, a user's model), in float64.

The two counts are independent: `count_conservation_laws` is D minus the rank of Lie
brackets of the outputs' gradients (Marcotte et al. 2023); `known_count` the rank of the
gradients of the charges the units give plus the dead parameters. Stopping the brackets at
level `max_level` can only under-count the Lie algebra, so D − rank(levels ≤ k) is an
upper bound on the number of laws, and the charges (each a law: its generator is tangent)
a lower bound: when the two agree, both are the count. The default tests stop at level 2
(one compile of two levels per shape); the slow test runs the levels out.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamics as dyn
from dynamics.symmetries import Slice, Units

jax.config.update("jax_enable_x64", True)


def _biased(model, seed, scale=0.3):
    """Random biases (zero at init): generic pre-activations."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape) if a.ndim == 1 else a,
                        model)


def _draw(make, shape, seed, tries=20):
    """The first generic draw (`known_count` has a closed form) of `make(key)` on
    N(0, 1) inputs of `shape`, as (model, x)."""
    for k in range(tries):
        model = _biased(make(jax.random.key(1000 * seed + k)), 1000 * seed + k)
        x = jnp.asarray(np.random.default_rng(seed + 77 * k).normal(size=shape))
        if dyn.symmetries._known.generic(model, x):
            return model, x
    raise AssertionError("no generic draw")


def _conv(key, activation="relu"):
    return dyn.ConvNet(1, (2, 3), 3, 2, image_size=4, activation=activation, key=key)


def _rnn(key, activation="relu"):
    return dyn.RNN(2, (3,), 2, activation=activation, key=key)


def _count(model, x, level=2):
    # 16 tuples per batch, not 64: the count does not depend on it, and the unoptimised
    # XLA the suite compiles with runs small batches of conv brackets faster
    return dyn.symmetries.count_conservation_laws(model, x, key=0, max_level=level,
                                                  samples=16, progress=False)


@eqx.filter_jit
def _jacobian(model, x):
    return jax.jacrev(lambda m: jax.vmap(m)(x))(model)


def _dead(model, x):
    """Parameters with an exactly zero gradient of every output (independent of the
    units: a NumPy test of the Jacobian columns)."""
    jac = _jacobian(model, x)
    return sum(int(np.sum(~np.any(np.asarray(j) != 0, axis=tuple(range(j.ndim - a.ndim)))))
               for j, a in zip(jax.tree.leaves(eqx.filter(jac, eqx.is_inexact_array)),
                               jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))


def test_relu_conv_nets_one_law_per_channel_plus_dead_parameters():
    """3 random ReLU conv nets 1→2→3 channels on 16 Gaussian 4×4 images: the bracket count
    equals one law per hidden channel (5) plus the parameters no output reads."""
    for seed in range(3):
        model, x = _draw(_conv, (16, 1, 4, 4), seed)
        result = _count(model, x)
        assert result.count == dyn.symmetries.known_count(model, x) == 5 + _dead(model, x)
        # the rank is clean: kept singular values ≥ 1e-4, dropped ones round-off
        assert result.singular_values.min() > 1e-6 and result.largest_dropped < 1e-12


def test_linear_conv_net_has_a_gl_law_per_pair_of_channels():
    """Identity activation: GL(C_l) acts on each hidden layer's channels (convolution is
    linear per channel), C(C + 1)/2 laws each: 3 + 6 = 9 for channels (2, 3)."""
    model, x = _draw(lambda k: _conv(k, "identity"), (16, 1, 4, 4), 0)
    result = _count(model, x)
    assert result.count == dyn.symmetries.known_count(model, x) == 3 + 6


# the linear RNN under -m slow: the linear conv net's GL test covers mixing charges
@pytest.mark.parametrize("activation,laws",
                         [("relu", 3), pytest.param("identity", 6, marks=pytest.mark.slow)])
def test_rnn_counts(activation, laws):
    """An Elman RNN 2→3→2 on 16 sequences of 4 steps: one law per recurrent unit (ReLU),
    3·4/2 = 6 for GL(3) acting on the state (linear: W_in → A W_in, W_rec → A W_rec A⁻¹,
    W_out → W_out A⁻¹), whatever the weight sharing across steps."""
    for seed in range(2 if activation == "relu" else 1):
        model, x = _draw(lambda k: _rnn(k, activation), (16, 4, 2), seed)
        result = _count(model, x, level=3)
        assert result.count == dyn.symmetries.known_count(model, x) == laws + _dead(model, x)


def test_residual_stream_is_one_gl_family():
    """ReLU residual MLP (stream 3, blocks of 3 hidden, 2 blocks): 6 block-neuron laws and
    the stream's GL(3), 6 more (the skip ties the layers' stream rescalings into one)."""
    make = lambda k: dyn.ResidualMLP(3, 3, 3, 2, 2, key=k)  # noqa: E731
    model, x = _draw(make, (24, 3), 1)
    result = _count(model, x, level=3)
    laws = dyn.symmetries._unit_laws.unit_laws(model, x)
    assert (laws.charges, laws.mixing) == (9, 3)
    assert result.count == laws.count == 6 + 6 + _dead(model, x)


class _TwoLayer(eqx.Module):
    """A user's model: x ↦ B relu(A x), stating its hidden units."""

    a: jax.Array
    b: jax.Array

    def __call__(self, x):
        return self.b @ jax.nn.relu(self.a @ x)

    def rescaling_units(self):
        return (Units("hidden", 4, (Slice("a", 0, 1.0, 2), Slice("b", 1, "-p", 2)), 1.0),)


def test_user_model_with_units():
    rng = np.random.default_rng(0)
    model = _TwoLayer(jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(2, 4))))
    x = jnp.asarray(rng.normal(size=(20, 3)))
    assert _count(model, x).count == dyn.symmetries.known_count(model, x) == 4


def test_known_count_refuses_deficient_units():
    """On 2 sequences of 2 steps, an RNN unit's in-weights (2 input, 3 recurrent, a bias)
    see at most 4 live inputs: deficient rank, no closed form, refused."""
    model = _biased(_rnn(jax.random.key(2)), 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2)))
    assert not dyn.symmetries._known.generic(model, x)
    with pytest.raises(ValueError, match="known_count.*deficient rank"):
        dyn.symmetries.known_count(model, x)
    with pytest.raises(ValueError, match="known_count: `x`"):
        dyn.symmetries.known_count(model, jnp.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match="known_count: `model`"):
        dyn.symmetries.known_count(lambda x: x, x)


@pytest.mark.slow
def test_twenty_relu_conv_nets_levels_run_out():
    """20 random ReLU conv nets of two shapes (the issue's target), every level until the
    rank stalls: one law per channel plus dead parameters, each."""
    shapes = [((2, 3), 4), ((3, 2), 5)]
    for seed in range(20):
        channels, size = shapes[seed % 2]
        model, x = _draw(lambda k, c=channels, s=size: dyn.ConvNet(1, c, 3, 2, image_size=s,
                                                                  key=k),
                         (16, 1, size, size), seed)
        result = dyn.symmetries.count_conservation_laws(model, x, key=seed, samples=16,
                                                        progress=False)
        assert result.count == dyn.symmetries.known_count(model, x) == 5 + _dead(model, x)
