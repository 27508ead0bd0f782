"""The edge-of-stability study in quick mode: it runs, writes its files, and its central
flow holds the sharpness at 2/η where gradient flow sharpens past it (the full mode's
numbers are in docs/studies.md)."""

import xarray as xr

import studies


def test_edge_of_stability_quick(tmp_path):
    written = studies.load("edge-of-stability").run(tmp_path, quick=True)
    assert written["loss_sharpness"].stat().st_size > 10_000
    ds = xr.open_datatree(written["results"])["eta_0.9"].to_dataset()
    edge = ds.attrs["edge"]
    assert ds.attrs["onset_step"] < 60  # GD reaches the edge early (measured: step 25-35)
    late = ds["save"] >= 60
    # The central flow on the edge: its top eigenvalue at 2/η to the relaxation's lag
    # (τ = 1 step) and the solve's tolerance (rtol 1e-5); 1e-3 relative.
    cf = ds["central_sharpness"].where(late, drop=True)
    assert float(abs(cf - edge).max()) < 1e-3 * edge
    # Gradient flow leaves it (measured +7% by step 100).
    assert float(ds["gradient_sharpness"][-1]) > 1.03 * edge
