"""Figures for comparing posteriors (arviz-plots, matplotlib backend).

- :func:`plot_marginals`: each parameter's marginal density, one curve per posterior
  (VI over MCMC shows at a glance where q is too narrow or shifted);
- :func:`plot_forest`: means and intervals of every posterior, parameter by parameter;
- :func:`plot_elbo`: the ELBO per step of each variational run;
- :func:`plot_trace` and :func:`plot_rank`: MCMC chains (rank plots are flat when
  the chains agree; Vehtari et al. 2021);
- :func:`plot_ppc`: replicated data sets against the observed data;
- :func:`plot_loo_khat`: each observation's Pareto k-hat in PSIS-LOO.

The ArviZ figures return a ``PlotCollection`` (``.savefig(path)``), the ELBO a
matplotlib ``Figure``; :func:`save_figure` writes either.
"""

from __future__ import annotations

from pathlib import Path

import arviz_plots
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from ppl_notes.comparison import _reference_label, as_samples, labelled
from ppl_notes.cross_validation import loo
from ppl_notes.diagnostics import continuous_sites
from ppl_notes.errors import OptionError

__all__ = ["plot_marginals", "plot_forest", "plot_elbo", "plot_trace", "plot_rank",
           "plot_ppc", "plot_loo_khat", "plot_story_graph", "save_figure"]


def shared_sites(fits: dict, var_names=None) -> list[str]:
    """``var_names`` as a list, or the continuous latent sites every posterior has."""
    if var_names is not None:
        return [var_names] if isinstance(var_names, str) else list(var_names)
    first = next(iter(fits.values()))
    return [v for v in continuous_sites(first)
            if all(v in p.tree["posterior"].data_vars for p in fits.values())]


def _samples(posteriors, var_names):
    """Each posterior on one ``sample`` dim, thinned evenly to the smallest draw count.

    ArviZ stacks them along a ``model`` dim, which needs equal lengths (4000 NUTS draws
    against 1000 VI draws would otherwise be padded with NaN).
    """
    fits = labelled(posteriors)
    sites = shared_sites(fits, var_names)
    trees = {label: as_samples(p, sites) for label, p in fits.items()}
    size = min(t["posterior"].sizes["sample"] for t in trees.values())
    for label, tree in trees.items():
        total = tree["posterior"].sizes["sample"]
        if total > size:
            keep = np.linspace(0, total - 1, size).round().astype(int)
            dataset = tree["posterior"].to_dataset().isel(sample=keep)
            trees[label] = xr.DataTree.from_dict(
                {"posterior": dataset.assign_coords(sample=np.arange(size))})
    return trees, sites


