"""A comparison report a person would read: CSV tables, PNG figures, one HTML page.

:func:`write_report` takes posteriors of one story (typically VI and NUTS) and writes to
a folder:

- ``parameters.csv`` (:func:`ppl_notes.compare`), ``posteriors.csv`` (one row per
  posterior: run time and diagnostics), ``warnings.csv`` (every finding), ``loo.csv``
  (PSIS-LOO per posterior, where the story has data);
- ``marginals.png``, ``forest.png``, ``elbo.png``, ``trace.png``, ``rank.png``,
  ``ppc.png``, ``loo_khat.png`` (those that apply);
- ``report.html``: all of it on one self-contained page (figures embedded as data URIs,
  no scripts, no network), with the run settings and library versions.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from ppl_notes import plots
from ppl_notes._versions import library_versions
from ppl_notes.comparison import compare, labelled
from ppl_notes.cross_validation import loo

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: .5em .8em;
           margin: .4em 0; }
.ok { background: #eaf7ea; border-left: 4px solid #2e8b57; padding: .5em .8em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; }
"""

_CAPTIONS = {
    "marginals": "Marginal densities, one curve per posterior.",
    "forest": "Means with 50% and 94% intervals, standardised by the reference posterior.",
    "elbo": "The ELBO per step of each variational run.",
    "trace": "MCMC chains: draws over time and their densities.",
    "rank": "Rank ECDFs per chain: inside the band when the chains agree.",
    "ppc": "Posterior predictive check: replicated data sets against the observed data.",
    "loo_khat": "Pareto k-hat of each observation in PSIS-LOO (above 0.7: unreliable).",
}


_MAX_PANELS = 24  # panels per figure; a larger model's other parameters go in the tables


def figure_sites(fits: dict, var_names=None, max_panels: int = _MAX_PANELS):
    """The parameters drawn as figures, and those left to the tables.

    The top-level parameters (fewest elements first: scalars, then small vectors) are
    taken while the figure has at most ``max_panels`` panels; a hierarchical model's
    per-group parameters (71 schools, 400 students) are read better as tables.

    Returns
    -------
    (list of str, dict of str to int)
        The sites to draw, and each site left out with its number of elements.
    """
    first = next(iter(fits.values()))
    candidates = plots.shared_sites(fits, var_names)
    sizes = {}
    for site in candidates:
        variable = first.tree["posterior"][site]
        sizes[site] = int(np.prod([n for d, n in variable.sizes.items()
                                   if d not in first.sample_dims]))
    drawn, panels = [], 0
    for site in sorted(candidates, key=lambda s: sizes[s]):
        if panels + sizes[site] <= max_panels:
            drawn.append(site)
            panels += sizes[site]
    left = {s: sizes[s] for s in candidates if s not in drawn}
    return [s for s in candidates if s in drawn], left


def _figures(fits: dict, reference: str | None, out: Path, sites: list[str],
             loo_results: dict) -> dict[str, Path]:
    figures = {}
    if sites:
        figures["marginals"] = plots.plot_marginals(fits, var_names=sites)
        figures["forest"] = plots.plot_forest(fits, var_names=sites, reference=reference)
    variational = {k: p for k, p in fits.items() if "elbo" in p.history.columns}
    if variational:
        figures["elbo"] = plots.plot_elbo(variational)
    mcmc = [p for p in fits.values() if p.is_mcmc]
    if mcmc and sites:
        chains = fits[reference] if reference in fits and fits[reference].is_mcmc else mcmc[0]
        figures["trace"] = plots.plot_trace(chains, var_names=sites)
        figures["rank"] = plots.plot_rank(chains, var_names=sites)
    predictive = fits[reference] if reference is not None else next(iter(fits.values()))
    observed = predictive.model is not None and predictive.model.observed
    if observed and predictive.num_draws > 1:
        figures["ppc"] = plots.plot_ppc(predictive)
    loo_ready = [k for k, p in variational.items() if _pointwise_observations(p) > 1]
    if loo_ready:
        label = loo_ready[0]
        figures["loo_khat"] = plots.plot_loo_khat(fits[label], loo_results.get(label))
    return {name: plots.save_figure(figure, out / f"{name}.png")
            for name, figure in figures.items()}


def _pointwise_observations(posterior) -> int:
    """How many terms the pointwise log-likelihood has (0 without one)."""
    if "log_likelihood" not in posterior.tree.children:
        return 0
    group = posterior.tree["log_likelihood"]
    return sum(int(np.prod([n for d, n in group[v].sizes.items()
                            if d not in posterior.sample_dims]))
               for v in group.data_vars)


def _loo_results(fits: dict) -> dict:
    """Each fit's PSIS-LOO with its pointwise k-hat (the table and the k-hat figure)."""
    return {label: loo(posterior, pointwise=True, warn=False)
            for label, posterior in fits.items()
            if "log_likelihood" in posterior.tree.children and posterior.num_draws >= 2}


def _loo_table(loo_results: dict) -> pd.DataFrame:
    rows = []
    for label, result in loo_results.items():
        k = result.pareto_k.values.reshape(-1)
        rows.append({"posterior": label, "elpd_loo": result.elpd, "se": result.se,
                     "p_loo": result.p, "share_k_above_0.7": float((k > 0.7).mean())})
    return pd.DataFrame(rows).set_index("posterior") if rows else pd.DataFrame()


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(float_format=lambda v: f"{v:.4g}", na_rep="", border=0)


