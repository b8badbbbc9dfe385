r"""Posterior predictive draws: replicate the data under each posterior draw.

:math:`y^{rep} \sim p(y \mid \theta_s)` for draws :math:`\theta_s` of the posterior
(every latent site, discrete ones included where they were recovered, so the replicates
are of the same units: the same people, the same schools). Laid out with the posterior's
own sample dims, they become the DataTree's ``posterior_predictive`` group, which
ArviZ's posterior predictive checks read (``plot_ppc_dist``).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
import xarray as xr
from arviz_base import dict_to_dataset

from ppl_notes._sites import sample_sites, trace_model
from ppl_notes.arviz_io import infer_dims
from ppl_notes.errors import OptionError

__all__ = ["posterior_predictive"]


def _thinned_indices(posterior, num_draws: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Flat draw indices, evenly thinned to at most ``num_draws``, and their sample shape."""
    sizes = [posterior.tree["posterior"].sizes[d] for d in posterior.sample_dims]
    if len(sizes) == 2:  # MCMC: thin each chain alike
        chains, draws = sizes
        keep = np.arange(0, draws, max(1, math.ceil(chains * draws / num_draws)))
        index = (np.arange(chains)[:, None] * draws + keep[None, :]).reshape(-1)
        return index, (chains, len(keep))
    total = sizes[0]
    index = np.arange(0, total, max(1, math.ceil(total / num_draws)))
    return index, (len(index),)


def _data_of(posterior) -> dict:
    if posterior.data is not None:
        return dict(posterior.data)
    if posterior.model is None:
        raise OptionError("posterior predictive draws need the story: this result was loaded "
                          "and its story could not be imported")
    data = {}
    for group in ("constant_data", "observed_data"):
        if group in posterior.tree.children:
            dataset = posterior.tree[group].to_dataset()
            data.update({k: dataset[k].values for k in dataset.data_vars})
    return posterior.model.prepare_data(data)


def posterior_predictive(posterior, num_draws: int = 500, seed: int = 0) -> xr.Dataset:
    """Replicated data sets, one per (thinned) posterior draw; stored in the posterior's tree.

    Parameters
    ----------
    posterior : Posterior
        From :func:`ppl_notes.infer`, with its story (in memory or importable).
    num_draws : int
        At most this many replicates (the draws are thinned evenly, chains alike).
    seed : int
        Seeds the replicates.

    Returns
    -------
    xarray.Dataset
        One variable per observed site, with the posterior's sample dims; also added to
        ``posterior.tree`` as the ``posterior_predictive`` group.
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise OptionError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    model = posterior.model
    data = _data_of(posterior)
    if not model.observed:
        raise OptionError(f"story {model.name!r} has no observed sites to replicate")
    index, shape = _thinned_indices(posterior, num_draws)
    dataset = posterior.tree["posterior"].to_dataset()
    sites = [s for s in dataset.data_vars if s in _sample_site_names(model, data)]
    flat = {s: posterior.draws(s)[index] for s in sites}
    replicated = {name: [] for name in model.observed}
    with torch.no_grad(), pyro.poutine.seed(rng_seed=seed):
        for row in range(len(index)):
            values = {s: torch.as_tensor(flat[s][row], dtype=_dtype(model, flat[s]))
                      for s in sites}
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(**data)
            for name in model.observed:
                # a fresh draw from the observed site's distribution given this draw
                replicated[name].append(trace.nodes[name]["fn"].sample().cpu().numpy())
    arrays = {name: np.stack(values).reshape(shape + values[0].shape)
              for name, values in replicated.items()}
    result = dict_to_dataset(arrays, coords={k: np.asarray(v) for k, v in
                                             model.coords(data).items()},
                             dims=infer_dims(model, trace), sample_dims=list(posterior.sample_dims),
                             inference_library=None, check_conventions=False)
    posterior.tree["posterior_predictive"] = xr.DataTree(result)
    return result


def _sample_site_names(model, data) -> set[str]:

    return {n for n, s in sample_sites(trace_model(model, data, 0)).items() if not s["is_observed"]}


def _dtype(model, values: np.ndarray):
    return model.dtype if np.issubdtype(values.dtype, np.floating) else torch.long
