r"""Expectation-maximisation: variational inference whose q(z) is the exact posterior.

Notes §2.f: for any q(z),

.. math:: \log p(x \mid \theta) = \underbrace{\mathbb E_q[\log p(x, z \mid \theta)]
          - \mathbb E_q[\log q(z)]}_{\mathrm{ELBO}(q,\theta)}
          + \mathrm{KL}\big(q(z) \,\|\, p(z \mid x, \theta)\big).

EM (Dempster, Laird & Rubin 1977) maximises the ELBO by coordinate ascent. The E-step
sets :math:`q(z) = p(z \mid x, \theta_t)` -- exactly, by enumerating each local discrete
site -- which makes the KL term zero; the M-step maximises the expected complete-data
log-likelihood :math:`Q(\theta) = \mathbb E_q[\log p(x, z \mid \theta)]` (in closed form
where the story gives ``m_step``, by L-BFGS otherwise). Neither step can lower
:math:`\log p(x \mid \theta)`, which is recorded at every iteration.

With ``priors=True`` the story's priors join the M-step (MAP-EM) and the recorded
objective is the log posterior density, which rises monotonically instead. This is also
the cure for a mixture component collapsing onto a single data point: its variance goes
to zero and the likelihood to infinity, which maximum-likelihood EM detects and reports.

The continuous latent sites are point estimates; each discrete site is drawn from its
E-step posterior at the end, and the posterior itself is kept as ``q_<site>`` in the
result's ``fitted_params``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.distributions import constraints
from tqdm.auto import tqdm

from ppl_notes._result import RunResult
from ppl_notes.errors import InferenceError, OptionError, StoryError
from ppl_notes.evaluation import RunContext, StoryFacts, run_dtype
from ppl_notes.evaluation.density import trace_with
from ppl_notes.evaluation.potential import BatchedPotential
from ppl_notes.inference._options import Option, positive_int
from ppl_notes.inference.point import point_result
from ppl_notes.optim.mode import maximise

OPTIONS = (
    positive_int("iterations", 500, "at most this many E- and M-steps"),
    Option("tolerance", (float, int), 1e-9, "stop when the objective rises by less than "
           "tolerance x (1 + |objective|) in one iteration", lambda v: v > 0, "a number > 0"),
    Option("priors", (bool,), False, "False: maximum-likelihood EM; True: MAP-EM, the "
           "story's priors added to the M-step"),
    Option("init", (str, dict), "median", "starting point: 'median' (of the prior), "
           "'sample' (a prior draw), or {site: value}",
           lambda v: isinstance(v, dict) or v in ("median", "sample"),
           "'median', 'sample' or a dict of site values"),
    positive_int("m_step_iterations", 100, "L-BFGS iterations of a gradient M-step"),
    Option("recover_discrete", (bool,), True,
           "draw the discrete sites from their E-step posterior at the estimate"),
)

#: A positive site (a scale) below this fraction of the data's sd has collapsed.
COLLAPSE_FRACTION = 1e-6


class EnumeratedStory:
    r"""The story's log-density terms at fixed continuous sites, discrete sites enumerated.

    Calling it with unconstrained ``flat`` gives the prior term :math:`\log p(\theta)`,
    the complete-data terms :math:`\log p(x_i, z_i \mid \theta)` laid out as
    ``(joint values of z, *plates)``, and for each discrete site the dims it occupies.
    """

    def __init__(self, model, data: Mapping[str, Any], facts: StoryFacts | None = None) -> None:
        self.model, self.data = model, data
        self.sites = BatchedPotential(model, data, 1, compiler="none", facts=facts)
        facts = self.sites.facts
        if not facts.discrete:
            raise StoryError(
                f"method 'em' needs a story with discrete latent sites (the E-step's "
                f"q(z)); story {getattr(model, 'name', model)!r} has none: use 'map' or "
                "'mle' for its point estimate")
        if not facts.local_discrete:
            raise StoryError(
                f"method 'em' here needs discrete sites local to the observations (one per "
                f"observation): {facts.pointwise_note} Use 'map' (the discrete sites are "
                "summed out exactly) or 'svi'/'nuts'")
        self.layout = facts
        self.supports = facts.supports

    def values(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained site values (leading dim 1) at unconstrained ``flat``."""
        return self.sites.constrain(flat[None])

    def __call__(self, flat: torch.Tensor):
        """``(log prior, complete-data terms, {discrete site: its enumerated dim})``."""
        with run_dtype(self.layout.dtype), pyro.validation_enabled(False):
            trace, _, _ = trace_with(self.model, self.data, self.layout,
                                     {n: v[0] for n, v in self.sites.unflatten(flat[None]).items()},
                                     unconstrained=True)
        prior = sum((trace.nodes[n]["log_prob"].sum() for n in self.layout.continuous),
                    torch.zeros((), dtype=flat.dtype))
        terms = sum(trace.nodes[n]["log_prob"] for n in self.layout.discrete + self.layout.observed)
        enum_ndim = terms.dim() - self.layout.plate_nesting
        site_dims = {}
        for name in self.layout.discrete:
            shape = trace.nodes[name]["value"].shape
            padded = (1,) * (terms.dim() - len(shape)) + tuple(shape)
            site_dims[name] = next(d for d in range(enum_ndim) if padded[d] > 1)
        return prior, terms, enum_ndim, site_dims


