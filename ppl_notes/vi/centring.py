r"""Centring chosen by the evidence: a funnel's sites decentred where the Gaussian misses.

A site :math:`\theta \sim \mathcal N(\mu, \tau)` whose location or scale is another
latent site makes a funnel: where :math:`\tau` is small, :math:`\theta` is pinned to
:math:`\mu`, and a Gaussian over :math:`(\mu, \log\tau, \theta)` cannot follow the neck
(the centred eight schools: k-hat above 0.7, sds off). Pyro's ``LocScaleReparam``
writes the same story with a centredness :math:`c \in [0, 1]`:

.. math:: \tilde\theta \sim \mathcal N(c\,\mu,\ \tau^{c}), \qquad
          \theta = \mu + \tau^{1-c}\,(\tilde\theta - c\,\mu),

:math:`c = 1` the story as written, :math:`c = 0` the non-centred form
:math:`\theta = \mu + \tau\,\tilde\theta` (Papaspiliopoulos, Roberts & Sköld 2007).
Gorinova, Moore & Hoffman (2020, "Automatic reparameterisation of probabilistic
programs") learn :math:`c` per site by VI. Here it is chosen among
:data:`CENTREDNESS_TRIED` and the story as written, by the ELBO each Gaussian fit
reaches: ELBOs in any parameterisation bound the same :math:`\log p(x)`, so the highest
is the fit nearest the posterior in KL. It is tried only where the Gaussian of the story
as written misses (where default SVI would go on to the flow), on the sites found by
:func:`funnel_sites`; where no decentred fit beats it by two standard errors, the story
stays as written and ``info["centring"]`` says so.

The draws of a decentred fit are the story's own: :math:`\theta` is kept (a
deterministic site of the decentred story), :math:`\tilde\theta` is left out.
"""

from __future__ import annotations

import math
from typing import Any

import pyro.distributions as dist
from pyro import poutine
from pyro.infer.inspect import get_dependencies
from pyro.infer.reparam import LocScaleReparam

from ppl_notes.evaluation import StoryFacts
from ppl_notes.vi.escalation import elbo_at_draws, escalation_wanted

__all__ = ["CENTREDNESS_TRIED", "chosen_centring", "funnel_sites", "decentred",
           "original_sites"]

#: The centrednesses tried besides the story as written (c = 1)
CENTREDNESS_TRIED = (0.0, 0.5)
#: The families LocScaleReparam writes with a centredness
_LOC_SCALE = (dist.Normal, dist.StudentT, dist.Cauchy, dist.Laplace)


def _base(fn):
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def funnel_sites(model, data: dict[str, Any], facts: StoryFacts) -> list[str]:
    """The latent sites of a location-scale family whose location or scale is a latent.

    Read from the story's prior dependencies (Pyro's ``get_dependencies``: which sites'
    values each site's distribution was computed from); none where the story has
    discrete sites (their enumeration is left as it is).
    """
    if facts.discrete or facts.trace is None:
        return []
    try:
        prior = get_dependencies(model, model_kwargs=dict(data))["prior_dependencies"]
    except Exception:  # noqa: BLE001 - a story provenance cannot follow: no candidates
        return []
    found = []
    for name in facts.continuous:
        fn = _base(facts.trace.nodes[name]["fn"])
        upstream = set(prior.get(name, ())) - {name}
        if isinstance(fn, _LOC_SCALE) and upstream & set(facts.continuous):
            found.append(name)
    return found


def decentred(model, sites: list[str], centredness: float):
    """The story with ``sites`` written at ``centredness`` (``LocScaleReparam``)."""
    config = {name: LocScaleReparam(centered=centredness) for name in sites}
    return model._copy(fn=poutine.reparam(model.fn, config=config),
                       name=model.name, marginal=None, guide=None)


def original_sites(posterior: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """A decentred fit's draws as the story's own: each ``<site>_decentered`` left out."""
    auxiliary = {f"{site}_decentered" for site in sites}
    return {name: value for name, value in posterior.items() if name not in auxiliary}


def chosen_centring(context, fit, gaussian, dim: int):
    """The decentred fit where it beats the Gaussian of the story as written, else None.

    Parameters
    ----------
    context : RunContext
        Default SVI's context (``escalate="auto"``).
    fit : callable
        ``fit(context) -> RunResult``: the Gaussian fit, going on to the flow as its
        options say (:func:`ppl_notes.vi.potential_svi.run_on_potential`).
    gaussian : RunResult
        The Gaussian of the story as written; ``info["centring"]`` is set on it where
        the story stays so.
    dim : int
        Unconstrained elements (the flow's limit).

    Returns
    -------
    RunResult or None
        The best decentred fit, its draws the story's own sites, with
        ``info["centring"]``; ``gaussian`` itself, marked partial, where Ctrl-C stopped a
        trial (nothing more is fitted); None where the story as written is kept or no
        site is a funnel's.
    """
    sites = funnel_sites(context.model, context.data, context.facts)
    if not sites:
        return None
    draws = context.options["num_draws"]
    elbo = {1.0: elbo_at_draws(gaussian, draws)}
    fits = {}
    for centredness in CENTREDNESS_TRIED:
        trial = context.replace(model=decentred(context.model, sites, centredness), options={
            **context.options, "escalate": "never", "centring": "tried"})
        fits[centredness] = fit(trial)
        if fits[centredness].partial:  # Ctrl-C: the story as written's Gaussian, no more
            gaussian.partial = True
            gaussian.info["centring"] = {
                "sites": sites, "kept": False, "centredness": {s: 1.0 for s in sites},
                "why": "interrupted (Ctrl-C) while trying the centring: the Gaussian of the "
                       "story as written is returned"}
            return gaussian
        elbo[centredness] = elbo_at_draws(fits[centredness], draws)
    best = max(fits, key=lambda c: elbo[c][0] if math.isfinite(elbo[c][0]) else -math.inf)
    gain = elbo[best][0] - elbo[1.0][0]
    error = math.hypot(elbo[best][1], elbo[1.0][1])
    measured = {"sites": sites, "elbo": {str(c): round(float(e[0]), 4) for c, e in elbo.items()},
             "tried": [1.0, *CENTREDNESS_TRIED]}
    if not gain > 2 * error:  # NaN too: the story as written
        gaussian.info["centring"] = {
            **measured, "kept": False, "centredness": {s: 1.0 for s in sites},
            "why": f"no decentred Gaussian's ELBO is above the story's {elbo[1.0][0]:.3f} by "
                   f"two standard errors ({2 * error:.3f})"}
        return None
    result = fits[best]
    escalate, reason = escalation_wanted("auto", result, dim)
    if escalate:  # decentred, and still not Gaussian: the flow, on the decentred story
        result = fit(context.replace(model=decentred(context.model, sites, best), options={
            **context.options, "centring": "tried"}))
    else:  # what default SVI decided, not the trial's "never"
        result.info["escalation"] = {"to_flow": False, "reason": reason}
    result.posterior = original_sites(result.posterior, sites)
    result.info["centring"] = {
        **measured, "kept": True, "centredness": {s: best for s in sites},
        "why": f"the Gaussian of the story with {', '.join(sites)} at centredness {best} "
               f"has ELBO {elbo[best][0]:.3f}, above the story as written's "
               f"{elbo[1.0][0]:.3f} by more than two standard errors ({2 * error:.3f})"}
    return result
