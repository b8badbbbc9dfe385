"""EM (notes §2.f: EM as VI with q(z) = p(z | x, theta)) against a plain numpy EM."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from ppl_notes import InferenceError, OptionError, StoryError, infer
from ppl_notes import model as story
from ppl_notes.models import heights
from ppl_notes.models.conjugate import normal_mean

START = {"alpha": [0.5, 0.5], "mu": [160.0, 180.0], "sigma": [7.0, 7.0]}


def _numpy_em(x, alpha, mu, sigma, iterations):
    """Textbook EM for a 1-D Gaussian mixture (Bishop 2006, §9.2.2)."""
    alpha, mu, sigma = (np.array(v, dtype=float) for v in (alpha, mu, sigma))
    for _ in range(iterations):
        joint = alpha * norm.pdf(x[:, None], mu, sigma)
        r = joint / joint.sum(1, keepdims=True)
        weight = r.sum(0)
        alpha = weight / len(x)
        mu = (r * x[:, None]).sum(0) / weight
        sigma = np.sqrt((r * (x[:, None] - mu) ** 2).sum(0) / weight)
    return alpha, mu, sigma


@pytest.fixture(scope="module")
def galton():
    return heights.model.default_data()["height"]


def _assert_matches(fit, reference):
    for name, expected in zip(("alpha", "mu", "sigma"), reference, strict=True):
        np.testing.assert_allclose(fit.draws(name)[0], expected, rtol=1e-4)


def test_closed_form_em_matches_numpy_em(galton):
    fit = infer(heights.model, method="em", init=START, iterations=60, tolerance=1e-300,
                progress=False)
    assert fit.info["m_step"] == "closed form"
    _assert_matches(fit, _numpy_em(galton, START["alpha"], START["mu"], START["sigma"], 60))


def test_gradient_m_step_matches_numpy_em(galton):
    # the same story without its closed-form M-step: each M-step is an L-BFGS search
    plain = story(observed="height", data=heights.model.default_data)(heights.model.fn)
    fit = infer(plain, method="em", init=START, iterations=8, tolerance=1e-300, progress=False)
    assert fit.info["m_step"] == "L-BFGS"
    _assert_matches(fit, _numpy_em(galton, START["alpha"], START["mu"], START["sigma"], 8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_likelihood_never_decreases(seed):
    fit = infer(heights.model, method="em", init="sample", seed=seed, iterations=150,
                progress=False)
    record = fit.history["log_likelihood"].to_numpy()
    assert len(record) > 5
    assert np.all(np.diff(record) >= -1e-9 * np.abs(record[:-1]))


def test_map_em_log_posterior_never_decreases():
    fit = infer(heights.model, method="em", priors=True, init=START, iterations=15,
                tolerance=1e-300, progress=False)
    record = fit.history["log_posterior"].to_numpy()
    assert np.all(np.diff(record) >= -1e-9 * np.abs(record[:-1]))


def test_e_step_posterior_is_bayes_rule_at_the_estimate(galton):
    fit = infer(heights.model, method="em", progress=False)
    q = fit.to_arviz()["fitted_params"]["q_gender"].values  # (K, N)
    alpha, mu, sigma = (fit.draws(n)[0] for n in ("alpha", "mu", "sigma"))
    expected = heights.component_probabilities(galton, alpha, mu, sigma).T
    np.testing.assert_allclose(q, expected, atol=1e-10)
    assert fit.draws("gender").shape == (1, len(galton))


def test_a_collapsing_component_is_reported_and_map_em_cures_it(galton):
    # one component placed on the shortest person with a tiny sd: ML-EM shrinks it onto
    # that single height, where the likelihood is unbounded
    start = {"mu": [galton.min(), 170.0], "sigma": [0.01, 7.0]}
    with pytest.raises(InferenceError, match=r"collapsed.*sigma\[0\].*priors=True"):
        infer(heights.model, method="em", init=start, progress=False)
    fit = infer(heights.model, method="em", init=start, priors=True, iterations=60,
                progress=False)
    assert np.all(np.isfinite(fit.history["log_posterior"]))
    assert fit.draws("sigma").min() > 1.0


def test_em_needs_discrete_sites_and_valid_init():
    with pytest.raises(StoryError, match="discrete latent sites.*'map' or 'mle'"):
        infer(normal_mean, method="em", progress=False)
    with pytest.raises(OptionError, match="'gender' is not a continuous latent site"):
        infer(heights.model, method="em", init={"gender": [0]}, progress=False)