def responsibilities(terms, enum_ndim, site_dims) -> tuple[torch.Tensor, dict]:
    """The E-step: the joint posterior of the discrete sites, and each site's marginal."""
    flat_terms = terms.reshape((-1,) + terms.shape[enum_ndim:])
    joint = torch.softmax(flat_terms, dim=0).reshape(terms.shape)
    marginals = {}
    for name, dim in site_dims.items():
        others = [d for d in range(enum_ndim) if d != dim]
        marginal = joint.sum(others, keepdim=True) if others else joint
        marginals[name] = marginal.reshape((marginal.shape[dim],) + terms.shape[enum_ndim:])
    return joint, marginals


def _log_likelihood(terms, enum_ndim) -> torch.Tensor:
    return torch.logsumexp(terms.reshape((-1,) + terms.shape[enum_ndim:]), dim=0).sum()


def _start(story: EnumeratedStory, init, seed: int) -> torch.Tensor:
    strategy = "median" if isinstance(init, dict) else init
    start = torch.as_tensor(story.sites.initial_points(strategy, [seed], "EM")[0])
    if not isinstance(init, dict):
        return start
    values = story.sites.unflatten(start)
    for name, value in init.items():
        if name not in story.sites.transforms:
            raise OptionError(f"init: {name!r} is not a continuous latent site of the story; "
                              f"they are {list(story.sites.transforms)}")
        tensor = torch.as_tensor(np.asarray(value, dtype=float), dtype=torch.float64)
        shape = story.sites.shapes[name]
        unconstrained = story.sites.transforms[name].inv(tensor)
        if tuple(unconstrained.shape) != shape or not bool(torch.isfinite(unconstrained).all()):
            raise OptionError(f"init: {name!r}={tensor.tolist()} is not a valid value of the "
                              f"site (its support is {story.sites.transforms[name].codomain})")
        values[name] = unconstrained
    return torch.cat([values[n].reshape(-1) for n in story.sites.names])


def _collapsed(story: EnumeratedStory, values: Mapping[str, torch.Tensor],
               scale: float) -> str | None:
    """Name the first positive site element that has shrunk to (almost) zero.

    ``values`` are constrained site values without a draw dim: the closed-form M-step's
    candidate is checked before it is mapped to unconstrained space, where a scale of
    exactly 0 has no image (log 0).
    """
    for name, value in values.items():
        support = story.supports.get(name)
        if isinstance(support, constraints.greater_than) and float(support.lower_bound) == 0:
            value = torch.as_tensor(value)
            small = (~(value >= COLLAPSE_FRACTION * scale)).nonzero()
            if len(small):
                index = tuple(int(i) for i in small[0])
                return f"{name}{list(index)} = {float(value[index]):.3g}"
    return None