def plot_marginals(*posteriors, var_names=None):
    """Overlaid marginal densities: one panel per parameter element, a curve per posterior.

    Parameters
    ----------
    *posteriors : Posterior, or one mapping ``{label: Posterior}``
    var_names : str or list of str, optional
        Default: the continuous latent sites all posteriors share.
    """
    trees, sites = _samples(posteriors, var_names)
    panels = sum(int(np.prod([n for d, n in next(iter(trees.values()))["posterior"][s].sizes.items()
                              if d != "sample"])) for s in sites)
    columns = min(4, panels)
    rows = -(-panels // columns)
    collection = arviz_plots.plot_dist(
        trees, var_names=sites, sample_dims=["sample"], backend="matplotlib",
        visuals={"point_estimate_text": False},
        figure_kwargs={"figsize": (3.3 * columns + 1.5, 3.2 * rows)})
    collection.add_legend("model")
    collection.get_viz("figure").set_layout_engine("constrained")  # titles clear of axes
    return collection


def plot_forest(*posteriors, var_names=None, reference=None):
    r"""Means and 94% intervals of each posterior, standardised parameter by parameter.

    Each element is shown as :math:`(\theta - \bar\theta_{ref}) / s_{ref}` (the
    reference as in :func:`ppl_notes.compare`; without one, all posteriors pooled), so
    parameters of any scale share one axis and a shift of 0.1 reads as 0.1 posterior sd.
    """
    fits = labelled(posteriors)
    trees, sites = _samples((fits,), var_names)
    ref = _reference_label(fits, reference)
    datasets = {label: tree["posterior"].to_dataset() for label, tree in trees.items()}
    base = (datasets[ref] if ref is not None else
            xr.concat(list(datasets.values()), dim="sample", coords="minimal"))
    centre, scale = base.mean("sample"), base.std("sample")
    standardised = {label: xr.DataTree.from_dict({"posterior": (d - centre) / scale})
                    for label, d in datasets.items()}
    collection = arviz_plots.plot_forest(standardised, var_names=sites, sample_dims=["sample"],
                                         combined=True, backend="matplotlib")
    collection.add_legend("model")
    chart = collection.get_viz("figure")
    what = f"sd of {ref}" if ref is not None else "pooled sd"
    chart.supxlabel(f"(value - reference mean) / {what}")
    return collection


def plot_elbo(*posteriors, skip: float = 0.1):
    """The ELBO per step of each variational posterior, with a running mean.

    Parameters
    ----------
    skip : float
        The share of early steps left out of the y-range (the ELBO starts far below).
    """
    fits = {k: p for k, p in labelled(posteriors).items() if "elbo" in p.history.columns}
    if not fits:
        raise OptionError("plot_elbo needs a variational posterior (svi or bbvi)")
    figure, axis = plt.subplots(figsize=(7, 3.5), layout="constrained")
    low, high = np.inf, -np.inf
    for label, posterior in fits.items():
        elbo = posterior.history["elbo"].to_numpy()
        steps = np.arange(len(elbo))
        window = max(len(elbo) // 50, 1)
        running = np.convolve(elbo, np.ones(window) / window, mode="valid")
        line, = axis.plot(steps, elbo, alpha=0.25, linewidth=0.6)
        axis.plot(steps[window - 1:], running, color=line.get_color(), label=label)
        tail = elbo[int(len(elbo) * skip):]
        low, high = min(low, np.nanquantile(tail, 0.01)), max(high, np.nanmax(tail))
    if np.isfinite(low) and np.isfinite(high) and high > low:
        margin = 0.05 * (high - low)
        axis.set_ylim(low - margin, high + margin)
    axis.set_xlabel("step")
    axis.set_ylabel("ELBO")
    axis.set_title("ELBO per step (light) and its running mean")
    axis.legend()
    return figure


def _mcmc(posterior, what: str):
    if not posterior.has_chains:
        raise OptionError(f"{what} needs draws in chains (MCMC, or VI with restarts=); this "
                          f"posterior is from {posterior.method!r}")


def plot_trace(posterior, var_names=None):
    """Each chain's draws over time, and their densities (MCMC)."""
    _mcmc(posterior, "plot_trace")
    sites = shared_sites({"": posterior}, var_names)
    return arviz_plots.plot_trace_dist(posterior.tree, var_names=sites,
                                       sample_dims=["chain", "draw"], backend="matplotlib")


def plot_rank(posterior, var_names=None):
    """Rank ECDF plots per chain (MCMC): inside the band when the chains agree."""
    _mcmc(posterior, "plot_rank")
    sites = shared_sites({"": posterior}, var_names)
    return arviz_plots.plot_rank(posterior.tree, var_names=sites, sample_dims=["chain", "draw"],
                                 backend="matplotlib")


def plot_ppc(posterior, num_draws: int = 100, seed: int = 0):
    """Replicated data sets from the posterior against the observed data."""
    if "posterior_predictive" not in posterior.tree.children:
        posterior.predict(num_draws=num_draws, seed=seed)
    tree = posterior.tree
    if list(posterior.sample_dims) == ["sample"]:
        # ArviZ stacks the sample dims into a new dim named "sample": VI's independent
        # draws are shown as one chain of draws instead.
        groups = {name: tree[name].to_dataset() for name in ("posterior_predictive",
                                                             "observed_data")}
        groups["posterior_predictive"] = (groups["posterior_predictive"]
                                          .rename({"sample": "draw"}).expand_dims("chain"))
        tree = xr.DataTree.from_dict(groups)
    return arviz_plots.plot_ppc_dist(tree, sample_dims=["chain", "draw"],
                                     num_samples=num_draws, backend="matplotlib")


def plot_loo_khat(posterior, result=None):
    r"""Each observation's Pareto :math:`\hat k` in PSIS-LOO (:func:`ppl_notes.loo`).

    One point per observation, in data order, against the thresholds of Vehtari et al.
    (2024): below :math:`\min(1 - 1/\log_{10} S, 0.7)` (``good_k``, S draws) its LOO
    estimate is reliable; above 0.7 it is not (those points are drawn in red and
    counted in the title). ``result`` is the posterior's ``loo(posterior,
    pointwise=True)`` where the caller has it already; otherwise it is computed.
    One scatter, not one artist per point: 0.1 s for the 934 heights, where ArviZ's
    ``plot_khat`` took 2.9 s.
    """
    if result is None:
        result = loo(posterior, pointwise=True, warn=False)
    khat = np.asarray(result.pareto_k.values, dtype=float).reshape(-1)
    bad = khat > 0.7
    figure, axis = plt.subplots(figsize=(7.5, 3.2), layout="constrained")
    index = np.arange(len(khat))
    axis.scatter(index[~bad], khat[~bad], s=8, color="C0", alpha=0.6, linewidths=0)
    axis.scatter(index[bad], khat[bad], s=14, color="C3", linewidths=0)
    axis.axhline(0.7, color="C3", linestyle="--", linewidth=1, label="0.7: unreliable above")
    if result.good_k < 0.7:
        axis.axhline(result.good_k, color="0.4", linestyle=":", linewidth=1,
                     label=f"{result.good_k:.2f}: reliable below, with {result.n_samples} draws")
    axis.set_xlabel("observation")
    axis.set_ylabel(r"Pareto $\hat k$")
    axis.set_title(f"{posterior.label}: PSIS-LOO k-hat, {int(bad.sum())} of {len(khat)} "
                   "observations above 0.7")
    axis.legend(loc="upper right", fontsize=8, frameon=False)
    return figure


def save_figure(figure, path) -> Path:
    """Write a PlotCollection or matplotlib Figure to ``path`` (PNG) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(figure, "get_viz"):  # a PlotCollection
        figure.savefig(path, dpi=110)
        plt.close(figure.get_viz("figure"))
    else:
        figure.savefig(path, dpi=110)
        plt.close(figure)
    return path


def plot_story_graph(story, data=None):
    """The story's graph: one node per sample site, arrows from what it depends on.

    Nodes are placed by depth (a site right of everything it depends on); observed sites
    are shaded; each label names the distribution and the plates the site sits in. Drawn
    with matplotlib from Pyro's ``get_model_relations`` (no graphviz needed).
    """
    from pyro.infer.inspect import get_model_relations

    prepared = story.prepare_data(data)
    relations = get_model_relations(story, model_kwargs=prepared)
    parents = relations["sample_sample"]
    plates = {site: [p for p, sites in relations["plate_sample"].items() if site in sites]
              for site in parents}
    depth: dict[str, int] = {}

    def depth_of(site):
        if site not in depth:
            depth[site] = 1 + max((depth_of(p) for p in parents[site]), default=-1)
        return depth[site]

    for site in parents:
        depth_of(site)
    columns: dict[int, list[str]] = {}
    for site in parents:
        columns.setdefault(depth[site], []).append(site)
    position = {site: (column, -row + (len(sites) - 1) / 2)
                for column, sites in columns.items() for row, site in enumerate(sites)}
    tallest = max(len(sites) for sites in columns.values())
    figure, axis = plt.subplots(figsize=(2.6 * len(columns) + 1, 1.2 * tallest + 1),
                                layout="constrained")
    for site, (x, y) in position.items():
        for parent in parents[site]:
            px, py = position[parent]
            bend = -0.35 if x - px > 1 else 0.0  # around the columns in between
            axis.annotate("", xy=(x - 0.28, y), xytext=(px + 0.28, py),
                          arrowprops={"arrowstyle": "->", "color": "0.3",
                                      "connectionstyle": f"arc3,rad={bend}"})
        observed = site in relations["observed"]
        label = f"{site}\n{relations['sample_dist'][site]}"
        if plates[site]:
            label += f"\n[{', '.join(plates[site])}]"
        axis.text(x, y, label, ha="center", va="center", fontsize=9,
                  bbox={"boxstyle": "round,pad=0.5", "facecolor": "0.8" if observed else "white",
                        "edgecolor": "0.2"})
    axis.set_xlim(-0.6, len(columns) - 0.4)
    ys = [y for _, y in position.values()]
    axis.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    axis.axis("off")
    axis.set_title(f"story {story.name!r}: latent sites white, observed shaded")
    return figure
