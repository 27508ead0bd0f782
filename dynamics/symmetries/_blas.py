"""One BLAS thread for the counting code's dense linear algebra.

`count_conservation_laws` and `known_count` alternate XLA computations (the bracket and
Jacobian values) with NumPy SVDs and ranks. Right after an XLA computation, a
multi-threaded OpenBLAS call waits for threads that XLA's own pool keeps busy: on a
2-core machine a 64 × 624 SVD took 0.5–0.8 s there against 3 ms with one thread (and
5–25 ms with two threads in a process that had not run XLA). The matrices are small,
so one thread loses nothing; the limit holds only inside these functions, not for the
user's own NumPy work.
"""

import functools
from collections.abc import Callable

from threadpoolctl import threadpool_limits


def single_threaded_blas(fn: Callable) -> Callable:
    """`fn`, run with the BLAS libraries limited to one thread (module docstring)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapped
