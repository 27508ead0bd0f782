"""Figures from runs: `from dynamics import plot; plot.plot_loss({"GF": traj})`.

Kept out of `dynamics/__init__` so that importing the library does not import matplotlib.
"""

from ._plot import (
    plot_drift as plot_drift,
    plot_layer_norms as plot_layer_norms,
    plot_loss as plot_loss,
    plot_monitor as plot_monitor,
    plot_trajectory_3d as plot_trajectory_3d,
    positions as positions,
    series as series,
)
from ._work_precision import plot_work_precision as plot_work_precision
