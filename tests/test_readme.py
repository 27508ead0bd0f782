"""The README's code runs as written (the first block with a shorter horizon by default;
verbatim under `-m slow`)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(code, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        return namespace
    finally:
        os.chdir(cwd)


def _shortened(code):
    # Same calls, shorter horizon: t1 = 10 -> 0.5 (the full run takes ~1 min).
    short = code.replace("t1=10.0", "t1=0.5").replace("linspace(0.0, 10.0, 101)",
                                                      "linspace(0.0, 0.5, 6)")
    assert short != code
    return short


def test_tour_runs(tmp_path):
    ns = _run(_shortened(_blocks()[0]), tmp_path)
    traj = ns["traj"]
    assert traj.ts.shape == (6,) and traj.monitors["loss"][-1] < traj.monitors["loss"][0]
    q = traj.monitors["rescaling_charges"]
    # GF conserves the rescaling charges; rtol = atol = 1e-8 leaves ~1e-8.
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), atol=1e-6)


@pytest.mark.slow
def test_tour_runs_verbatim(tmp_path):
    ns = _run(_blocks()[0], tmp_path)
    assert ns["traj"].ts.shape == (101,)


def test_more_examples_run(tmp_path):
    ns = _run(_blocks()[0].split("traj = dyn.simulate(")[0] + _blocks()[1], tmp_path)
    energy = ns["nd"].monitors["energy"]
    assert abs(energy[-1] - energy[0]) < 1e-8  # ND conserves H at 1e-10
    assert ns["gf"].event == "loss_below" and abs(ns["gf"].event_time - 0.32434) < 1e-4
    np.testing.assert_allclose(ns["same_as_nagf"].final_params, ns["nagf"].final_params,
                               atol=1e-7)  # the same ODE, two derivations, 1e-10 solves
    assert (tmp_path / "results" / "newtonian.nc").exists()
