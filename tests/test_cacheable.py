"""`simulate`'s compiled solve carries no host callback, so JAX's persistent compilation
cache stores it (the suite's conftest relies on it: a program compiled by one test or
xdist worker is read back by the next), while diffrax's checks stay on outside it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

import dynamics as dyn
from dynamics._driver._cacheable import no_redundant_ts_checks


def _loss():  # a new closure each call: the in-memory jit cache misses, the disk cache not
    x = jnp.linspace(-1.0, 1.0, 5)
    return lambda w: jnp.sum((w * x - 0.3) ** 2)


def test_second_solve_of_the_same_program_is_read_from_the_cache():
    events = []

    def listen(event, **kwargs):
        events.append(event)

    monitoring.register_event_listener(listen)
    try:
        runs = [dyn.simulate(dyn.GradientFlow(), jnp.array(2.0), _loss(), t1=1.0,
                             ts=jnp.linspace(0.0, 1.0, 3)) for _ in range(2)]
    finally:
        monitoring.unregister_event_listener(listen)
    np.testing.assert_array_equal(runs[0].final_params, runs[1].final_params)
    assert "/jax/compilation_cache/cache_hits" in events


def test_diffrax_checks_stay_on_outside_simulate():
    msg = "saveat.ts must lie between t0 and t1."
    check = jax.jit(lambda ts: eqx.error_if(ts, ts > 1.0, msg))
    with pytest.raises(Exception, match="must lie between"):
        jax.block_until_ready(check(jnp.array([0.5, 2.0])))
    with no_redundant_ts_checks():  # only inside simulate's solve
        skipped = jax.jit(lambda ts: eqx.error_if(ts, ts > 1.0, msg) + 0.0)
        assert float(skipped(jnp.array([0.5, 2.0]))[1]) == 2.0
    other = jax.jit(lambda ts: eqx.error_if(ts, ts > 1.0, "another check") * 1.0)
    with no_redundant_ts_checks(), pytest.raises(Exception, match="another check"):
        jax.block_until_ready(other(jnp.array([0.5, 2.0])))
