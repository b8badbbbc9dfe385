r"""Simulation-based calibration: does a method recover the parameters its story drew.

For each replicate :math:`r` (Talts, Betancourt, Simpson, Vehtari & Gelman 2018,
"Validating Bayesian inference algorithms with simulation-based calibration"):

1. draw :math:`\tilde\theta \sim p(\theta)` and :math:`\tilde y \sim p(y \mid \tilde\theta)`
   by running the story forwards (:meth:`~ppl_notes.story.Model.simulate`);
2. fit :math:`\tilde y` with the method under test;
3. rank each scalar element of :math:`\tilde\theta` among :math:`L` posterior draws:
   NUTS draws are thinned by :math:`\lceil n / \widehat{\mathrm{ESS}}\rceil` to near
   independence, VI draws are independent already.

If the method is exact, :math:`p(\theta \mid \tilde y)` averaged over the prior
predictive is the prior, so each rank is uniform on :math:`\{0, \dots, L\}`. Ranks are
made continuous by the randomised PIT :math:`u = (\mathrm{rank} + V)/(L + 1)`,
:math:`V \sim U(0, 1)`, uniform on (0, 1) for any :math:`L`, so replicates with different
:math:`L` pool. For VI this is also the check of Yao, Vehtari, Simpson & Gelman (2018,
"Yes, but did it work?", VSBC): its marginal probabilities
:math:`p_r = q(\theta < \tilde\theta_r)` are these PIT values; VSBC's own statistic, the
asymmetry of their distribution around 1/2 (a biased q), is reported as well.

The verdict: each parameter's PIT values are tested for uniformity (Kolmogorov-Smirnov);
the method is *calibrated* when no p-value falls below :math:`0.05 / K` over :math:`K`
parameters (Bonferroni: a family-wise false-alarm rate of at most 5%).

Replicates run in parallel worker processes (one per core) and are stored as they
finish, one JSON line each: a calibration killed and restarted with the same arguments
continues from the replicates it had.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppl_notes._cluster import check_scheduler, client_for, completed
from ppl_notes._pool import run_in_processes
from ppl_notes._progress import show_progress
from ppl_notes._signing import cache_root, sign, signing_key, verify
from ppl_notes._sites import sample_sites
from ppl_notes.data_preparation import to_tensor
from ppl_notes.display import calibration_html
from ppl_notes.errors import (
    CheckpointError,
    OptionError,
    PartialResultWarning,
    PPLNotesError,
    StoryError,
    UntrustedFileError,
)
from ppl_notes.evaluation.fingerprint import code_digest, data_digests
from ppl_notes.inference import infer
from ppl_notes.inference.backends import methods_with

__all__ = ["Calibration", "calibrate"]

#: family-wise false-alarm rate of the uniformity tests (Bonferroni over parameters)
FAMILY_ALPHA = 0.05
_FORMAT = "ppl_notes calibration 3"
#: NUTS settings per replicate unless given: one chain, as Talts et al. (2018) run it
_NUTS_DEFAULTS = {"chains": 1, "warmup": 500, "draws": 1000}


@dataclass
class Calibration:
    """The replicates of a simulation-based calibration and the verdict on them.

    Attributes
    ----------
    ranks : xarray.Dataset
        ``rank``, ``pit`` and ``truth`` over ``(replicate, parameter)``, and ``num_draws``
        (the :math:`L` each rank is out of) over ``replicate``.
    pvalues : pandas.Series
        The Kolmogorov-Smirnov p-value of each parameter's PIT values against U(0, 1).
    calibrated : bool
        No p-value below ``0.05 / len(pvalues)`` (Bonferroni; module doc).
    vsbc_pvalues : pandas.Series
        VSBC's symmetry test (two-sample KS of :math:`p` against :math:`1 - p`), for
        the VI methods; empty for NUTS.
    partial : bool
        Whether Ctrl-C ended the calibration before every replicate finished (the
        verdict is then on those that did).
    options : dict
        The options each fit was run with (after the calibration's defaults).
    """

    method: str
    story: str
    ranks: Any
    pvalues: Any
    calibrated: bool
    vsbc_pvalues: Any = None
    partial: bool = False
    options: dict = field(default_factory=dict)

    @property
    def rule(self) -> str:
        """The multiple-testing rule behind :attr:`calibrated`, in words."""
        return (f"calibrated when every parameter's KS p-value is at least "
                f"{FAMILY_ALPHA} / {len(self.pvalues)} (Bonferroni, family-wise rate "
                f"{FAMILY_ALPHA})")

    def to_arviz(self):
        """The PIT values as an ArviZ DataTree (group ``prior_sbc``, sample dim ``replicate``)."""
        import xarray as xr

        pit = self.ranks["pit"]
        groups = {"prior_sbc": xr.Dataset({"pit": pit}),
                  "calibration": self.ranks.drop_vars("pit")}
        tree = xr.DataTree.from_dict(groups)
        tree.attrs.update(method=self.method, story=self.story, calibrated=int(self.calibrated),
                          rule=self.rule, pvalues=json.dumps(self.pvalues.to_dict()))
        return tree

    def plot(self, **kwargs):
        """ECDF difference of the PIT values with simultaneous bands, one panel per parameter.

        arviz-plots' :func:`~arviz_plots.plot_ecdf_pit` (Säilynoja, Bürkner & Vehtari 2022:
        graphical test for discrete uniformity). Keyword arguments go to it.
        """
        import arviz_plots

        return arviz_plots.plot_ecdf_pit(self.to_arviz(), group="prior_sbc",
                                         sample_dims=["replicate"], **kwargs)

    def _repr_html_(self) -> str:
        """What a notebook shows: the verdict and each p-value (:mod:`ppl_notes.display`)."""
        return calibration_html(self)

    def __repr__(self) -> str:
        lines = [f"Calibration of {self.story!r} by {self.method}: "
                 f"{self.ranks.sizes['replicate']} replicates, "
                 f"{'calibrated' if self.calibrated else 'NOT calibrated'} ({self.rule})"]
        lines += [f"  {name:20s} KS p = {p:.3g}" for name, p in self.pvalues.items()]
        return "\n".join(lines)


def calibrate(model, method: str = "nuts", replicates: int = 200, *, scheduler=None,
              data: Mapping | None = None, seed: int = 0,
              store: str | os.PathLike | bool | None = None, processes: int | None = None,
              progress: bool = True, trusted: bool = False, **options: Any) -> Calibration:
    """Simulation-based calibration of ``method`` on ``model`` (module doc).

    Parameters
    ----------
    model : Model
        The story; its prior and likelihood make the replicates.
    method : {"nuts", "svi", "bbvi"}
        The method under test, as :func:`ppl_notes.infer` names it.
    replicates : int
        How many data sets to simulate and fit. Replicate ``r``'s seed depends on
        ``seed`` and ``r`` only, so 200 replicates extend a run of 100.
    scheduler : None, str or distributed.Client
        ``None``: worker processes on this machine. An address (``"tcp://host:8786"``)
        or a Client: the replicates run on that Dask cluster's workers, and a replicate
        whose worker dies is run again on another (:mod:`ppl_notes._cluster`).
    data : dict, optional
        The story's arguments that are not observed (covariates, sizes such as
        ``num_obs``); default: those of the story's default data.
    seed : int
        The calibration's seed.
    store : path, bool or None
        Where finished replicates are kept, one JSON line each. ``None``: a file named
        by the arguments' fingerprint under ``$PPL_NOTES_CACHE`` (default
        ``~/.cache/ppl_notes``)``/calibrations``; ``False``: nowhere.
    processes : int, optional
        Worker processes (default: one per core).
    progress : bool
        A progress bar over the replicates.
    trusted : bool
        Continue a store whose lines are not signed with this user's key (each line of a
        store carries an HMAC, :mod:`ppl_notes._signing`); it holds numbers only and
        cannot run code, but its ranks are then only as good as its author.
    **options
        Passed to :func:`ppl_notes.infer` for each fit (NUTS defaults to one chain of
        500 warmup + 1000 draws here).

    Returns
    -------
    Calibration
        Partial (with a :class:`~ppl_notes.errors.PartialResultWarning`) when
        interrupted by Ctrl-C; the store keeps every finished replicate.
    """
    import cloudpickle

    drawn = methods_with(lambda backend: backend.draws)
    if method not in drawn:
        raise OptionError(f"calibrate: method must be one that gives draws, one of {drawn}, "
                          f"got {method!r}")
    if int(replicates) != replicates or replicates < 2:
        raise OptionError(f"calibrate: replicates must be an integer >= 2, got {replicates!r}")
    check_scheduler(scheduler, "calibrate")
    if method == "nuts":
        options = {**_NUTS_DEFAULTS, **options}
    covariates = ({key: to_tensor(model, key, value) for key, value in data.items()}
                  if data is not None else model._default_covariates())
    _simulated(model, _replicate_seed(seed, 0), covariates, 0)  # before any worker starts
    parameters = _parameters(model, covariates)
    fingerprint = {"story": f"{model.name} {code_digest(model)}", "method": method,
                   "seed": seed, "options": repr(sorted(options.items())),
                   "data": data_digests(covariates)}
    path = _store_path(store, model.name, fingerprint)
    done = _read_store(path, fingerprint, trusted) if path is not None else {}
    todo = [r for r in range(replicates) if r not in done]
    job = cloudpickle.dumps({"model": model, "method": method, "options": options,
                             "covariates": covariates, "seed": seed,
                             "parameters": parameters})
    interrupted = False
    if todo:
        try:
            _run(job, todo, done, path, replicates, processes, progress, scheduler,
                 model.name)
        except KeyboardInterrupt:
            interrupted = True
    results = [done[r] for r in range(replicates) if r in done]
    if interrupted:
        if len(results) < 2:
            raise KeyboardInterrupt("calibration interrupted before two replicates finished")
        warnings.warn(f"calibration interrupted: {len(results)} of {replicates} replicates "
                      "finished" + (f" (kept in {path}; run again to continue)" if path else ""),
                      PartialResultWarning, stacklevel=2)
    return _verdict(model.name, method, parameters, results, options, partial=interrupted)


# -- one replicate (in a worker) ---------------------------------------------------------

_jobs: dict[bytes, dict] = {}


def _replicate_seed(seed: int, replicate: int) -> int:
    """Replicate r's seed, from ``seed`` and r only (below 1e6: NUTS seeds seed*1000+chain)."""
    return int(np.random.SeedSequence([seed, replicate]).generate_state(1)[0] % 1_000_000)


