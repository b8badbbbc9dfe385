r"""Diagnostics of one posterior, and the warnings they raise.

MCMC (draws with ``chain`` and ``draw`` dims): the largest rank-normalised split R-hat,
the smallest bulk and tail ESS (Vehtari et al. 2021), the number of divergent
transitions, the lowest E-BFMI of any chain (Betancourt 2016) and how often the tree
reached its maximum depth. Variational posteriors: the final ELBO, whether it was still
moving when the run stopped, and the Pareto :math:`\hat k` of the importance ratios
:math:`p(x, z_s)/q(z_s)` (Yao et al. 2018, "Yes, but did it work?"): above 0.7 the
approximation cannot be trusted for this posterior. Point estimates: whether the
optimiser converged.

Every finding names the parameter it concerns and the next step to take. ``infer``
issues each as a :class:`~ppl_notes.errors.DiagnosticWarning` when a run ends, so that
nobody misses one; :func:`findings` returns them for reports.

References
----------
Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. & Bürkner, P.-C. (2021).
Rank-normalization, folding, and localization: an improved R-hat. Bayesian Analysis.
Betancourt, M. (2016). Diagnosing suboptimal cotangent disintegrations in Hamiltonian
Monte Carlo. arXiv:1604.00695. Yao, Y., Vehtari, A., Simpson, D. & Gelman, A. (2018). Yes,
but did it work?: Evaluating variational inference. ICML.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_notes import chain_diagnostics as chains
from ppl_notes._elements import element_draws
from ppl_notes.errors import DiagnosticWarning
from ppl_notes.psis import importance_ess_share, importance_khat, psis_weights

__all__ = ["THRESHOLDS", "Finding", "diagnostics", "findings", "elbo_trend", "warn_about",
           "richer_guide"]

#: R-hat, ESS and BFMI need this many draws in each chain (split chains, autocorrelation).
MIN_DRAWS_PER_CHAIN = 4

#: Where each check starts to warn (Vehtari et al. 2021; Betancourt 2016; Yao et al. 2018).
THRESHOLDS = {"r_hat": 1.01, "ess": 400, "bfmi": 0.3, "khat": 0.7, "tree_depth": 0.01,
              "elbo_change": 0.05}


#: Where the weights can be trusted (k-hat <= 0.7), q's raw draws must agree with the
#: weighted posterior this closely: means in weighted sds, and the sd ratio
#: (:func:`importance_gap`; the Monte Carlo error of a weighted sd from 1000 draws is a
#: few percent)
GAP_MEAN, GAP_SD = 0.1, (0.9, 1.1)

@dataclass(frozen=True)
class Finding:
    """One diagnostic that crossed its threshold.

    Attributes
    ----------
    check : str
        ``r_hat``, ``ess_bulk``, ``ess_tail``, ``divergences``, ``bfmi``, ``tree_depth``,
        ``khat``, ``elbo``, ``improper``, ``draws``, ``converged``, ``log_density``,
        ``value_branch`` or ``stopped_short``.
    parameter : str
        The parameter element (``tau``, ``theta[A]``), chain or objective it concerns.
    value, threshold : float
        What was measured and where the warning starts.
    message : str
        What is wrong and the next step.
    """

    check: str
    parameter: str
    value: float
    threshold: float
    message: str

    def __str__(self) -> str:
        return self.message


def continuous_sites(posterior) -> list[str]:
    """The posterior's variables minus its discrete latent sites (e.g. each person's gender)."""
    return [str(v) for v in posterior.tree["posterior"].data_vars
            if v not in posterior.discrete_sites]


def _worst(values: dict[str, float], largest: bool) -> tuple[str, float]:
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    if not finite:
        return "", float("nan")
    key = (max if largest else min)(finite, key=finite.get)
    return key, finite[key]


def richer_guide(info: dict[str, Any]) -> str:
    """What to fit instead of a variational family that misses the posterior.

    Only families ppl_notes has, each with the option that selects it: the mean-field
    fit goes to ``guide='fullrank'`` or ``'flow'``, the full-rank to ``'flow'``, a flow
    to NUTS (nothing richer is offered), a guide function to a flow of its own.
    """
    family = info.get("family")
    escalation = info.get("escalation") or {}
    nuts = "or check it against NUTS (method='nuts', ppl_notes.compare)"
    if family == "flow":
        return ("the flow (guide='flow', ppl_notes.vi.flow_family) is the richest family "
                "ppl_notes fits: check it against NUTS (method='nuts', ppl_notes.compare)")
    if family == "meanfield":
        return ("use guide='fullrank' (a Gaussian with correlations; mean-field ignores "
                "them and is too narrow) or guide='flow' (a Real-NVP flow started at the "
                f"Gaussian), {nuts}")
    if family in ("fullrank", "lowrank"):
        if escalation.get("to_flow") and not escalation.get("kept", True):
            return (f"default SVI fitted a flow and kept the Gaussian ({escalation['why']}); "
                    f"{nuts}")
        return (f"use guide='flow' (a Real-NVP flow started at this Gaussian; leaving guide "
                f"unset fits it where k-hat exceeds 0.7), {nuts}")
    return ("use a richer guide function (Pyro's AutoNormalizingFlow or AutoIAFNormal), or "
            f"leave guide unset for the Gaussian that goes on to a flow, {nuts}")


def _sentence(text: str) -> str:
    """``text`` with its first letter capitalised, the rest as written."""
    return text[:1].upper() + text[1:]


def beyond(value: float, threshold: float, digits: int = 2) -> str:
    """``value`` with as many decimals as it takes not to read as ``threshold``.

    A k-hat of 0.7004 is "0.7004 (> 0.7)", never "0.70 (> 0.7)".
    """
    for places in range(digits, 10):
        text = f"{value:.{places}f}"
        if float(text) != threshold:
            return text
    return repr(value)


def elbo_trend(elbo: np.ndarray, fraction: float = 0.1) -> tuple[float, float]:
    r"""How much the ELBO moved at the end of a run, and the noise of that change.

    The mean over the last ``fraction`` of the steps minus the mean over the
    ``fraction`` before, with its standard error from the per-step noise (estimated from
    successive differences: the per-step estimates are nearly independent draws around a
    slowly moving value).

    Returns
    -------
    (change, standard_error)
    """
    elbo = np.asarray(elbo, dtype=float)
    elbo = elbo[np.isfinite(elbo)]
    return window_change(elbo, max(int(len(elbo) * fraction), 5))


def window_change(elbo: np.ndarray, window: int) -> tuple[float, float]:
    """The change of a windowed mean of the ELBO, and its standard error.

    The mean of the last ``window`` values minus the mean of the ``window`` before;
    ``nan`` with fewer than ``2 * window`` values.
    """
    elbo = np.asarray(elbo, dtype=float)
    if len(elbo) < 2 * window:
        return float("nan"), float("nan")
    last, before = elbo[-window:], elbo[-2 * window:-window]
    change = float(last.mean() - before.mean())
    # The per-step noise from successive differences (half their variance), which a
    # trend inside the windows does not inflate as the windows' own spreads would.
    noise = np.diff(elbo[-2 * window:]).var(ddof=1) / 2
    standard_error = float(np.sqrt(2 * noise / window))
    return change, standard_error


def importance_gap(posterior) -> tuple[str, float, float]:
    r"""Where q's draws and the importance-weighted posterior differ most.

    Where the Pareto-smoothed weights :math:`w \propto p/q` can be trusted
    (:math:`\hat k \le 0.7`), they estimate the posterior's moments from q's own draws
    (Vehtari et al. 2024). A q too *wide* has small, well-behaved ratios, so k-hat, which
    sees a q too narrow, passes it; comparing q's raw moments with the weighted ones sees
    both. Each restart is weighted with its own q.

    Returns
    -------
    (label, mean shift, label, sd ratio)
        The element whose raw mean is furthest from the weighted one, with that shift in
        weighted sds; the element whose raw-over-weighted sd ratio is furthest from 1,
        with that ratio.
    """
    stats_ = posterior.tree["sample_stats"]
    dims = list(posterior.sample_dims)
    draws = element_draws(posterior.tree["posterior"].to_dataset(), continuous_sites(posterior),
                          dims, flatten=False)
    log_p, log_q = stats_["log_p"].values, stats_["log_q"].values
    if not posterior.has_chains:
        log_p, log_q = log_p[None], log_q[None]
        draws = {k: v[None] for k, v in draws.items()}
    shift_at, worst_shift, ratio_at, worst_ratio = "", 0.0, "", 1.0
    for restart in range(log_p.shape[0]):
        p, q = log_p[restart], log_q[restart]
        keep = np.isfinite(p) & np.isfinite(q)
        try:
            weights, _ = psis_weights(p[keep], q[keep])
        except ValueError:  # too few draws for a tail fit
            continue
        for label, values in draws.items():
            x = values[restart][keep]
            mean = float(weights @ x)
            sd = float(np.sqrt(max(weights @ (x - mean) ** 2, 0.0)))
            if not sd > 0:
                continue
            shift, ratio = float(abs(x.mean() - mean) / sd), float(x.std() / sd)
            if shift > worst_shift:
                shift_at, worst_shift = label, shift
            if abs(math.log(ratio)) > abs(math.log(worst_ratio)):
                ratio_at, worst_ratio = label, ratio
    return shift_at, worst_shift, ratio_at, worst_ratio


def diagnostics(posterior) -> dict[str, Any]:
    """The numbers behind the checks, for one posterior (``nan`` where a check does not apply).

    Returns
    -------
    dict
        MCMC: ``max_r_hat``, ``min_ess_bulk``, ``min_ess_tail``, ``divergences``,
        ``min_bfmi``, ``max_tree_depth_share``; variational: ``final_elbo``,
        ``elbo_change``, ``elbo_change_se``, ``khat``; point estimates: ``converged``.
    """
    numbers: dict[str, Any] = {}
    if posterior.has_chains:
        per_chain = posterior.tree["posterior"].sizes["draw"]
        numbers["draws_per_chain"] = per_chain
        if per_chain >= MIN_DRAWS_PER_CHAIN:
            numbers.update(_mcmc_numbers(posterior))
    history = posterior.history
    if "elbo" in history.columns:
        # the steps the pooled restarts reached (one left out may have run longer)
        elbo = history["elbo"].dropna().to_numpy()
        change, standard_error = elbo_trend(elbo)
        if posterior.info.get("engine") == "potential":
            # a deterministic objective, stopped when a step moved q by a tiny KL: its
            # history is a handful of Newton steps, not a noisy trace to test for a trend
            change, standard_error = math.nan, math.nan
        window = max(len(elbo) // 10, 1)
        numbers["final_elbo"] = float(np.mean(elbo[-window:])) if elbo.size else math.nan
        numbers["elbo_change"], numbers["elbo_change_se"] = change, standard_error
    if posterior.is_variational and posterior.num_draws > 1:
        stats_ = posterior.tree["sample_stats"]  # of the draws the fit holds
        finite = np.isfinite(stats_["log_p"].values) & np.isfinite(stats_["log_q"].values)
        numbers["nonfinite_log_p_share"] = float(1 - finite.mean())
        pairs = posterior.q_log_weights()  # the importance step's proposals, if it drew any
        # restarts: each its own q (pooling p/q_r would mix their normalising constants);
        # draws where the log density is not finite are a finding of their own, below
        pairs = [(p[np.isfinite(p) & np.isfinite(q)], q[np.isfinite(p) & np.isfinite(q)])
                 for p, q in pairs]
        numbers["khat"] = max(importance_khat(p, q) for p, q in pairs)
        numbers["importance_ess_share"] = min(importance_ess_share(p, q) for p, q in pairs)
        if (math.isfinite(numbers["khat"]) and numbers["khat"] <= THRESHOLDS["khat"]
                and not posterior.importance_corrected):  # corrected: the draws are weighted
            mean_at, shift, sd_at, ratio = importance_gap(posterior)
            numbers["importance_mean_gap"] = (mean_at, shift)
            numbers["importance_sd_ratio"] = (sd_at, ratio)
    if posterior.method == "pathfinder":  # its draws are resampled: the weights' own k-hat
        numbers["khat"] = float(posterior.info.get("khat", math.nan))
        numbers["importance_ess_share"] = float(posterior.info.get("importance_ess_share", 0))
    if "converged" in posterior.info:
        numbers["converged"] = bool(posterior.info["converged"])
    return numbers


def _mcmc_numbers(posterior) -> dict[str, Any]:

    tree, sites = posterior.tree, continuous_sites(posterior)
    numbers: dict[str, Any] = {}
    if sites:
        draws = element_draws(tree["posterior"], sites, ["chain", "draw"], flatten=False)
        labels, stacked = list(draws), np.stack(list(draws.values()))

        def worst(values: np.ndarray, largest: bool) -> tuple[str, float]:
            return _worst(dict(zip(labels, values.tolist(), strict=True)), largest)

        checked = chains.checks_of_elements(stacked)
        if "rhat" in checked:
            numbers["max_r_hat"] = worst(checked["rhat"], largest=True)
        numbers["min_ess_bulk"] = worst(checked["ess_bulk"], largest=False)
        numbers["min_ess_tail"] = worst(checked["ess_tail"], largest=False)
    sample_stats = tree["sample_stats"] if "sample_stats" in tree.children else None
    if sample_stats is not None and "diverging" in sample_stats.data_vars:
        diverging = sample_stats["diverging"].values.astype(bool)
        numbers["divergences"] = int(diverging.sum())
        numbers["divergence_site"] = _where_divergent(posterior, sites, diverging)
    if sample_stats is not None and "energy" in sample_stats.data_vars:
        per_chain = chains.bfmi(sample_stats["energy"].transpose("chain", "draw").values)
        chain = int(np.argmin(per_chain))
        numbers["min_bfmi"] = (f"chain {chain}", float(per_chain[chain]))
    if sample_stats is not None and "reached_max_tree_depth" in sample_stats.data_vars:
        numbers["max_tree_depth_share"] = float(sample_stats["reached_max_tree_depth"].mean())
    return numbers


def _where_divergent(posterior, sites: list[str], diverging: np.ndarray) -> tuple[str, str]:
    """The element whose divergent draws sit furthest from its other draws, and which side."""
    if not diverging.any() or diverging.all() or not sites:
        return "", ""
    draws = element_draws(posterior.tree["posterior"].to_dataset(), sites, ["chain", "draw"])
    flags = diverging.reshape(-1)
    best, side, score = "", "", 0.0
    for label, values in draws.items():
        spread = values[~flags].std()
        if spread <= 0:
            continue
        shift = (values[flags].mean() - values[~flags].mean()) / spread
        if abs(shift) > score:
            best, side, score = label, "small" if shift < 0 else "large", abs(shift)
    return best, side


#: Methods whose answer is a point reached by gradient steps alone
GRADIENT_MODES = ("map", "mle", "em")


def findings(posterior, numbers: dict[str, Any] | None = None) -> list[Finding]:
    """The checks that crossed their thresholds, each naming a parameter and a next step.

    ``numbers`` are :func:`diagnostics` of the posterior, when already computed.
    """
    numbers = diagnostics(posterior) if numbers is None else numbers
    found: list[Finding] = []
    per_chain = numbers.get("draws_per_chain", MIN_DRAWS_PER_CHAIN)
    if per_chain < MIN_DRAWS_PER_CHAIN:
        found.append(Finding(
            "draws", "draws", per_chain, MIN_DRAWS_PER_CHAIN,
            f"{per_chain} draw(s) per chain: R-hat, ESS and BFMI need at least "
            f"{MIN_DRAWS_PER_CHAIN}, so the chains were not checked. Run more draws (draws=)."))
    if "max_r_hat" in numbers:
        label, value = numbers["max_r_hat"]
        if value > THRESHOLDS["r_hat"] and posterior.is_variational:
            found.append(Finding(
                "r_hat", label, value, THRESHOLDS["r_hat"],
                f"R-hat of {label} across the restarts is {value:.3f} (> "
                f"{THRESHOLDS['r_hat']}): the restarts' fits disagree, so no one of them can "
                f"be trusted. Run more steps or a lower learning_rate (each stopped short of "
                f"its optimum), or, when they found different optima (info['modes']), start "
                f"from a better point or use a richer guide."))
        elif value > THRESHOLDS["r_hat"]:
            found.append(Finding(
                "r_hat", label, value, THRESHOLDS["r_hat"],
                f"R-hat of {label} is {value:.3f} (> {THRESHOLDS['r_hat']}): the chains "
                f"disagree. Run more warmup and draws (warmup=, draws=); if it stays high the "
                f"posterior may be multimodal or poorly identified (for a hierarchical story, "
                f"try its non-centred form)."))
    for kind in ("bulk", "tail"):
        key = f"min_ess_{kind}"
        if key in numbers:
            label, value = numbers[key]
            if value < THRESHOLDS["ess"]:
                found.append(Finding(
                    f"ess_{kind}", label, value, THRESHOLDS["ess"],
                    f"{kind} ESS of {label} is {value:.0f} (< {THRESHOLDS['ess']}): too few "
                    f"effective draws for reliable {'means' if kind == 'bulk' else 'intervals'}"
                    f". Run more draws (draws=) or more chains; a low ESS with divergences "
                    f"points to a geometry a reparameterisation would fix."))
    if numbers.get("divergences", 0) > 0:
        count = numbers["divergences"]
        label, side = numbers.get("divergence_site", ("", ""))
        share = count / posterior.num_draws
        where = f" They concentrate where {label} is {side}." if label else ""
        found.append(Finding(
            "divergences", label, float(count), 0.0,
            f"{count} divergent transitions ({share:.1%} of draws): NUTS could not follow "
            f"the posterior's curvature, so the draws are biased.{where} Raise target_accept "
            f"(e.g. 0.95), or reparameterise: a centred hierarchical story (theta ~ "
            f"Normal(mu, tau)) becomes non-centred (theta = mu + tau * z)."
            + _metric_advice(posterior)))
    if "min_bfmi" in numbers:
        chain, value = numbers["min_bfmi"]
        if value < THRESHOLDS["bfmi"]:
            found.append(Finding(
                "bfmi", chain, value, THRESHOLDS["bfmi"],
                f"E-BFMI of {chain} is {value:.2f} (< {THRESHOLDS['bfmi']}): momentum "
                f"resampling explores the energy poorly (heavy tails or a funnel). "
                f"Reparameterise the story, or try mass_matrix='dense'."))
    if numbers.get("max_tree_depth_share", 0.0) > THRESHOLDS["tree_depth"]:
        value = numbers["max_tree_depth_share"]
        depth = posterior.options.get("max_tree_depth")
        found.append(Finding(
            "tree_depth", "max_tree_depth", value, THRESHOLDS["tree_depth"],
            f"{value:.1%} of the transitions hit max_tree_depth={depth}: sampling is "
            f"inefficient, not biased. Raise max_tree_depth, use "
            f"mass_matrix='dense', or rescale strongly correlated parameters."))
    found.extend(_variational_findings(posterior, numbers))
    branch = posterior.info.get("value_branch")
    if branch and posterior.method in GRADIENT_MODES:
        found.append(Finding(
            "value_branch", posterior.method, 1.0, 0.0,
            f"the story branches on a value computed from its parameters ({branch}), so "
            f"its density jumps where the branch changes, and {posterior.method}'s "
            "gradient steps do not see a jump: the point found is a mode of the piece of "
            "the density it started in, which another piece may beat. Write the branch "
            "as a smooth function of the parameters, or sample the posterior with "
            "method='nuts' (its accept step sees every jump)."))
    unbounded = posterior.info.get("unbounded")
    if unbounded and posterior.method in GRADIENT_MODES:
        found.append(Finding(
            "unbounded", unbounded["site"], unbounded["gradient"], 0.0,
            f"{posterior.method} stopped on a slope, not at a mode: the log density was "
            f"still rising along {unbounded['site']} (gradient {unbounded['gradient']:.3g}, "
            f"unconstrained value {unbounded['unconstrained']:.3g}), as it does without "
            "bound where a scale goes to 0 (a centred hierarchical story, or an sd on "
            "data that are all equal). There is no mode to report: sample the posterior "
            "(method='nuts' or 'svi'), or give that scale a prior that vanishes at 0 (a "
            "Gamma or a LogNormal)."))
    elif numbers.get("converged") is False:
        found.append(Finding(
            "converged", posterior.method, 0.0, 1.0,
            f"{posterior.method} stopped before converging: raise steps or iterations, or "
            f"loosen tolerance."))
    return found


def _metric_advice(posterior) -> str:
    """Where the metric came from gradients: Stan's diagonal may diverge less."""
    if posterior.options.get("mass_matrix") not in ("lowrank", "fisher"):
        return ""
    return (" The metric was adapted from gradients (mass_matrix="
            f"{posterior.options['mass_matrix']!r}); on a funnel or a Gaussian process "
            "mass_matrix='diag' (the draws' variance) can diverge less.")


