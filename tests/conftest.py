import jax

# The numerical checks compare against NumPy/SciPy references at ~1e-12; that needs float64.
jax.config.update("jax_enable_x64", True)
