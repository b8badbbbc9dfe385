"""Evaluate a story at many posterior draws at once.

For each draw of the continuous latent sites this gives: the discrete sites drawn from
their exact conditional posterior (``infer_discrete``, Pyro's forward-filter
backward-sample), the pointwise log-likelihood of each observation marginal over the
enumerated discrete sites, and the log joint density. Draws are vectorised in an outer
plate left of the story's plates; a story whose code cannot broadcast over that plate is
evaluated one draw at a time instead (slower, same numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate, infer_discrete

from ppl_notes._sites import (
    deterministic_sites,
    is_enumerable,
    latent_sites,
    sample_sites,
    trace_model,
    trace_plate_nesting,
)
from ppl_notes.errors import StoryError

logger = logging.getLogger(__name__)

_ELEMENTS_PER_CHUNK = 20_000_000


@dataclass
class DrawEvaluation:
    """What :func:`evaluate_draws` returns; every array has the draws as leading dim."""

    discrete: dict[str, np.ndarray] = field(default_factory=dict)
    deterministic: dict[str, np.ndarray] = field(default_factory=dict)
    log_likelihood: dict[str, np.ndarray] = field(default_factory=dict)
    log_joint: np.ndarray | None = None
    log_likelihood_error: str | None = None

    @classmethod
    def concatenate(cls, pieces: list[DrawEvaluation], error: str | None = None):
        """Join evaluations of consecutive chunks of draws."""
        return cls(
            discrete={k: np.concatenate([p.discrete[k] for p in pieces])
                      for k in pieces[0].discrete},
            deterministic={k: np.concatenate([p.deterministic[k] for p in pieces])
                           for k in pieces[0].deterministic},
            log_likelihood={k: np.concatenate([p.log_likelihood[k] for p in pieces])
                            for k in pieces[0].log_likelihood},
            log_joint=np.concatenate([p.log_joint for p in pieces]),
            log_likelihood_error=error,
        )


@dataclass(frozen=True)
class _Layout:
    plate_nesting: int
    batch_ndim: dict[str, int]
    discrete: tuple[str, ...]
    observed: tuple[str, ...]
    continuous: tuple[str, ...]
    pointwise_error: str | None
    value_shapes: dict[str, tuple[int, ...]]
    batch_shapes: dict[str, tuple[int, ...]]
    deterministic: tuple[str, ...] = ()


def layout_of(model, data: Mapping[str, Any]) -> _Layout:
    """Which sites are discrete, continuous and observed, and their shapes."""
    trace = trace_model(model, data, 0)
    sites = sample_sites(trace)
    nesting = trace_plate_nesting(trace)
    discrete = tuple(n for n, s in sites.items() if not s["is_observed"] and is_enumerable(s["fn"]))
    observed = tuple(n for n, s in sites.items() if s["is_observed"])
    continuous = tuple(
        n for n, s in sites.items() if not s["is_observed"] and n not in discrete
    )
    error = None
    if discrete:
        plates = {n: {f.name for f in sites[n]["cond_indep_stack"]} for n in discrete + observed}
        if len(observed) != 1:
            error = "pointwise log-likelihood with discrete latents needs exactly one observed site"
        elif any(plates[d] != plates[observed[0]] for d in discrete):
            error = (
                "pointwise log-likelihood needs every discrete latent site in the same plates "
                f"as {observed[0]!r} (one discrete value per observation)"
            )
    batch_ndim = {n: len(s["fn"].batch_shape) for n, s in sites.items()}
    value_shapes = {n: tuple(s["value"].shape) for n, s in sites.items()}
    batch_shapes = {n: tuple(s["fn"].batch_shape) for n, s in sites.items()}
    deterministic = deterministic_sites(trace)
    value_shapes.update({n: tuple(s["value"].shape) for n, s in deterministic.items()})
    return _Layout(nesting, batch_ndim, discrete, observed, continuous, error,
                   value_shapes, batch_shapes, tuple(deterministic))


def evaluate_draws(
    model,
    data: Mapping[str, Any],
    draws: Mapping[str, torch.Tensor],
    *,
    recover_discrete: bool = True,
    seed: int = 0,
) -> DrawEvaluation:
    """Discrete posterior draws, pointwise log-likelihood and log joint for each draw.

    Parameters
    ----------
    model : Model
        The story.
    data : dict
        Prepared data (tensors).
    draws : dict of Tensor
        The continuous latent sites, each with one leading draw dimension.
    recover_discrete : bool
        Draw the discrete sites from p(z | x, theta) for every draw (``infer_discrete``).
    seed : int
        Seed for the discrete draws.

    Returns
    -------
    DrawEvaluation
    """
    layout = layout_of(model, data)
    num_draws = next(iter(draws.values())).shape[0]
    per_draw = max(1, sum(int(v[0].numel()) for v in data.values() if torch.is_tensor(v)))
    per_draw *= max(1, 2 ** len(layout.discrete))
    chunk = max(1, min(num_draws, _ELEMENTS_PER_CHUNK // per_draw))
    pieces = []
    with pyro.poutine.seed(rng_seed=seed), torch.no_grad():
        for start in range(0, num_draws, chunk):
            values = {k: v[start : start + chunk] for k, v in draws.items()}
            pieces.append(_evaluate_chunk(model, data, values, layout, recover_discrete))
    return DrawEvaluation.concatenate(pieces, layout.pointwise_error)


def _compact(values: np.ndarray) -> np.ndarray:
    """Discrete draws in the smallest integer type that holds them (int8 for a category).

    Recovering a discrete site costs draws x elements of it: 4000 draws of 1e6 people's
    genders take 4 GB as int64 and 0.5 GB as int8.
    """
    if values.size == 0 or not np.all(np.equal(np.mod(values, 1), 0)):
        return values
    low, high = values.min(), values.max()
    for kind in (np.int8, np.int16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return values.astype(kind)
    return values.astype(np.int64)


#: Above this many bytes of recovered discrete draws, say what they cost and how to avoid it.
DISCRETE_BYTES_TO_MENTION = 256 * 2**20


def discrete_cost(model, data: Mapping[str, Any], num_draws: int) -> int:
    """Bytes the recovered discrete draws take (one byte per element and draw, as int8)."""
    layout = layout_of(model, data)
    return num_draws * sum(int(np.prod(layout.value_shapes[n])) for n in layout.discrete)


def posterior_of(model, data: Mapping[str, Any], draws: Mapping[str, torch.Tensor], *,
                 recover_discrete: bool, seed: int, order=None
                 ) -> tuple[dict[str, np.ndarray], DrawEvaluation]:
    """Every method's posterior from draws of its continuous (or guide) sites.

    The draws are evaluated (:func:`evaluate_draws`); the result holds the latent sites
    in the story's order (``order``, traced when not given) with the recovered discrete
    sites among them, then the deterministic sites; arrays keep the leading draw dim.
    """
    if recover_discrete:
        cost = discrete_cost(model, data, next(iter(draws.values())).shape[0])
        if cost > DISCRETE_BYTES_TO_MENTION:
            logger.warning(
                "recovering the discrete sites of story %r for every draw takes %.2f GB; "
                "recover_discrete=False skips it, and fewer draws (num_draws= for VI, thin= "
                "for NUTS) thin it", getattr(model, "name", model), cost / 1e9)
    evaluation = evaluate_draws(model, data, draws, recover_discrete=recover_discrete,
                                seed=seed)
    values = {k: v.detach().cpu().numpy() for k, v in draws.items()}
    values.update(evaluation.discrete)
    order = latent_sites(trace_model(model, data, 0)) if order is None else order
    posterior = {n: values[n] for n in order if n in values}
    posterior.update(evaluation.deterministic)
    return posterior, evaluation


def _evaluate_chunk(model, data, values, layout, recover_discrete) -> DrawEvaluation:
    try:
        return _evaluate_vectorized(model, data, values, layout, recover_discrete)
    except (RuntimeError, ValueError, IndexError) as error:
        logger.info("story %r does not broadcast over draws (%s); evaluating one draw at a "
                    "time", getattr(model, "name", model), error)
    singles = [
        _evaluate_vectorized(model, data, {k: v[i : i + 1] for k, v in values.items()},
                             layout, recover_discrete, vectorize=False)
        for i in range(next(iter(values.values())).shape[0])
    ]
    return DrawEvaluation.concatenate(singles)


def _vectorized_story(model, values, layout, vectorize):
    """The story conditioned on ``values`` (draws first), inside a plate over the draws."""
    plate_nesting = layout.plate_nesting
    num = next(iter(values.values())).shape[0] if values else 1

    def shaped(name, value):
        if not vectorize:
            return value[0]
        pad = plate_nesting - layout.batch_ndim[name]
        return value.reshape((num,) + (1,) * pad + tuple(value.shape[1:]))

    conditioned = poutine.condition(model, data={k: shaped(k, v) for k, v in values.items()})

    def story(**kwargs):
        if not vectorize:
            return conditioned(**kwargs)
        with pyro.plate("_draws", num, dim=-(plate_nesting + 1)):
            return conditioned(**kwargs)

    enum_dim = -(plate_nesting + 2) if vectorize else -(plate_nesting + 1)
    return story, num, enum_dim


def log_joint(model, data, values, layout: _Layout, vectorize: bool = True,
              deterministic: dict | None = None, priors: bool = True):
    r"""Differentiable log joint density of each draw, and pointwise log-likelihoods.

    Local discrete sites are summed out exactly:

    .. math:: \log p(x,\theta) = \log p(\theta)
              + \sum_i \log \sum_{z_i} p(z_i \mid \theta)\, p(x_i \mid z_i, \theta).

    With ``priors=False`` the continuous sites' prior terms are left out: the result is
    the log-likelihood :math:`\log p(x \mid \theta)` (the discrete sites' own
    probabilities stay, they are part of it).

    Returns
    -------
    (Tensor, dict of Tensor)
        Shape ``(draws,)``, and per observed site ``(draws, *batch_shape)``. The values
        of ``pyro.deterministic`` sites go into ``deterministic`` when it is given.
    """
    story, num, enum_dim = _vectorized_story(model, values, layout, vectorize)
    enumerated = poutine.enum(config_enumerate(story), first_available_dim=enum_dim)
    trace = poutine.trace(enumerated).get_trace(**data)
    if deterministic is not None:
        for name in layout.deterministic:
            value = trace.nodes[name]["value"].expand(
                (num,) if not vectorize else trace.nodes[name]["value"].shape)
            deterministic[name] = value.reshape((num,) + layout.value_shapes[name])
    trace.compute_log_prob()
    total = 0.0
    for name in layout.continuous if priors else ():
        total = total + _sum_to_draws(trace.nodes[name]["log_prob"], num, vectorize)
    pointwise = {}
    if layout.discrete:
        if layout.pointwise_error is not None:
            raise StoryError(layout.pointwise_error)
        factor = sum(trace.nodes[n]["log_prob"] for n in layout.discrete + layout.observed)
        enum_ndim = factor.dim() - (layout.plate_nesting + (1 if vectorize else 0))
        marginal = torch.logsumexp(factor.reshape((-1,) + factor.shape[enum_ndim:]), dim=0)
        pointwise[layout.observed[0]] = marginal
    else:
        for name in layout.observed:
            pointwise[name] = trace.nodes[name]["log_prob"].expand(
                trace.nodes[name]["fn"].batch_shape)
    for name, log_prob in pointwise.items():
        total = total + _sum_to_draws(log_prob, num, vectorize)
        pointwise[name] = log_prob.reshape((num,) + layout.batch_shapes[name])
    return total, pointwise


def _evaluate_vectorized(model, data, values, layout, recover_discrete, vectorize=True):
    result = DrawEvaluation()
    if layout.discrete and recover_discrete:
        story, num, enum_dim = _vectorized_story(model, values, layout, vectorize)
        sampler = infer_discrete(config_enumerate(story), first_available_dim=enum_dim,
                                 temperature=1)
        trace = poutine.trace(sampler).get_trace(**data)
        for name in layout.discrete:
            value = trace.nodes[name]["value"]
            result.discrete[name] = _compact(_draw_major(value, num, layout.value_shapes[name]))
    total, pointwise = log_joint(model, data, values, layout, vectorize, result.deterministic)
    result.deterministic = {k: v.detach().cpu().numpy() for k, v in result.deterministic.items()}
    result.log_likelihood = {k: v.detach().cpu().numpy() for k, v in pointwise.items()}
    result.log_joint = total.detach().double().cpu().numpy()
    return result


def _draw_major(value: torch.Tensor, num: int, shape: tuple[int, ...]) -> np.ndarray:
    """Reshape a (vectorised) site value to ``(draws, *shape)``."""
    return value.detach().cpu().reshape((num,) + tuple(shape)).numpy()


def _sum_to_draws(log_prob: torch.Tensor, num: int, vectorize: bool) -> torch.Tensor:
    if not vectorize:
        return log_prob.sum().reshape(1).double()
    return log_prob.expand((num,) + log_prob.shape[1:]).reshape(num, -1).sum(-1).double()


def sample_guide(guide, data: Mapping[str, Any], num_draws: int, plate_nesting: int, seed: int,
                 sites: tuple[str, ...] | None = None):
    r"""Draw ``num_draws`` values of every guide site, and log q of each draw.

    Returns
    -------
    (dict of Tensor, numpy.ndarray)
        Site values with a leading draw dim, and :math:`\log q(\theta_s)`.
    """
    with pyro.poutine.seed(rng_seed=seed), torch.no_grad():
        plain = poutine.trace(guide).get_trace(**data)
        # log q sums every guide site, auxiliary ones too (an autoguide draws an
        # unconstrained auxiliary value and a Delta carrying the Jacobian).
        drawn = {n: s for n, s in sample_sites(plain).items() if not s["is_observed"]}
        shapes = {n: tuple(s["value"].shape) for n, s in drawn.items()}
        names = tuple(n for n, s in drawn.items() if not s["infer"].get("is_auxiliary"))
        names = names if sites is None else sites
        try:
            def vectorized(**kwargs):
                with pyro.plate("_draws", num_draws, dim=-(plate_nesting + 1)):
                    return guide(**kwargs)

            trace = poutine.trace(vectorized).get_trace(**data)
            trace.compute_log_prob()
            values = {n: trace.nodes[n]["value"].reshape((num_draws,) + shapes[n]) for n in names}
            log_q = sum(_sum_to_draws(trace.nodes[n]["log_prob"], num_draws, True) for n in drawn)
        except (RuntimeError, ValueError, IndexError) as error:
            logger.info("guide does not broadcast over draws (%s); drawing one at a time", error)
            traces = [poutine.trace(guide).get_trace(**data) for _ in range(num_draws)]
            for trace in traces:
                trace.compute_log_prob()
            values = {n: torch.stack([t.nodes[n]["value"] for t in traces]) for n in names}
            log_q = torch.stack([sum(t.nodes[n]["log_prob_sum"] for n in drawn) for t in traces])
    return values, np.asarray(log_q, dtype=float)
