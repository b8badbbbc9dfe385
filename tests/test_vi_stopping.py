"""Where SVI starts (the Laplace approximation at the mode) and when it stops (the guide's
KL movement between window averages).

Truth from outside the code under test: the closed-form posterior of a Bayesian linear
regression with known noise (Gaussian, so the Laplace approximation is exact), the
closed-form mode and curvature of a Gamma posterior on the log scale, and the closed-form
KL divergence between two Gaussians. The stories are written as Pyro's tutorials write
them: ``X @ w``, float32 data, the observed site under a name of its own.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import constraints

import ppl_notes
from ppl_notes import infer
from ppl_notes._dtype import run_dtype
from ppl_notes.errors import DiagnosticWarning
from ppl_notes.evaluation import story_dtype
from ppl_notes.models.conjugate import normal_mean, normal_mean_posterior
from ppl_notes.vi.guide_distance import GuideDistance
from ppl_notes.vi.laplace_start import apply_scales, laplace_start

NOISE = 0.5
RNG = np.random.default_rng(7)
X = RNG.normal(size=(30, 3)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5]) + NOISE * RNG.normal(size=30)).astype(np.float32)


@ppl_notes.model(observed="obs", data={"X": X, "y": Y})
def regression(X, y=None):
    """w ~ Normal(0, I); y ~ Normal(X w, 0.5^2 I)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1))
    pyro.sample("obs", dist.Normal(X @ w, NOISE).to_event(1), obs=y)


def _regression_posterior():
    """Closed form: precision I + X^T X / s^2, mean Sigma X^T y / s^2."""
    x, y = X.astype(float), Y.astype(float)
    precision = np.eye(3) + x.T @ x / NOISE**2
    covariance = np.linalg.inv(precision)
    return covariance @ x.T @ y / NOISE**2, covariance, precision


def test_the_laplace_start_of_a_gaussian_posterior_is_the_posterior():
    with run_dtype(story_dtype(regression)):  # as infer() runs a story
        _check_laplace_start()


