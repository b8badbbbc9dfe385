"""Centring chosen by the evidence (issue 44 item 4): a funnel's sites decentred where the
Gaussian of the story as written misses.

Truth: posteriordb's reference posterior of eight schools (its non-centred program, the
same posterior over mu, tau and theta as the centred story ppl_notes ships), 10,000
effective draws. The tolerances are the issue's landing bar, 0.1 reference sd for every
mean and [0.9, 1.1] for every sd ratio; the draws' own Monte Carlo error (about
1/sqrt(ESS) of an sd, ESS in the thousands) is a small part of it.
"""

import numpy as np
import pytest

import ppl_notes as pn
from ppl_notes._result import RunResult
from ppl_notes.errors import OptionError
from ppl_notes.evaluation.facts import story_facts
from ppl_notes.models import get_story
from ppl_notes.vi.centring import chosen_centring, funnel_sites
from tests.corpus.posteriordb_stories import load


@pytest.fixture(scope="module")
def eight_schools_fit():
    return pn.infer(get_story("eight_schools").load_model(), method="svi", seed=0,
                    progress=False)


def test_the_centred_eight_schools_lands_decentred(eight_schools_fit):
    fit = eight_schools_fit
    centring = fit.info["centring"]
    assert centring["kept"] and centring["centredness"] == {"theta": 0.0}
    assert set(fit.tree["posterior"].data_vars) == {"mu", "tau", "theta"}
    assert fit.info["escalation"]["to_flow"] is False  # the Gaussian lands: no flow
    _, reference = load("eight_schools-eight_schools_noncentered")
    draws = {"mu": fit.draws("mu"), "tau": fit.draws("tau"),
             **{f"theta[{j + 1}]": fit.draws("theta")[:, j] for j in range(8)}}
    for name, row in reference.iterrows():
        got = draws[name]
        assert abs(got.mean() - row["mean"]) < 0.1 * row["sd"], (name, got.mean(), row["mean"])
        assert 0.9 <= got.std() / row["sd"] <= 1.1, (name, got.std(), row["sd"])
    assert fit.check().reliable
    with pytest.raises(OptionError, match="decentred at"):
        fit.log_weights(num_samples=100)


def test_funnel_sites_are_those_whose_location_or_scale_is_a_latent():
    for name, sites in (("eight_schools", ["theta"]), ("eight_schools_noncentered", []),
                        ("linear_regression", []), ("heights", [])):
        story = get_story(name).load_model()
        data = story.prepare_data(None)
        assert funnel_sites(story, data, story_facts(story, data)) == sites, name


def test_a_gaussian_posterior_never_tries_the_centring():
    fit = pn.infer(get_story("normal_mean").load_model(), method="svi", seed=0,
                   progress=False)
    assert "centring" not in fit.info


def _with_elbo(value: float, spread: float = 0.1) -> RunResult:
    """A fit whose q draws give ELBO ``value`` (log p - log q at 1000 draws)."""
    rng = np.random.default_rng(0)
    log_p = value + spread * rng.standard_normal((1, 1000, 1))
    return RunResult("svi", ("sample",), {"theta": np.zeros((1000, 8))},
                     importance={"log_p": log_p, "log_q": np.zeros_like(log_p)},
                     info={"importance": {"khat": [0.3], "ess_share": [0.9]}})


def test_the_story_as_written_stays_where_no_decentred_fit_is_better():
    story = get_story("eight_schools").load_model()
    from ppl_notes.evaluation import RunContext

    data = story.prepare_data(None)
    context = RunContext(story, data, options={"num_draws": 1000, "escalate": "auto"})
    gaussian = _with_elbo(-31.0)
    tried = []

    def fit(trial):
        tried.append(trial.options["escalate"])
        return _with_elbo(-31.5)

    assert chosen_centring(context, fit, gaussian, dim=10) is None
    assert tried == ["never", "never"]  # c = 0 and c = 1/2, Gaussians alone
    assert gaussian.info["centring"]["kept"] is False
    assert "no decentred Gaussian's ELBO is above" in gaussian.info["centring"]["why"]


def test_ctrl_c_while_trying_the_centring_returns_the_story_as_written():
    story = get_story("eight_schools").load_model()
    from ppl_notes.evaluation import RunContext

    context = RunContext(story, story.prepare_data(None),
                         options={"num_draws": 1000, "escalate": "auto"})
    gaussian = _with_elbo(-31.0)

    def interrupted(trial):
        result = _with_elbo(-30.0)
        result.partial = True
        return result

    returned = chosen_centring(context, interrupted, gaussian, dim=10)
    assert returned is gaussian and returned.partial
    assert "interrupted (Ctrl-C)" in returned.info["centring"]["why"]
