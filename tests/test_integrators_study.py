"""The `integrators` study in quick mode: it runs, writes its figures and results, and
its numbers say what the study claims."""

import numpy as np
import pytest
import xarray as xr

import studies


# Slow: the quick mode compiles ~10 solves (126 s on the loaded 2-core machine, 234 s in
# one pytest run), over the 30 s budget. Its claims have fast tests of their own:
# orders (test_convergence.py), Verlet's bounded energy and Gauss–Legendre's charges to
# 1e-12 (test_solvers.py).
@pytest.mark.slow
def test_integrators_quick(tmp_path):
    written = studies.load("integrators").run(tmp_path, quick=True)
    for key in ("wp_gf", "wp_toy", "energy", "charges"):
        assert written[key].exists() and written[key].stat().st_size > 10_000
    tree = xr.open_datatree(written["results"])
    tanh = tree["wp_gf_tanh"].to_dataset()
    # Heun at fixed steps on the smooth (Tanh) network: error ∝ n^-2 (slope within 0.3:
    # three step sizes, the largest still outside the asymptotic range).
    assert abs(float(tanh["slope"].sel(solver="Heun")) + 2.0) < 0.3
    # Tsit5: a tighter tolerance gives a smaller error.
    err = tanh["error"].sel(solver="Tsit5").values
    assert np.all(np.diff(err) < 0)
    energy = tree["energy"].to_dataset()
    # Velocity Verlet's energy error stays bounded (no growth from the first half of the
    # run to the second, up to oscillation: factor < 1.5); Heun's grows.
    assert float(energy["growth"].sel(solver="VelocityVerlet")) < 1.5
    assert float(energy["growth"].sel(solver="Heun")) > 1.5
    charges = tree["charges"].to_dataset()["charge_drift"]
    # Gauss–Legendre keeps the quadratic rescaling charges to the stage solve's
    # tolerance (1e-12 is the bar); Heun at the same steps drifts far above it.
    gl = charges.sel(solver="GaussLegendre(2)").values
    assert np.all(gl < 1e-12) and np.all(charges.sel(solver="Heun").values > 1e-8)
