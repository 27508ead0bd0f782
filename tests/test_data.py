import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import sklearn.datasets
import sklearn.metrics
import sklearn.preprocessing

from dynamics import datasets, losses
from dynamics._models import MLP, Swish, Tanh
from dynamics.datasets._datasets import Dataset


@pytest.fixture(scope="module")
def digits_all():
    return datasets.digits()


@pytest.fixture(scope="module")
def sklearn_digits():
    return sklearn.datasets.load_digits()


@eqx.filter_jit
def _batched(model, x):
    return jax.vmap(model)(x)


def _outputs(model, x):
    return np.asarray(_batched(model, x))


@eqx.filter_jit
def _value(loss, model):
    # One compilation per (loss, model) structure instead of one per eager operation.
    return loss(model)


def _loss(loss, model) -> float:
    return float(loss(model))


# Shared sizes, so each random sampler and loss compiles once for the whole file
# (compilation, not arithmetic, dominates the run time on a small CPU).
N_DIGITS = 120
N = 64
# TEACHER and BINARY_MODEL have the same number of weights (30), so the MLP's weight
# sampler, which compiles once per model size, compiles once for both.
TEACHER = (3, 6, 2)
BINARY_MODEL = (2, 10, 1)
N_BINARY = 61


# --------------------------------------------------------------------------- datasets


def test_digits_full(digits_all, sklearn_digits):
    d = digits_all
    assert d.x.shape == (1797, 64) and d.x.dtype == jnp.float64
    assert d.y.shape == (1797,) and jnp.issubdtype(d.y.dtype, jnp.integer)
    assert d.num_classes == 10 and len(d) == 1797
    assert set(np.unique(d.y).tolist()) == set(range(10))
    np.testing.assert_array_equal(d.y, sklearn_digits.target)
    x = np.asarray(d.x)
    constant = sklearn_digits.data.std(axis=0) == 0
    assert 0 < constant.sum() < 64  # the digits have a few always-blank pixels
    # Standardization in float64 of values <= 16: errors are a few ulps of O(1) numbers.
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x[:, ~constant].std(axis=0), 1.0, rtol=1e-12)
    assert np.all(x[:, constant] == 0.0)
    # Independent reference: StandardScaler also leaves zero-variance features at 0.
    ref = sklearn.preprocessing.StandardScaler().fit_transform(sklearn_digits.data)
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)  # same arithmetic, float64


def test_digits_subsets(digits_all):
    first = datasets.digits(100)
    assert len(first) == 100
    np.testing.assert_array_equal(first.x, digits_all.x[:100])
    np.testing.assert_array_equal(first.y, digits_all.y[:100])

    sub = datasets.digits(N_DIGITS, key=jax.random.key(0))
    assert sub.x.shape == (N_DIGITS, 64) and sub.num_classes == 10
    # Every row is a row of the full set (same standardization), and no row repeats.
    full = np.asarray(digits_all.x)
    idx = [int(np.flatnonzero((full == row).all(axis=1))[0]) for row in np.asarray(sub.x)]
    assert len(set(idx)) == N_DIGITS
    np.testing.assert_array_equal(np.asarray(digits_all.y)[idx], sub.y)
    assert idx != list(range(N_DIGITS))
    again = datasets.digits(N_DIGITS, key=jax.random.key(0))
    np.testing.assert_array_equal(again.x, sub.x)
    other = datasets.digits(N_DIGITS, key=jax.random.key(1))
    assert not np.array_equal(other.y, sub.y)


@pytest.mark.parametrize("n", [0, 1798, 2.5, True])
def test_digits_bad_n(n):
    with pytest.raises(ValueError, match="`n`"):
        datasets.digits(n)