def _one_replicate(payload: bytes, replicate: int) -> dict[str, Any]:
    """Simulate, fit, rank: one replicate's record."""
    import cloudpickle


    key = hashlib.sha256(payload).digest()
    if key not in _jobs:
        _jobs[key] = cloudpickle.loads(payload)
    job = _jobs[key]
    model, parameters = job["model"], job["parameters"]
    seed = _replicate_seed(job["seed"], replicate)
    started = time.perf_counter()
    simulated = _simulated(model, seed, job["covariates"], replicate)
    fit_data = dict(job["covariates"])
    for site, argument in model.observed_arguments.items():
        if argument:
            fit_data[argument] = simulated[site].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = infer(model, fit_data, method=job["method"], seed=seed, progress=False,
                    **job["options"])
    truth = _flatten({site: simulated[site].numpy() for site in parameters}, parameters)
    draws = _flatten({site: fit.draws(site) for site in parameters}, parameters, leading=True)
    draws = _thinned(draws) if job["method"] == "nuts" else draws
    names = _parameter_names(parameters)
    below = (draws < np.array([truth[p] for p in names])).sum(0)
    jitter = np.random.default_rng(seed).random(len(below))
    size = draws.shape[0]
    return {"replicate": replicate, "num_draws": size,
            "rank": {p: int(b) for p, b in zip(names, below, strict=True)},
            "pit": {p: float((b + v) / (size + 1))
                    for p, b, v in zip(names, below, jitter, strict=True)},
            "prob_below": {p: float(b / size) for p, b in zip(names, below, strict=True)},
            "truth": truth, "seconds": time.perf_counter() - started}


