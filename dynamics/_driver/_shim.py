"""What the two diffrax shims of the solve share (`_cacheable`, `_clip_floor`): each
replaces one private name of equinox or diffrax, once per process, by a wrapper that
acts only while a context variable is set, in the thread that set it, and otherwise
calls what it replaced."""

import contextlib
import contextvars
import functools


def once(install):
    """`install` runs on the first call only (a patch is applied once per process)."""
    return functools.cache(install)


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value):
    """Within: `var` holds `value` in this thread (and contexts copied from it)."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
