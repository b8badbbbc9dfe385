"""What a story offers besides inference: a table of its sites, and generation.

The notes' *generation* direction (§2.a) runs a story forwards: latent values first, then
a data set drawn from them (:meth:`StoryViews.simulate`), many times over for the prior
predictive. :class:`~ppl_notes.story.Model` inherits these views; they read only what
every story has (its function, observed arguments, dtype, default data).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from ppl_notes._dtype import run_dtype
from ppl_notes._sites import distribution_name, sample_sites, support_name

__all__ = ["StoryViews"]


class StoryViews:
    """The site table, forward runs and the graph of a story (a mixin of ``Model``)."""

    def sites(self, data: Mapping | None = None) -> pd.DataFrame:
        """A table of the story's sample sites.

        Columns: ``name``, ``kind`` (latent/observed), ``distribution``, ``support``,
        ``shape`` (of one value), ``plates``, ``discrete``.
        """
        trace = self.trace(data)
        rows = []
        for name, site in sample_sites(trace).items():
            rows.append(
                {
                    "name": name,
                    "kind": "observed" if site["is_observed"] else "latent",
                    "distribution": distribution_name(site["fn"]),
                    "support": support_name(site["fn"].support),
                    "shape": tuple(site["value"].shape),
                    "plates": tuple(f.name for f in site["cond_indep_stack"]),
                    "discrete": bool(site["fn"].support.is_discrete),
                }
            )
        return pd.DataFrame(rows, columns=["name", "kind", "distribution", "support", "shape",
                                           "plates", "discrete"])

    # -- generation (notes §2.a) -------------------------------------------------
    def simulate(self, seed: int = 0, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the story forwards once: draw latent values, then a data set from them.

        Keyword arguments are passed to the story (e.g. ``num_people=500``). Covariates
        of the default data (arguments that are not observed sites, such as each
        school's standard error) are used unless given. Observed sites are left free, so
        this is the notes' *generation* direction.

        Returns
        -------
        dict
            Every sample site's value, latent and observed.
        """
        trace = self.forward_trace(seed, **kwargs)
        return {name: site["value"].detach() for name, site in sample_sites(trace).items()}

    def forward_trace(self, seed: int = 0, **kwargs: Any):
        """The Pyro trace of one run forwards: :meth:`simulate`'s, every site whole."""
        covariates = self._default_covariates()
        free = {argument: None for argument in self.observed_arguments.values() if argument}
        with pyro.poutine.seed(rng_seed=seed), run_dtype(self.dtype):
            return poutine.trace(self).get_trace(**{**covariates, **free, **kwargs})

    def _default_covariates(self) -> dict[str, Any]:
        return dict(self._covariates)

    @functools.cached_property
    def _covariates(self) -> dict[str, Any]:
        """The default data's arguments that are not observed (prepared once)."""
        if self._default_data is None:
            return {}
        defaults = self.prepare_data(None)
        return {k: v for k, v in defaults.items() if k not in self.observed_arguments.values()}

    def prior_predictive(
        self, num_samples: int = 500, seed: int = 0, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Draw ``num_samples`` data sets from the prior story.

        Returns
        -------
        dict of numpy arrays
            Each site's draws, with a leading sample dimension.
        """
        draws = [self.simulate(seed=seed + i, **kwargs) for i in range(num_samples)]
        return {name: np.stack([d[name].numpy() for d in draws]) for name in draws[0]}

    def render(self, data: Mapping | None = None):
        """Draw the story's graph (needs the ``graphviz`` package and binary)."""
        try:
            import graphviz  # noqa: F401
        except ImportError as error:  # pragma: no cover - optional dependency
            raise ImportError("Model.render needs the 'graphviz' package") from error
        prepared = self.prepare_data(data)
        return pyro.render_model(self, model_kwargs=prepared, render_distributions=True)
