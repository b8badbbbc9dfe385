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

__all__ = ["psis_log_weights", "gpd_fit", "psis_weights", "importance_khat",
           "importance_ess_share", "logsumexp", "systematic_resample"]

#: Columns smoothed at once: bounds the (grid x tail x columns) array of the fit (~60 MB).
_COLUMNS_AT_ONCE = 512


def logsumexp(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """log(sum(exp(values))) along ``axis`` (the draws), stable; scipy's without its import."""
    top = np.max(values, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(values - top), axis=axis))


def gpd_fit(excess: np.ndarray) -> tuple:
    """Shape and scale of a generalised Pareto fit to sorted positive ``excess``.

    Zhang & Stephens (2009), with the prior of Vehtari et al. (2024): ``nan`` where the
    first quartile is not above the minimum (not Pareto-like at all), ``inf`` where the
    fit is undefined. ``excess`` is 1-D (floats back) or 2-D, one column a fit (arrays).
    """
    excess = np.asarray(excess, dtype=float)
    columns = excess.reshape(len(excess), -1)
    kappa, sigma = _gpd_fit_columns(columns)
    if excess.ndim == 1:
        return float(kappa[0]), float(sigma[0])
    return kappa, sigma


def _gpd_fit_columns(excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prior_bs, prior_k = 3, 10
    n = len(excess)
    m_est = 30 + int(n**0.5)
    first_quartile = excess[int((n / 4 + 0.5) - 1)]
    pareto_like = first_quartile > excess[0]
    grid = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))
    with np.errstate(divide="ignore", invalid="ignore"):
        b = grid[:, None] / (prior_bs * first_quartile) + 1 / excess[-1]  # (grid, column)
        k = np.mean(np.log1p(-b[:, None, :] * excess[None]), axis=1)
        profile = n * (np.log(-b / k) - k - 1)
        weights = np.exp(profile - logsumexp(profile))
        weights = np.where(weights >= 10 * np.finfo(float).eps, weights, 0.0)
        total = weights.sum(axis=0)
        weights /= np.where(total > 0, total, 1.0)  # none kept: b_post = 0, as with none left
        b_post = np.sum(b * weights, axis=0)
        kappa = np.mean(np.log1p(-b_post * excess), axis=0)
        sigma = -kappa / b_post
        kappa = (n * kappa + prior_k * 0.5) / (n + prior_k)
    sigma = np.where(np.isnan(kappa), np.nan, sigma)
    kappa = np.where(np.isnan(kappa), np.inf, kappa)
    return np.where(pareto_like, kappa, np.nan), np.where(pareto_like, sigma, np.nan)


