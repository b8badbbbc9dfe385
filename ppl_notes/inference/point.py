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
:func:`exact_zeros`: proximal gradient steps find which weights sit at the kink, and an
active-set search polishes the others (see there); the result has exact zeros, as
coordinate descent's lasso does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_notes.errors import InferenceError
from ppl_notes.evaluation.draws import posterior_of
from ppl_notes.evaluation.potential import BatchedPotential
from ppl_notes.inference._options import Option, choice, positive_int
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
    the density of :math:`\theta` itself. ``jacobian=True`` adds it: the mode of the
    density of the unconstrained coordinates, where a Gaussian over them (an autoguide)
    is centred (:mod:`ppl_notes.inference.laplace_start`).
    """

    def __init__(self, model, data, priors: bool, jacobian: bool = False) -> None:
        self.model, self.data, self.priors, self.jacobian = model, data, priors, jacobian
        self.sites = BatchedPotential(model, data, 1, compiler="none")

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """The objective at ``flat`` (shape ``(dim,)``), differentiable."""
        if self.jacobian:
            return -self.sites._evaluate(flat[None], jacobian=True, priors=self.priors).total[0]
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
                    f"{label}: the log density became {-loss.item()} after {len(values)} "
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
    kinks = laplace_coordinates(objective.sites) if priors else None
    if kinks is not None:
        flat, facts["exact_zeros"] = exact_zeros(objective, flat, *kinks,
                                                 tolerance=options["tolerance"])
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


def map_start(model, data: dict[str, Any], seed: int, dispersed: bool, steps: int = 200,
              jacobian: bool = False):
    """A quick posterior mode to start a variational fit from, or None where there is none.

    L-BFGS from the prior median (``dispersed=False``) or from a prior draw (a restart;
    uniform in (-2, 2) on the unconstrained scale where a prior cannot be sampled, as
    Stan's flat priors cannot),
    on the density with discrete sites summed out: the fixed point EM reaches too, found
    without an M-step. None when the search fails or does not converge in ``steps``
    iterations (an unbounded density, e.g. a centred hierarchy's scale going to 0): the
    fit then starts where it would have without it. ``jacobian=True``: the mode of the
    unconstrained coordinates' density instead (:class:`PointObjective`).

    Returns
    -------
    (dict, BatchedPotential, Tensor, int) or None
        Each site's value at the mode (on its support), the sites' potential, the mode's
        unconstrained vector, and the gradient evaluations the search took.
    """
    try:
        objective = PointObjective(model, data, priors=True, jacobian=jacobian)
        start = objective.sites.initial_points("sample" if dispersed else "median", [seed])[0]
        flat, _, facts = maximise(objective, start, steps, 1e-6, False, "MAP start")
    except (InferenceError, ValueError, RuntimeError) as error:
        logger.info("no MAP start for %r (%s); starting from the prior", model.name, error)
        return None
    if not facts["converged"] or not bool(torch.isfinite(flat).all()):
        return None
    values = objective.sites.constrain(flat.reshape(1, -1))
    return ({name: torch.as_tensor(np.asarray(value)[0]) for name, value in values.items()},
            objective.sites, flat, facts["evaluations"])


def laplace_coordinates(sites: BatchedPotential):
    """``(index, loc, scale)`` of the flat coordinates with a Laplace prior on the real line.

    None when the story has none. Such a site's unconstrained coordinate is its value, so
    its prior's kink sits at ``loc`` in the search space.
    """
    from pyro.distributions import Laplace
    from torch.distributions import Independent

    index, locs, scales, start = [], [], [], 0
    for name, size in zip(sites.names, sites.sizes, strict=True):
        fn = sites.facts.trace.nodes[name]["fn"]
        while isinstance(fn, Independent) or hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, Laplace) and fn.support is torch.distributions.constraints.real:
            shape = sites.shapes[name]
            index.append(torch.arange(start, start + size))
            locs.append(fn.loc.detach().double().expand(shape).reshape(-1))
            scales.append(fn.scale.detach().double().expand(shape).reshape(-1))
        start += size
    if not index:
        return None
    return torch.cat(index), torch.cat(locs), torch.cat(scales)


def exact_zeros(objective: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor,
                index: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                tolerance: float = 1e-9, rounds: int = 30) -> tuple[torch.Tensor, int]:
    r"""The exact minimiser of a negative log density with Laplace terms, zeros included.

    Write the objective as :math:`f(\theta) = g(\theta) + \sum_i |\theta_i - m_i| / b_i`
    over the Laplace coordinates :math:`i` (``index``, with locations ``loc`` and
    scales ``scale``), :math:`g` smooth. Two stages:

    1. proximal gradient with backtracking (Beck & Teboulle 2009, FISTA): a gradient step
       on :math:`g`, then soft thresholding towards :math:`m_i`, which sets coordinates
       exactly to their kink; this finds which coordinates sit there;
    2. an active set: with those coordinates held at :math:`m_i` and the others' signs
       fixed, :math:`f` is smooth, and L-BFGS minimises it; a coordinate that crosses its
       kink is put at it, and one at its kink whose optimality condition
       :math:`|\partial_i g| \le 1/b_i` fails is released, until neither happens --
       the subgradient optimality conditions of the lasso (Tibshirani 1996), as
       coordinate descent reaches them.

    Returns the minimiser and the number of coordinates exactly at their kink.
    """
    weight = 1.0 / scale

    def smooth(point: torch.Tensor) -> torch.Tensor:
        return objective(point) - (weight * (point[index] - loc).abs()).sum()

    def value_and_grad(point: torch.Tensor):
        point = point.detach().requires_grad_(True)
        value = smooth(point)
        (grad,) = torch.autograd.grad(value, point)
        return value.detach(), grad

    def prox(point: torch.Tensor, step: float) -> torch.Tensor:
        out = point.clone()
        shifted = point[index] - loc
        out[index] = loc + torch.sign(shifted) * (shifted.abs() - step * weight).clamp(min=0)
        return out

    def total(point: torch.Tensor) -> float:
        return float(smooth(point) + (weight * (point[index] - loc).abs()).sum())

    # 1. FISTA
    point, previous, momentum, step = flat.clone(), flat.clone(), 1.0, 1.0
    with torch.no_grad():
        current = total(point)
    for _ in range(2000):
        value, grad = value_and_grad(point)
        while True:
            candidate = prox(point - step * grad, step)
            difference = candidate - point
            bound = value + grad @ difference + (difference @ difference) / (2 * step)
            with torch.no_grad():
                if float(smooth(candidate)) <= float(bound) + 1e-12:
                    break
            step *= 0.5
        with torch.no_grad():
            new = total(candidate)
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        extrapolated = candidate + (momentum - 1) / next_momentum * (candidate - previous)
        previous, momentum = candidate, next_momentum
        point = extrapolated if new <= current else candidate  # restart on an increase
        if new > current:
            momentum = 1.0
        if abs(current - new) <= 1e-13 * max(1.0, abs(new)):
            point = candidate
            break
        current = new
    point = previous.clone()
    # 2. active set
    at_kink = (point[index] - loc).abs() <= 1e-12
    for _ in range(rounds):
        free = torch.ones_like(point, dtype=torch.bool)
        free[index[at_kink]] = False
        signs = torch.sign(point[index] - loc)
        base = point.clone()
        base[index[at_kink]] = loc[at_kink]

        def restricted(sub: torch.Tensor, base=base, free=free, signs=signs) -> torch.Tensor:
            full = base.clone()
            full[free] = sub
            return smooth(full) + (weight * signs * (full[index] - loc)).sum()

        sub, _, _ = maximise(restricted, base[free], 500, tolerance, False, "MAP start")
        candidate = base.clone()
        candidate[free] = sub
        crossed = (~at_kink) & (torch.sign(candidate[index] - loc) != signs)
        if crossed.any():
            # move only as far as the first kink along the way: put the crossers there
            point = base
            point[index[crossed]] = loc[crossed]
            at_kink = at_kink | crossed
            continue
        point = candidate
        _, grad = value_and_grad(point)
        violated = at_kink & (grad[index].abs() > weight * (1 + 1e-9))
        if not violated.any():
            break
        at_kink = at_kink & ~violated
        # released coordinates move off the kink against their gradient
        nudge = -torch.sign(grad[index[violated]]) * 1e-8
        point[index[violated]] = loc[violated] + nudge
    point = point.detach()
    point[index[at_kink]] = loc[at_kink]
    return point, int(at_kink.sum())
