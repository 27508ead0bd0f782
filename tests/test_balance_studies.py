"""The balancing studies in quick mode: they run, write their files, and their numbers
agree with what the fixes guarantee."""

import numpy as np
import xarray as xr

from studies import baldi_balance, saul_minnorm


def test_saul_minnorm_quick(tmp_path):
    written = saul_minnorm.run(tmp_path, quick=True)
    assert all(p.exists() for p in written.values())
    ds = xr.open_dataset(written["results"])
    ratio = ds["ratio"].values
    assert ratio.shape == (3, 3, 3, saul_minnorm.UPDATES + 1)
    np.testing.assert_allclose(ratio[..., 0], 1.0, rtol=0, atol=0)  # ‖W0‖/‖W0‖ exactly
    # Monotone (Saul Thm 1) up to rounding of the sums, and below 1: He init is unbalanced.
    assert np.all(np.diff(ratio, axis=-1) <= 1e-14)
    assert np.all(ratio[..., -1] < 0.99)
    assert np.all(ds["min_ratio"].values <= ratio[..., -1] * (1 + 1e-12))
    assert np.all(ds["iterations_to_1e-6"].values >= 1)


def test_baldi_balance_quick(tmp_path):
    written = baldi_balance.run(tmp_path, quick=True)
    assert all(p.exists() for p in written.values())
    tree = xr.open_datatree(written["results"])
    # Full balancing every epoch: every neuron's ‖out‖/‖(in, b)‖ is 1 after the fix;
    # the fix stops at |λ − 1| < 1e-10, so the ratio λ⁴-close to 1 within ~1e-9.
    np.testing.assert_allclose(tree["toy"]["ratio_full"].values, 1.0, atol=1e-8)
    acc = tree["digits"]["test_accuracy"].values
    assert np.all((acc >= 0) & (acc <= 1))
    # A trained digits net beats chance (0.1) by far after a few GD epochs.
    assert acc[..., -1].mean() > 0.5
