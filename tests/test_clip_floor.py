"""Diffrax's t1 − 100 ulps, computed from the bits (`dynamics._driver._clip_floor`): the
same value as the chained `prevbefore`, bit for bit, and a much smaller program."""

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics._driver._clip_floor import fast_clip_floor, steps_below


def _chain(x, k):
    for _ in range(k):
        x = eqxi.prevbefore(x)
    return x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_steps_below_is_the_chain_bit_for_bit(dtype):
    fi = np.finfo(dtype)
    # Zeros, normals of both signs, the binade edges, the extremes, and the denormal
    # range where the chain itself runs (a positive x within k ulps of tiny).
    xs = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 0.3, -0.3, 1e8, 1e8 + 1, fi.tiny,
                   1.5 * fi.tiny, 100 * fi.tiny, -fi.tiny, fi.max, -fi.max,
                   fi.smallest_subnormal, 3 * fi.smallest_subnormal, np.inf], dtype)
    uint = np.uint64 if dtype == np.float64 else np.uint32
    for k in (1, 2, 100):
        ref = np.asarray(jax.jit(jax.vmap(lambda x: _chain(x, k)))(xs))
        got = np.asarray(jax.jit(jax.vmap(lambda x: steps_below(x, k)))(xs))
        np.testing.assert_array_equal(got.view(uint), ref.view(uint), err_msg=f"k={k}")


def _solve(t1):
    term = diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t))
    return diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, t1, None, jnp.array([1.0, 2.0]),
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 5) * t1),
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        adjoint=diffrax.ForwardMode(), throw=False).ys


def test_a_solve_is_the_same_and_its_program_smaller():
    plain = jax.jit(_solve)

    def lean(t1):
        with fast_clip_floor():
            return _solve(t1)

    lean = jax.jit(lean)
    for t1 in (1.0, 0.3, 1e8 + 1.0, 7.0):
        np.testing.assert_array_equal(lean(t1), plain(t1))  # the same value: bitwise
    # ~1,500 scalar operations of the hundred chained nextafter calls are gone; if a
    # new diffrax moved the chain, the shim stays out and this says so.
    size = {name: f.lower(1.0).compile().as_text().count(" = ")
            for name, f in (("plain", plain), ("lean", lean))}
    assert size["plain"] - size["lean"] > 1000, size
