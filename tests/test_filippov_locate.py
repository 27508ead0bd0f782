"""How the Filippov mode finds its switches: one switching component evaluated on its
own, and the root-finding bracket at a step's start. (One retry per crossing under a
projection is checked in tests/test_filippov.py, on a solve compiled there anyway; steps
cut at crossings in tests/test_projection.py.)"""

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
    t_c, _, _ = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
    assert float(t_c) == 0.5
    # a component >= 0 at the start is root-found inside the step as before
    interp = _Line(t0, jnp.asarray(0.03), jnp.asarray(-1.0))
    t_c, _, tau = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
    np.testing.assert_allclose(float(t_c), 0.53, rtol=0, atol=1e-12)
    assert float(tau) == 0.0  # a trigger without a noise level


class _NoisyCrossing(CrossingTrigger):
    def noise(self, y):
        return jnp.asarray(1e-12)


def test_a_crossing_is_reached_only_beyond_its_rounding_time():
    # τ = noise/|φ̇|: the slope of the crossing component from its root to the sample
    # past it (here exactly 4)
    trigger = _NoisyCrossing(lambda t, y: y, direction=False)
    t0, t1 = jnp.asarray(0.5), jnp.asarray(0.7)
    for y0 in (0.03, 0.15):  # crossing in the first sample interval, then the third
        interp = _Line(t0, jnp.asarray(y0), jnp.asarray(-4.0))
        t_c, _, tau = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
        np.testing.assert_allclose(float(t_c), 0.5 + y0 / 4, rtol=0, atol=1e-12)
        np.testing.assert_allclose(float(tau), 1e-12 / 4, rtol=1e-9)
    # no crossing: no time
    interp = _Line(t0, jnp.asarray(1.0), jnp.asarray(-1.0))
    t_c, _, tau = trigger.locate(t0, t1, interp, jnp.array([True]), ACTION_ROOT_FINDER)
    assert np.isinf(float(t_c)) and float(tau) == 0.0


def test_the_sliding_system_on_the_sliding_examples_equals_the_full_one():
    # Gradient flow is affine in the loss: the multiplier system's residual, Jacobian
    # and field evaluated on the slots' examples alone (`SlotSystem`) equal the ones
    # on all 40 examples. Slots: two pairs of example 3 (units 0 and 1 of the first
    # hidden layer, so that example enters L_S once) and a second-layer pair of
    # example 3 (downstream of the first two: its ż reads their multipliers), one of
    # example 11; a fifth slot free.
    from dynamics._filippov._system import FullSystem, SlotSystem

    model, loss = relu_network()
    w, static = eqx.partition(model, eqx.is_inexact_array)
    switching = Filippov(max_sliding=5).build(Problem(dyn.GradientFlow(), loss, static),
                                              True, w).switching
    # (40 examples: a solve would use the full system, `by_slots`; the two are compared
    # here directly)
    width, n = 7, 40
    pairs = jnp.array([3 * width, 3 * width + 1, n * width + 3 * 6 + 2, 11 * width + 4, -1.0])
    mode = eqx.tree_at(lambda m: m.slots, switching.init(w), pairs)
    s0, s = jnp.array([0.5, 0.3, 0.8, 0.2, 0.5]), jnp.array([0.1, 0.9, 0.4, 0.6, 0.5])
    full, slot = FullSystem(switching, 0.0, w, mode), SlotSystem.build(switching, 0.0, w, mode, s0)
    # rounding of sums over 40 examples against sums over 2, then a difference of two
    # such sums: a few ulps of the gradient's scale (~1)
    np.testing.assert_allclose(slot.residual(s), full.residual(s), rtol=0, atol=1e-13)
    np.testing.assert_allclose(_flat(slot.rate(s)), _flat(full.rate(s)), rtol=0, atol=1e-13)
    np.testing.assert_allclose(switching._jacobian(slot, s), switching._jacobian(full, s),
                               rtol=0, atol=1e-12)
    assert np.abs(full.residual(s) - full.residual(s0)).max() > 1e-3  # s matters


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


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
