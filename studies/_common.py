"""Scaffolding every study repeats: output folders, progress lines, figure style and
saving, the netCDF tree, the float64 guard. Not a study (the leading underscore keeps
it out of `dynamics list`)."""

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import matplotlib
import xarray as xr
from matplotlib.figure import Figure

import dynamics as dyn

__all__ = ["DPI", "RC", "folders", "known_kinks", "require_x64", "save_figures", "save_tree",
           "say", "step_note", "timed"]

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


@contextlib.contextmanager
def known_kinks():
    """Silence `dyn.ChatteringWarning` for runs that integrate a ReLU net at a loose
    tolerance on purpose (the study's figure states the tolerance; `timed` reports the
    rejected steps in its progress line instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dyn.ChatteringWarning)
        yield


def step_note(result) -> str:
    """'   N steps (M rejected)' for a `Trajectory` from an adaptive solve, else ''."""
    stats = getattr(result, "stats", {}) or {}
    if "num_steps" not in stats:
        return ""
    rejected = stats.get("num_rejected_steps", 0)
    return f"{stats['num_steps']:>7} steps" + (f" ({rejected} rejected)" if rejected else "")


def timed(label: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) under `known_kinks`, with a progress line giving its wall time
    (and steps when the result is a `Trajectory`)."""
    start = time.perf_counter()
    with known_kinks():
        result = fn(*args, **kwargs)
    say(f"{label:<40}{step_note(result)}  {time.perf_counter() - start:6.1f} s")
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
