"""Simulation-based calibration (ppl_notes.calibration): the truth is the story's own prior.

Under an exact method the randomised PIT of each drawn parameter among its posterior draws
is U(0, 1) (Talts et al. 2018). The acceptance checks run on the Dask cluster
(tests/test_cluster.py): NUTS passing on a conjugate story, and mean-field VI, whose
marginal sds are sqrt(1 - rho^2) = 0.44 of the true ones on the correlated Gaussian
(closed form, Bishop 2006 §10.1.2), failing. These tests cover the store, the local
pool, interrupts and the command line.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ppl_notes import calibrate
from ppl_notes.errors import CheckpointError, OptionError
from ppl_notes.models.conjugate import normal_mean

ROOT = Path(__file__).resolve().parents[1]
QUICK_NUTS = {"warmup": 200, "draws": 400}


def test_a_calibration_continues_from_its_store_and_equals_a_clean_run(tmp_path):
    store = tmp_path / "sbc.jsonl"
    calibrate(normal_mean, "nuts", replicates=2, store=store, processes=1, progress=False,
              **QUICK_NUTS)
    first = store.read_text().splitlines()
    assert len(first) == 1 + 2  # header + one line per replicate
    store.write_text("\n".join(first) + '\n{"replicate": 2, "ra')  # a line cut short by a kill
    resumed = calibrate(normal_mean, "nuts", replicates=4, store=store, processes=1,
                        progress=False, **QUICK_NUTS)
    clean = calibrate(normal_mean, "nuts", replicates=4, store=False, processes=1,
                      progress=False, **QUICK_NUTS)
    np.testing.assert_array_equal(resumed.ranks["rank"].values, clean.ranks["rank"].values)
    np.testing.assert_allclose(resumed.ranks["truth"].values, clean.ranks["truth"].values)


def test_a_killed_calibration_loses_no_finished_replicate(tmp_path):
    store = tmp_path / "sbc.jsonl"
    script = textwrap.dedent(f"""
        from ppl_notes import calibrate
        from ppl_notes.models.conjugate import normal_mean
        calibrate(normal_mean, "nuts", replicates=40, store={str(store)!r}, processes=1,
                  progress=False, warmup=200, draws=400)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                               start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if store.exists() and len(store.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = [json.loads(line)["record"]["replicate"] for line in store.read_text().splitlines()[1:]
            if line.endswith("}")]
    assert len(kept) >= 2
    resumed = calibrate(normal_mean, "nuts", replicates=max(kept) + 2, store=store,
                        processes=1, progress=False, **QUICK_NUTS)
    assert resumed.ranks.sizes["replicate"] == max(kept) + 2
    lines = store.read_text().splitlines()[1:]
    replicates = [json.loads(line)["record"]["replicate"] for line in lines if line.endswith("}")]
    assert sorted(set(replicates)) == list(range(max(kept) + 2))


def test_a_store_of_another_calibration_is_refused_by_name(tmp_path):
    store = tmp_path / "sbc.jsonl"
    calibrate(normal_mean, "nuts", replicates=2, store=store, processes=1, progress=False,
              **QUICK_NUTS)
    with pytest.raises(CheckpointError, match="other seed"):
        calibrate(normal_mean, "nuts", replicates=2, seed=1, store=store, processes=1,
                  progress=False, **QUICK_NUTS)


def test_bad_arguments_are_refused_before_any_fit():
    with pytest.raises(OptionError, match="method"):
        calibrate(normal_mean, "map", replicates=10, store=False)
    with pytest.raises(OptionError, match="replicates"):
        calibrate(normal_mean, "nuts", replicates=1, store=False)


def test_the_command_line_calibrates_a_story_and_writes_its_figure(tmp_path, capsys):
    from ppl_notes.cli import main

    code = main(["calibrate", "correlated_gaussian", "--method", "svi", "--replicates", "12",
                 "--set", "steps=800", "--store", "none", "--no-progress", "--out",
                 str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Calibration of 'correlated_gaussian' by svi: 12 replicates" in printed
    assert code == (0 if "NOT calibrated" not in printed else 1)
    assert (tmp_path / "calibration.png").stat().st_size > 10_000
    assert len((tmp_path / "ranks.csv").read_text().splitlines()) == 1 + 12 * 2


def test_stories_without_default_data_are_calibrated_as_users_write_them():
    """Issue 30: sizes from a fixed plate, or from the covariates given as data=."""
    import pyro
    import pyro.distributions as dist
    import torch

    from ppl_notes import model

    @model(observed="x")
    def fixed_plate(x=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("flips", 20):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    @model(observed="y")
    def regression(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
        with pyro.plate("rows", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)

    plate_run = calibrate(fixed_plate, "nuts", replicates=3, store=False, processes=1,
                          progress=False, **QUICK_NUTS)
    assert list(plate_run.ranks["parameter"].values) == ["mu"]
    design = np.random.default_rng(0).normal(size=(30, 2))  # numpy, as users pass it
    covariate_run = calibrate(regression, "svi", data={"X": design}, replicates=3,
                              store=False, processes=1, progress=False)
    assert list(covariate_run.ranks["parameter"].values) == ["w[0]", "w[1]"]
    ranks = covariate_run.ranks["rank"].values
    assert np.all((ranks >= 0) & (ranks <= 4 * 1000))  # among 4 restarts x 1000 draws
    assert len(set(covariate_run.ranks["truth"].values[:, 0])) == 3  # a truth per replicate