def _variational_findings(posterior, numbers: dict[str, Any]) -> list[Finding]:
    found = []
    share = numbers.get("nonfinite_log_p_share", 0.0)
    if share > 0:
        count = round(share * posterior.num_draws)
        found.append(Finding(
            "log_density", "log p", share, 0.0,
            f"the story's log density is NaN or infinite at {count} of the "
            f"{posterior.num_draws} draws from q ({share:.2%}): q puts mass where the story "
            "is undefined (a parameter outside its domain, log or sqrt of a negative). "
            "Give the parameter a prior on its domain, or guard the transform; those "
            "draws are left out of k-hat"))
    short, fits = stopped_short(posterior.info)
    if short:
        caps = sorted({str(f.get("steps_done", "?")) for f in short})
        found.append(Finding(
            "stopped_short", "ELBO", float(len(short)), 0.0,
            f"{len(short)} of {len(fits)} fit(s) stopped at the step cap ({', '.join(caps)} "
            "steps) with the ELBO still moving: the guide had not reached its optimum, so "
            "its means and sds lie somewhere between its start and its end. Raise steps "
            "(steps=); the run stops earlier by itself once the guide settles."))
    if "importance_mean_gap" in numbers:
        (mean_at, shift), (sd_at, ratio) = (numbers["importance_mean_gap"],
                                            numbers["importance_sd_ratio"])
        if shift > GAP_MEAN or not GAP_SD[0] <= ratio <= GAP_SD[1]:
            found.append(Finding(
                "importance_gap", mean_at if shift > GAP_MEAN else sd_at,
                shift if shift > GAP_MEAN else ratio, GAP_MEAN if shift > GAP_MEAN else 1.0,
                f"q's draws differ from the importance-weighted posterior (means up to "
                f"{shift:.2f} sd apart, at {mean_at}; sd ratio {ratio:.2f} at {sd_at}; "
                f"reliable within {GAP_MEAN} sd and [{GAP_SD[0]}, {GAP_SD[1]}]): q is too "
                "wide or shifted where k-hat cannot see it. "
                "posterior.importance_resampled() corrects the draws."))
    change, standard_error = numbers.get("elbo_change", math.nan), numbers.get("elbo_change_se",
                                                                                 math.nan)
    if (math.isfinite(change) and abs(change) > 3 * standard_error
            and abs(change) > THRESHOLDS["elbo_change"]):
        direction = "still rising" if change > 0 else "falling"
        step = ("run more steps (steps=)" if change > 0
                else "lower learning_rate or raise learning_rate_decay's effect")
        found.append(Finding(
            "elbo", "ELBO", change, THRESHOLDS["elbo_change"],
            f"the ELBO was {direction} when the run stopped ({change:+.3g} nats between the "
            f"last two tenths of the steps, +/- {standard_error:.2g}): {step}."))
    modes = posterior.info.get("modes") or []
    if len(modes) > 1:
        best = {r["restart"]: r["final_elbo"] for r in posterior.info.get("restarts", [])}
        groups = "; ".join(f"restarts {group} (final ELBO {best.get(group[0], math.nan):.4g})"
                           for group in modes)
        found.append(Finding(
            "modes", "restarts", float(len(modes)), 1.0,
            f"the restarts found {len(modes)} different optima: {groups}. The ELBO has "
            f"several local optima (a multimodal posterior, or a guide that collapsed); the "
            f"first has the highest ELBO. Keep its restarts "
            f"(posterior.tree.posterior.sel(chain=...)), or fit from a better start."))
    flat = posterior.info.get("flat_direction")
    if flat:
        found.append(Finding(
            "improper", flat["direction"], flat["curvature"], 0.0,
            f"the posterior looks improper: sites {flat['sites']} have flat priors (masked, "
            f"zero-scaled or ImproperUniform) and the log density has no curvature along "
            f"{flat['direction']} at the fitted mean, so it may not integrate; the numbers "
            f"there mean nothing (the guide widens for as long as it runs). Give these "
            f"sites proper priors, or data that identify them."))
    khat = numbers.get("khat", math.nan)
    if math.isfinite(khat) and khat > THRESHOLDS["khat"]:
        label, side = _most_underweighted(posterior)
        where = (f" The largest ratios p/q come with {side} {label}: q is too narrow there."
                 if label else "")
        found.append(Finding(
            "khat", label or "q", khat, THRESHOLDS["khat"],
            f"Pareto k-hat of p/q is {beyond(khat, THRESHOLDS['khat'])} (> "
            f"{THRESHOLDS['khat']}): the approximation "
            f"can't be trusted for this posterior (Yao et al. 2018).{where} "
            f"{_sentence(richer_guide(posterior.info))}."))
    return found


