"""The command line and the default study, run once with --quick."""

import contextlib
import io

import numpy as np
import pytest
import xarray as xr

import studies
from dynamics.__main__ import main

FIGURES = ("toy_trajectories", "toy_loss", "conservation", "mlp_loss", "mlp_norms")


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    code, stdout, stderr = _main(["run", "quickstart", "--quick", "--out", str(out)])
    return out, code, stdout, stderr


def test_list(capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "quickstart" in listing
    line = next(x for x in listing.splitlines() if x.startswith("quickstart"))
    assert len(line.split(maxsplit=1)) == 2  # a name and a description


def test_registry_lists_without_importing():
    entries = studies.available()
    assert "quickstart" in entries and "Głuch" in entries["quickstart"]


def test_unknown_study_exit_code_and_message():
    code, stdout, stderr = _main(["run", "no_such_study", "--quick"])
    assert code == 2
    assert "no_such_study" in stderr and "quickstart" in stderr


def test_usage_errors_return_2():
    assert _main([])[0] == 2
    assert _main(["frobnicate"])[0] == 2
    assert _main(["--help"])[0] == 0


def test_run_writes_figures_and_results(quickstart):
    out, code, stdout, stderr = quickstart
    assert code == 0, stderr
    for name in FIGURES:
        png = out / "figures" / f"quickstart_{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in stdout  # the CLI says what it wrote
    nc = out / "results" / "quickstart.nc"
    assert nc.is_file() and str(nc) in stdout
    # The atomic write leaves no temporary file behind.
    assert [p.name for p in (out / "results").iterdir()] == ["quickstart.nc"]


def test_results_read_back(quickstart):
    out = quickstart[0]
    nc = out / "results" / "quickstart.nc"
    with xr.open_datatree(nc) as tree:
        assert tree.attrs["study"] == "quickstart" and tree.attrs["quick"] == 1
        for problem in ("rotational_toy", "digits_mlp"):
            for flow in ("gf", "nd", "nagf"):
                ds = tree[f"{problem}/{flow}"].to_dataset()
                assert ds.attrs["success"] == 1 and ds.attrs["diverged"] == 0
                loss = ds["loss"].values
                assert loss.ndim == 1 and loss.size > 2 and np.all(np.isfinite(loss))
            # GF is a descent flow, dL/dt = −‖∇L‖² ≤ 0. The saved values come from the
            # dense interpolant, whose error (~rtol·|L|) could make a flat stretch wiggle:
            # allow increases of 1e-9, well below either problem's rtol·L(0).
            gf = tree[f"{problem}/gf"]["loss"].values
            assert np.all(np.diff(gf) <= 1e-9)
            assert gf[-1] < 0.5 * gf[0]
    # One run per group also opens as a plain Dataset.
    with xr.open_dataset(nc, group="rotational_toy/nd") as nd:
        h = nd["energy"].values
        ell = nd["angular_momentum"].values
        w = nd["param"].values
    # ND conserves H = ½‖ẇ‖² + L. At rtol = atol = 1e-10 every accepted Tsit5 step has a
    # local error ≲ 1e-10·(1 + |y_i|) ≲ 3e-10 per component (‖w‖ ≤ 1.6, ‖ẇ‖ ≤ 2.5 since
    # H ≈ 3.06); H changes by at most |∇H| ≈ ‖(∇L, ẇ)‖ ≲ 10 times that, and over the
    # ~300 steps of the quick run the errors add up to at most ~300·10·3e-10·√6 ≈ 2e-6
    # if they never cancel. 1e-6 sits below that worst case; the observed drift is ~1e-9.
    assert np.max(np.abs(h - h[0])) < 1e-6
    # Angular momentum is conserved too (Głuch & Urbanke eq. 45), and ℓ(0) = w × ẇ =
    # (0, −3/2, 3/2) is normal to the plane y = z that holds the orbit.
    np.testing.assert_allclose(ell, np.broadcast_to([0.0, -1.5, 1.5], ell.shape), atol=1e-7)
    assert np.max(np.abs(w[:, 1] - w[:, 2])) < 1e-12


def test_output_paths_are_checked_before_the_study_runs(tmp_path, monkeypatch):
    """A file where results/ or figures/ go, or an --out that cannot be written, is a
    usage error before anything runs (it was a raw FileExistsError after the study had
    run for 48 s, its results lost)."""
    ran = []
    monkeypatch.setattr(studies, "load", lambda name: type(
        "Study", (), {"run": staticmethod(lambda out, quick: ran.append(name) or {})}))
    for sub in ("results", "figures"):
        out = tmp_path / sub
        out.mkdir()
        (out / sub).write_text("in the way")
        code, _, stderr = _main(["run", "quickstart", "--quick", "--out", str(out)])
        assert code == 2 and f"{sub}' is a file" in stderr and "Traceback" not in stderr
    code, _, stderr = _main(["run", "quickstart", "--quick", "--out", "/sys/dynamics-test"])
    assert code == 2 and "cannot write to" in stderr
    assert ran == []
    # Both spellings of a study's name run it (the docstring says so).
    code, _, stderr = _main(["run", "saul_minnorm", "--quick", "--out", str(tmp_path / "ok")])
    assert code == 0, stderr
    assert ran == ["saul_minnorm"]


def test_list_gives_whole_descriptions(capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    # Two descriptions were cut mid-sentence at the first line of their docstrings.
    assert lines["theory3-margin"].endswith("reaching the same margin.")
    assert lines["theory3-nmgd"].endswith("drifts under perturbations.")
