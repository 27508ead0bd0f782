import os
import shutil
import tempfile

# One BLAS thread for the tests' NumPy/SciPy references. Right after an XLA computation
# a multi-threaded OpenBLAS call waits for threads that XLA's pool keeps busy (a 64 × 624
# SVD: 0.5-0.8 s against 3 ms on one thread, on 2 cores), and the suite alternates the
# two all the time (the counting tests took 44% less). Set before NumPy is loaded where
# possible (the xdist workers inherit it), and applied to what is loaded already.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

threadpool_limits(limits=1, user_api="blas")

# The numerical checks compare against NumPy/SciPy references at ~1e-12; that needs float64.
# `DYNAMICS_FLOAT32=1 pytest -m float32` runs instead the float32 subset (tests marked
# `float32`, tests/test_float32.py) in JAX's default precision, as a new user gets it;
# the Makefile's `test` target runs both.
FLOAT32 = os.environ.get("DYNAMICS_FLOAT32", "") not in ("", "0")
if not FLOAT32:
    jax.config.update("jax_enable_x64", True)
    # The float64 suite compiles a few hundred programs and runs most of them for well
    # under a second: LLVM's optimisation passes are a large part of XLA's compile time
    # and buy nothing there (quick studies: 10-20% less wall time). Set before the first
    # computation initialises the backend. No fast-math at any level, but rounding may
    # differ in the last bit between two programs computing the same thing (seen:
    # 1.9e-32 where two programs' teacher outputs were bitwise equal at -O2), so a test
    # that compares across programs allows for rounding. The float32 subset keeps the
    # default pipeline, so the optimised code is exercised too. A user's XLA_FLAGS win.
    # XLA's CPU fusion emitters (the MLIR path, jaxlib 0.10's default) take about as long
    # again as the rest of a solve's compilation; with the older elemental emitters a
    # ReLU MLP's ND simulate with four monitors takes 4.5 -> 2.9 s CPU, tracing included
    # (its results equal to ~1e-13 relative, rounding).
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

# Most of the suite's time is XLA compilation, and many tests compile the same program
# (the same flow, solver and monitors on a toy loss). A per-session on-disk cache lets a
# later test reuse the executable whenever the lowered program is identical (a new
# closure over the same data, or the other xdist worker). JAX skips programs with host
# callbacks: `simulate` keeps diffrax's redundant device-side input checks out of its
# solve for that (dynamics/_driver/_cacheable.py); a progress bar still disables it.
# Made by the controlling process and inherited by the xdist workers through the
# environment, so that both workers share it; removed by the controller at the end.
_CACHE = os.environ.get("DYNAMICS_TEST_JAX_CACHE") or tempfile.mkdtemp(
    prefix="dynamics-jax-cache-")
os.environ["DYNAMICS_TEST_JAX_CACHE"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "float32: runs only in the float32 subset (DYNAMICS_FLOAT32=1)"
    )


def pytest_collection_modifyitems(config, items):
    # Each test runs in the one precision it was written for.
    for item in items:
        marked = item.get_closest_marker("float32") is not None
        if marked and not FLOAT32:
            item.add_marker(pytest.mark.skip(reason="float32 subset: DYNAMICS_FLOAT32=1"))
        elif FLOAT32 and not marked:
            item.add_marker(pytest.mark.skip(reason="float64 test (DYNAMICS_FLOAT32 is set)"))


def pytest_sessionfinish(session, exitstatus):
    if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
        shutil.rmtree(_CACHE, ignore_errors=True)