def _gpd_quantiles(probabilities: np.ndarray, kappa: np.ndarray, sigma: np.ndarray,
                   location: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        exponential = location - sigma * np.log1p(-probabilities)
        pareto = location + sigma * np.expm1(-kappa * np.log1p(-probabilities)) / kappa
    return np.where(sigma > 0, np.where(kappa == 0, exponential, pareto), np.nan)


def psis_log_weights(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple:
    r"""Pareto-smoothed, normalised log weights of ``log_ratios``, and :math:`\hat k`.

    ``log_ratios`` is 1-D (one set of draws: weights and a float back) or 2-D, draws by
    columns, each column smoothed on its own (PSIS-LOO's one column per observation:
    weights of the same shape and one :math:`\hat k` per column), vectorised over the
    columns. ``r_eff`` is the draws' relative effective sample size, which sets the tail.

    Raises
    ------
    ValueError
        With fewer than 5 ratios in the tail (fewer than about 25 draws), or a column whose
        tail values are all equal, as ``arviz_stats`` does.
    """
    values = np.asarray(log_ratios, dtype=float)
    columns = values.reshape(len(values), -1)
    pieces = [_smooth_columns(columns[:, i:i + _COLUMNS_AT_ONCE], r_eff)
              for i in range(0, columns.shape[1], _COLUMNS_AT_ONCE)]
    weights = np.concatenate([w for w, _ in pieces], axis=1)
    khat = np.concatenate([k for _, k in pieces])
    if values.ndim == 1:
        return weights[:, 0], float(khat[0])
    return weights.reshape(values.shape), khat


def _smooth_columns(log_ratios: np.ndarray, r_eff: float) -> tuple[np.ndarray, np.ndarray]:
    values = log_ratios - np.max(log_ratios, axis=0)
    n = len(values)
    tail = int(np.floor(3 * (n / r_eff) ** 0.5) if n * r_eff > 225 else np.floor(n / 5))
    if tail < 5:
        raise ValueError("n_draws_tail must be at least 5")
    order = np.argsort(values, axis=0)
    ordered = np.take_along_axis(values, order, axis=0)
    draws_tail, cutoff = ordered[n - tail:], ordered[n - tail - 1]
    largest = np.max(draws_tail, axis=0)
    if np.any(np.abs(largest - np.min(draws_tail, axis=0)) < np.finfo(float).tiny):
        raise ValueError("All tail values are the same")
    khat, sigma = _gpd_fit_columns(np.exp(draws_tail) - np.exp(cutoff))
    probabilities = (np.arange(0.5, tail) / tail)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        smoothed = np.log(_gpd_quantiles(probabilities, khat, sigma, np.exp(cutoff)))
    smoothed = np.where(smoothed > largest, largest, smoothed)
    tail_rows = order[n - tail:]
    columns = np.broadcast_to(np.arange(values.shape[1]), tail_rows.shape)
    values[tail_rows, columns] = np.where(np.isfinite(khat), smoothed, draws_tail)
    return values - logsumexp(values), khat


def importance_khat(log_p: np.ndarray, log_q: np.ndarray) -> float:
    r"""Pareto :math:`\hat k` of the ratios :math:`p(x, z_s)/q(z_s)`, :math:`z_s \sim q`.

    ArviZ's PSIS fit (Vehtari et al. 2024; :func:`psis_log_weights`) to the largest ratios;
    Yao et al. (2018) read it as a diagnostic of the approximation itself. ``nan`` with
    too few draws to fit a tail (fewer than about 30).
    """
    try:
        return psis_weights(log_p, log_q)[1]
    except ValueError:  # too few draws for a tail fit (ArviZ needs >= 5 in the tail)
        return float("nan")


def psis_weights(log_p: np.ndarray, log_q: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed importance weights of draws from q for p, and their :math:`\hat k`.

    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto Smoothed Importance Sampling"
    (JMLR): the largest ratios :math:`p/q` are replaced by quantiles of a generalised
    Pareto fit to them, which bounds the estimator's variance (:func:`psis_log_weights`).

    Returns
    -------
    (weights, khat)
        Normalised weights (summing to 1), one per draw, and the tail's shape estimate.
    """
    log_ratio = np.asarray(log_p, dtype=float).ravel() - np.asarray(log_q, dtype=float).ravel()
    log_weights, khat = psis_log_weights(log_ratio)
    weights = np.exp(log_weights - log_weights.max())
    return weights / weights.sum(), float(khat)


def importance_ess_share(log_p: np.ndarray, log_q: np.ndarray) -> float:
    r"""The effective sample size of the raw weights :math:`p/q`, as a share of the draws.

    :math:`(\sum w)^2 / (S \sum w^2)` (Kong 1992): 1 when q is p up to a constant.
    """
    log_ratio = np.asarray(log_p, dtype=float).ravel() - np.asarray(log_q, dtype=float).ravel()
    weights = np.exp(log_ratio - log_ratio.max())
    return float(weights.sum() ** 2 / (len(weights) * (weights**2).sum()))


def systematic_resample(weights: np.ndarray, size: int, rng: np.random.Generator
                        ) -> np.ndarray:
    """``size`` indices drawn in proportion to normalised ``weights``, systematically.

    One uniform offset, then evenly spaced points on the cumulative weights (Kitagawa
    1996): each index is drawn within one of its expected count, a lower variance than
    multinomial resampling.
    """
    points = (rng.random() + np.arange(size)) / size
    return np.minimum(np.searchsorted(np.cumsum(weights), points), len(weights) - 1)
