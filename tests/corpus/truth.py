"""Posteriors computed without the code under test: closed forms and numpy quadrature.

Each function returns ``{name: Moments}`` with the posterior mean, sd and (where it is
known) mode of each element; quadrature uses a 401 x 401 grid over +-9 sds of a coarse
first pass, which puts its error far below the Monte Carlo error the tests allow.
"""

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats


@dataclass
class Moments:
    """Posterior mean and sd of each element; the mode where it is known."""

    mean: np.ndarray
    sd: np.ndarray
    mode: np.ndarray | None = None


def m(mean, sd, mode=None):
    return Moments(np.atleast_1d(np.asarray(mean, float)), np.atleast_1d(np.asarray(sd, float)),
                   None if mode is None else np.atleast_1d(np.asarray(mode, float)))


def normal_mean(x, noise_sd, prior_sd, prior_mean=0.0, extra_precision=0.0):
    """mu ~ N(prior_mean, prior_sd), x_i ~ N(mu, noise_sd), plus a N(0, 1/extra) factor."""
    precision = 1 / prior_sd**2 + len(x) / noise_sd**2 + extra_precision
    mean = (prior_mean / prior_sd**2 + np.sum(x) / noise_sd**2) / precision
    return m(mean, precision**-0.5, mean)


def beta(a, b):
    return m(a / (a + b), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))), (a - 1) / (a + b - 2))


def gamma(a, b):
    return m(a / b, np.sqrt(a) / b, (a - 1) / b)


def inverse_gamma(a, b):
    return m(b / (a - 1), b / ((a - 1) * np.sqrt(a - 2)), b / (a + 1))


def gaussian_linear(design, y, noise_sd, prior_precision):
    """w ~ N(0, P^-1), y ~ N(design @ w, noise_sd): mean, sd and mode of w."""
    covariance = np.linalg.inv(design.T @ design / noise_sd**2 + prior_precision)
    mean = covariance @ design.T @ y / noise_sd**2
    return mean, covariance


def change_point(y, a, b):
    """Rates Gamma(a, b) before and after tau ~ U{0..T-1}: exact by enumeration.

    Returns the moments of both rates and p(tau | y).
    """
    y = np.asarray(y, float)
    T = len(y)
    cum = np.concatenate([[0.0], np.cumsum(y)])

    def log_marginal(total, count):
        return (a * np.log(b) - special.gammaln(a) + special.gammaln(a + total)
                - (a + total) * np.log(b + count))

    log_post = np.array([log_marginal(cum[t], t) + log_marginal(cum[T] - cum[t], T - t)
                         for t in range(T)])
    p_tau = np.exp(log_post - special.logsumexp(log_post))
    out = {}
    for name, totals, counts in (("rate_before", cum[:T], np.arange(T)),
                                 ("rate_after", cum[T] - cum[:T], T - np.arange(T))):
        shape, rate = a + totals, b + counts
        mean = np.sum(p_tau * shape / rate)
        second = np.sum(p_tau * shape * (shape + 1) / rate**2)
        out[name] = m(mean, np.sqrt(second - mean**2))

    def negative(log_rates):
        r1, r2 = np.exp(log_rates)
        per_tau = [np.sum(stats.poisson.logpmf(y[:t], r1)) + np.sum(stats.poisson.logpmf(y[t:], r2))
                   for t in range(T)]
        return -(special.logsumexp(per_tau) - np.log(T) + stats.gamma.logpdf(r1, a, scale=1 / b)
                 + stats.gamma.logpdf(r2, a, scale=1 / b))

    best = optimize.minimize(negative, np.log([out["rate_before"].mean[0],
                                               out["rate_after"].mean[0]]), method="Nelder-Mead",
                             options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
    out["rate_before"].mode, out["rate_after"].mode = np.exp(best.x[:1]), np.exp(best.x[1:])
    return out, p_tau


def grid_2d(log_density, first, second, names, transforms=None, size=401):
    """Moments of a 2-parameter posterior by quadrature on a grid.

    ``log_density(a, b)`` takes broadcastable arrays; ``first``/``second`` are the boxes of
    a coarse pass. ``transforms`` maps extra names to functions of ``(a, b)`` whose
    moments are wanted too (e.g. the smaller of two mixture means).
    """
    def grid(box_a, box_b, n):
        a = np.linspace(*box_a, n)[:, None]
        b = np.linspace(*box_b, n)[None, :]
        log_p = log_density(a, b)
        weights = np.exp(log_p - np.max(log_p))
        return a, b, weights / weights.sum(), log_p

    a, b, w, _ = grid(first, second, 201)
    boxes = []
    for values in (a, b):
        mean = np.sum(w * values)
        sd = np.sqrt(np.sum(w * (values - mean) ** 2))
        boxes.append((mean - 9 * sd, mean + 9 * sd))
    boxes = [(max(lo, box[0]), min(hi, box[1]))
             for (lo, hi), box in zip(boxes, (first, second), strict=True)]
    a, b, w, log_p = grid(boxes[0], boxes[1], size)
    a_full, b_full = np.broadcast_arrays(a, b)
    at = np.unravel_index(np.argmax(log_p), log_p.shape)
    out = {}
    functions = {names[0]: lambda x, y: x, names[1]: lambda x, y: y, **(transforms or {})}
    for name, function in functions.items():
        values = function(a_full, b_full)
        mean = np.sum(w * values)
        out[name] = m(mean, np.sqrt(np.sum(w * (values - mean) ** 2)), values[at])
    return out


def normal_log_pdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)
