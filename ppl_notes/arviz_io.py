"""Pyro results -> ArviZ 1.x ``xarray.DataTree``.

ArviZ 1.x converts NumPyro but not Pyro. This module follows arviz-base's
``io_numpyro``: an adapter gives the sample dims and arrays of a run, and a converter
has one method per DataTree group and ``to_datatree()`` to assemble them. Dims are named
after the story's plates (batch dims) and its declared event dims; coords come from the
data. Two extra groups travel with the results so that ``save``/``load`` lose nothing:
``history`` (the objective per step) and ``fitted_params`` (the guide's parameters).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from arviz_base import dict_to_dataset

from ppl_notes._sites import deterministic_sites, sample_sites
from ppl_notes.evaluation import StoryFacts

if TYPE_CHECKING:  # importing ppl_notes.inference here would import this module again
    from ppl_notes._result import RunResult

__all__ = ["PyroConverter", "infer_dims", "to_datatree"]


def infer_dims(model, trace) -> dict[str, list[str]]:
    """Dim names of each site: its plates' names (outermost first), then event dims.

    Event dims come from the story's ``dims`` declaration or a site's
    ``infer={"event_dims": [...]}``; undeclared ones are left to ArviZ's defaults.
    ``trace`` is any run of the story on the data (its plates and sites are read).
    """
    declared = getattr(model, "dims", {})
    dims = {}
    for name, site in {**sample_sites(trace), **deterministic_sites(trace)}.items():
        frames = sorted((f for f in site["cond_indep_stack"] if f.vectorized), key=lambda f: f.dim)
        batch = [f.name for f in frames]
        event = list(declared.get(name, site["infer"].get("event_dims", [])))
        batch_ndim = len(site["fn"].batch_shape)
        # Plates left of the site's own batch dims broadcast away: keep the rightmost ones.
        batch = batch[len(batch) - batch_ndim:] if batch_ndim < len(batch) else batch
        if batch or event:
            dims[name] = batch + event
    return dims


class PyroConverter:
    """Build the DataTree of one run: one method per group, as arviz-base does.

    Parameters
    ----------
    run : RunResult
        Arrays from a back end.
    model : Model
        The story (for dims and coords).
    data : dict
        The prepared data the run used.
    attrs : dict
        Provenance stored on the root node (method, options, timings, versions...).
    facts : StoryFacts
        The story's facts on ``data`` (those of the run's context).
    """

    def __init__(self, run: RunResult, model, data: Mapping[str, Any], attrs: dict[str, Any],
                 facts: StoryFacts):
        self.run = run
        self.model = model
        self.data = data
        self.attrs = attrs
        self.facts = facts
        self.dims = infer_dims(model, facts.trace)
        self.coords = {k: np.asarray(v) for k, v in model.coords(data).items()}

    def _dataset(self, values: Mapping[str, np.ndarray], sample_dims, skip_event_dims=False):
        if not values:
            return None
        return dict_to_dataset(
            dict(values),
            coords=self.coords,
            dims=self.dims,
            sample_dims=list(sample_dims),
            skip_event_dims=skip_event_dims,
            inference_library=None,
            check_conventions=False,
        )

    def posterior_to_xarray(self):
        """The draws of every latent site (discrete ones included)."""
        return self._dataset(self.run.posterior, self.run.sample_dims)

    def sample_stats_to_xarray(self):
        """Sampler statistics (NUTS) or log p / log q of each draw (VI)."""
        return self._dataset(self.run.sample_stats, self.run.sample_dims)

    def log_likelihood_to_xarray(self):
        """Pointwise log-likelihood of each observation, discrete sites summed out."""
        return self._dataset(self.run.log_likelihood, self.run.sample_dims, skip_event_dims=True)

    def observed_data_to_xarray(self):
        """The data of the observed sites (as the story observed them)."""
        facts = self.facts
        observed = {k: _numpy(facts.trace.nodes[k]["value"]) for k in facts.likelihood}
        return self._dataset(observed, [])

    def constant_data_to_xarray(self):
        """Array-valued data that are not observed sites (covariates)."""
        constant = {
            k: _numpy(v) for k, v in self.data.items()
            if k not in self.model.observed_arguments.values() and hasattr(v, "shape")
            and np.ndim(_numpy(v)) > 0
        }
        return self._dataset(constant, [])

    def history_to_xarray(self):
        """The objective per step (ELBO for SVI)."""
        history = self.run.history
        if history is None or history.empty:
            return None
        return xr.Dataset({c: ("step", history[c].to_numpy()) for c in history.columns},
                          coords={"step": history.index.to_numpy()})

    def fitted_params_to_xarray(self):
        """The guide's fitted parameters, each with its own dims."""
        if not self.run.params:
            return None
        variables = {}
        for name, value in self.run.params.items():
            value = np.asarray(value)
            dims = [f"{name}_dim_{i}" for i in range(value.ndim)]
            variables[name] = (dims, value)
        return xr.Dataset(variables)

    def importance_to_xarray(self):
        """The proposals of a variational fit's importance step: log p and log q of each."""
        if not self.run.importance:
            return None
        dims = [*self.run.sample_dims[:-1], "proposal"]
        return xr.Dataset({k: (dims, np.asarray(v)) for k, v in self.run.importance.items()})

    def to_datatree(self) -> xr.DataTree:
        """Assemble every available group."""
        groups = {
            "posterior": self.posterior_to_xarray(),
            "sample_stats": self.sample_stats_to_xarray(),
            "log_likelihood": self.log_likelihood_to_xarray(),
            "observed_data": self.observed_data_to_xarray(),
            "constant_data": self.constant_data_to_xarray(),
            "history": self.history_to_xarray(),
            "fitted_params": self.fitted_params_to_xarray(),
            "importance": self.importance_to_xarray(),
        }
        tree = xr.DataTree.from_dict({k: v for k, v in groups.items() if v is not None})
        tree.attrs.update({k: _attr(v) for k, v in self.attrs.items()})
        return tree


def to_datatree(run: RunResult, model, data: Mapping[str, Any], attrs: dict[str, Any],
                facts: StoryFacts):
    """Convert one run to a DataTree (see :class:`PyroConverter`)."""
    return PyroConverter(run, model, data, attrs, facts).to_datatree()


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _attr(value):
    if isinstance(value, (bool, np.bool_)):
        return int(value)  # netCDF attributes have no boolean type
    if isinstance(value, (str, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value, default=str, sort_keys=True)