def _parameter_names(parameters: dict[str, tuple[int, ...]]) -> list[str]:
    """The scalar elements' names: ``mu``, ``w[0]``, ``w[1]``..., in site order."""
    names = []
    for site, shape in parameters.items():
        size = int(np.prod(shape, dtype=int))
        names += [site] if shape == () else [f"{site}[{i}]" for i in range(size)]
    return names


def _flatten(values: dict[str, np.ndarray], parameters, leading: bool = False):
    """Site values -> one column per scalar element (``leading``: draws first)."""
    if leading:
        return np.concatenate([np.asarray(values[s], dtype=float).reshape(
            np.asarray(values[s]).shape[0], -1) for s in parameters], axis=1)
    flat = np.concatenate([np.asarray(values[s], dtype=float).reshape(-1) for s in parameters])
    return dict(zip(_parameter_names(parameters), flat.tolist(), strict=True))


def _thinned(draws: np.ndarray) -> np.ndarray:
    """Every k-th draw, k = ceil(n / min bulk ESS): near-independent draws (Talts et al.)."""
    import arviz_stats

    ess = min(float(arviz_stats.ess(draws[None, :, j], method="bulk"))
              for j in range(draws.shape[1]))
    step = max(1, math.ceil(draws.shape[0] / max(ess, 1.0)))
    return draws[::step]


