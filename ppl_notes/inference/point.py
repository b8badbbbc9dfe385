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

L-BFGS assumes a smooth density. A Laplace (lasso) prior is not differentiable at 0:
where its mode puts some weights exactly at 0 the search stalls near the kink and every
weight is only accurate to about 1e-2 (diabetes data, tau = 0.5); where no weight is 0
it is as exact as for the ridge. A proximal or orthant-wise method (OWL-QN; Andrew & Gao
2007) would be the fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_notes.errors import InferenceError
from ppl_notes.inference._draws import posterior_of
from ppl_notes.inference._options import Option, choice, positive_int
from ppl_notes.inference._potential import BatchedPotential
from ppl_notes.inference._result import RunResult

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


class PointObjective:
    r"""The negative log density to minimise, on a flat unconstrained vector.

    ``priors=True``: :math:`-\log p(x, \theta)` (MAP); ``priors=False``:
    :math:`-\log p(x \mid \theta)` (MLE). The sites are mapped to their supports by
    ``biject_to``; the Jacobian of that map is not added, so the optimum is the mode of
    the density of :math:`\theta` itself.
    """

    def __init__(self, model, data, priors: bool) -> None:
        self.model, self.data, self.priors = model, data, priors
        self.sites = BatchedPotential(model, data, 1, compiler="none")

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """The objective at ``flat`` (shape ``(dim,)``), differentiable."""
        return -self.sites.log_density(flat[None], priors=self.priors)[0]


def maximise(objective: Callable[[torch.Tensor], torch.Tensor], start, steps: int,
             tolerance: float, progress: bool, label: str, hint: str = "",
             ) -> tuple[torch.Tensor, pd.DataFrame, dict[str, Any]]:
    """Minimise ``objective`` from ``start`` by L-BFGS; the optimum, history and facts.

    The history holds the log density (minus the objective) at every function
    evaluation; a non-finite value stops the search with an :class:`InferenceError`
    that ends with ``hint``.
    """
    flat = torch.as_tensor(start, dtype=torch.float64).detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([flat], lr=1.0, max_iter=steps, max_eval=steps * 5 // 4 + 20,
                                  tolerance_grad=tolerance, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")
    values: list[float] = []
    with tqdm(total=steps, desc=label, disable=not progress) as bar:
        def closure():
            optimizer.zero_grad()
            loss = objective(flat)
            if not torch.isfinite(loss):
                raise InferenceError(
                    f"{label}: the log density became {float(-loss)} after {len(values)} "
                    f"evaluations; the density is unbounded here (a scale going to 0?). {hint}")
            loss.backward()
            values.append(-loss.item())
            bar.update(min(optimizer.state[flat].get("n_iter", 0), steps) - bar.n)
            return loss

        optimizer.step(closure)
    gradient = flat.grad.detach()
    iterations = int(optimizer.state[flat].get("n_iter", 0))
    facts = {"iterations": iterations, "evaluations": len(values),
             "max_abs_gradient": float(gradient.abs().max()) if gradient.numel() else 0.0,
             "converged": iterations < steps}
    if not facts["converged"]:
        say = logger.info if label == "MAP start" else logger.warning
        say("%s: L-BFGS used all %d iterations (largest gradient element %.3g); raise steps",
            label, steps, facts["max_abs_gradient"])
    history = pd.DataFrame({"log_density": values},
                           index=pd.RangeIndex(len(values), name="evaluation"))
    return flat.detach(), history, facts


def _run(model, data, *, seed: int, progress: bool, options: dict[str, Any],
         priors: bool) -> RunResult:
    started = time.perf_counter()
    method = "map" if priors else "mle"
    objective = PointObjective(model, data, priors)
    start = objective.sites.initial_points(options["init"], [seed])[0]
    label = "MAP" if priors else "MLE"
    hint = ("Use method='map' (the priors keep it bounded) or check the data" if not priors
            else "Check the story's priors and data")
    flat, history, facts = maximise(objective, start, options["steps"], options["tolerance"],
                                    progress, label, hint)
    return point_result(method, model, data, objective.sites, flat, history, facts, options,
                        seed, started)


def point_result(method, model, data, sites: BatchedPotential, flat, history, facts,
                 options, seed, started, params=None) -> RunResult:
    """A one-draw :class:`RunResult` for a point estimate at unconstrained ``flat``.

    ``history``'s first column is the objective (a log density) at each step.
    """
    posterior, evaluation = posterior_of(model, data, sites.constrain(flat.reshape(1, -1)),
                                         recover_discrete=options["recover_discrete"],
                                         seed=seed + 1)
    return RunResult(
        method=method, sample_dims=("sample",), posterior=posterior,
        sample_stats={"log_density": np.array([history.iloc[-1, 0]])},
        log_likelihood=evaluation.log_likelihood, history=history, params=params or {},
        options=options, info={**facts, "objective": history.columns[0]},
        seconds=time.perf_counter() - started)


def run_map(model, data: dict[str, Any], *, guide, seed: int, progress: bool,
            options: dict[str, Any]) -> RunResult:
    """The posterior mode of the continuous latent sites (discrete ones summed out)."""
    return _run(model, data, seed=seed, progress=progress, options=options, priors=True)


def run_mle(model, data: dict[str, Any], *, guide, seed: int, progress: bool,
            options: dict[str, Any]) -> RunResult:
    """The maximum-likelihood estimate: the same search with the priors dropped."""
    return _run(model, data, seed=seed, progress=progress, options=options, priors=False)


def map_start(model, data: dict[str, Any], seed: int, dispersed: bool,
              steps: int = 200) -> dict[str, torch.Tensor] | None:
    """A quick posterior mode to start a variational fit from, or None where there is none.

    L-BFGS from the prior median (``dispersed=False``) or from a prior draw (a restart),
    on the density with discrete sites summed out: the fixed point EM reaches too, found
    without an M-step. None when the search fails or does not converge in ``steps``
    iterations (an unbounded density, e.g. a centred hierarchy's scale going to 0): the
    fit then starts where it would have without it.
    """
    try:
        objective = PointObjective(model, data, priors=True)
        start = objective.sites.initial_points("sample" if dispersed else "median", [seed])[0]
        flat, _, facts = maximise(objective, start, steps, 1e-6, False, "MAP start")
    except (InferenceError, ValueError, RuntimeError) as error:
        logger.info("no MAP start for %r (%s); starting from the prior", model.name, error)
        return None
    if not facts["converged"] or not bool(torch.isfinite(flat).all()):
        return None
    values = objective.sites.constrain(flat.reshape(1, -1))
    return {name: torch.as_tensor(np.asarray(value)[0]) for name, value in values.items()}
