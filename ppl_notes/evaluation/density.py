r"""The log density of a story at a batch of draws, on each of three paths.

For draws :math:`\theta_1..\theta_S` of the continuous latent sites this gives, per draw,

.. math:: \log p(x, \theta_s) = \log p(\theta_s) + \log \sum_z p(z \mid \theta_s)
          \, p(x \mid z, \theta_s)

with every enumerable discrete site :math:`z` summed out exactly (Pyro's enumeration and
tensor variable elimination, so global discrete sites and Markov chains work too), the
pointwise log-likelihood where it exists, the ``pyro.deterministic`` values and the
constrained values. Given unconstrained draws :math:`u`, :math:`\theta = T(u)` per site and
:math:`\log|\det J_T(u)|` is added: NUTS's potential is minus that total.

The paths compute the same numbers (:mod:`~ppl_notes.evaluation.paths` checks it):

* ``"plate"``: the draws in one extra Pyro plate left of the story's own, one run of
  the story for all of them. Fastest, but only right for stories written batch-aware.
* ``"vmap"``: the one-draw computation mapped over the draws by
  :func:`torch.func.vmap`, as NumPyro maps with ``jax.vmap``: the story sees one draw, so
  ``X @ w`` and ``locs[z]`` keep their meaning.
* ``"loop"``: the one-draw computation once per draw. Always right; as slow as Pyro.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import config_enumerate
from pyro.infer.mcmc.util import TraceEinsumEvaluator
from pyro.infer.util import is_validation_enabled

from ppl_notes._sites import latent_sites, sample_sites
from ppl_notes.checks import changing_sites_error
from ppl_notes.evaluation.chain_discrete import NotAChain, chain_of
from ppl_notes.evaluation.facts import StoryFacts
from ppl_notes.evaluation.handlers import (
    Unconstrain,
    Unvalidated,
    VmapSafeEnum,
    run_dtype,
    vmap_safe_contraction,
)

__all__ = ["Evaluation", "evaluate", "trace_with", "draws_per_batch", "PATHS"]

PATHS = ("plate", "vmap", "loop")


class Evaluation(NamedTuple):
    r"""Per draw (leading dim): log density and the story's values at the draw.

    ``pointwise`` is the log-likelihood of each declared observation, ``deterministic``
    the ``pyro.deterministic`` sites, ``constrained`` the latent sites on their supports,
    ``log_jacobian`` :math:`\log|\det J_T(u)|` of the map to them (zero for values
    given on their supports), whether or not ``total`` includes it. ``discrete`` holds
    the discrete sites drawn from :math:`p(z \mid x, \theta)` in the same run, where
    they were asked for and form a chain (:mod:`~ppl_notes.evaluation.chain_discrete`);
    else it is empty.
    """

    total: torch.Tensor
    pointwise: dict[str, torch.Tensor]
    deterministic: dict[str, torch.Tensor]
    constrained: dict[str, torch.Tensor]
    log_jacobian: torch.Tensor
    discrete: dict[str, torch.Tensor]


def evaluate(model, data: Mapping[str, Any], facts: StoryFacts,
             values: Mapping[str, torch.Tensor], *, unconstrained: bool, path: str,
             priors: bool = True, jacobian: bool = True, density: bool = True,
             discrete: bool = False) -> Evaluation:
    r"""Evaluate the story at ``values`` (each with a leading draw dim) on ``path``.

    Parameters
    ----------
    model, data
        The story and its prepared data.
    facts : StoryFacts
        The story's facts (:func:`~ppl_notes.evaluation.facts.story_facts`).
    values : dict of Tensor
        The continuous latent sites, draws first: constrained, or on the unconstrained
        space when ``unconstrained`` (then the log-Jacobian is part of the total).
    path : {"plate", "vmap", "loop"}
    priors : bool
        ``False`` leaves the continuous sites' prior terms out (the log-likelihood).
    jacobian : bool
        With ``unconstrained``: add the log-Jacobian of the map to the supports (NUTS's
        density of ``u``); ``False`` gives the density of the constrained values
        themselves (the mode MAP and MLE look for).
    density : bool
        ``False`` only runs the story for the constrained and deterministic values: no
        log probabilities, no sum over the discrete sites; ``pointwise`` is empty and
        ``total`` holds the log-Jacobian alone (zero unless ``unconstrained`` and
        ``jacobian``).
    discrete : bool
        Also draw the discrete sites from :math:`p(z \mid x, \theta)` in the same run,
        where they form a chain (the ``vmap`` and ``loop`` paths): a second run of the
        story for them is saved. ``Evaluation.discrete`` is empty where they were not
        drawn.

    Returns
    -------
    Evaluation
        ``total`` is float64, shape ``(draws,)``; gradients flow to ``values``.
    """
    dtype = facts.dtype
    values = {k: v.to(dtype) for k, v in values.items()}
    with run_dtype(dtype), pyro.validation_enabled(False), vmap_safe_contraction():
        if path == "plate":
            result = _evaluate_plate(model, data, facts, values, unconstrained, priors, jacobian,
                                     density)
        elif path == "vmap":
            def one(draw):
                return _evaluate_one(model, data, facts, draw, unconstrained, priors, jacobian,
                                     density, discrete)

            result = Evaluation(*torch.func.vmap(one, randomness="different")(values))
        elif path == "loop":
            num = next(iter(values.values())).shape[0]
            pieces = [_evaluate_one(model, data, facts, {k: v[i] for k, v in values.items()},
                                    unconstrained, priors, jacobian, density, discrete)
                      for i in range(num)]
            stacked = [{k: torch.stack([getattr(p, part)[k] for p in pieces])
                        for k in getattr(pieces[0], part)}
                       for part in ("pointwise", "deterministic", "constrained", "discrete")]
            result = Evaluation(torch.stack([p.total for p in pieces]), *stacked[:3],
                                torch.stack([p.log_jacobian for p in pieces]), stacked[3])
        else:
            raise ValueError(f"unknown evaluation path {path!r}; the paths are {PATHS}")
    return result._replace(total=result.total.double(),
                           log_jacobian=result.log_jacobian.double())


def trace_with(model, data, facts, values, unconstrained, enum_dim=None, outer=None,
               density=True):
    """Trace the story with ``values`` substituted and discrete sites enumerated.

    Returns the trace (log probabilities computed), the constrained values and, for
    unconstrained ``values``, each site's log-Jacobian. ``enum_dim`` defaults to the dim
    left of the story's plates (one draw, no draw dim).
    """
    enum_dim = -(facts.plate_nesting + 1) if enum_dim is None else enum_dim
    handler = Unconstrain(values) if unconstrained else None
    story = handler(model) if handler is not None else poutine.condition(model, data=values)
    if outer is not None:
        story = outer(story)
    if facts.discrete:
        story = VmapSafeEnum(first_available_dim=enum_dim)(config_enumerate(story))
    if not is_validation_enabled():
        story = Unvalidated()(story)
    trace = poutine.trace(story).get_trace(**data)
    _check_same_latent_sites(trace, facts, values)
    if density:
        _compute_log_prob(trace)
    if handler is None:
        constrained, log_det = dict(values), {}
    else:
        constrained, log_det = handler.constrained, handler.log_det
    return trace, constrained, log_det


def _check_same_latent_sites(trace, facts: StoryFacts, values: Mapping[str, Any]) -> None:
    """Raise :class:`~ppl_notes.errors.StoryError` where this run's latent sites differ.

    Every run must sample the latent sites the story's first run sampled, and no
    others: a site under a branch on a value (``if mu > 0: z = pyro.sample("z", ...)``)
    would otherwise be drawn from its prior where it appears, or missed where it
    vanishes, and the density would silently be another one. Observed sites and
    ``pyro.factor`` terms may come and go with a branch: the evaluation sums those of
    each run (:func:`observed_sites`).
    """
    appeared = [n for n, site in latent_sites(trace).items()
                if n not in values and n not in facts.discrete]
    vanished = [n for n in values if n not in trace.nodes]
    if not appeared and not vanished:
        return
    which = " and ".join([f"{appeared} appear"] * bool(appeared)
                         + [f"{vanished} vanish"] * bool(vanished))
    raise changing_sites_error("the story", f"{which} at some values and not at others")


def observed_sites(trace, values: Mapping[str, Any]) -> list[str]:
    """The observed sample sites of one run (data, ``pyro.factor``): not the substituted ones.

    Read from each run, not from the story's facts: a factor under a branch on a value
    (``if 0.7 < mu < 1.1: pyro.factor(...)``) is part of the density exactly where the
    run takes that branch.
    """
    return [n for n, site in sample_sites(trace).items()
            if site["is_observed"] and n not in values]


def _compute_log_prob(trace) -> None:
    """Each sample site's scaled and masked ``log_prob``, as Pyro's ``compute_log_prob``.

    Without Pyro's ``log_prob_sum`` per site: the evaluation sums what it needs itself,
    and a sum nobody reads would still be an operation of every compiled potential (204
    of the HMM tape's 5426).
    """
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and "log_prob" not in site:
            try:
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            except ValueError as error:  # as Pyro says it: the site, and the trace's shapes
                raise ValueError(f"Error while computing log_prob at site '{name}':\n{error}\n"
                                 f"{trace.format_shapes(last_site=name)}") from error
            site["unscaled_log_prob"] = log_p
            site["log_prob"] = scale_and_mask(log_p, site["scale"], site["mask"])


def in_draw_plate(facts, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Draws ``(num, *value shape)`` shaped for a plate over them left of the story's plates."""
    num = next(iter(values.values())).shape[0]
    return {n: v.reshape((num,) + (1,) * (facts.plate_nesting - facts.batch_ndim[n])
                         + tuple(v.shape[1:])) for n, v in values.items()}


def trace_in_draw_plate(model, data, facts, values, unconstrained, density=True):
    """:func:`trace_with` for every draw at once.

    The draws sit in a plate ``_draws`` left of the story's plates, and the discrete
    sites are enumerated left of that.
    """
    num, nesting = next(iter(values.values())).shape[0], facts.plate_nesting

    def outer(story):
        def in_plate(**kwargs):
            with pyro.plate("_draws", num, dim=-(nesting + 1)):
                return story(**kwargs)
        return in_plate

    return trace_with(model, data, facts, in_draw_plate(facts, values), unconstrained,
                      -(nesting + 2), outer, density)


def _evaluate_one(model, data, facts, values, unconstrained, priors, jacobian,
                  density=True, discrete=False) -> Evaluation:
    """One draw (no draw dim): the story as its author wrote it."""
    trace, constrained, log_det = trace_with(model, data, facts, values, unconstrained,
                                             density=density)
    if density and facts.discrete and facts.elements_per_draw is None:
        _note_elements(facts, trace)  # an enumerated run: draws_per_batch needs no run
    zero = torch.zeros((), dtype=facts.dtype)
    log_jacobian = sum((d.sum() for d in log_det.values()), zero)
    log_det = log_det if jacobian else {}
    deterministic = {n: trace.nodes[n]["value"].reshape(facts.value_shapes[n])
                     for n in facts.deterministic}
    constrained = {n: constrained[n].reshape(facts.value_shapes[n]) for n in facts.continuous
                   if n in constrained}
    if not density:
        return Evaluation(sum((d.sum() for d in log_det.values()), zero), {}, deterministic,
                          constrained, log_jacobian, {})
    drawn = {}
    if facts.discrete:
        try:  # a chain of discrete sites (an HMM's) is summed out by its forward recursion
            chain = chain_of(trace, facts.discrete, facts.plate_nesting)
        except NotAChain:
            chain = None
        total = (TraceEinsumEvaluator(trace, True, facts.plate_nesting).log_prob(trace)
                 if chain is None else chain.log_marginal())
        if discrete and chain is not None:
            drawn = _drawn_states(chain, facts)
        if not priors:
            total = total - sum((trace.nodes[n]["log_prob"].sum() for n in facts.continuous),
                                zero)
    else:
        sites = observed_sites(trace, values) + [n for n in facts.continuous if priors]
        total = sum((trace.nodes[n]["log_prob"].sum() for n in sites), zero)
    total = total + sum((d.sum() for d in log_det.values()), zero)
    pointwise = _pointwise(trace, facts, vectorized=False)
    pointwise = {n: v.reshape(facts.batch_shapes[n]) for n, v in pointwise.items()}
    return Evaluation(total, pointwise, deterministic, constrained, log_jacobian, drawn)


def _drawn_states(chain, facts) -> dict[str, torch.Tensor]:
    """The chain's states drawn and shaped as their sites.

    Empty where they do not fit those shapes: the caller then recovers them by a run of
    their own.
    """
    try:
        return {n: v.reshape(facts.value_shapes[n]) for n, v in chain.draw().items()}
    except RuntimeError:
        return {}


def _pointwise(trace, facts, vectorized: bool) -> dict[str, torch.Tensor]:
    """Each declared observation's log-likelihood, discrete sites summed out per observation."""
    if facts.pointwise_note is not None or facts.pointwise_skipped is not None:
        return {}
    if not facts.discrete:
        return {n: trace.nodes[n]["log_prob"] for n in facts.likelihood}
    name = facts.likelihood[0]
    factor = sum(trace.nodes[n]["log_prob"] for n in facts.discrete + (name,))
    enum_ndim = factor.dim() - facts.plate_nesting - (1 if vectorized else 0)
    return {name: torch.logsumexp(factor.reshape((-1,) + factor.shape[enum_ndim:]), dim=0)}


def _evaluate_plate(model, data, facts, values, unconstrained, priors, jacobian,
                    density=True) -> Evaluation:
    """Every draw at once, in a plate over the draws left of the story's plates."""
    num = next(iter(values.values())).shape[0]
    trace, constrained, log_det = trace_in_draw_plate(model, data, facts, values,
                                                      unconstrained, density)
    log_jacobian = torch.zeros(num, dtype=facts.dtype)
    for term in log_det.values():
        log_jacobian = log_jacobian + _per_draw(term, num).reshape(num, -1).sum(-1)
    log_det = log_det if jacobian else {}
    if facts.discrete and not facts.local_discrete:
        raise ValueError("the plate path sums out only local discrete sites")
    deterministic = {n: _per_draw(trace.nodes[n]["value"], num, facts.value_shapes[n])
                     for n in facts.deterministic}
    constrained = {n: _per_draw(constrained[n], num, facts.value_shapes[n])
                   for n in facts.continuous if n in constrained}
    total = torch.zeros(num, dtype=facts.dtype)
    if not density:
        return Evaluation(log_jacobian if log_det else total, {}, deterministic, constrained,
                          log_jacobian, {})
    terms = [trace.nodes[n]["log_prob"] for n in (facts.continuous if priors else ())]
    pointwise = _pointwise(trace, facts, vectorized=True)
    observed = observed_sites(trace, values)
    if facts.discrete:
        terms += list(pointwise.values())
        terms += [trace.nodes[n]["log_prob"] for n in observed if n not in pointwise]
    else:
        terms += [trace.nodes[n]["log_prob"] for n in observed]
    for term in terms + list(log_det.values()):
        total = total + _per_draw(term, num).reshape(num, -1).sum(-1)
    pointwise = {n: _per_draw(v, num, facts.batch_shapes[n]) for n, v in pointwise.items()}
    return Evaluation(total, pointwise, deterministic, constrained, log_jacobian, {})


#: The most tensor elements one batch of draws may create over all the story's sample
#: sites (about 160 MB of float64).
ELEMENTS_PER_BATCH = 20_000_000
#: The most elements of any one site's tensor in a batch: 4 MB of float64. A tensor near
#: glibc's largest mmap threshold (32 MB) is mapped fresh, or trimmed off the heap, and
#: page-faulted in on every operation; a small one stays in cache. A log density over
#: 4000 draws x 1059 values, in batches of 4000, 3777, 2000, 1000 and 500 draws (32, 30.5,
#: 16, 8 and 4 MB a tensor), took 76, 34, 12, 6.6 and 3.1 ms (41371, 17157, 0, 0 and 0
#: minor page faults). SVI's median over 5 fits, with 16, 8 and 4 MB: earnings 0.20, 0.19,
#: 0.17 s; diamonds 0.97, 0.95, 0.91 s; Galton's heights 1.00, 0.93, 0.88 s (0.46 s and
#: 1.34-1.40 s for earnings and heights with one batch of every draw). The HMM's 200
#: sites of 4000 x 2 values stay in one batch, under the budget over all sites above.
ELEMENTS_PER_TENSOR = 500_000


def draws_per_batch(model, data: Mapping[str, Any], facts: StoryFacts, num_draws: int) -> int:
    """How many draws one evaluation may take, within both element budgets.

    One draw's size (every sample site's value and log-probability tensor: their sum,
    and the largest) is measured once and kept on the facts: read off the story's first
    run where it has no discrete sites, else on an enumerated run (enumeration dims
    included): the first evaluation's, which every method makes before its draws (the
    path choice's), else one of its own.
    """
    if facts.elements_per_draw is None:
        if facts.discrete or facts.trace is None:
            with run_dtype(facts.dtype), pyro.validation_enabled(False), torch.no_grad():
                values = {n: facts.trace.nodes[n]["value"] for n in facts.continuous}
                trace, _, _ = trace_with(model, data, facts, values, unconstrained=False)
            _note_elements(facts, trace)
        else:
            _note_elements(facts, facts.trace, enumerated=False)
    total, largest = facts.elements_per_draw
    return max(1, min(num_draws, ELEMENTS_PER_BATCH // total, ELEMENTS_PER_TENSOR // largest))


def _note_elements(facts: StoryFacts, trace, enumerated: bool = True) -> None:
    """Keep one draw's size on ``facts``: its sample sites' elements, all and the largest.

    ``trace`` is one draw's run: enumerated, with log probabilities (``enumerated``), or
    the story's first run, whose log probabilities take their distributions' batch shapes.
    Under :func:`torch.func.vmap` a tensor's size is one draw's, so a vectorised run
    serves too.
    """
    sizes = [(int(site["log_prob"].numel()) if enumerated
              else math.prod(getattr(site["fn"], "batch_shape", ())),
              int(site["value"].numel()))
             for site in trace.nodes.values() if site["type"] == "sample"]
    facts.elements_per_draw = (max(1, sum(a + b for a, b in sizes)),
                               max([1] + [max(a, b) for a, b in sizes]))


def _per_draw(value: torch.Tensor, num: int, shape: tuple[int, ...] | None = None):
    """A plate-path tensor as ``(draws, *shape)``, broadcasting what does not vary by draw."""
    if shape is None:
        lead = value.shape[0] if value.dim() else 1
        if lead != num:
            value = value.expand((num,) + tuple(value.shape[1:] if value.dim() else ()))
        return value
    size = int(torch.tensor(shape).prod()) if shape else 1
    if value.numel() == num * size:
        return value.reshape((num,) + tuple(shape))
    return value.reshape(-1).reshape(shape).expand((num,) + tuple(shape))
