r"""Variational and MCMC posteriors side by side: one table of parameters, one of runs.

:func:`compare` gives, for every scalar parameter element and every posterior, its mean,
sd and 94% equal-tailed interval, and against a reference posterior (by default the
single MCMC posterior present):

- the standardised mean difference :math:`(\bar\theta - \bar\theta_{ref})/s_{ref}`,
- the sd ratio :math:`s/s_{ref}` (mean-field VI on a correlated Gaussian with
  correlation :math:`\rho` gives :math:`\sqrt{1-\rho^2}`: KL(q‖p) is mode-seeking and
  under-dispersed, notes §2.e),
- the 1-D Wasserstein distance and the Kolmogorov-Smirnov statistic between the two
  marginals (``scipy.stats``, on all the draws).

:func:`diagnostics_table` has one row per posterior: method, run time, its diagnostics
(:mod:`ppl_notes.diagnostics`) and, against the reference, ArviZ's joint Wasserstein
distance (on a 200-draw subsample: it solves a transport problem) and k-nearest-neighbour
KL divergence. ``compare`` attaches it as
``table.attrs["diagnostics"]``, and each posterior's warnings as ``table.attrs["findings"]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import arviz_stats
import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from ppl_notes._elements import CI_PROB, element_draws
from ppl_notes.diagnostics import continuous_sites, diagnostics, findings
from ppl_notes.errors import DiagnosticWarning, OptionError, StoryError
from ppl_notes.posterior import Posterior
from ppl_notes.relabel import aligned_to
from ppl_notes.verdict import verdict_of

__all__ = ["compare", "diagnostics_table", "as_samples", "labelled"]

#: The probability mass of the reported interval (ArviZ 1.x's default).


def labelled(posteriors: Sequence[Any]) -> dict[str, Any]:
    """``{label: posterior}`` from posteriors or one mapping; labels made unique.

    A posterior's label is its method and guide (``svi (fullrank)``, ``nuts``); a second
    posterior with the same label gets `` #2``.
    """
    if len(posteriors) == 1 and isinstance(posteriors[0], Mapping):
        items = list(posteriors[0].items())
    else:
        items = [(getattr(p, "label", None), p) for p in posteriors]
    out: dict[str, Any] = {}
    for label, posterior in items:
        if not isinstance(posterior, Posterior):
            raise OptionError(f"compare takes Posterior objects (results of infer), got "
                              f"{type(posterior).__name__}")
        label, base, count = str(label), str(label), 1
        while label in out:
            count += 1
            label = f"{base} #{count}"
        out[label] = posterior
    if not out:
        raise OptionError("compare needs at least one posterior")
    return out


def _reference_label(posteriors: dict[str, Any], reference) -> str | None:
    if reference is None:
        mcmc = [k for k, p in posteriors.items() if p.is_mcmc]
        if len(mcmc) > 1:
            raise OptionError(f"several MCMC posteriors ({mcmc}): name the reference, e.g. "
                              f"reference={mcmc[0]!r}")
        return mcmc[0] if mcmc else None
    if isinstance(reference, str):
        if reference not in posteriors:
            raise OptionError(f"reference {reference!r} is not one of the posteriors "
                              f"{list(posteriors)}")
        return reference
    for label, posterior in posteriors.items():
        if posterior is reference:
            return label
    raise OptionError("reference must be one of the posteriors compared (or its label)")


def _common_sites(posteriors: dict[str, Any], var_names) -> list[str]:
    names = {p.model_name for p in posteriors.values()}
    if len(names) > 1:
        raise StoryError(f"compare takes posteriors of one story; got {sorted(names)}. "
                         "To compare stories, use ppl_notes.compare_models")
    first = next(iter(posteriors.values()))
    if var_names is None:
        var_names = [v for v in continuous_sites(first)
                     if all(v in p.tree["posterior"].data_vars for p in posteriors.values())]
    var_names = [var_names] if isinstance(var_names, str) else list(var_names)
    for label, posterior in posteriors.items():
        missing = [v for v in var_names if v not in posterior.tree["posterior"].data_vars]
        if missing:
            raise OptionError(f"var_names {missing} are not in posterior {label!r}; it has "
                              f"{sorted(posterior.tree['posterior'].data_vars)}")
    return var_names


def compare(*posteriors, reference=None, var_names: str | Sequence[str] | None = None
            ) -> pd.DataFrame:
    """Compare posteriors of one story parameter by parameter.

    Parameters
    ----------
    *posteriors : Posterior, or one mapping ``{label: Posterior}``
        Results of :func:`ppl_notes.infer`.
    reference : Posterior or str, optional
        The posterior the others are measured against; default: the single MCMC
        posterior present (none: the comparison columns are left out).
    var_names : str or list of str, optional
        Sites to compare; default: the continuous latent sites all posteriors share.

    Returns
    -------
    pandas.DataFrame
        Indexed by (``parameter``, ``posterior``); columns ``mean``, ``sd``,
        ``eti_3%``, ``eti_97%`` and, against the reference, ``smd``, ``sd_ratio``,
        ``wasserstein``, ``ks``. ``attrs["diagnostics"]`` holds
        :func:`diagnostics_table`, ``attrs["findings"]`` each posterior's
        :class:`~ppl_notes.diagnostics.Finding` s and
        ``attrs["reference"]`` the reference's label.

    Examples
    --------
    >>> table = compare(vi, mc)                               # doctest: +SKIP
    >>> table.xs("svi (fullrank)", level="posterior")["sd_ratio"]  # doctest: +SKIP
    """
    fits = labelled(posteriors)
    sites = _common_sites(fits, var_names)
    ref = _reference_label(fits, reference)
    fits = _aligned(fits, ref)
    draws = {label: element_draws(p.tree["posterior"].to_dataset(), sites, p.sample_dims)
             for label, p in fits.items()}
    tail = (1 - CI_PROB) / 2
    rows = []
    for parameter in draws[next(iter(fits))]:
        for label in fits:
            x = draws[label][parameter]
            row = {"parameter": parameter, "posterior": label, "mean": x.mean(),
                   "sd": x.std(ddof=1) if len(x) > 1 else np.nan,
                   "eti_3%": np.quantile(x, tail), "eti_97%": np.quantile(x, 1 - tail)}
            if ref is not None:
                row.update(_against(x, draws[ref][parameter]) if label != ref else
                           dict.fromkeys(("smd", "sd_ratio", "wasserstein", "ks"), np.nan))
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["parameter", "posterior"])
    numbers = {label: diagnostics(p) for label, p in fits.items()}
    found = {label: findings(p, numbers[label]) for label, p in fits.items()}
    table.attrs["reference"] = ref
    table.attrs["diagnostics"] = _diagnostics_rows(fits, ref, sites, numbers, found)
    table.attrs["findings"] = found
    return table


def _aligned(fits: dict[str, Any], ref: str | None) -> dict[str, Any]:
    """Each mixture posterior relabelled to the reference's labels (ppl_notes.relabel)."""
    if ref is None:
        return fits
    out = {}
    for label, posterior in fits.items():
        out[label], done = (posterior, []) if label == ref else aligned_to(posterior, fits[ref])
        if done:
            warnings.warn(f"compare: {label!r} found the mixture with permuted labels; "
                          f"relabelled to {ref!r}'s ({'; '.join(done)}; pivot relabelling, "
                          "Stephens 2000)", DiagnosticWarning, stacklevel=3)
    return out


