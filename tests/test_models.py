import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics._models import (
    MLP,
    AbstractActivation,
    Identity,
    LeakyReLU,
    Polynomial,
    ReLU,
    RePU,
    Swish,
    Tanh,
    activation_from_name,
)

# Independent NumPy versions of the activations: (module, numpy function of x and beta).
NUMPY_ACTIVATIONS = [
    (ReLU(), lambda x, b: np.maximum(x, 0.0)),
    (LeakyReLU(0.1), lambda x, b: np.where(x >= 0, x, 0.1 * x)),
    (RePU(2), lambda x, b: np.maximum(x, 0.0) ** 2),
    (RePU(2.5), lambda x, b: np.maximum(x, 0.0) ** 2.5),
    (Polynomial(3), lambda x, b: x**3),
    (Swish(0.7, trainable=False), lambda x, b: x / (1.0 + np.exp(-0.7 * x))),
    (Swish(0.7, trainable=True), lambda x, b: x / (1.0 + np.exp(-b * x))),
    (Identity(), lambda x, b: x),
    (Tanh(), lambda x, b: np.tanh(x)),
]


def _randomize(model, seed):
    """Give every bias and beta a random value in [0.5, 1], so the forward test sees them."""
    rng = np.random.default_rng(seed)
    where = lambda m: [leaf for leaf in (m.biases or ()) + (m.betas or ())]
    leaves = where(model)
    new = [jnp.asarray(rng.uniform(0.5, 1.0, leaf.shape)) for leaf in leaves]
    return eqx.tree_at(where, model, new) if leaves else model


# One compiled batched forward pass per model structure (eager dispatch is slow on 2 cores).
_batched = eqx.filter_jit(lambda model, xs: jax.vmap(model)(xs))


# One architecture for most tests, so the weight sampler compiles once.
WIDTHS = (4, 6, 5, 3)


def _inputs(n, d, seed=2):
    return np.random.default_rng(seed).standard_normal((n, d))


def _numpy_forward(model, act, x):
    h = np.asarray(x)
    n_layers = len(model.weights)
    for k in range(n_layers):
        h = np.asarray(model.weights[k]) @ h
        if model.biases is not None:
            h = h + np.asarray(model.biases[k])
        if k < n_layers - 1:
            beta = None if model.betas is None else np.asarray(model.betas[k])
            h = act(h, beta)
    return h


# Every activation with biases; bias=False is activation-independent, so two suffice.
FORWARD_CASES = [(act, f, True) for act, f in NUMPY_ACTIVATIONS] + [
    (act, f, False) for act, f in NUMPY_ACTIVATIONS if isinstance(act, (ReLU, Swish))
]


@pytest.mark.parametrize(
    "activation, np_act, bias", FORWARD_CASES, ids=[f"{a!r}-{b}" for a, _, b in FORWARD_CASES]
)
def test_forward_matches_numpy(activation, np_act, bias):
    model = MLP(WIDTHS, activation, bias=bias, key=jax.random.key(0))
    model = _randomize(model, 1)
    xs = _inputs(8, 4)
    out = _batched(model, xs)
    ref = np.stack([_numpy_forward(model, np_act, x) for x in xs])
    assert out.shape == (8, 3)
    assert out.dtype == jnp.float64
    # Same float64 operations in a different order: rounding differs by ~1e-15 relative.
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_shapes_and_fields():
    model = MLP(WIDTHS, key=jax.random.key(0))
    assert model.widths == WIDTHS
    assert model.depth == 3
    assert [w.shape for w in model.weights] == [(6, 4), (5, 6), (3, 5)]
    assert [b.shape for b in model.biases] == [(6,), (5,), (3,)]
    assert all(np.all(np.asarray(b) == 0) for b in model.biases)
    assert model.betas is None
    assert model(np.ones(4)).shape == (3,)
    # The pytree's leaves are exactly the trainable arrays: no stray hyperparameters.
    assert len(jax.tree.leaves(model)) == 6
    assert all(eqx.is_inexact_array(leaf) for leaf in jax.tree.leaves(model))


def test_no_bias():
    model = MLP(WIDTHS, bias=False, key=jax.random.key(0))
    assert model.biases is None
    assert len(jax.tree.leaves(model)) == 3


def test_single_layer_is_linear():
    model = MLP((3, 2), activation=Tanh(), key=jax.random.key(0))
    model = _randomize(model, 1)
    x = jnp.array([0.3, -1.2, 2.0])
    # No hidden layer, so no activation: one affine map (float64 rounding only).
    np.testing.assert_allclose(
        model(x), model.weights[0] @ x + model.biases[0], rtol=1e-14, atol=1e-14
    )


