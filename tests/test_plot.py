"""Plotting helpers: Figures with labelled axes and the lines they promise."""

import diffrax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn
from dynamics import plot


@pytest.fixture(scope="module")
def nd():
    """ND on the rotational toy: one small real Trajectory (one compilation)."""
    return dyn.simulate(
        dyn.NewtonianFlow(), jnp.array([0.5, 0.5, 0.5]), dyn.losses.rotational_toy(),
        v0=jnp.array([-2.0, 1.0, 1.0]), t1=2.0, ts=jnp.linspace(0.0, 2.0, 41),
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
        monitors=(dyn.monitors.Loss(), dyn.monitors.Energy()),
    )


def _layer_dataset(n=11, layers=3, scale=1.0):
    t = np.linspace(0.0, 1.0, n)
    norms = scale * (1.0 + np.outer(t, np.arange(1, layers + 1)))
    return xr.Dataset(
        {"layer_norms": (("time", "layer"), norms), "loss": ("time", np.exp(-t))},
        coords={"time": t},
    )


def _labelled(ax):
    return bool(ax.get_xlabel()) and bool(ax.get_ylabel())


def test_plot_loss_takes_trajectories_and_datasets(nd):
    fig = plot.plot_loss({"ND": nd, "ND from disk": nd.to_xarray()})
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert _labelled(ax)
    assert len(ax.lines) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ND", "ND from disk"]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), ax.lines[1].get_ydata())


def test_single_run_has_no_legend_unless_asked(nd):
    assert plot.plot_loss({"ND": nd}).axes[0].get_legend() is None
    assert plot.plot_loss({"ND": nd}, legend=True).axes[0].get_legend() is not None


def test_draws_into_given_axes(nd):
    fig = Figure()
    axes = fig.subplots(1, 2)
    assert plot.plot_loss({"ND": nd}, axes[1], title="loss") is fig
    assert len(axes[0].lines) == 0 and len(axes[1].lines) == 1
    assert axes[1].get_title() == "loss"


def test_plot_drift_is_logarithmic_and_skips_t0(nd):
    fig = plot.plot_drift({"a": nd, "b": nd})
    (ax,) = fig.axes
    assert _labelled(ax) and ax.get_yscale() == "log"
    assert len(ax.lines) == 2
    y = np.asarray(ax.lines[0].get_ydata(), dtype=float)
    assert np.isnan(y[0])  # |H(t0) − H(t0)| = 0 has no place on a log axis
    assert np.all(y[1:][np.isfinite(y[1:])] < 1e-6)


def test_plot_monitor_logy_masks_nonpositive():
    ds = xr.Dataset({"g": ("time", np.array([1.0, 0.0, 0.5]))}, coords={"time": [0.0, 1, 2]})
    fig = plot.plot_monitor({"r": ds}, "g", logy=True, ylabel="g")
    y = fig.axes[0].lines[0].get_ydata()
    assert np.isnan(y[1]) and fig.axes[0].get_ylabel() == "g"


def test_plot_layer_norms_one_line_per_run_and_layer():
    fig = plot.plot_layer_norms({"GF": _layer_dataset(), "ND": _layer_dataset(scale=2.0)},
                                colors={"GF": "tab:blue", "ND": "tab:orange"})
    (ax,) = fig.axes
    assert _labelled(ax)
    assert len(ax.lines) == 6
    assert len(ax.get_legend().get_texts()) == 6
    # colour per run, line style per layer
    assert {ln.get_color() for ln in ax.lines[:3]} == {"tab:blue"}
    assert len({ln.get_linestyle() for ln in ax.lines[:3]}) == 3


def test_plot_trajectory_3d(nd, tmp_path):
    fig = plot.plot_trajectory_3d(nd, title="ND", plane_normal=(0.0, 1.0, -1.0))
    (ax,) = fig.axes
    assert ax.name == "3d"
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_zlabel()
    assert ax.get_title() == "ND"
    assert len(ax.lines) == 1  # the path; sphere and plane are collections
    np.testing.assert_allclose(np.asarray(ax.lines[0].get_data_3d()).T, np.asarray(nd.params))
    fig.savefig(tmp_path / "traj.png", dpi=60)  # renders headless (Agg)
    assert (tmp_path / "traj.png").stat().st_size > 0
    # the same from an (n, 3) array
    assert len(plot.plot_trajectory_3d(np.asarray(nd.params), sphere=None).axes[0].lines) == 1


def test_errors_name_the_problem(nd):
    with pytest.raises(ValueError, match="grad_norm"):
        plot.plot_monitor({"ND": nd}, "grad_norm")
    with pytest.raises(ValueError, match="R³"):
        plot.plot_trajectory_3d(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="3-D"):
        plot.plot_trajectory_3d(nd, Figure().add_subplot())
    with pytest.raises(ValueError, match="not scalar"):
        plot.plot_monitor({"x": _layer_dataset()}, "layer_norms")