def test_teacher_student():
    teacher = MLP(TEACHER, Tanh(), key=jax.random.key(7))
    d = datasets.teacher_student(N, teacher=teacher, key=jax.random.key(0))
    assert d.x.shape == (N, 3) and d.y.shape == (N, 2) and d.num_classes is None
    # Noise-free targets are the teacher's outputs (same ops, same order).
    np.testing.assert_allclose(d.y, _outputs(teacher, d.x), rtol=1e-14, atol=1e-14)

    drawn = datasets.teacher_student(N, TEACHER, "tanh", key=jax.random.key(0))
    assert drawn.y.shape == (N, 2)
    # The drawn teacher is a fresh MLP: its outputs differ from those of `teacher`.
    assert not np.allclose(drawn.y, d.y)

    resid = [
        np.asarray(datasets.teacher_student(N, teacher=teacher, key=jax.random.key(0), noise=s).y)
        - np.asarray(d.y)
        for s in (0.3, 0.6)
    ]
    np.testing.assert_array_equal(
        d.x, datasets.teacher_student(N, teacher=teacher, key=jax.random.key(0), noise=0.3).x
    )
    # The noise is σ·ε with one ε per key: doubling σ doubles it (float64 rounding only).
    np.testing.assert_allclose(resid[1], 2 * resid[0], rtol=1e-12, atol=1e-14)
    # Sample std of 2N = 128 Gaussians: relative std 1/sqrt(2·128) ~ 6%; 5 of those.
    assert abs(resid[0].std() / 0.3 - 1) < 5 / np.sqrt(2 * resid[0].size)


