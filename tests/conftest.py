import shutil
import tempfile

import jax

# The numerical checks compare against NumPy/SciPy references at ~1e-12; that needs float64.
jax.config.update("jax_enable_x64", True)

# Most of the suite's time is XLA compilation, and many tests compile the same program
# (the same flow, solver and monitors on a toy loss). A per-session on-disk cache lets a
# later test reuse the executable whenever the lowered program is identical.
_CACHE = tempfile.mkdtemp(prefix="dynamics-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)
