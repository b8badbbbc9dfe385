"""Fitted models in use: predictions for new data, from memory and from a saved file.

Truth: Bayes' rule over the posterior draws (heights' component probabilities, computed
by the story's own closed form, not by the prediction code), and a regression's
predictive mean X_new @ E[w].
"""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from ppl_notes import infer, load
from ppl_notes.cli import main
from ppl_notes.errors import StoryError
from ppl_notes.models import heights
from ppl_notes.models.conjugate import normal_mean

NEW_HEIGHTS = [150.0, 180.0, 200.0]


@pytest.fixture(scope="module")
def saved_heights(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = infer(heights.model, method="svi", seed=0, progress=False)
    path = fit.save(tmp_path_factory.mktemp("heights") / "heights.nc")
    return fit, path


def _taller_share(predictions) -> np.ndarray:
    gender = predictions["gender"]
    return (gender == 1).mean([d for d in gender.dims if d != "people"]).values


def test_predict_in_a_fresh_process_equals_the_session(saved_heights):
    fit, path = saved_heights
    here = _taller_share(fit.predict({"height": NEW_HEIGHTS}, num_draws=1000, seed=5))
    code = textwrap.dedent(f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import ppl_notes
        fit = ppl_notes.load({str(path)!r})
        gender = fit.predict({{"height": {NEW_HEIGHTS}}}, num_draws=1000, seed=5)["gender"]
        print(json.dumps((gender == 1).mean([d for d in gender.dims if d != "people"])
                         .values.tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=path.parent)  # no training data, another cwd
    assert done.returncode == 0, done.stderr[-2000:]
    there = np.array(eval(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(here, there)
    # and both are Bayes' rule over the posterior draws, within the draws' MC error
    exact = np.array([heights.component_probabilities(h, fit.draws("alpha"), fit.draws("mu"),
                                                      fit.draws("sigma"))[:, -1].mean()
                      for h in NEW_HEIGHTS])
    error = np.sqrt(exact * (1 - exact) / 1000) + 1e-3
    assert np.all(np.abs(here - exact) < 4 * error), (here, exact)
    assert here[0] < 0.05 and here[1] > 0.9 and here[2] > 0.99


def test_the_command_line_predicts_from_the_file(saved_heights, capsys):
    _, path = saved_heights
    assert main(["predict", str(path), "--set", "height=180"]) == 0
    printed = capsys.readouterr().out
    assert "gender: P(0) = " in printed and "P(1) = 0.9" in printed


X = torch.tensor([[1.0, 0.5], [0.3, -1.2], [-0.7, 0.4], [1.5, 1.1], [0.2, -0.3], [1.0, 1.0]])
Y = X @ torch.tensor([1.5, -0.5]) + 0.1 * torch.tensor([0.3, -1.0, 0.5, 0.2, -0.4, 0.8])


def test_predictions_for_new_covariates_of_a_user_regression():
    import ppl_notes
    from tests.corpus.user_stories import linear_regression

    story = ppl_notes.model(observed="y", data={"X": X, "y": Y})(linear_regression)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = infer(story, method="nuts", chains=2, warmup=300, draws=500, progress=False)
    new = np.array([[2.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    predictions = fit.predict({"X": new}, num_draws=1000, seed=0)
    assert set(predictions.data_vars) == {"y"}
    y = predictions["y"].stack(s=fit.sample_dims).transpose("s", ...).values
    weights = fit.draws("w")
    expected = new @ weights.mean(0)
    # y = X_new w + noise: its mean's MC error is its own sd over sqrt(draws)
    assert np.all(np.abs(y.mean(0) - expected) < 4 * y.std(0) / np.sqrt(len(y)) + 1e-3)


def test_a_story_defined_in_main_gets_an_error_that_says_what_to_do(tmp_path):
    path = tmp_path / "coin.nc"
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("ignore")
        import pyro, pyro.distributions as dist, torch
        import ppl_notes

        @ppl_notes.model(observed="x", data={{"x": torch.tensor([1., 0., 1., 1.])}})
        def coin(x=None, n=None):
            p = pyro.sample("p", dist.Beta(1.0, 1.0))
            with pyro.plate("flips", x.shape[0] if x is not None else n):
                pyro.sample("x", dist.Bernoulli(p), obs=x)

        fit = ppl_notes.infer(coin, method="svi", steps=300, progress=False)
        fit.save({str(path)!r})
        again = ppl_notes.load({str(path)!r}, model=coin)   # attached by hand: works
        print(again.predict({{"n": 3}}, num_draws=50)["x"].shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = load(path)
    with pytest.raises(StoryError, match=r"script or notebook.*not attached.*model=coin"):
        loaded.predict({"n": 3})


def test_fresh_draws_of_an_autoguide_fit_in_memory_and_after_loading(tmp_path):
    from ppl_notes.models.conjugate import normal_mean_log_evidence

    fit = infer(normal_mean, method="svi", guide="meanfield", restarts=1, progress=False)
    here = fit.log_evidence(num_samples=3000, seed=2)
    loaded = load(fit.save(tmp_path / "fit.nc"))
    there = loaded.log_evidence(num_samples=3000, seed=2)
    assert here.value == pytest.approx(there.value, abs=1e-9)
    x = normal_mean.prepare_data(None)["x"]
    # AutoNormal holds the exact posterior: the ELBO is log p(x) up to its MC error
    assert abs(here.value - normal_mean_log_evidence(x)) < 4 * here.standard_error + 0.01


def test_a_story_with_other_sites_is_refused_naming_both_lists(tmp_path, capsys):
    """A coin fitted with ``p``, loaded with a story that renamed it ``bias``.

    Before, ``predict`` drew ``bias`` from its Beta(1, 1) prior (mean 0.50, sd 0.29)
    where the posterior is Beta(4, 2) (mean 0.67): a silent wrong answer. Now the story is
    refused, naming its sites and the file's variables; the command line says the same
    in one line, for a shipped story of other sites too.
    """
    import pyro
    import pyro.distributions as dist

    import ppl_notes

    flips = torch.tensor([1.0, 0.0, 1.0, 1.0])

    @ppl_notes.model(observed="x", data={"x": flips})
    def coin(x=None, n=None):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("flips", x.shape[0] if x is not None else n):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    @ppl_notes.model(observed="x", data={"x": flips})
    def coin_v2(x=None, n=None):
        bias = pyro.sample("bias", dist.Beta(1.0, 1.0))
        with pyro.plate("flips", x.shape[0] if x is not None else n):
            pyro.sample("x", dist.Bernoulli(bias), obs=x)

    fit = infer(coin, method="nuts", chains=2, warmup=200, draws=300, progress=False)
    path = fit.save(tmp_path / "coin.nc")
    assert load(path, model=coin).predict({"n": 3}, num_draws=50)["x"].shape[-1] == 3
    with pytest.raises(StoryError, match=r"\['bias'\].*\['p'\].*\['bias'\] have no posterior "
                                         r"draws.*\['p'\] are not sites of the story"):
        load(path, model=coin_v2).predict({"n": 3})
    normal = infer(normal_mean, method="nuts", chains=2, warmup=200, draws=300, progress=False)
    other = normal.save(tmp_path / "nm.nc")
    code = main(["predict", str(other), "--model", "ppl_notes.models.conjugate:beta_bernoulli",
                 "--set", "num_obs=3"])
    printed = capsys.readouterr()
    assert code != 0
    assert "is not the story this posterior was fitted with" in printed.err + printed.out
