"""Both methods against closed-form posteriors (the truth the code did not produce)."""

import numpy as np
import pytest
from scipy import integrate, stats

from ppl_notes import infer
from ppl_notes.guides.conjugate import beta_bernoulli_guide, normal_mean_guide
from ppl_notes.models.conjugate import (
    beta_bernoulli,
    beta_bernoulli_log_evidence,
    beta_bernoulli_posterior,
    normal_mean,
    normal_mean_log_evidence,
    normal_mean_posterior,
)

X = normal_mean.default_data()["x"]
Y = beta_bernoulli.default_data()["y"]


def test_normal_mean_closed_forms_against_scipy():
    # The evidence: x ~ MVN(m0 1, s^2 I + s0^2 11^T), computed independently by scipy.
    cov = 1.5**2 * np.eye(X.size) + 0.7**2 * np.ones((X.size, X.size))
    expected = stats.multivariate_normal(np.full(X.size, 0.3), cov).logpdf(X)
    assert normal_mean_log_evidence(X, 0.3, 0.7, 1.5) == pytest.approx(expected, rel=1e-10)
    # The posterior: the product prior x likelihood, normalised numerically on a grid.
    grid = np.linspace(-3, 5, 200_001)
    log_post = stats.norm(0.3, 0.7).logpdf(grid) + stats.norm(grid[:, None], 1.5).logpdf(X).sum(1)
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    mean = (grid * weights).sum()
    sd = np.sqrt(((grid - mean) ** 2 * weights).sum())
    assert normal_mean_posterior(X, 0.3, 0.7, 1.5) == pytest.approx((mean, sd), rel=1e-6)


def test_beta_bernoulli_evidence_against_quadrature():
    integral, _ = integrate.quad(lambda p: stats.beta(2.0, 3.0).pdf(p)
                                 * np.prod(stats.bernoulli(p).pmf(Y)), 0, 1, epsabs=1e-30)
    assert beta_bernoulli_log_evidence(Y, 2.0, 3.0) == pytest.approx(np.log(integral), rel=1e-8)


def _nuts_matches(fit, site, mean, sd):
    summary = fit.summary()
    row = summary.loc[site]
    # |mean - truth| < 4 MCSE: the Monte Carlo error of the posterior mean estimate.
    assert abs(row["mean"] - mean) < 4 * row["mcse_mean"], (row["mean"], mean, row["mcse_mean"])
    draws = fit.draws(site)
    # sd within 10%: the relative MC error of an sd from >= 1000 effective draws is ~2-3%.
    assert abs(draws.std() / sd - 1) < 0.10
    assert row["ess_bulk"] > 400 and row["r_hat"] < 1.01


@pytest.mark.parametrize("processes", [1, 2])
def test_nuts_recovers_the_normal_mean_posterior(processes):
    fit = infer(normal_mean, method="nuts", chains=4, warmup=500, draws=1000, seed=1,
                progress=False, processes=processes)
    _nuts_matches(fit, "mu", *normal_mean_posterior(X))
    assert not fit.to_arviz()["sample_stats"]["diverging"].values.any()


def test_nuts_recovers_the_beta_bernoulli_posterior():
    fit = infer(beta_bernoulli, method="nuts", chains=4, warmup=500, draws=1000, seed=2,
                progress=False, processes=1)
    a, b = beta_bernoulli_posterior(Y)
    _nuts_matches(fit, "p", a / (a + b), stats.beta(a, b).std())


def test_svi_with_the_exact_family_recovers_the_normal_mean_posterior():
    # the fit is checked to 5% of the closed form: a tolerance ten times the default's
    # stricter (the default stops with a fifth of an sd left, ppl_notes.vi.convergence)
    fit = infer(normal_mean, method="svi", guide=normal_mean_guide, steps=3000,
                learning_rate=0.02, num_particles=8, seed=3, tolerance=0.001, progress=False)
    params = fit.to_arviz()["fitted_params"]
    mean, sd = normal_mean_posterior(X)
    # the family contains the posterior: the fitted parameters are the exact ones (5%)
    assert float(params["mu_loc"]) == pytest.approx(mean, rel=0.05)
    assert float(params["mu_scale"]) == pytest.approx(sd, rel=0.05)
    assert fit.info["elbo"] == "Trace_ELBO"


def test_svi_with_the_exact_family_recovers_the_beta_posterior():
    # the fit is checked to 5% of the closed form: a tolerance ten times the default's
    # stricter (the default stops with a fifth of an sd left, ppl_notes.vi.convergence)
    fit = infer(beta_bernoulli, method="svi", guide=beta_bernoulli_guide, steps=3000,
                learning_rate=0.05, num_particles=8, seed=4, tolerance=0.001, progress=False)
    params = fit.to_arviz()["fitted_params"]
    a, b = beta_bernoulli_posterior(Y)
    q = stats.beta(float(params["p_a"]), float(params["p_b"]))
    assert q.mean() == pytest.approx(a / (a + b), rel=0.05)
    assert q.std() == pytest.approx(stats.beta(a, b).std(), rel=0.05)


def test_svi_elbo_stays_below_the_exact_evidence():
    fit = infer(normal_mean, method="svi", guide=normal_mean_guide, steps=1500,
                learning_rate=0.02, seed=5, progress=False)
    log_evidence = normal_mean_log_evidence(X)
    stats_ = fit.to_arviz()["sample_stats"]
    elbo = float((stats_["log_p"] - stats_["log_q"]).mean())
    standard_error = float((stats_["log_p"] - stats_["log_q"]).std()) / np.sqrt(1000)
    # ELBO <= log p(x) (notes §2.f); equality up to MC error for the exact family
    assert elbo < log_evidence + 4 * standard_error
    assert elbo > log_evidence - 0.05


def test_log_q_of_an_autoguide_is_the_density_of_its_draws():
    # AutoNormal on the Normal-mean story: q(mu) is Normal(loc, scale) in the fitted params.
    fit = infer(normal_mean, method="svi", guide="meanfield", restarts=1, seed=6,
                progress=False)
    params = fit.to_arviz()["fitted_params"]
    loc = float(params["AutoNormal.locs.mu"])
    scale = float(params["AutoNormal.scales.mu"])
    expected = stats.norm(loc, scale).logpdf(fit.draws("mu"))
    np.testing.assert_allclose(fit.to_arviz()["sample_stats"]["log_q"].values, expected,
                               rtol=1e-10)


def test_pyro_engine_recovers_the_same_posterior():
    # the plain path (Pyro's own NUTS) against the same truth as the fast engine above
    fit = infer(normal_mean, method="nuts", engine="pyro", chains=2, warmup=300, draws=1000,
                seed=7, progress=False)
    assert fit.info["engine"] == "pyro"
    _nuts_matches(fit, "mu", *normal_mean_posterior(X))
