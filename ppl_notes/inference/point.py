r"""Point estimates: the posterior mode (MAP) and the maximum-likelihood estimate (MLE).

Notes §1.b: minimising the empirical risk with the log loss is maximum likelihood,

.. math:: \hat\theta_{\mathrm{MLE}} = \arg\max_\theta \sum_i \log p(x_i \mid \theta),

and adding a regulariser (structural risk) is maximum a posteriori with the regulariser
as a log prior,

.. math:: \hat\theta_{\mathrm{MAP}} = \arg\max_\theta \sum_i \log p(x_i \mid \theta)
          + \log p(\theta)

(an L2 penalty is a Gaussian prior: ridge; an L1 penalty a Laplace prior: lasso). The
mode is the one of the density on the sites' own support -- no change-of-variables term
-- found by L-BFGS with a strong-Wolfe line search on unconstrained coordinates (Nocedal
& Wright 2006, Algorithm 7.5). Discrete latent sites are summed out exactly, so the
estimate maximises the marginal likelihood of the continuous sites; each discrete site
is then drawn from its exact conditional posterior at the estimate.

The result is a one-draw posterior; its objective at every function evaluation is the
history.

L-BFGS assumes a smooth density. A Laplace (lasso) prior is not differentiable at its
location: where the mode puts some weights exactly there, L-BFGS alone stalls near the
kink (every weight only accurate to about 1e-2 on the diabetes data at tau = 0.5). So a
MAP of a story with Laplace sites on the real line continues from L-BFGS's point with
:func:`ppl_notes.optim.kinks.exact_zeros`: proximal gradient steps find which weights sit
at the kink, and an active-set search polishes the others (see there); the result has
exact zeros, as coordinate descent's lasso does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ppl_notes._result import RunResult
from ppl_notes.evaluation import RunContext
from ppl_notes.evaluation.draws import posterior_of
from ppl_notes.evaluation.potential import BatchedPotential
from ppl_notes.inference._options import Option, choice, positive_int
from ppl_notes.optim.kinks import exact_zeros
from ppl_notes.optim.mode import PointObjective, laplace_coordinates, maximise

logger = logging.getLogger(__name__)


OPTIONS = (
    positive_int("steps", 1000, "at most this many L-BFGS iterations"),
    Option("tolerance", (float, int), 1e-9, "stop when every gradient element is this small",
           lambda v: v > 0, "a number > 0"),
    choice("init", "median", "starting point: the prior median (vector sites too) or a "
           "prior draw", ("median", "sample")),
    Option("recover_discrete", (bool,), True,
           "draw enumerated discrete sites from their posterior at the estimate"),
)


def _run(context: RunContext, priors: bool) -> RunResult:
    started = time.perf_counter()
    model, data, seed, options = context.model, context.data, context.seed, context.options
    progress = context.progress
    method = "map" if priors else "mle"
    objective = PointObjective(model, data, priors, facts=context.facts)
    start = objective.sites.initial_points(options["init"], [seed], method.upper())[0]
    label = "MAP" if priors else "MLE"
    hint = ("Use method='map' (the priors keep it bounded) or check the data" if not priors
            else "Check the story's priors and data")
    flat, history, facts = maximise(objective, start, options["steps"], options["tolerance"],
                                    progress, label, hint)
    _unbounded(facts, objective.sites, flat)
    kinks = laplace_coordinates(objective.sites) if priors else None
    if kinks is not None:
        flat, facts["exact_zeros"] = exact_zeros(objective, flat, *kinks,
                                                 tolerance=options["tolerance"])
    return point_result(method, model, data, objective.sites, flat, history, facts, options,
                        seed, started)


#: A search that stopped before its cap with a gradient element this large (nats per
#: unit of an unconstrained coordinate) stopped on a slope, not at a mode: one more unit
#: along it would gain a nat. Measured there: 20 (an sd on 20 equal values: the log
#: density is -20 log s, a constant slope in log s) to 1e9-1e17 (centred hierarchical
#: stories whose scale went to 1e-16..1e-34); at a mode, under the tolerance
UNBOUNDED_GRADIENT = 1.0


def _unbounded(facts: dict[str, Any], sites: BatchedPotential, flat) -> None:
    """Mark a search that stopped on a slope too steep for a mode (``facts["unbounded"]``).

    L-BFGS also stops when the objective stops changing in float64, which it does as a
    scale underflows towards 0 while the log density climbs without bound: it said
    ``converged`` there, with gradients of 1e9-1e17 and a scale of 1e-16 (baseball, an
    LKJ story, a funnel), or a gradient of 20 and an sd of 2.5e-24 (a Normal on 20 equal
    values).
    """
    if not facts["converged"] or facts["max_abs_gradient"] <= UNBOUNDED_GRADIENT:
        return
    at, names = facts["largest_gradient_at"], []
    for name, size in zip(sites.names, sites.sizes, strict=True):
        names += [name] * size
    facts["converged"] = False
    facts["unbounded"] = {"site": names[at] if at < len(names) else "?",
                          "gradient": facts["max_abs_gradient"],
                          "unconstrained": float(flat.reshape(-1)[at])}


def point_result(method, model, data, sites: BatchedPotential, flat, history, facts,
                 options, seed, started, params=None) -> RunResult:
    """A one-draw :class:`RunResult` for a point estimate at unconstrained ``flat``.

    ``history``'s first column is the objective (a log density) at each step.
    """
    posterior, evaluation = posterior_of(model, data, sites.constrain(flat.reshape(1, -1)),
                                         sites.facts, recover_discrete=options["recover_discrete"],
                                         seed=seed + 1)
    return RunResult(
        method=method, sample_dims=("sample",), posterior=posterior,
        sample_stats={"log_density": np.array([history.iloc[-1, 0]])},
        log_likelihood=evaluation.log_likelihood, history=history, params=params or {},
        options=options, info={**facts, "objective": history.columns[0]},
        seconds=time.perf_counter() - started)


def run_map(context: RunContext) -> RunResult:
    """The posterior mode of the continuous latent sites (discrete ones summed out)."""
    return _run(context, priors=True)


def run_mle(context: RunContext) -> RunResult:
    """The maximum-likelihood estimate: the same search with the priors dropped."""
    return _run(context, priors=False)
