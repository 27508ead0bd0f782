"""Keep the compiled solve free of host callbacks, so that JAX's persistent compilation
cache can store it.

`diffrax.diffeqsolve` checks its traced inputs on the device with `eqx.error_if`
("saveat.ts must be increasing ...", "... must lie between t0 and t1.", and with a
`dt0`, "Must have (t1 - t0) * dt0 >= 0 ..."); in equinox's default `raise` mode each
check is a `jax.pure_callback`, and JAX never writes an executable with a host callback
to its persistent cache ("Not writing persistent cache entry ... because it uses host
callbacks"). So every `simulate` compiled anew in every process, cache or not.
`simulate` validates these on the host before the solve (`_prepare.prepare`: t1 > t0,
dt0 > 0; `_validate_ts`: strictly increasing, inside [t0, t1], clipped there), so these
device checks can never fire on its runs: inside `no_redundant_ts_checks()` exactly
those three messages are skipped, in this thread only (a `ContextVar`), and every other
`error_if` (a linear solve's, a root find's) keeps its mode. Measured: a second
`simulate` of the same program that misses the in-memory cache (a new loss closure,
another process or xdist worker) now reads the executable from disk (an ND solve with
four monitors, tests/test_symmetry_monitors.py: XLA compilation 4.0 -> 0.7 s, the run
4.3 -> 1.9 s CPU; tracing still repeats).

If equinox's private hook moves, nothing is patched and solves simply are not cached.
"""

import contextvars

from ._shim import once, scoped

# diffrax 0.7.2, diffrax/_integrate.py: `_check_subsaveat_ts`, and the dt0 check (its
# message carries the values, hence a prefix).
_REDUNDANT = frozenset({"saveat.ts must be increasing or decreasing.",
                        "saveat.ts must lie between t0 and t1."})
_REDUNDANT_PREFIX = "Must have (t1 - t0) * dt0 >= 0"
_ACTIVE = contextvars.ContextVar("dynamics_skip_ts_checks", default=False)


@once
def _install() -> None:
    try:
        from equinox import _errors
    except ImportError:  # pragma: no cover - equinox reorganised
        return
    impl = getattr(_errors, "branched_error_if_impl_jit", None)
    if impl is None:  # pragma: no cover
        return

    def skipping(x, pred, index, msgs, *, on_error):
        if _ACTIVE.get() and len(msgs) == 1 and (
                msgs[0] in _REDUNDANT or msgs[0].startswith(_REDUNDANT_PREFIX)):
            return x
        return impl(x, pred, index, msgs, on_error=on_error)

    _errors.branched_error_if_impl_jit = skipping


def no_redundant_ts_checks():
    """Within: diffrax's device-side checks of `SaveAt` ts and of dt0's sign are left out
    of the trace (the caller has checked them on the host)."""
    _install()
    return scoped(_ACTIVE, True)
