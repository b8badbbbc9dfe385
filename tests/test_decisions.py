"""Bayes minimum-risk decisions (notes §1.b) and exact posteriors by enumeration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ppl_notes import DataError, decide, exact_posterior, infer
from ppl_notes.cli import main
from ppl_notes.models import heights
from ppl_notes.models.diagnosis import LOSS, diagnosis, posterior_probability


@pytest.mark.parametrize("prevalence", [0.001, 0.01, 0.2])
def test_enumerated_posterior_is_bayes_rule(prevalence):
    story = diagnosis.configure(prevalence=prevalence)
    tests = np.array([1.0, 0.0, 1.0, 0.0])
    exact = exact_posterior(story, {"test": tests})
    assert exact.shape == (4, 2)
    np.testing.assert_allclose(exact[:, 1], posterior_probability(tests, prevalence),
                               rtol=1e-12)


def test_the_costlier_miss_flips_the_argmax_decision():
    sick = posterior_probability(1.0)  # 0.154 after a positive test for a 1% disease
    assert sick < 0.5  # argmax p(y|x): healthy
    decision = decide(exact_posterior(diagnosis)[0], LOSS)
    assert decision.action == "treat"
    expected = pd.Series({"send home": 100 * sick, "treat": 1 - sick})
    np.testing.assert_allclose(decision.expected_loss[expected.index], expected, rtol=1e-12)
    zero_one = pd.DataFrame([[0, 1], [1, 0]], index=["healthy", "sick"])
    assert decide([1 - sick, sick], zero_one).action == "healthy"
    # after a negative test, sending home is right even at this cost
    assert decide(exact_posterior(diagnosis, {"test": [0.0]})[0], LOSS).action == "send home"


def test_decisions_for_many_cases_and_from_a_posterior():
    probabilities = exact_posterior(diagnosis, {"test": [1.0, 0.0]})
    decision = decide(probabilities, LOSS)
    assert list(decision.action) == ["treat", "send home"]
    assert decision.expected_loss.shape == (2, 2)
    fit = infer(heights.model, method="em", progress=False)
    guess = decide(fit, [[0, 1], [1, 0]], actions=["shorter", "taller"])
    assert guess.action.shape == (934,)


def test_bad_decision_input_names_the_argument():
    with pytest.raises(DataError, match="sum to 1"):
        decide([0.5, 0.6], LOSS)
    with pytest.raises(DataError, match="does not fit the loss table's 2 states"):
        decide([0.2, 0.3, 0.5], LOSS)
    with pytest.raises(DataError, match=r"no probability for states \['sick'\]"):
        decide({"healthy": 1.0}, pd.DataFrame({"healthy": [0, 1], "sick": [5, 0]}))
    with pytest.raises(DataError, match="actions has 3 labels"):
        decide([0.5, 0.5], [[0, 1], [1, 0]], actions=["a", "b", "c"])


@pytest.mark.parametrize(("story", "method"), [("linear_regression", "map"),
                                               ("linear_regression", "mle"),
                                               ("heights", "em"), ("normal_mean", "bbvi")])
def test_every_method_runs_from_the_cli(story, method, capsys, tmp_path):
    assert main(["run", story, "--method", method, "--no-progress",
                 "--out", str(tmp_path / "fit.nc")]) == 0
    out = capsys.readouterr().out
    assert f"{story} by {method}" in out and "saved to" in out


@pytest.mark.parametrize("method", ["map", "em", "nuts", "svi"])
def test_a_story_with_only_discrete_latents_points_to_exact_posterior(method):
    from ppl_notes import StoryError

    with pytest.raises(StoryError, match=r"no continuous latent sites.*exact_posterior"):
        infer(diagnosis, method=method, progress=False)
