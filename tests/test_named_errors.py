"""The last raw errors, written as users meet them: each is now a named error that says
what to do, and nothing fails silently (issue 31)."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import DataError, StoryError, calibrate, infer, model
from ppl_notes._progress import show_progress
from ppl_notes.cli import main
from ppl_notes.diagnostics import beyond
from ppl_notes.vi import gaussian_vi


@model(observed="y")
def groups(group, y=None):
    """A user's varying intercepts: a[group], the group an integer covariate."""
    a = pyro.sample("a", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("n", len(group)):
        pyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


GROUPS = {"group": np.array([0, 1, 2, 0, 1, 2]), "y": np.array([0.1, 1.0, 2.1, -0.2, 0.9, 2.2])}


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    fit = infer(groups, GROUPS, method="svi", restarts=1, progress=False)
    return fit, fit.save(tmp_path_factory.mktemp("groups") / "groups.nc")


@pytest.mark.parametrize("new_group", [torch.tensor([0, 2]), [0, 2],
                                       np.array([0, 2], dtype=np.int64)])
def test_predict_indexes_by_a_covariate_as_infer_does(grouped, new_group):
    from ppl_notes import load

    fit, path = grouped
    here = fit.predict({"group": new_group}, seed=1)["y"]
    there = load(path, model=groups).predict({"group": new_group}, seed=1)["y"]
    assert here.shape[-1] == 2
    np.testing.assert_array_equal(here.values, there.values)
    # group 2's intercept is near 2.1, group 0's near 0: the predictions follow a[group]
    means = here.mean([d for d in here.dims if d not in ("n", "y_dim_0")]).values.ravel()
    assert means[1] > means[0] + 1


@pytest.mark.parametrize("bad, words", [
    ({"group": [[[0]]]}, "shape (1, 1, 1) here and (6,) in the fit"),
    ({}, "needs argument(s) ['group']"),
    ({"group": [True, False]}, "numbers in the fit and is booleans here"),
    ({"group": [0.5, 1.0]}, "the new values must be integers too"),
    ({"group": [0.5, np.nan]}, "NaN or infinite"),
    ({"grp": [0]}, "has no argument 'grp'"),
])
def test_bad_new_data_is_named_before_the_story_runs(grouped, bad, words):
    fit, _ = grouped
    with pytest.raises(DataError) as caught:
        fit.predict(bad)
    assert words in str(caught.value)


@pytest.mark.parametrize("value, words", [("abc", "not a number"), ("150,nan", "NaN"),
                                          ("", "not a number")])
def test_the_command_lines_bad_numbers_are_one_line(tmp_path, capsys, value, words):
    fit = infer(groups, GROUPS, method="svi", restarts=1, progress=False)
    path = fit.save(tmp_path / "groups.nc")
    code = main(["predict", str(path), "--model", "tests.test_named_errors:groups",
                 "--set", f"group={value}"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


@model(observed="y", data={"y": [0.1, 0.5]})
def scale_with_a_normal_prior(y=None):
    s = pyro.sample("s", dist.Normal(0.0, 1.0))  # half of its draws are negative scales
    with pyro.plate("n", 2):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


@pytest.mark.parametrize("method", ["svi", "nuts"])
def test_a_normal_prior_on_a_scale_is_a_story_error(method):
    with pytest.raises(StoryError, match="Normal is given an invalid scale"):
        infer(scale_with_a_normal_prior, method=method, progress=False)


@model(observed="y", data={"y": [0.1, 0.5]})
def breaks_when_simulating(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    if y is None:
        raise RuntimeError("no simulation path")
    with pyro.plate("n", 2):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_calibrate_names_a_story_that_cannot_simulate():
    with pytest.raises(StoryError, match="failed while simulating replicate 0"):
        calibrate(breaks_when_simulating, "nuts", replicates=3, store=False, progress=False,
                  processes=1)


@model(observed="y", data={"y": [-1.0] * 20})
def nan_below_minus_one(y=None):
    """NaN where mu < -1: rare under the prior (4 in 10,000 draws, so the story's own
    probe of prior draws passes it), common under a Gaussian q that the data pull there."""
    mu = pyro.sample("mu", dist.Normal(0.0, 0.3))
    pyro.factor("guard", torch.log(mu + 1.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_a_log_of_a_negative_under_the_prior_is_a_story_error():
    @model(observed="y", data={"y": [0.1, 0.5]})
    def log_of_a_negative(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        pyro.factor("guard", torch.log(mu + 1.0))  # NaN for 37% of prior draws
        with pyro.plate("n", 2):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(StoryError, match="log factor that is NaN at line"):
        infer(log_of_a_negative, method="svi", progress=False)


def test_svi_draws_where_the_density_is_nan_are_a_finding():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = infer(nan_below_minus_one, method="svi", progress=False)
    share = fit.diagnostics()["nonfinite_log_p_share"]
    in_region = float((fit.draws("mu") < -1).mean())
    assert share == pytest.approx(in_region) and share > 0
    assert any("log density is NaN or infinite" in str(w.message) for w in caught)
    verdict = fit.check()
    assert not verdict.reliable
    assert any("NaN or infinite" in reason for reason in verdict.fails)
    assert not any("converged" in reason for reason in verdict.fails)  # that one holds


def test_a_number_at_its_threshold_is_shown_beyond_it():
    assert beyond(0.7004, 0.7) == "0.7004" and beyond(0.84, 0.7) == "0.84"
    assert beyond(1.0100001, 1.01, 3) == "1.0100001"


def test_ci_silences_the_bars(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not show_progress(True)
    monkeypatch.setenv("CI", "")
    assert show_progress(True) and not show_progress(False)


def test_the_story_list_is_aligned(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(starts) == 1  # every description starts in the same column


@pytest.mark.filterwarnings("ignore::ppl_notes.errors.PartialResultWarning")
def test_a_compare_interrupted_during_svi_stops_there(monkeypatch, capsys, tmp_path):
    """Ctrl-C in the SVI stage: its partial result is saved and named, NUTS never runs,
    and the exit status is 130."""
    calls = {"count": 0}
    original = gaussian_vi._Evaluator.__call__

    def interrupted_on_the_third_step(self, fits):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(self, fits)

    monkeypatch.setattr(gaussian_vi._Evaluator, "__call__", interrupted_on_the_third_step)
    import ppl_notes.inference.nuts as nuts

    def never(*args, **kwargs):
        raise AssertionError("NUTS ran after an interrupt")

    monkeypatch.setattr(nuts, "run", never)
    code = main(["compare", "linear_regression", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted (Ctrl-C) during SVI" in err and "NUTS was not run" in err
    from ppl_notes import load

    saved = load(tmp_path / "svi.nc")
    assert saved.partial and "partial" in saved.label


def test_a_ctrl_c_after_calibrate_printed_its_result_says_what_was_kept(monkeypatch, capsys,
                                                                        tmp_path):
    from ppl_notes.calibration import Calibration

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Calibration, "plot", interrupted)
    code = main(["calibrate", "normal_mean", "--replicates", "3", "--store", "none",
                 "--processes", "1", "--no-progress", "--out", str(tmp_path),
                 "--set", "warmup=100", "--set", "draws=200"])
    captured = capsys.readouterr()
    assert code == 130 and "replicates" in captured.out  # the result was printed
    assert "interrupted (Ctrl-C) after the calibration" in captured.err
