"""Scaffolding every study repeats: output folders, progress lines, figure style and
saving, the netCDF tree, the float64 guard. Not a study (the leading underscore keeps
it out of `dynamics list`)."""

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import matplotlib
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

__all__ = ["DPI", "RC", "folders", "require_x64", "save_figures", "save_tree", "say", "timed"]

# Paper-sized type; every study's figures share it.
RC = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}
DPI = 120


def say(message: str) -> None:
    """One progress line (the CLI shows it while a study runs)."""
    print(f"  {message}", flush=True)


def timed(label: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), with a progress line giving its wall time (and step count
    when the result is a `Trajectory`)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    steps = getattr(result, "stats", {}) or {}
    extra = f"{steps['num_steps']:>7} steps" if "num_steps" in steps else ""
    say(f"{label:<40}{extra}  {time.perf_counter() - start:6.1f} s")
    return result


def require_x64(study: str, quick: bool = False, reason: str = "tight tolerances") -> None:
    """Studies that integrate to 1e-10 need float64; a quick float32 smoke run may not."""
    if not jax.config.read("jax_enable_x64") and not quick:
        raise RuntimeError(
            f"{study} needs float64 ({reason}): call "
            "jax.config.update('jax_enable_x64', True) first (the `dynamics` CLI does)."
        )


def folders(out: Path) -> tuple[Path, Path]:
    """(out/figures, out/results), the first created."""
    out = Path(out)
    figures, results = out / "figures", out / "results"
    figures.mkdir(parents=True, exist_ok=True)
    return figures, results


def save_figures(figures: Path, prefix: str,
                 builders: Mapping[str, Callable[[], Figure]]) -> dict[str, Path]:
    """Build each figure under the shared style and write figures/<prefix>_<key>.png."""
    written = {}
    with matplotlib.rc_context(RC):
        for key, build in builders.items():
            path = Path(figures) / f"{prefix}_{key}.png"
            build().savefig(path, dpi=DPI)
            written[key] = path
    return written


def save_tree(nodes: Mapping[str, xr.Dataset], path: Path, *, study: str, quick: bool,
              **attrs) -> Path:
    """Write the study's results as one netCDF file of groups (an `xarray.DataTree`),
    the root carrying the study's name, `quick` and `attrs`."""
    root = xr.Dataset(attrs={"study": study, "quick": int(quick), **attrs})
    return dyn.save(xr.DataTree.from_dict({"/": root, **dict(nodes)}), Path(path))
