"""The Głuch & Urbanke studies in quick mode: they run, write their files, and the numbers
they record are the paper's laws (conserved quantities constant to the solver's
tolerance, bounds holding, the discrete algorithms visibly off the conserved values)."""

import numpy as np
import xarray as xr

import studies


def _files(written, keys):
    for key in keys:
        assert written[key].exists() and written[key].stat().st_size > 10_000, key
    return xr.open_datatree(written["results"])


def test_gu_homogeneous_quick(tmp_path):
    tree = _files(studies.load("gu-homogeneous").run(tmp_path, quick=True),
                  ("norms", "residuals"))
    gf = tree["flow/gf"].to_dataset()
    gap = gf["norm_gap"].values
    # GF conserves ‖W2‖² − ‖W3‖² (eq. 31). ReLU: Dopri5 at rtol 1e-6 (chattering on the
    # kinks rules out tighter in a quick test); measured 1e-9 relative, 1e-6 allowed.
    np.testing.assert_allclose(gap, gap[0], rtol=1e-6)
    # GD at η = 0.01 does not: each step moves it by η²(‖g2‖² − ‖g3‖²), measured 1.8e-3.
    gd = tree["discrete/gd"].to_dataset()["norm_gap"].values
    assert abs(gd[-1] - gd[0]) > 1e-4
    for name in ("gf", "nd", "nagf"):
        ds = tree[f"flow/{name}"].to_dataset()
        # eq. 30's residual is zero by construction: round-off (measured ≤ 2e-17)
        assert np.max(np.abs(ds["residual"].values)) < 1e-12, name
        assert ds["loss"].values[-1] < ds["loss"].values[0]
    nd = tree["flow/nd"].to_dataset()
    law = nd["charge_law"].values
    scale = np.abs(nd["pairing"].values).max()
    # The integrated law is the integration's test: measured ≤ 3e-9 relative at rtol 1e-6.
    assert np.max(np.abs(law - law[0])) < 1e-6 * scale
    assert scale > 1e-3  # ... and its terms are not trivially zero
    # eq. 34: S(t) − S(0) ≤ 4(L(0) − L*) t² from rest
    s, bound = nd["nd_bound"].values.T
    assert np.all(s - s[0] <= bound + 1e-12)
    # NAGF: E(t) + ∫(3/s)‖ẇ‖² stays E(0) (eq. 35), and E decreases
    e = tree["flow/nagf"].to_dataset()["energy_law"].values
    # rtol 1e-6 solve on ReLU kinks: measured 6e-6 relative (E itself falls by 15%)
    np.testing.assert_allclose(e[:, 1], e[0, 1], rtol=3e-5)
    assert np.all(np.diff(e[:, 0]) < 0)


def test_gu_p_homogeneous_quick(tmp_path):
    tree = _files(studies.load("gu-p-homogeneous").run(tmp_path, quick=True), ("gf",))
    sq = tree["gf"].to_dataset()["sq_norms"].values
    lhs, rhs = sq[0, 1] - sq[:, 1], 4.0 * (sq[0, 3] - sq[:, 3])
    assert np.abs(lhs).max() > 1e-2  # W2 moves ...
    # ... and 4× as much as W4 (p^k = 4): measured 3e-7 of max|lhs| at rtol 1e-6 (ReLU layers)
    assert np.max(np.abs(lhs - rhs)) < 1e-5 * np.abs(lhs).max()


def test_gu_rotation_quick(tmp_path):
    tree = _files(studies.load("gu-rotation").run(tmp_path, quick=True),
                  ("paths", "momentum"))
    nd = tree["nd"].to_dataset()
    ell = nd["angular_momentum"].values
    # w × ẇ at the start: (0, −3/2, 3/2); the paper prints (0, 3/2, −3/2), i.e. ẇ × w
    np.testing.assert_allclose(ell[0], [0.0, -1.5, 1.5], rtol=1e-14)
    # conserved by ND to the solve's 1e-10 (measured 1e-10 relative)
    np.testing.assert_allclose(ell, np.broadcast_to(ell[0], ell.shape), atol=1e-8)
    nagf = tree["nagf"].to_dataset()
    t, ell = nagf["time"].values, nagf["angular_momentum"].values
    q = t[:, None] ** 3 * ell  # t³ℓ (eq. 46), measured 1e-9 relative
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), atol=1e-8 * np.abs(q[0]).max())
    gf = tree["gf"].to_dataset()["angular_momentum"].values
    assert np.abs(gf).max() < 1e-14  # ∇L ∥ w: ℓ is round-off


def test_gu_linear_swish_bias_quick(tmp_path):
    from studies.gu_linear_swish_bias import drift

    written = studies.load("gu-linear-swish-bias").run(tmp_path, quick=True)
    tree = _files(written, ("laws",))
    for flow in ("GF", "ND", "NAGF"):
        ds = tree[flow.lower()].to_dataset()
        keys = [k[len("charge_law_"):] for k in ds.data_vars if k.startswith("charge_law_")]
        assert len(keys) == 6
        for key in keys:
            residual = np.abs(ds[f"residual_{key}"].values).max()
            assert residual < 1e-14, (flow, key, residual)  # exact symmetries: round-off
            if flow == "GF" and key.startswith("rotation"):
                continue  # antisymmetric ξ: no gradient-flow charge
            # smooth activations at rtol = atol = 1e-10: measured ≤ 8e-10 relative
            assert drift(ds["time"].values, ds, flow, key).max() < 1e-8, (flow, key)


def test_gu_time_symmetry_quick(tmp_path):
    tree = _files(studies.load("gu-time-symmetry").run(tmp_path, quick=True), ("speed",))
    ds = tree["nd"].to_dataset()
    peak = ds["mean_speed"].max("time").values
    bound = ds["bound"].values
    assert np.all(peak <= bound)  # eq. 49 at every save time and width
    assert np.all(np.diff(peak) < 0)  # wider nets move slower
    # slope of log peak against log width near −½ (measured −0.61 on 16, 64, 256)
    slope = np.polyfit(np.log(ds["width"].values), np.log(peak), 1)[0]
    assert -0.8 < slope < -0.35
    e = ds["energy"].values
    # H conserved; ReLU kinks limit Tsit5 at rtol 1e-9 to ~3e-6 relative
    np.testing.assert_allclose(e, np.broadcast_to(e[:, :1], e.shape), rtol=1e-5)


def test_conservation_laws_quick(tmp_path):
    """2 random linear and 2 random ReLU nets: every count with a closed form equals it,
    on clean rank gaps; the table, figure and netCDF are written. (The counts of 12
    more random nets against `known_count` are tests/test_symmetries.py's.)"""
    written = studies.load("conservation-laws").run(tmp_path, quick=True)
    ds = _files(written, ("counts",))["counts"].to_dataset()
    assert ds.sizes["net"] == 4 and set(ds["kind"].values) == {"linear", "relu"}
    known = ds["expected"].values >= 0
    assert known.sum() >= 3
    np.testing.assert_array_equal(ds["count"].values[known], ds["expected"].values[known])
    # threshold 1e-9 between the kept and dropped singular values, decades from both
    assert ds["smallest_kept"].min() > 1e-7 and ds["largest_dropped"].max() < 1e-11
    assert "| linear |" in written["table"].read_text()