def stopped_short(info: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The variational fits that stopped before converging with the ELBO still moving.

    Each pooled restart (those left out of the draws do not count: see
    :func:`ppl_notes.vi.restarts.pooled_restarts`), or the one fit, that ended at its
    step cap (or by an interrupt) without its stopping rule met and without its ELBO
    settled; and all fits. A fit
    with neither ``stopped`` nor ``restarts`` in ``info`` is not a variational fit of
    this kind: none.
    """
    restarts = [r for r in info.get("restarts") or [] if r.get("pooled", True)]
    if "stopped" not in info and not restarts:
        return [], []
    fits = restarts if restarts else [info]
    return [f for f in fits
            if f.get("stopped") != "converged" and not f.get("elbo_settled")], fits


def _most_underweighted(posterior) -> tuple[str, str]:
    """The element most rank-correlated with log p/q: where q puts too little mass."""
    stats_ = posterior.tree["sample_stats"]
    if "log_q" not in stats_.data_vars:  # resampled draws (pathfinder): no q per draw
        return "", ""
    log_ratio = (stats_["log_p"].values - stats_["log_q"].values).reshape(-1)
    sites = continuous_sites(posterior)
    draws = element_draws(posterior.tree["posterior"].to_dataset(), sites, posterior.sample_dims)
    best, side, score = "", "", 0.0
    for label, values in draws.items():
        if np.ptp(values) == 0:
            continue
        rho = _rank_correlation(values, log_ratio)
        if np.isfinite(rho) and abs(rho) > score:
            best, side, score = label, "large" if rho > 0 else "small", abs(rho)
    return best, side


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order: draws of continuous sites)."""
    ranks_a = np.argsort(np.argsort(a)).astype(float)
    ranks_b = np.argsort(np.argsort(b)).astype(float)
    ranks_a -= ranks_a.mean()
    ranks_b -= ranks_b.mean()
    scale = np.sqrt((ranks_a**2).sum() * (ranks_b**2).sum())
    return float((ranks_a * ranks_b).sum() / scale) if scale > 0 else float("nan")


def warn_about(posterior, stacklevel: int = 3) -> list[Finding]:
    """Issue every finding as a :class:`DiagnosticWarning`; returns them."""
    found = findings(posterior)
    for finding in found:
        warnings.warn(f"{posterior.model_name} by {posterior.method}: {finding.message}",
                      DiagnosticWarning, stacklevel=stacklevel)
    return found