@pytest.mark.parametrize("init, gain", [("he", 2.0), ("lecun", 1.0)])
def test_init_variance(init, gain):
    fan_in, fan_out = 1000, 1000
    model = MLP((fan_in, fan_out, 1), init=init, key=jax.random.key(3))
    w = np.asarray(model.weights[0])
    n = w.size
    var = w.var()
    # The sample variance of N = 1e6 Gaussians has relative std sqrt(2/N) ~ 1.4e-3;
    # 5 standard deviations (0.7%) is a bound a correct init essentially never exceeds.
    assert abs(var / (gain / fan_in) - 1) < 5 * np.sqrt(2 / n)
    # The sample mean has std sqrt(var/N); again 5 standard deviations.
    assert abs(w.mean()) < 5 * np.sqrt(gain / fan_in / n)


def test_init_draws_what_jax_random_normal_draws():
    """The init draws from a sampler compiled per power-of-two size and cuts the prefix
    (`dynamics/_random.py`); the weights must be exactly those of one
    `jax.random.normal(key, (total,))`, cut per layer, as before that change, and the
    same under a transformation (vmap over keys: the traced fallback)."""
    from dynamics._random import normal

    widths, key = (5, 7, 3), jax.random.key(11)
    z = np.asarray(jax.random.normal(key, (5 * 7 + 7 * 3,)))
    model = MLP(widths, key=key)
    np.testing.assert_array_equal(model.weights[0], np.sqrt(2 / 5) * z[:35].reshape(7, 5))
    np.testing.assert_array_equal(model.weights[1], np.sqrt(2 / 7) * z[35:].reshape(3, 7))
    batched = eqx.filter_vmap(lambda k: MLP(widths, key=k))(jnp.stack([key, key]))
    np.testing.assert_array_equal(batched.weights[1][1], model.weights[1])
    for shape, dtype in [((), None), ((1025,), None), ((3, 600), jnp.float32)]:
        np.testing.assert_array_equal(normal(key, shape, dtype),
                                      jax.random.normal(key, shape, dtype))
    raw = jax.random.PRNGKey(0)  # uint32 keys take jax.random.normal itself
    np.testing.assert_array_equal(normal(raw, (4,)), jax.random.normal(raw, (4,)))


def _rescale_neuron(model, layer, i, a, p):
    """In-weights and bias of neuron i in hidden `layer` ×a, its out-weights ×a^(-p)."""
    weights = [np.array(w) for w in model.weights]
    weights[layer][i, :] *= a
    weights[layer + 1][:, i] *= a ** (-p)
    model = eqx.tree_at(lambda m: m.weights, model, tuple(map(jnp.asarray, weights)))
    if model.biases is not None:
        biases = [np.array(b) for b in model.biases]
        biases[layer][i] *= a
        model = eqx.tree_at(lambda m: m.biases, model, tuple(map(jnp.asarray, biases)))
    return model


@pytest.mark.parametrize(
    "activation",
    [ReLU(), LeakyReLU(0.1), RePU(2), RePU(2.5), Polynomial(3), Identity()],
    ids=repr,
)
def test_homogeneous_rescaling_preserves_function(activation):
    model = MLP(WIDTHS, activation, key=jax.random.key(0))
    model = _randomize(model, 1)
    xs = _inputs(8, 4)
    out = _batched(model, xs)
    p = activation.degree
    a = 3.7
    for layer, i in [(0, 2), (1, 4)]:
        rescaled = _rescale_neuron(model, layer, i, a, p)
        # Exact symmetry; the only error is float64 rounding through a few layers.
        scale = float(jnp.max(jnp.abs(out)))
        np.testing.assert_allclose(_batched(rescaled, xs), out, rtol=0, atol=1e-12 * scale)
    if p != 1:
        # Control: the degree-1 rescaling is not a symmetry of a p != 1 unit.
        wrong = _rescale_neuron(model, 0, 2, a, 1)
        assert not np.allclose(_batched(wrong, xs), out, rtol=1e-6)


def test_swish_trainable_betas_and_rescaling():
    model = MLP(WIDTHS, Swish(beta=1.5), key=jax.random.key(0))
    assert [b.shape for b in model.betas] == [(6,), (5,)]
    assert all(np.all(np.asarray(b) == 1.5) for b in model.betas)
    assert all(b.dtype == jnp.float64 and not b.weak_type for b in model.betas)
    model = _randomize(model, 1)
    xs = _inputs(8, 4)
    out = _batched(model, xs)
    a = 2.9
    for layer, i in [(0, 1), (1, 3)]:
        rescaled = _rescale_neuron(model, layer, i, a, 1)
        betas = [np.array(b) for b in rescaled.betas]
        betas[layer][i] /= a
        rescaled = eqx.tree_at(lambda m: m.betas, rescaled, tuple(map(jnp.asarray, betas)))
        # Exact symmetry σ(ax; β/a) = a σ(x; β); float64 rounding only.
        np.testing.assert_allclose(_batched(rescaled, xs), out, rtol=0, atol=1e-12)
    # Control: without the β rescaling the output changes.
    assert not np.allclose(_batched(_rescale_neuron(model, 0, 1, a, 1), xs), out, rtol=1e-6)


