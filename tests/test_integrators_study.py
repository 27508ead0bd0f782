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
    # A slope is given only from the asymptotic regime: none of the -15 kind.
    for name in ("wp_gf_tanh", "wp_gf_relu", "wp_toy"):
        slopes = tree[name].to_dataset()["slope"].values
        assert np.all(np.isnan(slopes) | ((slopes < -0.5) & (slopes > -9))), (name, slopes)
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


def _wp(errors, evals, reference_error=np.nan):
    """A work-precision Dataset of one adaptive method, as dyn.work_precision gives."""
    n = len(errors)
    return xr.Dataset(
        {"error": (("solver", "setting"), [errors]),
         "grad_evals": (("solver", "setting"), [evals]),
         "tolerance": (("solver", "setting"), [10.0 ** -np.arange(3, 3 + n)]),
         "dt": (("solver", "setting"), [np.full(n, np.nan)]),
         "finished": (("solver", "setting"), [np.ones(n, bool)])},
        coords={"solver": ["Tsit5"], "setting": np.arange(n)},
        attrs={"reference_error": reference_error})


def test_slopes_only_from_the_asymptotic_regime():
    """Three quick Tsit5 points whose cost barely moves (31, 37, 49 evaluations) were
    printed as "slope -15.1"; a slope needs three asymptotic points and a narrow fit."""
    from studies._integrators_runs import slope

    integrators = studies.load("integrators")
    quick = _wp([5.7e-2, 1.2e-3, 5.3e-6], [31.0, 37.0, 49.0])
    assert np.isnan(slope(quick, "Tsit5"))
    # Order 2 at fixed cost ratios: measured, also with a coarse pre-asymptotic point.
    n = np.array([10.0, 40.0, 80.0, 160.0, 320.0])
    e = 3.0 * n ** -2.0
    e[0] = 0.5  # above 0.1: pre-asymptotic
    assert abs(slope(_wp(e, n), "Tsit5") + 2.0) < 1e-6
    # Points below the reference's own error are neither fitted nor drawn.
    with_floor = _wp(e, n, reference_error=2e-4)
    assert np.isnan(slope(with_floor, "Tsit5"))  # two asymptotic points left
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    with_floor["slope"] = ("solver", [np.nan])
    assert integrators._wp_axes(ax, with_floor, "t") == 2
    (line,) = ax.get_lines()
    assert np.all(line.get_xdata() >= 2e-4) and len(line.get_xdata()) == 3
    assert "2 at the reference's error" in line.get_label()
    assert ax.get_legend().get_texts()[0].get_fontsize() >= 8
