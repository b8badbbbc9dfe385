"""The corpus's second round (issue 30): each new story with its data and its truth.

Truths from closed forms (Gaussian linear models, conjugate means) and from numpy/scipy
quadrature on a grid (:func:`tests.corpus.truth.grid_2d`), each log density written out
here from the distributions' formulas, not read from ppl_notes.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch
from scipy import special

from ppl_notes import model
from tests.corpus import truth
from tests.corpus import user_stories_two as us2


def _rng(seed):
    return np.random.default_rng(seed)


def _gaussian_linear(design, y, noise_sd, prior_precision):
    mean, covariance = truth.gaussian_linear(design, y, noise_sd, prior_precision)
    return mean, np.sqrt(np.diag(covariance))


def _log_gamma_pdf(x, shape, rate):
    return shape * np.log(rate) - special.gammaln(shape) + (shape - 1) * np.log(x) - rate * x


def round_two_cases(case_type) -> list:
    """The new stories (10), as :class:`tests.corpus.cases.Case` objects."""
    Case = case_type
    cases = []

    X = _rng(40).normal(size=(50, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.5 * _rng(41).normal(size=50)

    def module_truth():
        design = np.column_stack([X, np.ones(len(X))])
        mean, sd = _gaussian_linear(design, y, 0.5, np.diag([1.0, 1.0, 1.0, 1 / 100]))
        return {"linear.weight": truth.m(mean[:3], sd[:3], mean[:3]),
                "linear.bias": truth.m(mean[3:], sd[3:], mean[3:])}

    cases.append(Case("pyro_module_regression",
                      model(observed={"obs": "y"})(us2.BayesianRegression(3)),
                      {"x": X, "y": y}, module_truth, "closed form", svi_means_exact=True))

    xp = _rng(42).normal(2.0, 1.5, 40)
    cases.append(Case("param_inside_model", model(observed="x")(us2.param_noise), {"x": xp},
                      lambda: {"mu": truth.normal_mean(xp, 1.5, 10.0)},
                      "closed form (the param at its initial value)"))

    xs = _rng(43).normal(-1.0, 1.0, 30)
    cases.append(Case("poutine_scale", model(observed="x")(us2.weighted_likelihood),
                      {"x": xs}, lambda: {"mu": truth.normal_mean(xs, 1 / np.sqrt(2), 10.0)},
                      "closed form", svi_means_exact=True))

    zeros = _rng(44).random(60) < 0.3
    zip_counts = np.where(zeros, 0, _rng(45).poisson(4.0, 60)).astype(float)

    def zip_truth():
        zero = zip_counts == 0
        positive = zip_counts[~zero]

        def log_density(gate, rate):
            log_zero = np.log(gate + (1 - gate) * np.exp(-rate))
            log_positive = (np.log1p(-gate) - rate)[..., None] + positive * np.log(
                rate[..., None]) - special.gammaln(positive + 1)
            return (zero.sum() * log_zero + log_positive.sum(-1)
                    + _log_gamma_pdf(rate, 2.0, 0.5))

        return truth.grid_2d(log_density, (1e-4, 1 - 1e-4), (0.05, 20.0), ("gate", "rate"))

    cases.append(Case("zero_inflated_poisson", model(observed="counts")(us2.zero_inflated_counts),
                      {"counts": zip_counts}, zip_truth, "quadrature"))

    nb_counts = _rng(46).negative_binomial(3.0, 3.0 / 8.0, 50).astype(float)

    def nb_truth():
        def log_density(mean, dispersion):
            p = mean / (mean + dispersion)
            k = nb_counts
            log_lik = (special.gammaln(k + dispersion[..., None]) - special.gammaln(
                dispersion[..., None]) - special.gammaln(k + 1)
                + k * np.log(p[..., None]) + dispersion[..., None] * np.log1p(-p[..., None]))
            log_mean_prior = -np.log(mean) - 0.5 * (np.log(mean) - 1.0) ** 2
            return log_lik.sum(-1) + log_mean_prior + _log_gamma_pdf(dispersion, 2.0, 0.5)

        return truth.grid_2d(lambda a, b: log_density(*np.broadcast_arrays(a, b)),
                             (0.5, 15.0), (0.2, 40.0), ("mean", "dispersion"))

    cases.append(Case("negative_binomial", model(observed="counts")(
        us2.negative_binomial_counts), {"counts": nb_counts}, nb_truth, "quadrature"))

    xo = _rng(47).normal(size=80)
    latent = 1.2 * xo + _rng(48).logistic(size=80)
    ratings = np.digitize(latent, [-0.8, 0.8]).astype(float)

    def ordinal_truth():
        def log_density(slope, gap):
            eta = slope[..., None] * xo
            upper, lower = special.expit(gap[..., None] - eta), special.expit(-gap[..., None]
                                                                                 - eta)
            p = np.where(ratings == 0, lower, np.where(ratings == 1, upper - lower, 1 - upper))
            return (np.log(p).sum(-1) - 0.5 * (slope / 2.0) ** 2 - 0.5 * (gap / 3.0) ** 2)

        return truth.grid_2d(lambda a, b: log_density(*np.broadcast_arrays(a, b)),
                             (-2.0, 5.0), (1e-3, 4.0), ("slope", "gap"))

    cases.append(Case("ordinal_regression", model(observed="rating")(us2.ordinal_regression),
                      {"x": xo, "rating": ratings}, ordinal_truth, "quadrature"))

    yt = 1.0 + _rng(49).standard_t(4.0, 40)

    def student_truth():
        def log_density(nu, mu):
            z = (yt - mu[..., None]) ** 2 / nu[..., None]
            constant = (special.gammaln((nu + 1) / 2) - special.gammaln(nu / 2)
                        - 0.5 * np.log(nu * np.pi))
            log_lik = constant[..., None] - (nu[..., None] + 1) / 2 * np.log1p(z)
            return log_lik.sum(-1) + _log_gamma_pdf(nu, 2.0, 0.1) - 0.5 * (mu / 10.0) ** 2

        return truth.grid_2d(lambda a, b: log_density(*np.broadcast_arrays(a, b)),
                             (0.3, 150.0), (-3.0, 5.0), ("nu", "mu"))

    cases.append(Case("student_t_latent_nu", model(observed="y")(us2.robust_mean), {"y": yt},
                      student_truth, "quadrature"))

    Xg = np.linspace(0, 5, 15)[:, None]
    yg = np.sin(Xg[:, 0]) + 0.3 * _rng(50).normal(size=15)

    def gp_truth():
        distances = np.abs(Xg - Xg.T)
        kernel = 1.5**2 * np.exp(-0.5 * distances**2 / 0.8**2) + 1e-6 * np.eye(15)
        covariance = np.linalg.inv(np.linalg.inv(kernel) + np.eye(15) / 0.3**2)
        mean = covariance @ yg / 0.3**2
        return {"f": truth.m(mean, np.sqrt(np.diag(covariance)), mean)}

    cases.append(Case("gp_cdist", model(observed="y")(us2.gp_regression), {"X": Xg, "y": yg},
                      gp_truth, "closed form", svi_means_exact=True))

    row_effects, column_effects = _rng(51).normal(size=6), _rng(52).normal(size=5)
    table = (row_effects[:, None] + column_effects[None, :]
             + 0.7 * _rng(53).normal(size=(6, 5)))

    def crossed_truth():
        design = np.zeros((30, 11))
        for i in range(6):
            for j in range(5):
                design[i * 5 + j, i] = design[i * 5 + j, 6 + j] = 1.0
        mean, sd = _gaussian_linear(design, table.reshape(-1), 0.7, np.eye(11))
        return {"row": truth.m(mean[:6], sd[:6], mean[:6]),
                "column": truth.m(mean[6:], sd[6:], mean[6:])}

    cases.append(Case("crossed_effects_nested_plates", model(observed="y")(us2.crossed_effects),
                      {"y": table}, crossed_truth, "closed form", svi_means_exact=True))

    xc = _rng(54).normal(0.5, 1.0, 30)
    conditioned = pyro.condition(us2.unconditioned_mean, data={"x": torch.tensor(xc)})
    cases.append(Case("pyro_condition", model(observed="x", name="conditioned_mean")(
        conditioned), {"n": 30}, lambda: {"mu": truth.normal_mean(xc, 1.0, 10.0)},
        "closed form", svi_means_exact=True))
    return cases