def test_swish_not_trainable_has_no_betas():
    model = MLP(WIDTHS, Swish(trainable=False), key=jax.random.key(0))
    assert model.betas is None


def test_swish_no_hidden_layer_has_empty_betas():
    assert MLP((3, 1), Swish(), key=jax.random.key(0)).betas == ()


def test_degrees():
    assert ReLU().degree == 1
    assert LeakyReLU(0.3).degree == 1
    assert RePU(3).degree == 3
    assert RePU(2.5).degree == 2.5
    assert Polynomial(4).degree == 4
    assert Identity().degree == 1
    assert Swish().degree is None
    assert Tanh().degree is None
    assert MLP(WIDTHS, RePU(2), key=jax.random.key(0)).degree == 2


@pytest.mark.parametrize(
    "activation",
    [
        ReLU(),
        LeakyReLU(0.3),
        RePU(2),
        RePU(1.5),
        Polynomial(2),
        Polynomial(3),
        Identity(),
        Swish(),
        Tanh(),
    ],
    ids=repr,
)
def test_degree_is_the_actual_homogeneity(activation):
    x = jnp.linspace(-3.0, 3.0, 61)
    lam = 2.3
    if activation.degree is None:
        # Not homogeneous of any degree: σ(λx)/σ(x) is not a constant.
        ratio = activation(lam * x[x > 0]) / activation(x[x > 0])
        assert float(jnp.ptp(ratio)) > 1e-3
    else:
        # σ(λx) = λ^p σ(x) exactly; float64 rounding of one power only.
        np.testing.assert_allclose(
            activation(lam * x), lam**activation.degree * activation(x), rtol=1e-13, atol=1e-13
        )


def test_swish_beta_argument():
    x = jnp.array([-1.0, 0.5, 2.0])
    beta = jnp.array([0.5, 1.0, 3.0])
    ref = np.asarray(x) / (1 + np.exp(-np.asarray(beta) * np.asarray(x)))
    # Elementwise float64 arithmetic; a few ulps.
    np.testing.assert_allclose(Swish(beta=7.0)(x, beta=beta), ref, rtol=1e-14)


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("relu", {}, ReLU),
        ("leaky_relu", {"alpha": 0.2}, LeakyReLU),
        ("Leaky-ReLU", {}, LeakyReLU),
        ("repu", {"p": 3}, RePU),
        ("polynomial", {"p": 2}, Polynomial),
        ("swish", {"beta": 2.0, "trainable": False}, Swish),
        ("identity", {}, Identity),
        ("linear", {}, Identity),
        ("tanh", {}, Tanh),
    ],
)
def test_activation_from_name(name, kwargs, cls):
    act = activation_from_name(name, **kwargs)
    assert type(act) is cls
    for k, v in kwargs.items():
        assert getattr(act, k) == v


def test_mlp_accepts_activation_name():
    model = MLP(WIDTHS, "tanh", key=jax.random.key(0))
    assert isinstance(model.activation, Tanh)
    assert isinstance(model.activation, AbstractActivation)


def test_jit_and_grad():
    model = MLP(WIDTHS, Swish(), key=jax.random.key(0))
    x = jnp.array([0.1, -0.2, 0.3, 0.4])
    out = eqx.filter_jit(lambda m: m(x))(model)
    np.testing.assert_allclose(out, _batched(model, x[None])[0], rtol=1e-14)  # same ops
    grads = eqx.filter_jit(jax.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
    assert jax.tree.structure(grads) == jax.tree.structure(model)
    # d/dβ_i of the output is nonzero: the per-neuron betas are live parameters.
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in grads.betas)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: activation_from_name("sigmoidish"), "valid names are"),
        (lambda: activation_from_name("repu"), "keyword arguments"),
        (lambda: MLP((5,), key=jax.random.key(0)), "widths"),
        (lambda: MLP((5, 0, 1), key=jax.random.key(0)), "widths"),
        (lambda: MLP((5, 2.0, 1), key=jax.random.key(0)), "widths"),
        (lambda: MLP(5, key=jax.random.key(0)), "widths"),
        (lambda: MLP((5, 1)), "key"),
        (lambda: MLP((5, 1), init="xavier", key=jax.random.key(0)), "init"),
        (lambda: MLP((5, 1), activation=jnp.tanh, key=jax.random.key(0)), "activation"),
        (lambda: RePU(0.5), "p"),
        (lambda: Polynomial(0), "p"),
        (lambda: Polynomial(2.5), "p"),
        (lambda: LeakyReLU(float("nan")), "alpha"),
        (lambda: Swish(beta=float("inf")), "beta"),
    ],
)
def test_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_input_shape():
    model = MLP((3, 2), key=jax.random.key(0))
    with pytest.raises(ValueError, match="vmap"):
        model(jnp.ones((5, 3)))
