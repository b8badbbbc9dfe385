r"""The posterior's mode on the potential: L-BFGS on a flat unconstrained vector.

The engine of the point estimates (MAP, MLE), of EM's M-step and of VI's Laplace start:

* :class:`PointObjective`: :math:`-\log p(x, \theta)` (MAP) or :math:`-\log p(x \mid
  \theta)` (MLE) of a story, with or without the Jacobian of the map to unconstrained
  coordinates;
* :func:`maximise`: L-BFGS with a strong-Wolfe line search (Nocedal & Wright 2006,
  Algorithm 7.5), its history and whether it converged;
* :func:`map_start`: the mode as a starting point (VI's Laplace start, NUTS's init);
* :func:`laplace_coordinates`: the coordinates whose prior has a kink (Laplace), which
  :func:`ppl_notes.optim.kinks.exact_zeros` finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ppl_notes.errors import InferenceError, StoryError
from ppl_notes.evaluation import StoryFacts
from ppl_notes.evaluation.potential import BatchedPotential

logger = logging.getLogger(__name__)


class PointObjective:
    r"""The negative log density to minimise, on a flat unconstrained vector.

    ``priors=True``: :math:`-\log p(x, \theta)` (MAP); ``priors=False``:
    :math:`-\log p(x \mid \theta)` (MLE). The sites are mapped to their supports by
    ``biject_to``; the Jacobian of that map is not added, so the optimum is the mode of
    the density of :math:`\theta` itself. ``jacobian=True`` adds it: the mode of the
    density of the unconstrained coordinates, where a Gaussian over them (an autoguide)
    is centred (:mod:`ppl_notes.vi.laplace_start`). ``facts``: the story's, where the
    caller has them (read otherwise).
    """

    def __init__(self, model, data, priors: bool, jacobian: bool = False,
                 facts: StoryFacts | None = None) -> None:
        self.model, self.data, self.priors, self.jacobian = model, data, priors, jacobian
        self.sites = BatchedPotential(model, data, 1, compiler="none", facts=facts)

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
             "largest_gradient_at": int(gradient.abs().argmax()) if gradient.numel() else 0,
             "converged": iterations < steps}
    if not facts["converged"]:
        say = logger.info if label == "MAP start" else logger.warning
        say("%s: L-BFGS used all %d iterations (largest gradient element %.3g); raise steps",
            label, steps, facts["max_abs_gradient"])
    history = pd.DataFrame({"log_density": values},
                           index=pd.RangeIndex(len(values), name="evaluation"))
    return flat.detach(), history, facts


def map_start(model, data: dict[str, Any], seed: int, dispersed: bool, steps: int = 200,
              jacobian: bool = False, facts: StoryFacts | None = None):
    """A quick posterior mode to start a variational fit from, or None where there is none.

    L-BFGS from the prior median (``dispersed=False``) or from a prior draw (a restart;
    uniform in (-2, 2) on the unconstrained scale where a prior cannot be sampled, as
    Stan's flat priors cannot),
    on the density with discrete sites summed out: the fixed point EM reaches too, found
    without an M-step. None when the search fails or does not converge in ``steps``
    iterations (an unbounded density, e.g. a centred hierarchy's scale going to 0): the
    fit then starts where it would have without it. ``jacobian=True``: the mode of the
    unconstrained coordinates' density instead (:class:`PointObjective`). ``facts``: the
    story's, where the caller has them.

    Returns
    -------
    (dict, BatchedPotential, Tensor, int) or None
        Each site's value at the mode (on its support), the sites' potential, the mode's
        unconstrained vector, and the gradient evaluations the search took.
    """
    try:
        objective = PointObjective(model, data, priors=True, jacobian=jacobian, facts=facts)
        start = objective.sites.initial_points("sample" if dispersed else "median", [seed],
                                               "the MAP start of SVI")[0]
        flat, _, facts = maximise(objective, start, steps, 1e-6, False, "MAP start")
    except StoryError:  # the story is wrong everywhere, not only at this start
        raise
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