def test_teacher_student_errors():
    with pytest.raises(ValueError, match="exactly one"):
        datasets.teacher_student(10, key=jax.random.key(0))
    teacher = MLP(TEACHER, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exactly one"):
        datasets.teacher_student(10, TEACHER, teacher=teacher, key=jax.random.key(0))
    with pytest.raises(ValueError, match="MLP"):
        datasets.teacher_student(10, teacher=lambda x: x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        datasets.teacher_student(10, (3, 1))
    with pytest.raises(ValueError, match="noise"):
        datasets.teacher_student(10, (3, 1), key=jax.random.key(0), noise=-1.0)


def test_rotational():
    n, d = N, 3
    data = datasets.rotational(n, d, key=jax.random.key(0))
    x, y = np.asarray(data.x), np.asarray(data.y)
    assert x.shape == (n, d) and y.shape == (n, 1) and data.num_classes is None
    # y = |x|² − d; float64 rounding of a three-term sum.
    np.testing.assert_allclose(y[:, 0], (x**2).sum(axis=1) - d, rtol=1e-13, atol=1e-13)
    # Targets depend on |x| only: rotating the inputs leaves them unchanged.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    np.testing.assert_allclose(((x @ q.T) ** 2).sum(axis=1) - d, y[:, 0], atol=1e-12)  # rounding


def test_circles():
    data = datasets.circles(N_BINARY, key=jax.random.key(0), noise=0.0, factor=0.3)
    x, y = np.asarray(data.x), np.asarray(data.y)
    assert x.shape == (N_BINARY, 2) and data.num_classes == 2
    assert (y == 0).sum() == N_BINARY // 2 and (y == 1).sum() == N_BINARY - N_BINARY // 2
    r = np.linalg.norm(x, axis=1)
    # Without noise the points lie exactly on the circles (cos/sin rounding only).
    np.testing.assert_allclose(r[y == 0], 1.0, atol=1e-14)
    np.testing.assert_allclose(r[y == 1], 0.3, atol=1e-14)
    assert not np.all(y[: N_BINARY // 2] == 0)  # shuffled
    # Evenly spaced angles, as in sklearn.datasets.make_circles.
    angles = np.sort(np.arctan2(x[y == 0, 1], x[y == 0, 0]) % (2 * np.pi))
    np.testing.assert_allclose(np.diff(angles), 2 * np.pi / (N_BINARY // 2), atol=1e-12)

    noisy = datasets.circles(N_BINARY, key=jax.random.key(0), noise=0.05, factor=0.3)
    jitter = np.asarray(noisy.x) - x  # same key: same order, same angles
    # 2·61 Gaussian coordinates: their std has relative std ~ 1/sqrt(244) ~ 6%; 5 of those.
    assert abs(jitter.std() / 0.05 - 1) < 5 / np.sqrt(2 * jitter.size)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"factor": 1.0}, "factor"), ({"noise": -0.1}, "noise"), ({"n": 1}, "`n`")],
)
def test_circles_errors(kwargs, match):
    args = {"n": 10, "key": jax.random.key(0)} | kwargs
    with pytest.raises(ValueError, match=match):
        datasets.circles(**args)


def test_dataset_validation():
    x = np.zeros((5, 2))
    assert Dataset(x, np.arange(5)).num_classes == 5
    assert len(Dataset(x, np.zeros((5, 1)))) == 5
    with pytest.raises(ValueError, match="same number"):
        Dataset(x, np.zeros(4, int))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        Dataset(np.zeros(5), np.zeros(5, int))
    with pytest.raises(ValueError, match=r"\(n, k\)"):
        Dataset(x, np.zeros(5))
    with pytest.raises(ValueError, match="num_classes"):
        Dataset(x, np.zeros((5, 1)), num_classes=2)
    with pytest.raises(ValueError, match="lie in"):
        Dataset(x, np.array([0, 1, 2, 3, -1]), num_classes=4)
    # No examples: the loss is NaN (a run "diverged" at once and reported success).
    with pytest.raises(ValueError, match=r"`x` has no examples \(shape \(0, 2\)\)"):
        Dataset(np.zeros((0, 2)), np.zeros((0, 1)))


# --------------------------------------------------------------------------- losses


@pytest.fixture(scope="module")
def small_digits():
    return datasets.digits(N_DIGITS, key=jax.random.key(3))


@pytest.fixture(scope="module")
def classifier():
    return MLP((64, 12, 10), key=jax.random.key(4))


def test_cross_entropy(small_digits, classifier):
    loss = losses.cross_entropy(small_digits)
    logits = _outputs(classifier, small_digits.x)
    y = np.asarray(small_digits.y)
    ref = sklearn.metrics.log_loss(y, scipy.special.softmax(logits, axis=1), labels=range(10))
    ref2 = -np.mean(scipy.special.log_softmax(logits, axis=1)[np.arange(len(y)), y])
    value = _loss(loss, classifier)
    # O(1) float64 means of 120 terms; the references differ only in rounding.
    assert value == pytest.approx(ref, rel=1e-10)
    assert value == pytest.approx(ref2, rel=1e-12)


def test_mse_classification(small_digits, classifier):
    loss = losses.mse(small_digits)
    out = _outputs(classifier, small_digits.x)
    onehot = np.eye(10)[np.asarray(small_digits.y)]
    ref = 0.5 * np.mean(np.sum((out - onehot) ** 2, axis=1))
    assert _loss(loss, classifier) == pytest.approx(ref, rel=1e-12)  # rounding


def test_mse_regression():
    teacher = MLP(TEACHER, Tanh(), key=jax.random.key(7))
    data = datasets.teacher_student(N, teacher=teacher, key=jax.random.key(0))
    student = MLP(TEACHER, Tanh(), key=jax.random.key(1))
    out = _outputs(student, data.x)
    ref = 0.5 * np.mean(np.sum((out - np.asarray(data.y)) ** 2, axis=1))
    assert _loss(losses.mse(data), student) == pytest.approx(ref, rel=1e-12)  # rounding
    # The teacher itself has zero loss: the normalization has no offset. (Its outputs
    # come from two compiled programs, the data's and the loss's, which may round
    # differently: ~1e-32 = (1e-16)², not an offset.)
    assert _loss(losses.mse(data), teacher) < 1e-30
    with pytest.raises(ValueError, match="shape"):
        losses.mse(data)(lambda x: jnp.zeros(3))


@pytest.fixture(scope="module")
def binary():
    data = datasets.circles(N_BINARY, key=jax.random.key(0))
    model = MLP(BINARY_MODEL, key=jax.random.key(1))
    return data, model


def test_exponential_and_logistic(binary):
    data, model = binary
    f = _outputs(model, data.x)[:, 0]
    s = 2.0 * np.asarray(data.y) - 1.0
    # Means of 61 O(1) terms in float64: rounding only.
    ref = np.mean(np.exp(-s * f))
    assert _loss(losses.exponential(data), model) == pytest.approx(ref, rel=1e-12)
    ref = np.mean(np.log1p(np.exp(-s * f)))
    assert _loss(losses.logistic(data), model) == pytest.approx(ref, rel=1e-12)
    # Targets already ±1 (as float (n, 1) targets) give the same loss.
    pm = Dataset(data.x, s[:, None])
    assert _loss(losses.exponential(pm), model) == pytest.approx(np.mean(np.exp(-s * f)), 1e-12)


def test_logistic_is_stable_for_large_margins(binary):
    data, model = binary
    big = eqx.tree_at(lambda m: m.weights[-1], model, model.weights[-1] * 1e4)
    f = _outputs(big, data.x)[:, 0]
    s = 2.0 * np.asarray(data.y) - 1.0
    assert np.max(np.abs(f)) > 800  # exp(800) overflows float64: the naive formula fails
    value = _loss(losses.logistic(data), big)
    # np.logaddexp is the stable reference; large O(1e3) terms, float64 rounding.
    assert value == pytest.approx(np.mean(np.logaddexp(0.0, -s * f)), rel=1e-12)


def test_binary_loss_errors(binary, small_digits):
    data, _ = binary
    with pytest.raises(ValueError, match="scalar output"):
        losses.exponential(data)(lambda x: jnp.zeros(2))
    with pytest.raises(ValueError, match="binary"):
        losses.logistic(small_digits)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        losses.exponential(Dataset(data.x, np.full((N_BINARY, 1), 0.5)))


def test_cross_entropy_errors(small_digits):
    reg = Dataset(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="integer class labels"):
        losses.cross_entropy(reg)
    with pytest.raises(ValueError, match="Dataset"):
        losses.cross_entropy((np.zeros((3, 2)), np.zeros(3, int)))
    with pytest.raises(ValueError, match="10 logits"):
        losses.cross_entropy(small_digits)(lambda x: x[:3])


def _numpy_lp(arrays, p, lam):
    return lam / p * sum(np.sum(np.abs(np.asarray(a)) ** p) for a in arrays)


def test_penalties(classifier):
    model = eqx.tree_at(
        lambda m: m.biases, classifier, tuple(jnp.full(b.shape, 0.3) for b in classifier.biases)
    )
    w, b = model.weights, model.biases
    # Sums of a few hundred O(1) squares or powers in float64: rounding only.
    rel = 1e-12
    ref = 0.5 * 1e-2 * sum(np.sum(np.asarray(a) ** 2) for a in w)
    assert _loss(losses.l2(1e-2), model) == pytest.approx(ref, rel=rel)
    ref_b = ref + 0.5 * 1e-2 * sum(np.sum(np.asarray(a) ** 2) for a in b)
    assert _loss(losses.l2(1e-2, include_bias=True), model) == pytest.approx(ref_b, rel=rel)
    for p in (1, 2.5):
        assert _loss(losses.lp(p, 0.7), model) == pytest.approx(_numpy_lp(w, p, 0.7), rel=rel)
        assert _loss(losses.lp(p, 0.7, include_bias=True), model) == pytest.approx(
            _numpy_lp(w + b, p, 0.7), rel=rel
        )
    assert _loss(losses.lp(2, 0.3), model) == pytest.approx(_loss(losses.l2(0.3), model), rel)
    # Any other pytree: every inexact array leaf, nothing else.
    tree = {"a": jnp.array([1.0, -2.0]), "b": (jnp.array([[3.0]]), jnp.array([7]))}
    assert float(losses.l2(2.0)(tree)) == pytest.approx(14.0, rel=1e-15)  # exact arithmetic
    assert float(losses.lp(1, 1.0)(tree)) == pytest.approx(6.0, rel=1e-15)  # exact arithmetic


def test_penalty_gradient_at_zero_is_finite():
    grads = jax.grad(losses.lp(1, 1.0))(jnp.array([0.0, 2.0, -3.0]))
    np.testing.assert_array_equal(grads, [0.0, 1.0, -1.0])  # sign(w), with sign(0) = 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: losses.lp(0.5), "`p`"),
        (lambda: losses.lp(2, -1.0), "`lam`"),
        (lambda: losses.l2(float("nan")), "`lam`"),
        (lambda: losses.total(), "at least one"),
        (lambda: losses.total(lambda w: 0.0), "AbstractLoss"),
        (lambda: losses.rotational_toy(0.0), "radius"),
    ],
)
def test_loss_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_total(binary):
    data, model = binary
    parts = [losses.logistic(data), losses.l2(1e-2), losses.lp(1, 1e-3)]
    values = [_loss(term, model) for term in parts]
    summed = losses.total(*parts)
    assert isinstance(summed, losses.Sum)
    assert _loss(summed, model) == pytest.approx(sum(values), rel=1e-14)  # three additions
    via_add = parts[0] + parts[1] + parts[2]
    assert len(via_add.terms) == 3  # nested sums are flattened
    assert _loss(via_add, model) == pytest.approx(sum(values), rel=1e-14)  # three additions


