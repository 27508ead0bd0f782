"""Diffrax's "t1 minus 100 ulps" in a few operations instead of 1,500.

`diffrax._integrate.loop` (diffrax 0.7.2, `_integrate.py` line 322) computes the
threshold past which a step is rounded to t1 as one hundred chained calls:

    t1_clip_floor = t1
    for _ in range(100):
        t1_clip_floor = eqxi.prevbefore(t1_clip_floor)

With `t1` a traced value (as in `simulate`, so that a new horizon does not compile
again) each call is a custom-JVP `nextafter` of ~15 XLA operations that no pass can
fold: ~1,500 scalar operations, about a third of the program of a small solve.
Measured on a 4-8-3 MLP with three monitors (Tsit5, PID): XLA compilation 0.70-0.82 ->
0.53-0.54 s and tracing with lowering 0.87-1.13 -> 0.69-0.75 s per solve; every
compiled `simulate` pays it once.

Inside `fast_clip_floor()`, diffrax's `prevbefore` calls are answered by the same
values computed from the integer representation: k steps of `prevbefore` from x are
x's bits minus k (x > 0) or plus k (x < 0, the magnitude grows), from ±0 the bits of
−tiny plus k − 1, saturating at −inf. That is exact wherever every intermediate is a
nonzero normal number. The hundredth value, the only one diffrax reads, is exact
everywhere (`steps_below`): where a positive t1 lies within 100 ulps of the smallest
normal, `prevbefore` steps through denormals that the CPU may flush to zero, and there
the chain itself runs, in a loop. The 99 values before it are the closed form alone
(two operations each, dead code). tests/test_clip_floor.py checks the value bit for
bit against the chain, and a solve against diffrax's own. Outside the context, and
with any diffrax other than 0.7.2, nothing changes.
"""

import contextvars

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._shim import once, scoped

_DIFFRAX = "0.7.2"
_CHAIN = 100  # diffrax 0.7.2's chain length: the call whose value it reads.


class _Chain:
    # The last value handed out, the chain's start, and how many steps it is from it.
    def __init__(self):
        self.last = None
        self.base = self.bits = self.step = None
        self.steps = 0


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("dynamics_clip_floor", default=None)


def _itype(dtype) -> np.dtype:
    # The signed integer type as wide as the float `dtype`.
    return np.dtype(f"int{8 * np.dtype(dtype).itemsize}")


def _bits(x):
    # x's bits as a signed integer of its width, and that integer type.
    itype = _itype(x.dtype)
    return lax.bitcast_convert_type(x, itype), itype


def _const(value, dtype):
    # A constant operand that lax takes as is (no jnp call to trace).
    return np.asarray(value, dtype=dtype)


def _const_bits(value, dtype):
    # The bits of a constant float, as a NumPy integer scalar.
    return _const(value, dtype).view(_itype(dtype))


def _closed(x, k: int):
    # k steps of prevbefore from x by integer arithmetic on its bits (lax only: this
    # runs a hundred times per trace). Exact unless the chain crosses into denormals.
    bits, itype = _bits(x)
    finfo = np.finfo(x.dtype)
    zero = _const(0, x.dtype)
    neg_inf = _const_bits(-np.inf, x.dtype)
    neg_tiny = _const_bits(-finfo.tiny, x.dtype)
    down = lax.select(lax.gt(x, zero), lax.sub(bits, _const(k, itype)),
                      lax.min(lax.add(bits, _const(k, itype)), neg_inf))
    from_zero = np.minimum(neg_tiny + np.asarray(k - 1, itype), neg_inf)
    out = lax.select(lax.eq(x, zero), lax.full_like(bits, from_zero), down)
    return lax.bitcast_convert_type(out, x.dtype)


def steps_below(x, k: int):
    """k chained `equinox.internal.prevbefore` of the scalar float `x`, exactly.

    **Arguments:** `x` a floating scalar (traced or not); `k` ≥ 1, a Python int.

    **Returns:** `prevbefore` applied k times to x, bit for bit: by integer arithmetic
    on its bits, and where a positive x reaches below the smallest normal within k
    steps (denormals, which the CPU may flush to zero in `prevbefore`'s test x == 0),
    by the chain itself in a loop that runs only there.
    """
    x = jnp.asarray(x)
    closed = _closed(x, k)
    bits, itype = _bits(x)
    tiny = _const_bits(np.finfo(x.dtype).tiny, x.dtype)
    exact = lax.bitwise_not(lax.bitwise_and(
        lax.gt(x, _const(0, x.dtype)), lax.lt(lax.sub(bits, _const(k, itype)), tiny)))

    def chain(_):
        import equinox.internal as eqxi
        return lax.fori_loop(0, k, lambda _, y: eqxi.prevbefore(y), x)

    return lax.cond(exact, lambda _: closed, chain, None)


class _Namespace:
    # `equinox.internal` as diffrax's `_integrate` sees it: every name forwarded, and
    # `prevbefore` answered in closed form inside `fast_clip_floor()`.
    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def prevbefore(self, x):
        chain = _ACTIVE.get()
        if chain is None:
            return self._module.prevbefore(x)
        if chain.last is not None and x is chain.last:
            chain.steps += 1
        else:
            x = jnp.asarray(x)
            bits, itype = _bits(x)
            # One step down in the bits: −1 above zero, +1 below (the magnitude grows).
            step = lax.select(lax.gt(x, _const(0, x.dtype)), _const(-1, itype),
                              _const(1, itype))
            chain.base, chain.bits, chain.step, chain.steps = x, bits, step, 1
        if chain.steps < _CHAIN:
            # Values diffrax 0.7.2 does not read (only the hundredth): two operations
            # each, the closed form on nonzero normal numbers.
            k = _const(chain.steps, chain.bits.dtype)
            chain.last = lax.bitcast_convert_type(lax.add(chain.bits, lax.mul(chain.step, k)),
                                                  chain.base.dtype)
        else:
            chain.last = steps_below(chain.base, chain.steps)
        return chain.last


@once
def _install() -> None:
    try:
        import diffrax
        from diffrax import _integrate
    except ImportError:  # pragma: no cover
        return
    if getattr(diffrax, "__version__", None) != _DIFFRAX or not hasattr(_integrate, "eqxi"):
        return  # pragma: no cover - another diffrax: leave it as it is
    _integrate.eqxi = _Namespace(_integrate.eqxi)


def fast_clip_floor():
    """Within: diffrax's t1 − 100 ulps threshold is traced as a few integer operations
    (the same value, bit for bit) instead of a hundred chained `prevbefore` calls."""
    _install()
    return scoped(_ACTIVE, _Chain())
