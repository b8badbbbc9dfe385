r"""Leave-one-out cross-validation for MCMC and variational posteriors, and model comparison.

:func:`loo` estimates the expected log pointwise predictive density
:math:`\mathrm{elpd} = \sum_i \log p(y_i \mid y_{-i})` by Pareto-smoothed importance
sampling (Vehtari, Gelman & Gabry 2017), as ``arviz_stats.loo`` computes it from MCMC
draws and ``arviz_stats.loo_approximate_posterior`` from variational ones, which first
corrects the draws from q towards p with the ratios :math:`p(x, z)/q(z)` (Magnusson et
al. 2019). The smoothing is :mod:`ppl_notes.psis`, vectorised over the observations, and
the result is ArviZ's ``ELPDDataLOO``, equal to ArviZ's own (``tests/test_psis.py``):
ArviZ smooths one observation at a time in Python, 2.5 s for the 934 heights, where
this takes a tenth of a second.
Each observation's Pareto :math:`\hat k` says whether its estimate can be trusted
(above ~0.7 it cannot). :func:`compare_models` ranks stories by their elpd (ArviZ's
``compare``, stacking weights).

References
----------
Vehtari, A., Gelman, A. & Gabry, J. (2017). Practical Bayesian model evaluation using
leave-one-out cross-validation and WAIC. Statistics and Computing 27, 1413-1432.
Magnusson, M., Andersen, M. R., Jonasson, J. & Vehtari, A. (2019). Bayesian
leave-one-out cross-validation for large data. ICML.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import arviz_stats
import numpy as np
import pandas as pd
import xarray as xr
from arviz_stats.utils import ELPDDataLOO, get_log_likelihood

from ppl_notes.errors import OptionError
from ppl_notes.psis import logsumexp, psis_log_weights

__all__ = ["loo", "compare_models"]

_SAMPLE_DIMS = ("chain", "draw")


def _chain_draw_tree(posterior) -> xr.DataTree:
    """Variational draws laid out as one chain (ArviZ's LOO functions expect chain, draw)."""
    groups = {}
    for name in ("posterior", "log_likelihood", "sample_stats", "observed_data"):
        if name not in posterior.tree.children:
            continue
        dataset = posterior.tree[name].to_dataset()
        if "sample" in dataset.dims:
            dataset = (dataset.rename({"sample": "draw"}).expand_dims(chain=[0])
                       .transpose("chain", "draw", ...))
        groups[name] = dataset
    return xr.DataTree.from_dict(groups)


def loo(posterior, pointwise: bool = True, var_name: str | None = None, warn: bool = True):
    """PSIS-LOO of a posterior from ``infer`` (MCMC or variational).

    Parameters
    ----------
    posterior : Posterior
        With a ``log_likelihood`` group (every story with observed sites has one).
    pointwise : bool
        Keep each observation's elpd and Pareto k-hat (``elpd_i``, ``pareto_k``).
    var_name : str, optional
        The observed site, where a story has several.
    warn : bool
        Let ArviZ warn when some Pareto k exceeds 0.7 (reports and plots, which show the
        k values themselves, turn it off).

    Returns
    -------
    arviz_stats.ELPDData
        ``elpd``, ``se``, ``p`` (effective number of parameters), ``pareto_k``...

    Raises
    ------
    OptionError
        For a story with no observed data, a point estimate (one draw), or a
        variational posterior without log p and log q of its draws.
    """
    tree = posterior.tree
    if "log_likelihood" not in tree.children:
        note = str(tree.attrs.get("log_likelihood_note", ""))
        if note.startswith("not stored"):  # over the budget, or log_likelihood=False
            raise OptionError(f"loo needs the pointwise log-likelihood, and this fit of "
                              f"{posterior.model_name!r} has none: {note}")
        raise OptionError(f"loo needs observed data; story {posterior.model_name!r} has no "
                          "log_likelihood (no observed sites)")
    if posterior.num_draws < 2:
        raise OptionError(f"loo needs posterior draws; {posterior.method!r} gave a point "
                          "estimate (one draw). Use method='nuts' or 'svi'")
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", UserWarning)
        return _loo(posterior, tree, pointwise, var_name)


def _loo(posterior, tree, pointwise, var_name):
    if not (posterior.is_mcmc or posterior.is_variational):
        raise OptionError(f"loo of a {posterior.method!r} posterior needs log p and log q of "
                          "each draw (sample_stats), which this result does not have")
    layout = tree if posterior.is_mcmc else _chain_draw_tree(posterior)
    log_likelihood = get_log_likelihood(layout, var_name=var_name)
    log_likelihood = log_likelihood.transpose(*_SAMPLE_DIMS, ...)
    draws = log_likelihood.values.reshape(-1, *log_likelihood.shape[2:])
    if posterior.is_mcmc:
        r_eff, correction = _relative_ess(layout, len(draws)), 0.0
    elif posterior.importance_corrected:  # resampled towards p already: posterior draws
        r_eff, correction = _resampled_relative_ess(posterior), 0.0
    else:  # loo_approximate_posterior's correction of q's draws towards p: p/q
        stats = layout["sample_stats"]
        r_eff, correction = 1.0, (stats["log_p"] - stats["log_q"]).values.reshape(-1)
        correction = (correction - correction.max()).reshape((-1,) + (1,) * (draws.ndim - 1))
    log_weights, pareto_k = psis_log_weights(-draws + correction, r_eff)
    pareto_k = np.reshape(pareto_k, draws.shape[1:])
    elpd_i = logsumexp(log_weights + draws)
    p_loo_i = logsumexp(draws) - np.log(len(draws)) - elpd_i
    template = log_likelihood.isel({d: 0 for d in _SAMPLE_DIMS}, drop=True)
    elpd_i, p_loo_i = template.copy(data=elpd_i), template.copy(data=p_loo_i)
    pareto_k = template.copy(data=pareto_k)
    elpd, se, p_loo, _ = elpd_i.azstats.loo_summary(p_loo_i)
    good_k = min(1 - 1 / np.log10(len(draws)), 0.7) if len(draws) > 1 else 0.7
    too_large = bool(np.any(pareto_k.values > good_k))
    if too_large:
        warnings.warn(f"Estimated shape parameter of Pareto distribution is greater than "
                      f"{good_k:.2f} for one or more samples: the PSIS-LOO estimates of those "
                      "observations are unreliable (Vehtari et al. 2017)", UserWarning,
                      stacklevel=3)
    return ELPDDataLOO(
        elpd=elpd, se=se, p=p_loo, n_samples=len(draws), n_data_points=int(template.size),
        scale="log", warning=too_large, good_k=good_k,
        elpd_i=elpd_i if pointwise else None, pareto_k=pareto_k if pointwise else None,
        approx_posterior=not (posterior.is_mcmc or posterior.importance_corrected),
        log_weights=log_likelihood.copy(data=log_weights.reshape(log_likelihood.shape)))


def _resampled_relative_ess(posterior) -> float:
    r"""r_eff of draws resampled from proposals (the importance step).

    :math:`S` draws kept from weights whose ESS is :math:`E` hold about
    :math:`1/(1/S + 1/E)` independent draws, per restart.
    """
    importance = posterior.info["importance"]
    kept = posterior.tree["posterior"].sizes["draw" if posterior.has_chains else "sample"]
    held = sum(1 / (1 / kept + 1 / max(e, 1e-12)) for e in importance["ess"])
    return float(held / (kept * len(importance["ess"])))


def _relative_ess(tree: xr.DataTree, num_draws: int) -> float:
    """r_eff: the posterior's mean-ESS over its draws, averaged over every element.

    As ``arviz_stats.loo`` takes it (one value for all observations; 1 for one chain).
    """
    posterior = tree["posterior"].to_dataset()
    if posterior.sizes["chain"] == 1:
        return 1.0
    ess = posterior.azstats.ess(method="mean")
    return float(np.hstack([ess[v].values.ravel() for v in ess.data_vars]).mean() / num_draws)


def compare_models(posteriors: Mapping[str, object], method: str = "stacking",
                   var_name: str | None = None) -> pd.DataFrame:
    """Rank stories fitted to the same data by their PSIS-LOO elpd (ArviZ's ``compare``).

    Parameters
    ----------
    posteriors : mapping of str to Posterior
        One posterior per story, all of the same observations.
    method : {"stacking", "BB-pseudo-BMA", "pseudo-BMA"}
        How ArviZ weighs the stories.

    Returns
    -------
    pandas.DataFrame
        ArviZ's table: ``rank``, ``elpd``, ``p``, ``elpd_diff``, ``weight``, ``se``,
        ``dse``, ``warning``.
    """
    if not isinstance(posteriors, Mapping) or len(posteriors) < 2:
        raise OptionError("compare_models takes a dict {name: posterior} of two or more "
                          "stories fitted to the same data")
    return arviz_stats.compare({name: loo(p, var_name=var_name) for name, p in posteriors.items()},
                               method=method)