def run(context: RunContext) -> RunResult:
    """EM from the chosen start until the objective stops rising."""
    started = time.perf_counter()
    model, data, seed, options = context.model, context.data, context.seed, context.options
    progress = context.progress
    story = EnumeratedStory(model, data, context.facts)
    priors = options["priors"]
    observed = torch.cat([story.layout.trace.nodes[n]["value"].reshape(-1).double()
                          for n in story.layout.likelihood])
    scale = float(observed.std()) if observed.numel() > 1 else 1.0
    flat = _start(story, options["init"], seed)
    closed_form = model.m_step if (model.m_step is not None and not priors) else None
    name = "log_posterior" if priors else "log_likelihood"
    record: list[float] = []
    with tqdm(total=options["iterations"], desc="EM", disable=not progress) as bar:
        for iteration in range(options["iterations"]):
            with torch.no_grad():
                prior, terms, enum_ndim, site_dims = story(flat)
                objective = float(_log_likelihood(terms, enum_ndim) + (prior if priors else 0))
            if not math.isfinite(objective):
                raise InferenceError(_collapse_message(iteration, objective, None, priors))
            record.append(objective)
            bar.set_postfix({name: f"{objective:.6g}"}, refresh=False)
            bar.update(1)
            if iteration and record[-1] - record[-2] < options["tolerance"] * (1 + abs(objective)):
                break
            joint, marginals = responsibilities(terms, enum_ndim, site_dims)
            try:
                flat = _m_step(story, flat, joint.detach(), closed_form, marginals, data,
                               priors, options["m_step_iterations"], scale)
            except _Collapse as collapse:
                raise InferenceError(_collapse_message(iteration, objective, str(collapse),
                                                       priors)) from None
            collapsed = _collapsed(story, {n: v[0] for n, v in story.values(flat).items()},
                                   scale)
            if collapsed is not None:
                raise InferenceError(_collapse_message(iteration, objective, collapsed, priors))
    history = pd.DataFrame({name: record}, index=pd.RangeIndex(len(record), name="iteration"))
    converged = len(record) < options["iterations"]
    facts = {"iterations": len(record), "converged": converged,
             "m_step": "closed form" if closed_form is not None else "L-BFGS"}
    with torch.no_grad():
        _, terms, enum_ndim, site_dims = story(flat)
        _, marginals = responsibilities(terms, enum_ndim, site_dims)
    params = {f"q_{n}": m.numpy().copy() for n, m in marginals.items()}
    return point_result("em", model, data, story.sites, flat, history, facts, options, seed,
                        started, params=params)


class _Collapse(Exception):
    """The closed-form M-step put a scale at (almost) zero; the message names it."""


def _m_step(story, flat, joint, closed_form, marginals, data, priors, iterations, scale):
    """Maximise Q(theta) (+ log prior): the story's closed form, else L-BFGS from ``flat``.

    Raises
    ------
    _Collapse
        When the closed form's optimum has a positive site at (almost) zero: the
        likelihood is unbounded there, and no gradient step can do better.
    """
    if closed_form is not None:
        with torch.no_grad():
            values = {n: v[0] for n, v in story.values(flat).items()}
            values.update({k: torch.as_tensor(v, dtype=torch.float64)
                           for k, v in closed_form(data, marginals).items()})
            collapsed = _collapsed(story, values, scale)
            if collapsed is not None:
                raise _Collapse(collapsed)
            pieces = [story.sites.transforms[n].inv(values[n]).reshape(-1)
                      for n in story.sites.names]
        candidate = torch.cat(pieces)
        if bool(torch.isfinite(candidate).all()):
            return candidate
        # outside the support (e.g. ordered means that crossed): take gradient steps

    def negative_q(point):
        prior, terms, _, _ = story(point)
        return -((joint * terms).sum() + (prior if priors else 0))

    hint = "" if priors else "Use priors=True (MAP-EM): the priors keep the scales away from 0"
    optimum, _, _ = maximise(negative_q, flat, iterations, 1e-10, False, "EM M-step", hint)
    return optimum


def _collapse_message(iteration, objective, site, priors) -> str:
    where = f" ({site})" if site else ""
    cure = ("" if priors else " Run MAP-EM instead (priors=True): a prior that vanishes at "
            "scale 0 keeps the component from collapsing.")
    return (f"EM: at iteration {iteration} a component collapsed onto a single point"
            f"{where}; the likelihood is unbounded there (log-likelihood {objective:.6g})."
            f"{cure}")

