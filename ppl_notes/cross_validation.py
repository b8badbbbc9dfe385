r"""Leave-one-out cross-validation for MCMC and variational posteriors, and model comparison.

:func:`loo` estimates the expected log pointwise predictive density
:math:`\mathrm{elpd} = \sum_i \log p(y_i \mid y_{-i})` by Pareto-smoothed importance
sampling (Vehtari, Gelman & Gabry 2017): from MCMC draws with ``arviz_stats.loo``, from
variational draws with ``arviz_stats.loo_approximate_posterior``, which first corrects
the draws from q towards p with the ratios :math:`p(x, z)/q(z)` (Magnusson et al. 2019).
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
import pandas as pd
import xarray as xr

from ppl_notes.errors import OptionError

__all__ = ["loo", "compare_models"]


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
    if posterior.is_mcmc:
        return arviz_stats.loo(tree, pointwise=pointwise, var_name=var_name)
    if not posterior.is_variational:
        raise OptionError(f"loo of a {posterior.method!r} posterior needs log p and log q of "
                          "each draw (sample_stats), which this result does not have")
    layout = _chain_draw_tree(posterior)
    log_p = layout["sample_stats"]["log_p"]
    log_q = layout["sample_stats"]["log_q"]
    return arviz_stats.loo_approximate_posterior(layout, log_p, log_q, pointwise=pointwise,
                                                 var_name=var_name)


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
