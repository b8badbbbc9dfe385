"""Posterior: the result of every method, backed by one ArviZ ``xarray.DataTree``.

The DataTree is the single source of truth: ``to_arviz()`` returns it, ``save`` writes
it to netCDF (no pickle) and :func:`ppl_notes.result_files.load` reads it back, so a
loaded result is equal to the saved one. The story, guide and data stay attached in
memory for methods that need to run the model again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import h5netcdf
import numpy as np
import pandas as pd
import pyro
import torch
import xarray as xr

from ppl_notes._elements import CI_PROB
from ppl_notes._integrity import DIGEST_ATTR, SIGNATURE_ATTR, tree_digest
from ppl_notes._signing import sign, signing_key
from ppl_notes._sites import unconstrained_value
from ppl_notes.diagnostics import MIN_DRAWS_PER_CHAIN, diagnostics, findings
from ppl_notes.display import posterior_html
from ppl_notes.errors import OptionError
from ppl_notes.evaluation import StoryFacts, story_facts
from ppl_notes.evaluation.draws import evaluate_draws, sample_guide
from ppl_notes.evidence import Estimate, elbo_estimate, importance_estimate, kl_gap_estimate
from ppl_notes.prediction import predict, story_of
from ppl_notes.predictive import _data_of, posterior_predictive
from ppl_notes.psis import psis_weights, systematic_resample
from ppl_notes.verdict import check
from ppl_notes.vi.flow_family import FLOW_GUIDE
from ppl_notes.vi.gaussian_family import FAMILY_GUIDES

__all__ = ["Posterior"]


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
    facts : StoryFacts, optional
        The story's facts on ``data``, as the run read them (read again at most once,
        where a method needs them and none were given).
    """

    def __init__(self, tree: xr.DataTree, model=None, guide=None, data=None,
                 facts: StoryFacts | None = None) -> None:
        self.tree = tree
        self.model = model
        self.guide = guide
        self.data = data
        self._facts = facts

    @classmethod
    def from_draws(cls, draws: dict[str, Any], *, method: str = "reference",
                   model_name: str = "", sample_dims: tuple[str, ...] = ("chain", "draw"),
                   sample_stats: dict[str, Any] | None = None,
                   dims: dict[str, list[str]] | None = None,
                   coords: dict[str, Any] | None = None) -> Posterior:
        """A posterior from arrays of draws made elsewhere.

        A reference posterior or another library's run, to compare with
        :func:`ppl_notes.compare` or to diagnose.

        Parameters
        ----------
        draws : dict of array
            Each site's draws, sample dims first (``(chains, draws, ...)`` by default).
        method : str
            How the draws were made; MCMC diagnostics apply when ``sample_dims`` is
            ``("chain", "draw")``.
        model_name : str
            The story's name (``compare`` checks that all posteriors share it).
        sample_dims : tuple of str
            ``("chain", "draw")`` for MCMC, ``("sample",)`` for independent draws.
        sample_stats : dict of array, optional
            e.g. NUTS's ``diverging`` and ``energy``, or VI's ``log_p`` and ``log_q``.
        dims, coords : optional
            ArviZ dims of each site and their coordinate values.
        """
        from arviz_base import from_dict

        groups = {"posterior": dict(draws)}
        if sample_stats:
            groups["sample_stats"] = dict(sample_stats)
        tree = from_dict(groups, sample_dims=list(sample_dims), dims=dims, coords=coords,
                         check_conventions=False)
        tree.attrs.update({"method": method, "model": model_name, "guide": "",
                           "sample_dims": json.dumps(list(sample_dims)), "options": "{}",
                           "info": "{}", "discrete_sites": "[]", "seconds": float("nan"),
                           "partial": 0})
        return cls(tree)

    def __repr__(self) -> str:
        flag = ", partial" if self.partial else ""
        return (f"<Posterior of {self.tree.attrs.get('model')!r} by {self.method!r}"
                f"{flag}: {dict(self.tree['posterior'].sizes)}>")

    def _repr_html_(self) -> str:
        """What a notebook shows: the summary table and the verdict (:mod:`ppl_notes.display`)."""
        return posterior_html(self)

    @property
    def method(self) -> str:
        """The inference method that produced the draws (``svi``, ``nuts``...)."""
        return str(self.tree.attrs["method"])

    @property
    def model_name(self) -> str:
        """The name of the story the draws are from."""
        return str(self.tree.attrs.get("model", ""))

    @property
    def label(self) -> str:
        """How tables and plots name this posterior: its method, guide, and 'partial'."""
        notes = [str(self.tree.attrs.get("guide", "") or "")] + (["partial"] if self.partial
                                                                  else [])
        notes = [note for note in notes if note]
        return f"{self.method} ({', '.join(notes)})" if notes else self.method

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
    def has_chains(self) -> bool:
        """Whether the draws come in chains (``chain``, ``draw`` dims).

        MCMC's chains, or variational restarts (``restarts=``), which R-hat and ESS
        compare alike.
        """
        return list(self.sample_dims) == ["chain", "draw"]

    @property
    def is_mcmc(self) -> bool:
        """Whether the draws are MCMC chains (not a variational fit's restarts)."""
        return self.has_chains and not self.is_variational

    @property
    def is_variational(self) -> bool:
        """Whether the draws come from a fitted q, with log p and log q of each draw."""
        return ("sample_stats" in self.tree.children
                and "log_q" in self.tree["sample_stats"].data_vars)

    @property
    def importance_corrected(self) -> bool:
        """Whether the draws were resampled from q's proposals by their importance weights.

        The default SVI does it where the weights can be trusted
        (:mod:`ppl_notes.vi.importance`); the draws are then the posterior's, and the
        proposals' log p and log q are in the ``importance`` group.
        """
        return bool((self.info.get("importance") or {}).get("applied", False))

    def q_log_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each restart's ``(log p, log q)`` at draws of its q, for importance weights.

        The proposals of the importance step where the fit kept them (the draws kept
        may be resampled, and so no longer draws of q), else the stored draws.
        """
        if not self.is_variational:
            raise OptionError(f"importance weights need draws of a fitted q; this posterior "
                              f"is from {self.method!r}")
        group = (self.tree["importance"] if "importance" in self.tree.children
                 else self.tree["sample_stats"])
        log_p, log_q = group["log_p"].values, group["log_q"].values
        if log_p.ndim == 1:
            return [(log_p, log_q)]
        return list(zip(log_p, log_q, strict=True))

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

    def predict(self, new_data=None, *, num_draws: int = 500, seed: int = 0) -> xr.Dataset:
        """Predictions: replicates of the observed data, or every site on new data.

        Without ``new_data``: posterior predictive replicates of the observed data, added
        to the tree as ``posterior_predictive``
        (:func:`ppl_notes.predictive.posterior_predictive`). With ``new_data`` (new
        covariates or units, observed values where known): draws of every site the story
        makes there, added as ``predictions`` (:func:`ppl_notes.prediction.predict`);
        works on a loaded result in a fresh process.
        """
        if new_data is None:
            return posterior_predictive(self, num_draws=num_draws, seed=seed)
        return predict(self, new_data, num_draws=num_draws, seed=seed)

    def diagnostics(self) -> dict[str, Any]:
        """R-hat, ESS, divergences, BFMI (MCMC); ELBO trend and k-hat (VI).

        See :func:`ppl_notes.diagnostics.diagnostics`.
        """
        return diagnostics(self)

    def findings(self) -> list:
        """The diagnostics that crossed their thresholds (the warnings ``infer`` issued).

        Each names a parameter and a next step; see :mod:`ppl_notes.diagnostics`.
        """
        return findings(self)

    def check(self, calibration=None):
        """Whether this posterior can be trusted on its own: ``Verdict(reliable, fails, holds)``.

        Combines k-hat, R-hat across restarts, convergence and, when given, a calibration
        (VSBC); see :mod:`ppl_notes.verdict` for the rules and their references.
        """
        return check(self, calibration)

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
        """ArviZ's summary table (mean, sd, 94% interval, MCSE, ESS, R-hat).

        By default discrete per-observation sites (e.g. every person's gender) are left
        out; name them in ``var_names`` to include them. Variational draws are
        independent, so their table has no MCMC diagnostics (R-hat, ESS).
        """
        too_few = (self.tree["posterior"].sizes["draw"] < MIN_DRAWS_PER_CHAIN
                   if self.has_chains else self.num_draws < 2)
        if len(self.sample_dims) == 1 or too_few:  # no R-hat or ESS from independent or
            kwargs.setdefault("kind", "stats")     # too few draws
        kwargs.setdefault("ci_prob", CI_PROB)  # one interval everywhere: compare()'s too
        if var_names is None:
            var_names = [v for v in self.tree["posterior"].data_vars
                         if v not in self.discrete_sites]
        import arviz_stats  # on first use (most of ppl_notes' import time)

        with warnings.catch_warnings():
            if too_few:  # numpy's remarks on the sd and intervals of one or two draws
                warnings.simplefilter("ignore", RuntimeWarning)
            table = arviz_stats.summary(self.tree, var_names=var_names,
                                        sample_dims=self.sample_dims, **kwargs)
        if self.num_draws == 1:  # a point estimate (MAP, MLE, EM): its value only
            return table[["mean"]].rename(columns={"mean": "estimate"})
        return table

    def importance_resampled(self, num_draws: int | None = None, seed: int = 0) -> Posterior:
        r"""Draws of q reweighted towards the posterior by PSIS, then resampled.

        Each draw :math:`z_s \sim q` gets its Pareto-smoothed importance weight
        :math:`w_s \propto p(x, z_s)/q(z_s)` (:func:`ppl_notes.psis.psis_weights`;
        Vehtari et al. 2024), and ``num_draws`` draws (default: as many as there are) are
        resampled with those weights (systematic resampling), so that summaries, plots
        and ``compare`` use them as they are; restarts are reweighted each by its own q
        and kept in equal shares. ``info["psis"]`` holds :math:`\hat k` (the largest
        over restarts; trust the result only below 0.7, Yao et al. 2018) and the weights' effective
        sample size :math:`1/\sum_s w_s^2`, which bounds what the resampled draws hold.
        A fit whose draws the default SVI's importance step resampled already
        (:attr:`importance_corrected`, from more proposals than it keeps) is returned
        as it is.
        """
        if not self.is_variational:
            raise OptionError("importance_resampled reweights draws of a fitted q by p/q; "
                              f"this posterior is from {self.method!r}, without log q")
        if self.importance_corrected:
            return self  # resampled already, from more proposals than it keeps
        stats = self.tree["sample_stats"]
        log_p, log_q = stats["log_p"].values, stats["log_q"].values
        if self.has_chains:  # restarts: each reweighted by its own p/q, then equal shares
            pieces = [psis_weights(p, q) for p, q in zip(log_p, log_q, strict=True)]
            weights = np.concatenate([w for w, _ in pieces]) / len(pieces)
            khat = max(k for _, k in pieces)
        else:
            weights, khat = psis_weights(log_p, log_q)
        size = self.num_draws if num_draws is None else int(num_draws)
        chosen = systematic_resample(weights, size, np.random.default_rng(seed))
        groups = {}
        for name in ("posterior", "sample_stats", "log_likelihood"):
            if name not in self.tree.children:
                continue
            dataset = self.tree[name].to_dataset()
            if self.has_chains:
                dataset = dataset.stack(_flat=("chain", "draw")).drop_vars(
                    ["chain", "draw", "_flat"]).rename({"_flat": "sample"}).transpose(
                        "sample", ...)  # stack puts the new dimension last
            groups[name] = dataset.isel(sample=chosen).assign_coords(sample=np.arange(size))
        for name in ("observed_data", "constant_data"):
            if name in self.tree.children:
                groups[name] = self.tree[name].to_dataset()
        tree = xr.DataTree.from_dict(groups)
        tree.attrs.update(self.tree.attrs)
        info = {**self.info, "psis": {"khat": khat, "ess": float(1 / np.sum(weights**2)),
                                      "draws": len(weights)}}
        tree.attrs.update(sample_dims=json.dumps(["sample"]), info=json.dumps(info, default=str),
                          guide=f"{self.tree.attrs.get('guide', '')} + PSIS")
        return Posterior(tree, model=self.model, guide=self.guide, data=self.data,
                         facts=self._facts)

    @property
    def num_draws(self) -> int:
        """The number of draws (chains times draws for MCMC)."""
        posterior = self.tree["posterior"]
        return int(np.prod([posterior.sizes[d] for d in self.sample_dims]))

    def log_weights(self, num_samples: int | None = None, seed: int = 0) -> tuple:
        """``(log p(x, z_s), log q(z_s))`` for draws from a variational posterior.

        The draws stored with the fit, or ``num_samples`` fresh ones from the guide at
        its fitted parameters (the global param store is left as it was).
        """
        if not self.is_variational:
            raise OptionError(
                f"log_evidence and kl_gap need a variational posterior (draws from q with "
                f"log q); this one is from {self.method!r}. For MCMC, fit a guide with "
                "method='svi' and compare it with ppl_notes.compare")
        if num_samples is None:
            pairs = self.q_log_weights()
            return (np.concatenate([p for p, _ in pairs]), np.concatenate([q for _, q in pairs]))
        index = self._best_restart()[0] if "restarts" in self.info else None
        model = story_of(self)
        guide = self._guide_function(model)
        data = self.data if self.data is not None else _data_of(self)

        params = self.tree["fitted_params"].to_dataset() if "fitted_params" in self.tree.children \
            else {}
        enumerated = json.loads(self.tree.attrs.get("info", "{}")).get("enumerated", [])
        with pyro.get_param_store().scope():
            pyro.clear_param_store()
            for name in params:  # a fit with restarts holds a guide per pooled restart
                values = params[name].values if index is None else params[name].values[index]
                pyro.get_param_store()[name] = torch.as_tensor(values)
            nesting = model.max_plate_nesting(data)
            draws, log_q = sample_guide(guide, data, num_samples, nesting, seed)
            draws = {k: v for k, v in draws.items() if k not in enumerated}
            evaluation = evaluate_draws(model, data, draws, self._facts_on(model, data),
                                        recover_discrete=False)
        return evaluation.log_joint, log_q

    def _best_restart(self) -> tuple[int, str]:
        """The pooled restart with the highest final ELBO, whose guide fresh draws use.

        Its index among the stored guides' parameters, and a sentence saying which it is.
        """
        pooled = [r for r in self.info["restarts"] if r.get("pooled", True)]
        best = int(np.nanargmax([r["final_elbo"] if r["final_elbo"] is not None else np.nan
                                 for r in pooled]))
        return best, (f"fresh draws from restart {pooled[best]['restart']}'s guide, the "
                      f"highest final ELBO of the {len(pooled)} pooled restarts")

    def _facts_on(self, model, data) -> StoryFacts:
        """The facts of ``model`` on ``data``: the run's own, or read (once per posterior)."""
        if self._facts is None or model is not self.model or data is not self.data:
            facts = story_facts(model, data)
            if model is self.model and data is self.data:
                self._facts = facts
            return facts
        return self._facts

    def _guide_function(self, model):
        """The fit's guide: in memory, imported by reference, or an autoguide rebuilt."""
        if self.guide is not None:
            return self.guide
        families = {name: family for family, name in FAMILY_GUIDES.values()}
        name = str(self.tree.attrs.get("guide", ""))
        centring = self.info.get("centring") or {}
        if centring.get("kept"):
            raise OptionError(
                "fresh draws need the fitted guide over the story's own sites, and this "
                "Gaussian was fitted on the story decentred at "
                f"{centring.get('centredness')} (ppl_notes.vi.centring: its coordinates "
                "are not the story's): use its stored draws (call without num_samples), or "
                "fit with a larger num_draws")
        if name == FLOW_GUIDE:
            raise OptionError(
                "fresh draws need a Pyro guide, and a flow fitted on the potential "
                "(guide='flow', ppl_notes.vi.flow_family) is not one: use its stored draws "
                "(call without num_samples), or fit with a larger num_draws")
        if name not in families:
            raise OptionError(
                f"fresh draws need the fit's guide function {name!r}, which a result file "
                "does not carry (it holds values, never code): load it with "
                "ppl_notes.load(path, model=..., guide=...), or call without num_samples "
                "to use the stored draws")
        return families[name](pyro.poutine.block(model, hide=self.discrete_sites),
                              init_loc_fn=unconstrained_value)

    def log_evidence(self, how: str = "elbo", num_samples: int | None = None,
                     seed: int = 0) -> Estimate:
        r"""Estimate :math:`\log p(x)` from a variational posterior, with a standard error.

        Parameters
        ----------
        how : {"elbo", "importance"}
            ``elbo``: the lower bound :math:`\mathbb E_q[\log p(x,z) - \log q(z)]`;
            ``importance``: :math:`\log \frac1S \sum_s p(x, z_s)/q(z_s)`.
        num_samples : int, optional
            Fresh draws from the guide; by default the draws stored with the fit. A fit
            with restarts draws from its best pooled restart's guide (the highest final
            ELBO), and the estimate's ``source`` says which.
        seed : int
            Seeds fresh draws.
        """
        estimators = {"elbo": elbo_estimate, "importance": importance_estimate}
        if how not in estimators:
            raise OptionError(f"how must be one of {sorted(estimators)}, got {how!r}")
        estimate = estimators[how](*self.log_weights(num_samples, seed))
        if num_samples is not None and "restarts" in self.info:
            estimate = dataclasses.replace(estimate, source=self._best_restart()[1])
        return estimate

    def kl_gap(self, num_samples: int | None = None, seed: int = 0) -> Estimate:
        r""":math:`\mathrm{KL}(q\,\|\,p(z\mid x))` = importance :math:`\log p(x)` − ELBO.

        Notes §2.f: :math:`\log p(x) = \mathrm{KL} + \mathrm{ELBO}`; both estimates use
        the same draws (see :mod:`ppl_notes.evidence`).
        """
        return kl_gap_estimate(*self.log_weights(num_samples, seed))

    def save(self, path: str | os.PathLike, key: bytes | str | os.PathLike | None = None
             ) -> Path:
        """Write the results to a netCDF file (h5netcdf; no pickle). Returns the path.

        The file carries the SHA-256 of its content and an HMAC of that digest under this
        user's signing key (``key``, default ``$PPL_NOTES_CACHE/signing.key``;
        :mod:`ppl_notes._signing`), so :func:`load` can tell damage and tampering apart
        from the file as written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".part")
        self.tree.to_netcdf(temporary, engine="h5netcdf")
        # The digest is of the content as it reads back (netCDF changes some dtypes).
        with xr.open_datatree(temporary, engine="h5netcdf") as written:
            digest = tree_digest(written)
        with h5netcdf.File(temporary, "r+") as handle:
            handle.attrs[DIGEST_ATTR] = digest
            handle.attrs[SIGNATURE_ATTR] = sign(digest, signing_key(key))
        os.replace(temporary, path)
        return path