def write_report(*posteriors, out, title: str | None = None, reference=None,
                 var_names=None, table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write the comparison tables, figures and one HTML page to ``out``.

    Parameters
    ----------
    *posteriors : Posterior, or one mapping ``{label: Posterior}``
        Posteriors of one story (see :func:`ppl_notes.compare`).
    out : str or Path
        The folder (created if needed).
    title : str, optional
        The page's heading; default ``"<story>: VI vs MCMC"``.
    reference, var_names
        As in :func:`ppl_notes.compare`.
    table : pandas.DataFrame, optional
        ``compare(posteriors, reference=reference, var_names=var_names)`` where the
        caller has it already (the command line prints it first); otherwise computed.

    Returns
    -------
    dict
        What was written: ``"report"`` (the HTML page), each table and each figure.
    """
    fits = labelled(posteriors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if table is None:
        table = compare(fits, reference=reference, var_names=var_names)
    ref = table.attrs["reference"]
    diagnostics = table.attrs["diagnostics"]
    found = [{"posterior": label, "check": f.check, "parameter": f.parameter,
              "value": f.value, "threshold": f.threshold, "message": f.message}
             for label, listed in table.attrs["findings"].items() for f in listed]
    warnings_table = pd.DataFrame(found, columns=["posterior", "check", "parameter", "value",
                                                  "threshold", "message"])
    loo_results = _loo_results(fits)
    loo_table = _loo_table(loo_results)
    written = {"parameters": out / "parameters.csv", "posteriors": out / "posteriors.csv",
               "warnings": out / "warnings.csv"}
    table.to_csv(written["parameters"])
    diagnostics.to_csv(written["posteriors"])
    warnings_table.to_csv(written["warnings"], index=False)
    if not loo_table.empty:
        written["loo"] = out / "loo.csv"
        loo_table.to_csv(written["loo"])
    drawn, left = figure_sites(fits, var_names)
    figures = _figures(fits, ref, out, drawn, loo_results)
    written.update(figures)
    story = next(iter(fits.values())).model_name
    title = title or f"{story}: {_methods_title(fits)}"
    page = _page(title, fits, table, diagnostics, warnings_table, loo_table, figures, ref, left)
    written["report"] = out / "report.html"
    written["report"].write_text(page, encoding="utf-8")
    return written


def _methods_title(fits: dict) -> str:
    variational = any(p.is_variational for p in fits.values())
    mcmc = any(p.is_mcmc for p in fits.values())
    if variational and mcmc:
        return "VI vs MCMC"
    return "VI posteriors" if variational else "MCMC posteriors" if mcmc else "posteriors"


def _page(title, fits, table, diagnostics, warnings_table, loo_table, figures, ref,
          left) -> str:
    escape = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1>",
             f"<p>Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by ppl_notes. "
             f"Reference posterior: <b>{escape(str(ref))}</b>. smd = (mean - reference mean)"
             f" / reference sd; sd_ratio = sd / reference sd; wasserstein and ks compare "
             f"each marginal with the reference's.</p>",
             "<h2>Warnings</h2>"]
    if warnings_table.empty:
        parts.append("<div class='ok'>No diagnostic crossed its threshold.</div>")
    for row in warnings_table.itertuples():
        parts.append(f"<div class='warning'><b>{escape(row.posterior)}</b>: "
                     f"{escape(row.message)}</div>")
    parts += ["<h2>Posteriors</h2>", _html_table(diagnostics.T),
              "<h2>Parameters</h2>", _html_table(table)]
    if not loo_table.empty:
        parts += ["<h2>Leave-one-out (PSIS-LOO)</h2>", _html_table(loo_table)]
    unstored = {label: str(p.tree.attrs.get("log_likelihood_note", ""))
                for label, p in fits.items()}
    unstored = {label: note for label, note in unstored.items() if note.startswith("not stored")}
    if unstored:  # over the budget, or log_likelihood=False: no LOO, and the page says why
        parts.append("<h2>Leave-one-out (PSIS-LOO)</h2>")
        parts += [f"<p><b>{escape(label)}</b>: no pointwise log-likelihood, "
                  f"{escape(note)}</p>" for label, note in unstored.items()]
    parts.append("<h2>Figures</h2>")
    if left:
        listed = ", ".join(f"{escape(k)} ({n} elements)" for k, n in left.items())
        parts.append(f"<p>Drawn: the top-level parameters. In the tables only: {listed}.</p>")
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{escape(name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{escape(_CAPTIONS.get(name, name))}</figcaption></figure>")
    settings = {label: {"method": p.method, "guide": p.tree.attrs.get("guide", ""),
                        "seed": int(p.tree.attrs.get("seed", 0)), "options": p.options,
                        "info": p.info, "seconds": round(p.seconds, 2)}
                for label, p in fits.items()}
    parts += ["<h2>Run settings</h2>",
              f"<pre>{escape(json.dumps(settings, indent=2, default=str))}</pre>",
              "<h2>Versions</h2>",
              f"<pre>{escape(json.dumps(library_versions(), indent=2))}</pre>",
              "</body></html>"]
    return "\n".join(parts)