def _simulated(model, seed: int, covariates: dict, replicate: int) -> dict:
    """A replicate's parameters and data drawn from the story, or a StoryError saying so."""
    try:
        return model.simulate(seed=seed, **covariates)
    except PPLNotesError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the user's story: name it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise StoryError(
            f"calibrate: story {model.name!r} failed while simulating replicate {replicate}'s "
            f"parameters and data from its prior ({type(error).__name__}: {reason}). SBC "
            "runs the story forwards with its observed arguments left out (None): make "
            "that path work, and give the covariates it needs as data=") from error


def _parameters(model, covariates) -> dict[str, tuple[int, ...]]:
    """The latent continuous sites and their shapes (discrete sites are summed out).

    Read from one run of the story forwards, as SBC simulates it (its observed arguments
    None): a story without default data takes its sizes from its fixed plates or from
    the covariates given.
    """
    observed = set(model.observed_arguments)
    latent = {name: tuple(site["value"].shape)
              for name, site in sample_sites(model.forward_trace(0, **covariates)).items()
              if name not in observed and not site["fn"].support.is_discrete}
    if not latent:
        raise OptionError(f"calibrate: story {model.name!r} has no continuous latent site")
    return latent


# -- the pool, the store and the verdict -------------------------------------------------

def _on_cluster_worker(payload: bytes, replicate: int) -> dict[str, Any]:
    """One replicate in a Dask worker's thread: one torch thread, as in a local worker."""
    import torch

    torch.set_num_threads(1)
    return _one_replicate(payload, replicate)


def _run(job: bytes, todo: list[int], done: dict, path: Path | None, total: int,
         processes: int | None, progress: bool, scheduler, name: str) -> None:
    """Run the replicates ``todo`` in worker processes, storing each as it finishes."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=total - len(todo), desc="calibration replicates",
               disable=not show_progress(progress))

    def keep(record):
        done[record["replicate"]] = record
        if path is not None:
            _append(path, record)
        bar.update(1)

    try:
        if scheduler is not None:
            with client_for(scheduler, "calibrate") as client:
                key = f"calibrate-{name}-{uuid.uuid4().hex[:8]}"
                for record in completed(client, _on_cluster_worker, job,
                                        [(r,) for r in todo], key):
                    keep(record)
        else:
            run_in_processes(_one_replicate, job, [(r,) for r in todo], keep,
                             processes=processes)
    finally:
        bar.close()


def _store_tie(fingerprint: dict) -> str:
    """What ties a store's lines to its header: the digest of its format and fingerprint."""
    return hashlib.sha256(json.dumps({"format": _FORMAT, "fingerprint": fingerprint},
                                     sort_keys=True).encode()).hexdigest()


def _store_path(store, name: str, fingerprint: dict) -> Path | None:
    if store is False:
        return None
    if store is None or store is True:
        store = cache_root() / "calibrations" / f"{name}-{_store_tie(fingerprint)[:16]}.jsonl"
    path = Path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        header = {"format": _FORMAT, "fingerprint": fingerprint}
        path.write_text(_signed(header, _store_tie(fingerprint)) + "\n")
    return path


def _signed(record: dict, tie: str) -> str:
    """A store line: the record, the store's tie, and an HMAC of both under this user's key.

    The tie (:func:`_store_tie`) makes a line of one calibration worthless in another's
    store: a mean-field store's header followed by a NUTS store's lines, each signed
    alone, once read as a calibrated mean-field fit (p = 0.033 and 0.0003 became
    "calibrated").
    """
    body = json.dumps({"record": record, "store": tie}, sort_keys=True)
    return json.dumps({"record": record, "store": tie, "mac": sign(body, signing_key())},
                      sort_keys=True)


