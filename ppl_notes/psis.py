r"""Pareto-smoothed importance sampling in NumPy alone: log weights and :math:`\hat k`.

Every variational fit ends with the Pareto :math:`\hat k` of its importance ratios
:math:`p(x, z)/q(z)` (:mod:`ppl_notes.diagnostics`). ``arviz_stats`` computes it, but
importing it loads its LOO module and ``scipy.stats``: 1.5 s here, three times a
full-rank fit of the heights story. This module is the algorithm of Vehtari, Simpson,
Gelman, Yao & Gabry (2024), "Pareto Smoothed Importance Sampling", JMLR 25(72), written as
``arviz_stats.base.diagnostics`` writes it (``_psislw``, ``_ps_tail``, ``_gpdfit``,
``_gpinv``), and tested equal to it (``tests/test_psis.py``):

* the tail is the largest :math:`M = \lfloor 3\sqrt{S / r_{\text{eff}}}\rfloor` ratios
  (:math:`\lfloor S/5\rfloor` when :math:`S\,r_{\text{eff}} \le 225`);
* a generalised Pareto distribution is fitted to their excess over the largest ratio
  below the tail by Zhang & Stephens' (2009) empirical Bayes estimate, with the weakly
  informative prior that pulls :math:`\hat k` towards 0.5 (10 pseudo-observations);
* the tail ratios are replaced by the fitted quantiles (capped at the largest ratio),
  and the log weights normalised.
"""

from __future__ import annotations

import numpy as np

__all__ = ["psis_log_weights", "gpd_fit"]


def _logsumexp(values: np.ndarray) -> float:
    top = np.max(values)
    return float(top + np.log(np.sum(np.exp(values - top))))


def gpd_fit(excess: np.ndarray) -> tuple[float, float]:
    """Shape and scale of a generalised Pareto fit to sorted positive ``excess``.

    Zhang & Stephens (2009), with the prior of Vehtari et al. (2024): ``nan`` where the
    first quartile is not above the minimum (not Pareto-like at all), ``inf`` where the
    fit is undefined.
    """
    prior_bs, prior_k = 3, 10
    n = len(excess)
    m_est = 30 + int(n**0.5)
    first_quartile = excess[int((n / 4 + 0.5) - 1)]
    if first_quartile <= excess[0]:
        return float("nan"), float("nan")
    b = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))
    b /= prior_bs * first_quartile
    b += 1 / excess[-1]
    k = np.mean(np.log1p(-b[:, None] * excess), axis=1)
    profile = n * (np.log(-b / k) - k - 1)
    weights = np.exp(profile - _logsumexp(profile))
    kept = weights >= 10 * np.finfo(float).eps
    weights, b = weights[kept], b[kept]
    weights /= weights.sum()
    b_post = np.sum(b * weights)
    kappa = np.mean(np.log1p(-b_post * excess))
    sigma = -kappa / b_post
    kappa = (n * kappa + prior_k * 0.5) / (n + prior_k)
    if np.isnan(kappa):
        return float("inf"), float("nan")
    return float(kappa), float(sigma)


def _gpd_quantiles(probabilities: np.ndarray, kappa: float, sigma: float,
                   location: float) -> np.ndarray:
    if sigma <= 0:
        return np.full_like(probabilities, np.nan)
    if kappa == 0:
        return location - sigma * np.log1p(-probabilities)
    return location + sigma * np.expm1(-kappa * np.log1p(-probabilities)) / kappa


def psis_log_weights(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed, normalised log weights of ``log_ratios`` (1-D), and :math:`\hat k`.

    Raises
    ------
    ValueError
        With fewer than 5 ratios in the tail (fewer than about 25 draws), or a tail of
        equal values, as ``arviz_stats`` does.
    """
    values = np.asarray(log_ratios, dtype=float).ravel().copy()
    n = len(values)
    tail = int(np.floor(3 * (n / r_eff) ** 0.5) if n * r_eff > 225 else np.floor(n / 5))
    if tail < 5:
        raise ValueError("n_draws_tail must be at least 5")
    values -= np.max(values)
    order = np.argsort(values)
    tail_ids = np.arange(n - tail, n)
    draws_tail = values[order[tail_ids]]
    cutoff = values[order[tail_ids[0] - 1]]
    largest, smallest = np.max(draws_tail), np.min(draws_tail)
    if abs(largest - smallest) < np.finfo(float).tiny:
        raise ValueError("All tail values are the same")
    khat, sigma = gpd_fit(np.exp(draws_tail) - np.exp(cutoff))
    if np.isfinite(khat):
        probabilities = np.arange(0.5, tail) / tail
        smoothed = np.log(_gpd_quantiles(probabilities, khat, sigma, np.exp(cutoff)))
        smoothed[smoothed > largest] = largest
        values[order[tail_ids]] = smoothed
    values -= _logsumexp(values)
    return values, float(khat)
