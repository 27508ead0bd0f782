"""How the Filippov mode finds its switches: one switching component evaluated on its
own, and the root-finding bracket at a step's start. (One retry per crossing is
checked in tests/test_filippov.py, on a solve compiled there anyway.)"""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import dynamics as dyn
from dynamics._driver._actions import ACTION_ROOT_FINDER
from dynamics._driver._triggers import CrossingTrigger
from dynamics._filippov import Filippov
from dynamics._problem import Problem

sys.path.insert(0, str(Path(__file__).parent))
from _filippov_reference import relu_network  # noqa: E402


def test_one_component_equals_the_full_switching_values():
    model, loss = relu_network()
    w, static = eqx.partition(model, eqx.is_inexact_array)
    switching = Filippov(max_sliding=4).build(Problem(dyn.GradientFlow(), loss, static),
                                              True, w).switching
    mode = switching.init(w)
    n_all = switching.surfaces.num_pairs + 2 * switching.max_sliding
    one = jax.jit(jax.vmap(lambda c, m: switching.value(0.0, w, m, c), in_axes=(0, None)))
    full = switching.values(0.0, w, mode)
    # no pair slides: every pair by its own example's forward pass (a different
    # summation order than the batched one: a few ulps of the pre-activations' scale)
    got = one(jnp.arange(n_all), mode)
    finite = np.isfinite(full)
    np.testing.assert_allclose(got[finite], full[finite], rtol=0, atol=1e-14)
    assert np.array_equal(np.isfinite(got), finite)
    # two pairs of example 3 slide (hidden layer 0, units 0 and 1): that example's
    # second-layer pairs read their multipliers (the full path: `values` itself), the
    # same example's other first-layer pairs and every other example do not, and
    # take the cheap one. (Two pairs put in slots off their surfaces: a multiplier
    # system without meaning, so only the pairs that do not read it are compared.)
    width, n = 7, 40
    sliding = eqx.tree_at(lambda m: m.slots, mode,
                          mode.slots.at[:2].set(jnp.array([3 * width, 3 * width + 1.0])))
    full = switching.values(0.0, w, sliding)
    got = one(jnp.arange(n_all), sliding)
    layer1 = n * width + 3 * 6 + np.arange(6)  # example 3's second-layer pairs
    cheap = np.setdiff1d(np.arange(switching.surfaces.num_pairs),
                         np.r_[3 * width, 3 * width + 1, layer1])
    np.testing.assert_allclose(got[cheap], full[cheap], rtol=0, atol=1e-14)
    assert np.isinf(got[3 * width]) and np.isinf(got[3 * width + 1])  # sliding: +inf


class _Line(eqx.Module):
    """A dense output y(t) = y0 + slope·(t − t0)."""

    t0: jax.Array
    y0: jax.Array
    slope: jax.Array

    def evaluate(self, t):
        return self.y0 + self.slope * (t - self.t0)


def test_a_component_already_below_zero_at_the_start_crosses_there():
    # Eligible (>= 0 when the last step ended) yet a rounding below 0 at this step's
    # start: it crossed at t0. The bracket [t0, first sample] has no sign change, and
    # the root-finding used to return a point inside it (a switch found 3e-4 late on
    # the digits MLP).
    trigger = CrossingTrigger(lambda t, y: y, direction=False)
    t0, t1 = jnp.asarray(0.5), jnp.asarray(0.7)
    interp = _Line(t0, jnp.asarray(-1e-16), jnp.asarray(-1.0))
    t_c, _ = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
    assert float(t_c) == 0.5
    # a component >= 0 at the start is root-found inside the step as before
    interp = _Line(t0, jnp.asarray(0.03), jnp.asarray(-1.0))
    t_c, _ = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
    np.testing.assert_allclose(float(t_c), 0.53, rtol=0, atol=1e-12)


def test_packed_pattern_round_trips_and_survives_zero_increments():
    """The pattern rides in the solver state as bits packed into float words: unpacking
    gives the 0/1 entries back for any length (a partial last word included), and the
    arithmetic a Runge–Kutta step does with a zero derivative (y + h·Σ aᵢⱼ·0) leaves
    every word bit for bit."""
    from dynamics._filippov._state import pack_bits, unpack_bits

    rng = np.random.default_rng(0)
    for n in (1, 52, 53, 1000, 16_384):
        high = jnp.asarray(rng.integers(0, 2, n), jnp.float64)
        words = pack_bits(high)
        assert words.shape == (-(-n // 52),)
        np.testing.assert_array_equal(unpack_bits(words, n), high)
        moved = words + 0.37 * (0.2 * jnp.zeros_like(words) + 0.8 * jnp.zeros_like(words))
        np.testing.assert_array_equal(moved, words)
