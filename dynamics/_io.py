"""Writing results: netCDF, atomically, so a crash never leaves a corrupt file."""

import os
import secrets
from pathlib import Path

import xarray as xr


def save(obj, path: str | os.PathLike) -> Path:
    """Write a `Trajectory` (via `to_xarray()`), an `xarray.Dataset` or an
    `xarray.DataTree` (one netCDF group per node; read it back with
    `xarray.open_datatree`) to netCDF.

    The file is written to a temporary name in the target directory and renamed into
    place (`os.replace` is atomic on POSIX), so readers see the old file or the new
    one, never half of one. Returns the path written.
    """
    if hasattr(obj, "to_xarray"):
        obj = obj.to_xarray()
    if not isinstance(obj, xr.Dataset | xr.DataTree):
        raise ValueError(
            f"`obj` must be a dyn Trajectory, an xarray.Dataset or an xarray.DataTree, got "
            f"{type(obj).__name__}."
        )
    path = Path(path)
    if path.suffix not in (".nc", ".nc4", ".h5"):
        raise ValueError(f"`path` should end in .nc (netCDF), got {str(path)!r}.")
    if path.is_dir():
        raise ValueError(f"`path` {str(path)!r} is a directory; give a file path, e.g. "
                         f"{str(path / 'run.nc')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"`path` {str(path)!r}: a part of its folder is a file, not a "
                         "directory; give another path.") from None
    # A fresh name that the writer creates itself, so the file gets the usual permissions
    # (umask) rather than mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        obj.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> xr.Dataset | xr.DataTree:
    """Read a netCDF file written by `save` fully into memory: an `xarray.Dataset`, or an
    `xarray.DataTree` when the file has groups (several runs, as the studies write)."""
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        tree = tree.load()
    return tree if tree.children else tree.to_dataset()
