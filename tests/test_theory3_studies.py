"""The Theory III studies in quick mode: they run, write their figures and results, and
the numbers they record say what the studies claim."""

import jax
import numpy as np
import pytest
import xarray as xr

import studies


def test_theory3_margin_quick(tmp_path):
    written = studies.load("theory3-margin").run(tmp_path, quick=True)
    for key in ("linear", "depth", "relu"):
        assert written[key].exists() and written[key].stat().st_size > 10_000
    tree = xr.open_datatree(written["results"])
    svm = tree.attrs["svm_margin"]
    gf = tree["linear/gf"].to_dataset()
    # The normalized margin rises toward the SVM margin and never exceeds it.
    margin = np.asarray(gf["margin"])
    assert np.all(np.diff(margin) > 0) and margin[-1] < svm + 1e-9
    # The same flow in two coordinate systems gives the same margins (tangent WN is GF
    # pulled back; standard WN and the ‖V‖ = 1 Lagrange flow coincide): both pairs at
    # the study's rtol 1e-9 agree to 1e-6.
    wn = np.asarray(tree["linear/wn_tangent"].to_dataset()["margin"])
    np.testing.assert_allclose(wn, margin, atol=1e-6)
    st = np.asarray(tree["linear/wn_standard"].to_dataset()["margin"])
    lm = np.asarray(tree["linear/lm_unit"].to_dataset()["margin"])
    np.testing.assert_allclose(lm, st, atol=1e-6)
    # Depth 2 grows its norm product faster than depth 1 from the same ρ(0) = 1.
    rho1 = np.asarray(tree["depth/K1"].to_dataset()["norm_product"])
    rho2 = np.asarray(tree["depth/K2"].to_dataset()["norm_product"])
    # (the first save is at t = 0.1, where ρ has moved by a few percent from 1)
    np.testing.assert_allclose([rho1[0], rho2[0]], 1.0, atol=0.1)
    assert rho2[-1] > rho1[-1]
    assert jax.config.read("jax_enable_x64")


def test_theory3_nmgd_quick(tmp_path):
    written = studies.load("theory3-nmgd").run(tmp_path, quick=True)
    for key in ("least_squares", "polynomial", "perturbed"):
        assert written[key].exists() and written[key].stat().st_size > 10_000
    tree = xr.open_datatree(written["results"])
    for seed in range(3):
        gd = tree[f"least_squares/gd_seed{seed}"].to_dataset()
        # GD never touches the null-space part (to roundoff over 2,000 steps) ...
        null = np.asarray(gd["null_space_component"])
        np.testing.assert_allclose(null, null[0], rtol=1e-10)
        # ... NMGD from the paper's n0 = 1 erases it at its first step, and from n0 = 100
        # shrinks it by Π(1 − n^(-0.9)) ≈ 0.01 over 2,000 steps.
        erased = np.asarray(
            tree[f"least_squares/nmgd_n01_seed{seed}"].to_dataset()["null_space_component"])
        assert erased[1:].max() < 1e-13  # (index 0 is the start itself)
        kept = np.asarray(
            tree[f"least_squares/nmgd_n0100_seed{seed}"].to_dataset()["null_space_component"])
        assert kept[-1] < 0.02 * kept[0]
    gd, nm = (tree[f"perturbed/{k}"].to_dataset() for k in ("gd", "nmgd"))
    # Perturb and retrain: GD returns to zero training loss before each perturbation and its
    # norm ratchets up; NMGD ends with the smaller norm.
    steps, loss = np.asarray(gd["step"]), np.asarray(gd["loss"])
    before = [loss[np.searchsorted(steps, s) - 1] for s in (200, 400)]
    assert max(before) < 1e-20
    assert float(gd["norm"][-1]) > 2 * float(gd["norm"][0])
    assert float(nm["norm"][-1]) < 0.5 * float(gd["norm"][-1])


def test_theory3_cnn_tiny(tmp_path):
    """The study's whole pipeline on 3 GD steps, 40 images, C = 2 (every run one shape, one
    compile; the quick run takes minutes under the suite's unoptimised XLA: -m slow)."""
    _check_theory3_cnn(studies.load("theory3-cnn").run(
        tmp_path, quick=True, config={"steps": 3, "examples": (20, 40), "random": (20,),
                                      "channels": (2,), "width": 2, "fit": 40}),
        trained=False)


@pytest.mark.slow
def test_theory3_cnn_quick(tmp_path):
    _check_theory3_cnn(studies.load("theory3-cnn").run(tmp_path, quick=True), trained=True)


def _check_theory3_cnn(written, trained: bool):
    for key in ("examples", "parameters"):
        assert written[key].exists() and written[key].stat().st_size > 10_000
    tree = xr.open_datatree(written["results"])
    ex, par = tree["examples"].to_dataset(), tree["parameters"].to_dataset()
    # GD's per-step charge law is algebraic: rounding of the charges only (~1e-16 of the
    # largest per sum, over ~10^3 entries per channel)
    assert float(ex["charge_law_residual"].max()) < 1e-12
    assert float(par["charge_law_residual"].max()) < 1e-12
    # the orbit minimum is a minimum (BFGS from u = 0, where ρ itself is), and the
    # parameter counts are those of the bias-free net: 9·C + 4·9·C² + 10·C
    rho, rho_min = np.asarray(par["norm_product"]), np.asarray(par["min_norm_product"])
    assert np.all(rho_min <= rho * (1 + 1e-12)) and np.all(rho_min > 0.5 * rho)
    c = np.asarray(par["channels"])
    np.testing.assert_array_equal(par["parameters"], 9 * c + 36 * c**2 + 10 * c)
    if trained:  # on true labels, the quick run's net beats chance (0.9) on the test images
        true = ex.where(ex["labels"] == "true", drop=True)
        assert float(true["test_error"].min()) < 0.5