@pytest.mark.parametrize("radius", [1.0, 2.0])
def test_rotational_toy(radius):
    loss = losses.rotational_toy(radius)
    w = jnp.array([0.5, 0.5, 0.5])
    sq = 0.75
    # Exact closed forms; float64 rounding of a handful of operations.
    assert float(loss(w)) == pytest.approx((sq - radius**2) ** 2, rel=1e-14)
    np.testing.assert_allclose(jax.grad(loss)(w), 4 * (sq - radius**2) * np.asarray(w), rtol=1e-14)
    on_sphere = radius * jnp.array([0.6, 0.0, 0.8])
    assert abs(float(loss(on_sphere))) < 1e-14  # a minimum up to rounding of |w|² = r²


def test_losses_share_compiled_function():
    traces = []

    @eqx.filter_jit
    def evaluate(loss, model):
        traces.append(None)  # runs only while tracing
        return loss(model)

    model = MLP((64, 12, 10), key=jax.random.key(4))
    a = losses.cross_entropy(datasets.digits(N_DIGITS, key=jax.random.key(0)))
    b = losses.cross_entropy(datasets.digits(N_DIGITS, key=jax.random.key(1)))
    va, vb = evaluate(a, model), evaluate(b, model)
    assert len(traces) == 1
    assert float(va) != float(vb)  # the data really are different arguments
    # Penalties with different λ also share one trace: λ is an array field.
    evaluate(losses.l2(1.0), model)
    evaluate(losses.l2(2.0), model)
    assert len(traces) == 2
    # Control: different data shapes do retrace, so the counter can detect a trace.
    evaluate(losses.cross_entropy(datasets.digits(60)), model)
    assert len(traces) == 3


def test_swish_betas_not_penalized():
    model = MLP(BINARY_MODEL, Swish(beta=5.0), key=jax.random.key(0))
    ref = 0.5 * sum(np.sum(np.asarray(a) ** 2) for a in model.weights)
    # The penalty is on weights only; β_i = 5 would add 0.5·10·25 = 125 if counted.
    assert _loss(losses.l2(1.0), model) == pytest.approx(ref, rel=1e-13)