def _check_laplace_start():
    mean, covariance, precision = _regression_posterior()
    data = regression.prepare_data(None)
    start = laplace_start(regression, data, seed=0, dispersed=False)
    assert start.names == ["w"]
    # L-BFGS to 1e-6 in the gradient; central differences of an exact quadratic
    np.testing.assert_allclose(start.values["w"].numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(start.precision.numpy(), precision, rtol=1e-6)
    assert start.gradients >= 2 * 3  # the search's evaluations and the Hessian's six
    pyro.clear_param_store()
    full = AutoMultivariateNormal(regression)
    assert apply_scales(full, start, data)
    pyro.clear_param_store()  # the module keeps its values, as infer's loop needs
    fitted = full.get_posterior(**data)
    np.testing.assert_allclose(fitted.covariance_matrix.detach().numpy(), covariance,
                               rtol=1e-5)
    pyro.clear_param_store()
    mean_field = AutoNormal(regression)
    assert apply_scales(mean_field, start, data)
    mean_field(**data)
    # the mean-field optimum for a Gaussian target: sds 1 / sqrt(precision_ii)
    np.testing.assert_allclose(mean_field.scales.w.detach().numpy(),
                               1 / np.sqrt(np.diag(precision)), rtol=1e-5)


@ppl_notes.model(observed="counts", data={"counts": np.array([3, 5, 2, 4, 6], np.float32)})
def poisson_rate(counts):
    """rate ~ Gamma(2, 1); counts ~ Poisson(rate): the posterior is Gamma(2 + sum, 1 + n)."""
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("days", len(counts)):
        pyro.sample("counts", dist.Poisson(rate), obs=counts)


def test_the_laplace_start_is_taken_in_the_unconstrained_space():
    """On u = log(rate) the Gamma(a, b) posterior's density is prop. to exp(a u - b e^u):
    its mode is log(a / b) and its curvature there is a, so the start's sd of u is
    1 / sqrt(a) -- not the mode of the rate itself, (a - 1) / b."""
    a, b = 2 + 20, 1 + 5
    data = poisson_rate.prepare_data(None)
    start = laplace_start(poisson_rate, data, seed=0, dispersed=False)
    assert float(start.values["rate"]) == pytest.approx(a / b, rel=1e-5)
    assert float(start.precision[0, 0]) == pytest.approx(a, rel=1e-5)


def test_the_guide_distance_is_the_kl_divergence():
    """Two diagonal Gaussians: KL = sum_i log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2.
    With 4000 draws the estimate's relative standard error is sqrt(2 / 4000) = 2%, and its
    second-order error is the cube of the move; 10% covers both."""
    with run_dtype(story_dtype(regression)):
        _check_guide_distance()


def test_the_guide_distance_drawn_in_one_vectorised_trace_is_the_kl_divergence():
    """As above, the draws made in one trace in a plate left of the story's (one call of
    the guide, not 4000); the same closed form and tolerance."""
    with run_dtype(story_dtype(regression)):
        _check_guide_distance(particle_dim=-2)


def _check_guide_distance(particle_dim=None):
    data = regression.prepare_data(None)
    pyro.clear_param_store()
    guide = AutoNormal(regression)
    guide(**data)
    store = pyro.get_param_store()
    names = list(store.keys())

    def read():
        return [store._params[n] for n in names]

    def write(values):
        with torch.no_grad():
            for parameter, value in zip(read(), values, strict=True):
                parameter.copy_(value)

    here = [p.detach().clone() for p in read()]
    moved = [p + 0.01 * torch.ones_like(p) if "locs" in n else p + 0.01
             for n, p in zip(names, here, strict=True)]
    distance = GuideDistance(guide, data, write, read, draws=4000, particle_dim=particle_dim)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    got = distance(here, moved)
    assert torch.equal(torch.rand(3), before)  # the caller's random stream is untouched
    for parameter, value in zip(read(), here, strict=True):  # and its parameters
        assert torch.equal(parameter.detach(), value)

    def loc_scale(values):
        table = dict(zip(names, values, strict=True))
        scale = torch.nn.functional.softplus(table["AutoNormal.scales.w"])
        return table["AutoNormal.locs.w"].double(), scale.double()

    (m1, s1), (m2, s2) = loc_scale(here), loc_scale(moved)
    kl = float((torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum())
    parameters = sum(p.numel() for p in here)  # 6: under the full-rank count, 3 + 6
    assert got == pytest.approx(kl / parameters, rel=0.1)
    assert distance._vectorised is (particle_dim is not None)
    assert distance.elements == 3  # w's elements, however drawn
    assert distance(here, moved) == got  # the same phi's draws serve again


def test_a_gaussian_posterior_stops_early_and_on_the_closed_form():
    """From the Laplace start the full-rank guide is at its optimum: the rule stops at
    one of its first checks (three windows make the first), and the draws match the
    closed form within their Monte Carlo error (1000 draws: 4 standard errors of a mean,
    15% of a variance) plus what the stop allows (a fifth of an sd)."""
    mean, covariance, _ = _regression_posterior()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        fit = infer(regression, method="svi", guide="fullrank", optimizer="adam",
                    progress=False)
    assert fit.info["stopped"] == "converged"
    assert fit.info["steps_done"] <= 500
    draws = fit.draws("w")
    sd = np.sqrt(np.diag(covariance))
    assert np.all(np.abs(draws.mean(0) - mean) < 4 * sd / math.sqrt(len(draws)) + 0.2 * sd)
    np.testing.assert_allclose(np.cov(draws.T), covariance, rtol=0.15, atol=0.15 * sd.min()**2)
    assert fit.info["start_gradients"] > 0
    moves = fit.info["guide_moves"]
    assert moves and max(moves[-1][1:3]) <= fit.options["tolerance"]


def test_a_fit_still_moving_is_not_stopped():
    """From the prior's origin at a learning rate of 0.0005, Adam moves the mean by at
    most 0.0005 a step: the posterior mean (about 1.4) is out of reach of the 2000 steps,
    so every check sees the guide moving and the run ends at its cap."""
    mean, _ = normal_mean_posterior(normal_mean._default_data()["x"])
    assert mean > 2000 * 0.0005
    fit = infer(normal_mean, method="svi", init="prior", learning_rate=0.0005, progress=False)
    assert fit.info["stopped"] == "steps" and fit.info["steps_done"] == 2000
    tolerance = fit.options["tolerance"]  # the gain's: tolerance x 2 parameters (loc, scale)
    assert not any(max(move[1:3]) <= tolerance and move[3] <= 2 * tolerance
                   for move in fit.info["guide_moves"])


LINE_X = np.linspace(0.0, 1.0, 20)
LINE_Y = 1.0 + 2.0 * LINE_X + 0.3 * np.sin(40.0 * LINE_X)


@ppl_notes.model(observed="obs", data={"x": LINE_X.astype(np.float32),
                                        "y": LINE_Y.astype(np.float32)})
def flat_line(x, y=None):
    """Stan's flat priors, as posteriordb's kilpisjarvi has them: ImproperUniform."""
    alpha = pyro.sample("alpha", dist.ImproperUniform(constraints.real, (), ()))
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), ()))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(alpha + beta * x, sigma), obs=y)


def test_a_restart_of_a_story_with_flat_priors_starts_at_its_mode():
    """A flat prior cannot be sampled: a restart's search starts uniformly in (-2, 2)
    instead, and reaches the one mode: at any sigma, the least-squares line."""
    x32, y32 = LINE_X.astype(np.float32).astype(float), LINE_Y.astype(np.float32).astype(float)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([np.ones(20), x32], 1), y32, rcond=None)
    data = flat_line.prepare_data(None)
    for seed in (1, 2):
        start = laplace_start(flat_line, data, seed=seed, dispersed=True)
        assert start is not None
        assert float(start.values["alpha"]) == pytest.approx(alpha, abs=1e-4)
        assert float(start.values["beta"]) == pytest.approx(beta, abs=1e-4)
