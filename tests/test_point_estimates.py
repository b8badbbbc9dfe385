"""MAP and MLE against estimators computed independently (notes §1.b: ERM <-> MLE, SRM <-> MAP)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from ppl_notes import StoryError, infer, model
from ppl_notes.models.regression import linear, load_breast_cancer, load_diabetes, logistic


@pytest.fixture(scope="module")
def diabetes():
    data = load_diabetes()
    return data["x"], data["y"]


@pytest.mark.parametrize(("weight_scale", "noise_scale"), [(1.0, 1.0), (0.1, 0.7)])
def test_map_with_normal_prior_is_ridge(diabetes, weight_scale, noise_scale):
    x, y = diabetes
    story = linear.configure(weight_scale=weight_scale, noise_scale=noise_scale)
    fit = infer(story, method="map", progress=False)
    penalty = noise_scale**2 / weight_scale**2  # lambda = sigma^2 / tau^2
    ridge = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ y)
    estimate = fit.draws("weights")[0]
    assert np.abs(estimate - ridge).max() / np.abs(ridge).max() < 1e-4
    assert fit.info["converged"]
    assert fit.summary().columns.tolist() == ["estimate"]


def test_mle_is_ordinary_least_squares(diabetes):
    x, y = diabetes
    fit = infer(linear, method="mle", progress=False)
    ols, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert np.abs(fit.draws("weights")[0] - ols).max() / np.abs(ols).max() < 1e-4


def _lasso_coordinate_descent(x, y, penalty, sweeps=20000):
    """argmin ||y - Xw||^2 + penalty ||w||_1 by cyclic coordinate descent (soft thresholding)."""
    weights = np.zeros(x.shape[1])
    norms = (x**2).sum(0)
    for _ in range(sweeps):
        previous = weights.copy()
        for j in range(x.shape[1]):
            partial = x[:, j] @ (y - x @ weights + x[:, j] * weights[j])
            weights[j] = np.sign(partial) * max(abs(partial) - penalty / 2, 0.0) / norms[j]
        if np.abs(weights - previous).max() < 1e-13:
            break
    return weights


def test_map_with_laplace_prior_is_lasso(diabetes):
    # a penalty (lambda = 2 sigma^2 / tau = 2) that shrinks every weight but zeroes none:
    # L-BFGS needs the density smooth at its mode (see ppl_notes.inference.point)
    x, y = diabetes
    weight_scale, noise_scale = 1.0, 1.0
    story = linear.configure(prior="laplace", weight_scale=weight_scale,
                             noise_scale=noise_scale)
    fit = infer(story, method="map", progress=False)
    lasso = _lasso_coordinate_descent(x, y, 2 * noise_scale**2 / weight_scale)
    ols, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert np.all(lasso != 0) and np.abs(lasso - ols).max() > 1e-3  # shrunk, none zeroed
    assert np.abs(fit.draws("weights")[0] - lasso).max() / np.abs(lasso).max() < 1e-4


@pytest.mark.parametrize("weight_scale", [0.5, 0.05])
def test_map_with_laplace_prior_reaches_the_lasso_with_exact_zeros(diabetes, weight_scale):
    """tau = 0.5 zeroes two weights (L-BFGS alone stalled at 1e-2 there), tau = 0.05 four:
    the zeros are exactly coordinate descent's, the other weights equal to 1e-6."""
    x, y = diabetes
    story = linear.configure(prior="laplace", weight_scale=weight_scale, noise_scale=1.0)
    fit = infer(story, method="map", progress=False)
    lasso = _lasso_coordinate_descent(x, y, 2 / weight_scale)
    estimate = fit.draws("weights")[0]
    assert (lasso == 0).sum() >= 2
    np.testing.assert_array_equal(estimate == 0, lasso == 0)
    assert fit.info["exact_zeros"] == int((lasso == 0).sum())
    assert np.abs(estimate - lasso).max() / np.abs(lasso).max() < 1e-6


def test_logistic_map_is_penalised_logistic_regression():
    data = load_breast_cancer()
    x, y = data["x"], data["y"]
    weight_scale, bias_scale = 1.0, 10.0

    def negative_log_posterior(theta):
        bias, weights = theta[0], theta[1:]
        logits = bias + x @ weights
        value = -(y * log_expit(logits) + (1 - y) * log_expit(-logits)).sum()
        value += 0.5 * (weights**2).sum() / weight_scale**2 + 0.5 * bias**2 / bias_scale**2
        residual = y - expit(logits)
        grad = np.concatenate([[-residual.sum() + bias / bias_scale**2],
                               -x.T @ residual + weights / weight_scale**2])
        return value, grad

    truth = minimize(negative_log_posterior, np.zeros(x.shape[1] + 1), jac=True,
                     method="BFGS", options={"gtol": 1e-10, "maxiter": 10000}).x
    fit = infer(logistic, method="map", progress=False)
    estimate = np.concatenate([fit.draws("bias")[0].reshape(1), fit.draws("weights")[0]])
    assert np.abs(estimate - truth).max() / np.abs(truth).max() < 1e-4


def test_point_estimate_converts_to_arviz_with_its_history():
    fit = infer(linear, method="map", progress=False)
    tree = fit.to_arviz()
    assert tree["posterior"]["weights"].shape == (1, 10)
    history = fit.history["log_density"].to_numpy()
    assert history[-1] == pytest.approx(history.max())
    assert float(tree["sample_stats"]["log_density"][0]) == pytest.approx(history[-1])


def test_discrete_site_without_finite_support_is_refused_before_inference():
    import pyro
    import pyro.distributions as dist
    import torch

    @model(observed="y", data={"y": np.array([1.0, 2.0])})
    def counts(y=None):
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0, dtype=torch.float64), 1.0))
        number = pyro.sample("number", dist.Poisson(rate))
        with pyro.plate("obs", 2):
            pyro.sample("y", dist.Normal(number, 1.0), obs=y)

    for method in ("mle", "map", "nuts"):
        with pytest.raises(StoryError, match=r"'number'.*infinite support.*Poisson.*guide"):
            infer(counts, method=method, progress=False)