def _unsigned(line: str, trusted: bool, tie: str | None) -> dict | None:
    """A store line's record, or None for a line cut short.

    A line tied to another store than ``tie`` (None: the header's own, read first) is
    refused whoever signed it; one not signed with this user's key is an error unless
    ``trusted``.
    """
    try:
        entry = json.loads(line)
        record, its_tie = entry["record"], entry["store"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if tie is not None and its_tie != tie:
        raise CheckpointError(
            "a line of this calibration store belongs to another calibration (its tie to "
            "the store's header differs): lines were moved between stores; give another "
            "store (or delete it)")
    body = json.dumps({"record": record, "store": its_tie}, sort_keys=True)
    if not trusted and not verify(body, entry.get("mac"), signing_key()):
        raise UntrustedFileError(
            "a line of this calibration store is not signed with your key (another user's "
            "store, or a line changed after it was written); continue it only if you trust "
            "its author: calibrate(..., trusted=True), or give another store")
    return record


def _read_store(path: Path, fingerprint: dict, trusted: bool = False) -> dict[int, dict]:
    """The replicates a store holds; a store of another calibration is refused by name."""
    lines = path.read_text().splitlines()
    try:
        header = _unsigned(lines[0], trusted, None) or {}
    except IndexError:
        header = {}
    except UntrustedFileError as error:
        raise UntrustedFileError(f"calibration store {path}: {error}") from None
    if header.get("format") != _FORMAT:
        raise CheckpointError(f"calibration store {path} is not a ppl_notes calibration store "
                              f"({_FORMAT!r}); give another store (or delete it)")
    theirs = header["fingerprint"]
    differ = [key for key in fingerprint if theirs.get(key) != fingerprint[key]]
    if differ:
        raise CheckpointError(f"calibration store {path} holds a calibration with other "
                              f"{', '.join(differ)}; give another store (or delete it)")
    tie = _store_tie(theirs)
    if json.loads(lines[0]).get("store") != tie:
        raise CheckpointError(f"calibration store {path}: its header is not tied to its own "
                              "fingerprint; give another store (or delete it)")
    done = {}
    for line in lines[1:]:
        try:
            record = _unsigned(line, trusted, tie)
        except (UntrustedFileError, CheckpointError) as error:
            raise type(error)(f"calibration store {path}: {error}") from None
        if record is not None:  # None: a line cut short when the run was killed
            done[record["replicate"]] = record
    return done


def _append(path: Path, record: dict) -> None:
    """Append a signed record tied to the store's header, on a line of its own.

    A store cut mid-line (a run killed while writing) ends without a newline; the next
    record then starts a new line, where it was appended onto the partial one and lost
    with it (issue 41).
    """
    with path.open("rb") as existing:
        tie = json.loads(existing.readline())["store"]  # the header _read_store verified
        existing.seek(0, os.SEEK_END)
        cut = False
        if existing.tell():
            existing.seek(-1, os.SEEK_END)
            cut = existing.read(1) != b"\n"
    with path.open("a") as handle:
        handle.write(("\n" if cut else "") + _signed(record, tie) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _verdict(story: str, method: str, parameters, results: list[dict], options: dict,
             partial: bool) -> Calibration:
    import pandas as pd
    import xarray as xr
    from scipy import stats

    names = _parameter_names(parameters)
    index = [r["replicate"] for r in results]

    def table(key):
        return np.array([[r[key][p] for p in names] for r in results], dtype=float)

    coords = {"replicate": index, "parameter": names}
    dims = ("replicate", "parameter")
    ranks = xr.Dataset(
        {"rank": (dims, table("rank").astype(int)), "pit": (dims, table("pit")),
         "truth": (dims, table("truth")),
         "num_draws": (("replicate",), np.array([r["num_draws"] for r in results]))},
        coords=coords)
    pit = table("pit")
    pvalues = pd.Series({p: float(stats.kstest(pit[:, j], "uniform").pvalue)
                         for j, p in enumerate(names)}, name="ks_pvalue")
    vsbc = pd.Series(dtype=float, name="vsbc_pvalue")
    if method != "nuts":
        below = table("prob_below")
        vsbc = pd.Series({p: float(stats.ks_2samp(below[:, j], 1.0 - below[:, j]).pvalue)
                          for j, p in enumerate(names)}, name="vsbc_pvalue")
    calibrated = bool((pvalues >= FAMILY_ALPHA / len(names)).all())
    return Calibration(method=method, story=story, ranks=ranks, pvalues=pvalues,
                       calibrated=calibrated, vsbc_pvalues=vsbc, partial=partial,
                       options=options)
