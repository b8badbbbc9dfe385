"""Data-parallel SVI (ppl_notes.vi.data_parallel): 2 processes under torchrun, each with half
of the data plate and the gradients averaged, fit what one process fits on all of it.

The single-process fit to match uses 2 particles per step: K processes with one draw
each average K ELBO gradients, as one process with K particles does, and Adam's steps
depend on the gradient noise (less noise, longer steps along the slow directions: mean-
field SVI on the collinear diabetes features is still moving at thousands of steps, so fits with
different noise levels differ by more than their seeds do). "Within Adam's noise" is
measured, not assumed: two single-process fits with different seeds give the spread of
the fitted means (its RMS over the elements, in posterior sds); the 2-process fit must
lie within four times that of the single-process fit.
"""

import subprocess
import sys

import numpy as np
import pytest

from ppl_notes import infer, load
from ppl_notes.errors import OptionError
from ppl_notes.models.regression import linear

OPTIONS = {"steps": 1000, "learning_rate_decay": 0.05}


def _flat(fit):
    sites = sorted(fit.to_arviz()["posterior"].data_vars)
    return np.concatenate([fit.draws(s).reshape(fit.draws(s).shape[0], -1) for s in sites], 1)


def _means(fit):
    return _flat(fit).mean(0)


@pytest.mark.slow
def test_two_processes_fit_what_one_process_fits(tmp_path):
    out = tmp_path / "parallel.nc"
    command = [sys.executable, "-m", "ppl_notes.cli", "run", "linear_regression", "--method",
               "svi", "--autoguide", "--distributed", "2", "--no-progress", "--out", str(out),
               *[f"--set={k}={v}" for k, v in OPTIONS.items()]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 processes" in done.stdout
    parallel = load(out)
    info = parallel.info
    assert info["distributed"]["processes"] == 2
    assert sorted(info["distributed"]["split"]) == ["x", "y"]
    single = infer(linear, method="svi", seed=0, num_particles=2, progress=False, **OPTIONS)
    other_seed = infer(linear, method="svi", seed=1, num_particles=2, progress=False,
                       **OPTIONS)
    sd = _flat(single).std(0)
    noise = np.sqrt(np.mean(((_means(single) - _means(other_seed)) / sd) ** 2))
    gap = np.abs(_means(parallel) - _means(single)) / sd
    assert gap.max() <= 4 * noise, (gap, noise)


def test_distributed_svi_outside_torchrun_says_how_to_launch():
    with pytest.raises(OptionError, match="torchrun --nproc-per-node"):
        infer(linear, method="svi", distributed=True, steps=10, progress=False)
