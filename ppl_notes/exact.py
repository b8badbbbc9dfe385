r"""Exact posteriors of discrete sites by enumeration.

For a story whose latent sites are all discrete with finite support (or whose continuous
ones are fixed by :meth:`~ppl_notes.Model.configure`), Bayes' rule can be carried out
exactly: Pyro enumerates every value of every discrete site, in parallel, and sums
(Obermeyer et al. 2019, "Tensor variable elimination for plated factor graphs"). The
result is the truth that sampling and variational methods approximate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ppl_notes._sites import is_enumerable, latent_sites, trace_model
from ppl_notes.errors import StoryError
from ppl_notes.inference.em import EnumeratedStory, responsibilities

__all__ = ["exact_posterior"]


def exact_posterior(model, data: Mapping | None = None, site: str | None = None) -> np.ndarray:
    r"""The exact posterior :math:`p(z \mid x)` of a discrete site, per element.

    Parameters
    ----------
    model : Model
        A story whose latent sites are all discrete with finite support.
    data : mapping, optional
        Its data (default data when omitted).
    site : str, optional
        The discrete site; the story's only one by default.

    Returns
    -------
    numpy.ndarray
        Shape ``(*site shape, K)``: the probability of each of the K values.

    Examples
    --------
    >>> from ppl_notes.exact import exact_posterior
    >>> from ppl_notes.models.diagnosis import diagnosis
    >>> round(float(exact_posterior(diagnosis)[0, 1]), 3)  # P(sick | positive test)
    0.154
    """
    prepared = model.prepare_data(data)
    latent = latent_sites(trace_model(model, prepared, 0))
    continuous = [n for n, s in latent.items() if not is_enumerable(s["fn"])]
    if continuous:
        raise StoryError(
            f"exact_posterior enumerates discrete sites only; story {model.name!r} has "
            f"other latent sites {continuous}: fix them with model.configure(...) or infer "
            "them (ppl_notes.infer)")
    if site is None:
        if len(latent) != 1:
            raise StoryError(f"name the site with site=...; the story's discrete sites are "
                             f"{list(latent)}")
        site = next(iter(latent))
    if site not in latent:
        raise StoryError(f"story {model.name!r} has no discrete latent site {site!r}; it has "
                         f"{list(latent)}")

    story = EnumeratedStory(model, prepared)
    with torch.no_grad():
        _, terms, enum_ndim, site_dims = story(torch.zeros(0, dtype=torch.float64))
        _, marginals = responsibilities(terms, enum_ndim, site_dims)
    shape = tuple(latent[site]["value"].shape)
    probabilities = marginals[site].movedim(0, -1)
    return probabilities.expand(shape + probabilities.shape[-1:]).cpu().numpy().copy()
