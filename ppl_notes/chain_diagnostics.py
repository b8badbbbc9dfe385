r"""Rank-normalised R-hat, bulk and tail ESS and E-BFMI of MCMC draws, in NumPy alone.

The checks that follow every MCMC run (:func:`ppl_notes.diagnostics.diagnostics`) need
these four numbers per element. ``arviz_stats`` computes the same ones, but importing it
loads its LOO module and ``scipy.stats`` (1.0 s here, the larger part of a short NUTS
run's wall time). These functions are the algorithms of Vehtari, Gelman, Simpson,
Carpenter & Bürkner (2021), "Rank-normalization, folding, and localization: an improved
R-hat for assessing convergence of MCMC", *Bayesian Analysis* 16(2), written as
``arviz_stats.base`` writes them, and tested equal to it (``tests/test_chain_diagnostics.py``).

Every function takes draws shaped ``(chain, draw)`` and returns a float, ``nan`` where
the draws hold a NaN or are too few (fewer than 4 draws per chain; R-hat also needs 2
chains).
"""

from __future__ import annotations

import numpy as np

#: Blom's (1958) fractional offset for back-transforming ranks to normal scores.
BLOM_OFFSET = 3 / 8


def _valid(draws: np.ndarray, min_chains: int) -> bool:
    return (draws.ndim == 2 and draws.shape[1] >= 4 and draws.shape[0] >= min_chains
            and not np.isnan(draws).any())


def split_chains(draws: np.ndarray) -> np.ndarray:
    """Each chain's first and last halves as separate chains (a middle odd draw is dropped)."""
    half = draws.shape[1] // 2
    return np.vstack((draws[:, :half], draws[:, -half:]))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened ``values``, ties given their average rank."""
    flat = values.reshape(-1)
    order = np.argsort(flat, kind="mergesort")
    ordered = flat[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], flat.size]  # exclusive
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(flat.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks.reshape(values.shape)


def normal_scores(values: np.ndarray) -> np.ndarray:
    r"""Rank-normalised draws: :math:`\Phi^{-1}((r - 3/8) / (n - 3/4 + 1))` of the ranks."""
    import torch  # already loaded by ppl_notes' inference; scipy.special is not

    ranks = average_ranks(values)
    scaled = (ranks - BLOM_OFFSET) / (ranks.size - 2 * BLOM_OFFSET + 1)
    return torch.special.ndtri(torch.from_numpy(scaled)).numpy()


def _potential_scale_reduction(draws: np.ndarray) -> float:
    n = draws.shape[1]
    between = n * np.var(draws.mean(axis=1), ddof=1)
    within = np.mean(np.var(draws, axis=1, ddof=1))
    return float(np.sqrt((between / within + n - 1) / n))


def rhat(draws: np.ndarray) -> float:
    r"""Rank-normalised split :math:`\hat R`: the larger of the bulk and the folded one.

    Bulk: split-:math:`\hat R` of the normal scores of the split chains; folded: the same
    of :math:`|\theta - \mathrm{median}|`, which sees chains that differ in scale.
    """
    draws = np.asarray(draws, dtype=float)
    if not _valid(draws, min_chains=2):
        return float("nan")
    split = split_chains(draws)
    bulk = _potential_scale_reduction(normal_scores(split))
    folded = _potential_scale_reduction(normal_scores(np.abs(split - np.median(split))))
    return max(bulk, folded)


def autocovariance(draws: np.ndarray) -> np.ndarray:
    """Each chain's autocovariance at every lag (biased, divided by n), by FFT."""
    n = draws.shape[1]
    centred = draws - draws.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * n, axis=1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=2 * n, axis=1)[:, :n] / n


def effective_sample_size(draws: np.ndarray) -> float:
    r"""ESS of ``(chain, draw)`` draws: :math:`S / \hat\tau`.

    :math:`\hat\tau` sums the multi-chain autocorrelations, truncated by Geyer's initial
    monotone sequence (Stan's estimator; Gelman et al., BDA3, eqs. 11.7-11.8).
    """
    draws = np.asarray(draws, dtype=float)
    if np.max(draws) - np.min(draws) < np.finfo(float).resolution:
        return float(draws.size)
    chains, n = draws.shape
    acov = autocovariance(draws)
    mean_var = np.mean(acov[:, 0]) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus += np.var(draws.mean(axis=1), ddof=1)
    rho = np.zeros(n)
    rho_even, rho_odd = 1.0, 1.0 - (mean_var - np.mean(acov[:, 1])) / var_plus
    rho[0], rho[1] = rho_even, rho_odd
    lag_means = acov.mean(axis=0)
    t = 1
    while t < n - 3 and rho_even + rho_odd > 0.0:  # initial positive sequence
        rho_even = 1.0 - (mean_var - lag_means[t + 1]) / var_plus
        rho_odd = 1.0 - (mean_var - lag_means[t + 2]) / var_plus
        if rho_even + rho_odd >= 0:
            rho[t + 1], rho[t + 2] = rho_even, rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho[max_t + 1] = rho_even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    total = chains * n
    tau = -1.0 + 2.0 * np.sum(rho[:max_t + 1]) + np.sum(rho[max_t + 1:max_t + 2])
    tau = max(tau, 1 / np.log10(total))
    return float("nan") if np.isnan(rho).any() else float(total / tau)


def ess_bulk(draws: np.ndarray) -> float:
    """Bulk ESS: the ESS of the split chains' normal scores."""
    draws = np.asarray(draws, dtype=float)
    if not _valid(draws, min_chains=1):
        return float("nan")
    return effective_sample_size(normal_scores(split_chains(draws)))


def ess_tail(draws: np.ndarray, prob: float | tuple[float, float] | None = None) -> float:
    """Tail ESS: the smaller ESS of the indicators of two quantiles.

    ``prob``: the quantiles ``(low, high)``, or one ``p`` for ``(1 - p, p)``. Vehtari et
    al. use (0.05, 0.95); ArviZ 1.x, whose ``summary()`` ppl_notes shows, defaults to its
    credible-interval probability (``rcParams["stats.ci_prob"]``, 0.89), and so does
    ``None`` here, so that a warning and the summary table give the same number.
    """
    draws = np.asarray(draws, dtype=float)
    if not _valid(draws, min_chains=1):
        return float("nan")
    if prob is None:
        from arviz_base import rcParams  # light once xarray is loaded (20 ms)

        prob = rcParams["stats.ci_prob"]
    low, high = sorted(prob) if isinstance(prob, tuple) else sorted((prob, 1 - prob))
    return min(effective_sample_size(split_chains(draws <= np.quantile(draws, p)))
               for p in (low, high))


def bfmi(energy: np.ndarray) -> np.ndarray:
    r"""E-BFMI per chain (Betancourt 2016): :math:`\overline{(\Delta E)^2} / \mathrm{Var}(E)`."""
    energy = np.atleast_2d(np.asarray(energy, dtype=float))
    return np.square(np.diff(energy, axis=1)).mean(axis=1) / np.var(energy, axis=1, ddof=1)