def _against(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    scale = reference.std(ddof=1)
    return {
        "smd": (x.mean() - reference.mean()) / scale,
        "sd_ratio": x.std(ddof=1) / scale if len(x) > 1 else np.nan,
        "wasserstein": stats.wasserstein_distance(x, reference),
        "ks": stats.ks_2samp(x, reference).statistic,
    }


def as_samples(posterior, var_names: Sequence[str] | None = None) -> xr.DataTree:
    """The posterior group with one ``sample`` dim (MCMC's chains and draws stacked).

    Puts variational and MCMC draws on one layout, as ArviZ's two-sample functions and
    the overlaid plots need.
    """
    dataset = posterior.tree["posterior"].to_dataset()
    if var_names is not None:
        dataset = dataset[list(var_names)]
    if list(posterior.sample_dims) != ["sample"]:
        dims = list(posterior.sample_dims)
        dataset = dataset.stack(sample=dims).drop_vars([*dims, "sample"]).transpose("sample", ...)
        dataset = dataset.assign_coords(sample=np.arange(dataset.sizes["sample"]))
    return xr.DataTree.from_dict({"posterior": dataset})


def diagnostics_table(*posteriors, reference=None, var_names=None) -> pd.DataFrame:
    """One row per posterior: method, run time, draws, diagnostics, distance to the reference.

    MCMC rows have ``max_r_hat``, ``min_ess_bulk``, ``min_ess_tail`` (with the parameter
    each concerns), ``divergences`` and ``min_bfmi``; variational rows ``final_elbo``,
    ``elbo_change`` (last tenth of the steps minus the tenth before) and ``khat``.
    ``wasserstein_joint`` and ``kl_divergence`` are ArviZ's, against the reference.
    ``warnings`` counts the findings; ``reliable`` and ``verdict`` are
    :func:`ppl_notes.verdict.check`'s (its failed checks, in short).
    """
    fits = labelled(posteriors)
    sites = _common_sites(fits, var_names)
    ref = _reference_label(fits, reference)
    numbers = {label: diagnostics(p) for label, p in fits.items()}
    found = {label: findings(p, numbers[label]) for label, p in fits.items()}
    return _diagnostics_rows(fits, ref, sites, numbers, found)


def _diagnostics_rows(fits, ref, sites, numbers, found) -> pd.DataFrame:
    rows = []
    for label, posterior in fits.items():
        row: dict[str, Any] = {"posterior": label, "method": posterior.method,
                               "guide": posterior.tree.attrs.get("guide", ""),
                               "seconds": posterior.seconds, "draws": posterior.num_draws,
                               "partial": posterior.partial}
        for key, value in numbers[label].items():
            if key == "divergence_site":
                continue
            if isinstance(value, tuple):
                row[f"{key}_at"], row[key] = value
            else:
                row[key] = value
        fewest = min(posterior.num_draws, fits[ref].num_draws) if ref is not None else 0
        if ref is not None and label != ref and fewest > 1:
            pair = (as_samples(posterior, sites), as_samples(fits[ref], sites))
            common = dict(var_names=sites, sample_dims=["sample"], round_to="none")
            # ArviZ subsamples both without replacement: no more than the smaller one has.
            # The joint distance solves a transport problem: O(n^3) in its subsample.
            row["wasserstein_joint"] = float(arviz_stats.wasserstein(
                *pair, num_samples=min(200, fewest), **common))
            row["kl_divergence"] = float(arviz_stats.kl_divergence(
                pair[1], pair[0], num_samples=min(500, fewest), **common))
        row["warnings"] = len(found[label])
        verdict = verdict_of(posterior, numbers[label], found[label])
        row["reliable"] = verdict.reliable
        row["verdict"] = "reliable" if verdict.reliable else "; ".join(
            reason.split(":")[0] for reason in verdict.reasons[:3])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("posterior")
    order = [c for c in _DIAGNOSTIC_COLUMNS if c in table.columns]
    return table[order + [c for c in table.columns if c not in order]]


_DIAGNOSTIC_COLUMNS = (
    "method", "guide", "seconds", "draws", "partial", "reliable", "verdict", "warnings",
    "max_r_hat", "max_r_hat_at", "min_ess_bulk", "min_ess_bulk_at", "min_ess_tail",
    "min_ess_tail_at", "divergences", "min_bfmi", "min_bfmi_at", "max_tree_depth_share",
    "final_elbo", "elbo_change", "elbo_change_se", "khat", "converged",
    "wasserstein_joint", "kl_divergence",
)
