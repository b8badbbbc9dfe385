"""Posterior: the result of every method, backed by one ArviZ ``xarray.DataTree``.

The DataTree is the single source of truth: ``to_arviz()`` returns it, ``save`` writes
it to netCDF (no pickle) and :func:`load` reads it back, so a loaded result is equal to
the saved one. The story, guide and data stay attached in memory for methods that need
to run the model again.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import arviz_stats
import numpy as np
import pandas as pd
import xarray as xr

from ppl_notes.errors import DataError

__all__ = ["Posterior", "load"]


class Posterior:
    """Draws of a story's latent sites, with provenance and diagnostics.

    Parameters
    ----------
    tree : xarray.DataTree
        The results by ArviZ 1.x conventions (see :mod:`ppl_notes.arviz_io`).
    model, guide : optional
        The story and guide that produced them.
    data : dict, optional
        The prepared data the run used.
    """

    def __init__(self, tree: xr.DataTree, model=None, guide=None, data=None) -> None:
        self.tree = tree
        self.model = model
        self.guide = guide
        self.data = data

    def __repr__(self) -> str:
        flag = ", partial" if self.partial else ""
        return (f"<Posterior of {self.tree.attrs.get('model')!r} by {self.method!r}"
                f"{flag}: {dict(self.tree['posterior'].sizes)}>")

    @property
    def method(self) -> str:
        """The inference method that produced the draws (``svi``, ``nuts``...)."""
        return str(self.tree.attrs["method"])

    @property
    def partial(self) -> bool:
        """Whether the run stopped early (interrupted) and holds what was done."""
        return bool(self.tree.attrs.get("partial", False))

    @property
    def seconds(self) -> float:
        """Wall-clock seconds of the run."""
        return float(self.tree.attrs.get("seconds", float("nan")))

    @property
    def options(self) -> dict[str, Any]:
        """The options the run used (after defaults)."""
        return json.loads(self.tree.attrs.get("options", "{}"))

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the run, e.g. which ELBO was used, the NUTS engine."""
        return json.loads(self.tree.attrs.get("info", "{}"))

    @property
    def sample_dims(self) -> list[str]:
        """``["chain", "draw"]`` for MCMC, ``["sample"]`` for variational draws."""
        return json.loads(self.tree.attrs["sample_dims"])

    @property
    def discrete_sites(self) -> list[str]:
        """Latent sites with discrete support, drawn per posterior draw."""
        return json.loads(self.tree.attrs.get("discrete_sites", "[]"))

    @property
    def history(self) -> pd.DataFrame:
        """The objective per step (the ELBO for SVI); empty for MCMC."""
        if "history" not in self.tree.children:
            return pd.DataFrame()
        dataset = self.tree["history"].to_dataset()
        return dataset.to_dataframe()

    def to_arviz(self) -> xr.DataTree:
        """The results as an ArviZ 1.x DataTree."""
        return self.tree

    def __getitem__(self, site: str) -> np.ndarray:
        """Draws of one site, sample dims first."""
        posterior = self.tree["posterior"]
        if site not in posterior.data_vars:
            raise KeyError(f"no site {site!r} in the posterior; it has "
                           f"{sorted(posterior.data_vars)}")
        return posterior[site].values

    def draws(self, site: str) -> np.ndarray:
        """Draws of one site with the sample dims flattened into one leading dim."""
        values = self[site]
        return values.reshape((-1,) + values.shape[len(self.sample_dims):])

    def summary(self, var_names: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
        """ArviZ's summary table (mean, sd, interval, MCSE, ESS, R-hat).

        By default discrete per-observation sites (e.g. every person's gender) are left
        out; name them in ``var_names`` to include them. Variational draws are
        independent, so their table has no MCMC diagnostics (R-hat, ESS).
        """
        if len(self.sample_dims) == 1:
            kwargs.setdefault("kind", "stats")
        if var_names is None:
            var_names = [v for v in self.tree["posterior"].data_vars
                         if v not in self.discrete_sites]
        return arviz_stats.summary(self.tree, var_names=var_names,
                                   sample_dims=self.sample_dims, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the results to a netCDF file (h5netcdf; no pickle). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".part")
        self.tree.to_netcdf(temporary, engine="h5netcdf")
        os.replace(temporary, path)
        return path


def load(path: str | os.PathLike) -> Posterior:
    """Read a result written by :meth:`Posterior.save`.

    The story is re-attached when it can be imported by the name stored in the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no saved result at {str(path)!r}")
    try:
        with xr.open_datatree(path, engine="h5netcdf") as opened:
            tree = opened.load()
    except (OSError, ValueError) as error:
        raise DataError(f"{str(path)!r} is not a ppl_notes result: {error}") from error
    if "method" not in tree.attrs:
        raise DataError(f"{str(path)!r} is not a ppl_notes result (no 'method' attribute)")
    for node in tree.subtree:
        if node is tree:
            continue
        # netCDF stores a one-element list attribute as a scalar: restore ArviZ's lists.
        if "sample_dims" in node.attrs:
            node.attrs["sample_dims"] = [str(d) for d in np.atleast_1d(node.attrs["sample_dims"])]
    return Posterior(tree, model=_import_story(tree.attrs.get("model_path")))


def _import_story(reference: str | None):
    if not reference or ":" not in reference:
        return None
    module, _, name = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
