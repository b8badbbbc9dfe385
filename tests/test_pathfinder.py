"""Pathfinder (Zhang et al. 2022) and NUTS's init="pathfinder".

Truth: the closed form of the conjugate Normal mean (tests.corpus.truth's formula, in
ppl_notes.models.conjugate) and of Bayesian linear regression with known noise. On a
Gaussian posterior the L-BFGS inverse Hessian is exact in the directions the path
explored, so the pooled, importance-resampled draws match the closed form within their
Monte Carlo error: 1000 resampled draws of near-uniform weights, 4 standard errors of a
mean (0.13 sd) and 10% of an sd.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppl_notes import infer
from ppl_notes.errors import OptionError
from ppl_notes.models.conjugate import normal_mean, normal_mean_posterior
from ppl_notes.vi.lbfgs_paths import inverse_hessian, lbfgs_paths
from tests.test_vi_newton import _closed_form, _regression_data, regression


def test_lbfgs_paths_reach_the_minimum_and_their_inverse_hessian_the_covariance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    precision = a @ a.T + np.eye(3)
    centre = np.array([1.0, -2.0, 0.5])

    def potential(x):
        r = x - centre
        return 0.5 * np.einsum("ni,ij,nj->n", r, precision, r), r @ precision

    paths, evaluations = lbfgs_paths(potential, rng.normal(size=(2, 3)) * 3)
    for path in paths:
        assert path.stopped == "converged"
        np.testing.assert_allclose(path.positions[-1], centre, atol=1e-4)
    # the starts, and at least one trial point for every accepted iterate
    assert evaluations >= 2 + sum(len(p.positions) - 1 for p in paths)
    # BFGS on a quadratic: the inverse Hessian acts as the covariance along the path's steps
    hessian_inverse = inverse_hessian(paths[0])
    s = paths[0].positions[-1] - paths[0].positions[-2]
    y = paths[0].gradients[-1] - paths[0].gradients[-2]
    np.testing.assert_allclose(hessian_inverse @ y, s, rtol=1e-6, atol=1e-10)


def test_pathfinder_lands_on_a_gaussian_posterior():
    data = _regression_data(condition=1e3)
    mean, covariance, _ = _closed_form(data)
    sd = np.sqrt(np.diag(covariance))
    fit = infer(regression, data, method="pathfinder", progress=False)
    draws = fit.draws("w").reshape(-1, 4)
    assert draws.shape[0] == 1000
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean) / sd, 0.15)
    np.testing.assert_allclose(draws.std(0) / sd, 1, atol=0.1)
    assert fit.info["khat"] < 0.5 and fit.check().reliable, fit.check()
    assert fit.info["gradient_evaluations"] > fit.info["lbfgs_evaluations"] > 0


def test_pathfinder_on_the_conjugate_normal():
    mean, sd = normal_mean_posterior(normal_mean.prepare_data(None)["x"])
    fit = infer(normal_mean, method="pathfinder", seed=3, progress=False)
    draws = fit.draws("mu")
    assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(len(draws)) + 0.05 * sd
    assert draws.std() == pytest.approx(sd, rel=0.1)
    with pytest.raises(OptionError, match="num_paths"):
        infer(normal_mean, method="pathfinder", num_paths=0, progress=False)


def test_nuts_can_start_from_pathfinder():
    fit = infer(normal_mean, method="nuts", init="pathfinder", chains=2, warmup=200,
                draws=300, progress=False)
    assert fit.info["pathfinder_gradients"] > 0
    mean, sd = normal_mean_posterior(normal_mean.prepare_data(None)["x"])
    assert abs(fit.draws("mu").mean() - mean) < 0.2 * sd
    with pytest.raises(OptionError, match="init='pathfinder' starts ppl_notes' own engine"):
        infer(normal_mean, method="nuts", engine="pyro", init="pathfinder", progress=False)
