"""Evaluate a story at many posterior draws at once.

For each draw of the continuous latent sites this gives: the discrete sites drawn from
their exact conditional posterior (``infer_discrete``, Pyro's forward-filter
backward-sample), the pointwise log-likelihood of each observation marginal over the
enumerated discrete sites (where it exists), and the log joint density. The draws are
evaluated on the story's path (:mod:`ppl_notes.evaluation`): batched where that is
checked to keep the story's meaning, one at a time otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate, infer_discrete

from ppl_notes._sites import distribution_name, sample_sites
from ppl_notes.errors import InferenceError
from ppl_notes.evaluation import StoryFacts, choose_path, evaluate, run_dtype
from ppl_notes.evaluation.chain_discrete import categorical_draw
from ppl_notes.evaluation.density import draws_per_batch, in_draw_plate, trace_in_draw_plate
from ppl_notes.evaluation.handlers import vmap_safe_contraction

logger = logging.getLogger(__name__)



@dataclass
class DrawEvaluation:
    """What :func:`evaluate_draws` returns; every array has the draws as leading dim."""

    discrete: dict[str, np.ndarray] = field(default_factory=dict)
    deterministic: dict[str, np.ndarray] = field(default_factory=dict)
    log_likelihood: dict[str, np.ndarray] = field(default_factory=dict)
    log_joint: np.ndarray | None = None
    log_likelihood_note: str | None = None
    #: for unconstrained draws: the sites on their supports, and log|det J| of the map
    constrained: dict[str, np.ndarray] = field(default_factory=dict)
    log_jacobian: np.ndarray | None = None

    @classmethod
    def concatenate(cls, pieces: list[DrawEvaluation], note: str | None = None):
        """Join evaluations of consecutive chunks of draws.

        ``note`` says why no pointwise log-likelihood exists, where it does not. One
        chunk is returned as it is (a copy of 4000 draws' pointwise log-likelihood at
        1192 values costs 0.05 s).
        """
        if len(pieces) == 1:
            return dataclasses.replace(pieces[0], log_likelihood_note=note)
        return cls(
            discrete={k: np.concatenate([p.discrete[k] for p in pieces])
                      for k in pieces[0].discrete},
            deterministic={k: np.concatenate([p.deterministic[k] for p in pieces])
                           for k in pieces[0].deterministic},
            log_likelihood={k: np.concatenate([p.log_likelihood[k] for p in pieces])
                            for k in pieces[0].log_likelihood},
            log_joint=np.concatenate([p.log_joint for p in pieces]),
            log_likelihood_note=note,
            constrained={k: np.concatenate([p.constrained[k] for p in pieces])
                         for k in pieces[0].constrained},
            log_jacobian=None if pieces[0].log_jacobian is None else np.concatenate(
                [p.log_jacobian for p in pieces]),
        )


def evaluate_draws(
    model,
    data: Mapping[str, Any],
    draws: Mapping[str, torch.Tensor],
    facts: StoryFacts,
    *,
    recover_discrete: bool = True,
    seed: int = 0,
    unconstrained: bool = False,
) -> DrawEvaluation:
    r"""Discrete posterior draws, pointwise log-likelihood and log joint for each draw.

    Parameters
    ----------
    model : Model
        The story.
    data : dict
        Prepared data (tensors).
    draws : dict of Tensor
        The continuous latent sites, each with one leading draw dimension.
    facts : StoryFacts
        The story's facts on ``data`` (:func:`~ppl_notes.evaluation.facts.story_facts`).
    recover_discrete : bool or "same_run"
        Draw the discrete sites from p(z | x, theta) for every draw: in the evaluation's
        own run of the story where they form a chain
        (:mod:`~ppl_notes.evaluation.chain_discrete`), else by a run of their own
        (``infer_discrete``, or one softmax per observation for local sites).
        ``"same_run"`` draws them only where that takes no run of its own: a method that
        decides afterwards which draws it keeps (VI's importance step) recovers the
        others once, for those (:func:`discrete_draws`).
    seed : int
        Seed for the discrete draws.
    unconstrained : bool
        The draws are on the unconstrained space (a sampler's or a Gaussian's): the same
        run of the story maps them to their supports and gives the log-Jacobian
        (``constrained``, ``log_jacobian``), with no run of its own.

    Returns
    -------
    DrawEvaluation
        ``log_joint`` is :math:`\log p(x, \theta)` on the sites' own scale either way.
    """
    path = choose_path(model, data, facts)
    pieces = [_evaluate_chunk(model, data, values, facts, path, recover_discrete, unconstrained)
              for values in _in_batches(model, data, facts, draws, seed)]
    return DrawEvaluation.concatenate(pieces, facts.pointwise_note or facts.pointwise_skipped)


def _in_batches(model, data, facts: StoryFacts, draws: Mapping[str, torch.Tensor], seed: int):
    """The draws in batches of :func:`draws_per_batch`, under one seed, without gradients.

    Each batch is taken by the caller before the next is cut: whatever the caller draws
    (the discrete sites) comes from one random stream, in the draws' order.
    """
    num_draws = next(iter(draws.values())).shape[0]
    chunk = draws_per_batch(model, data, facts, num_draws)
    with pyro.poutine.seed(rng_seed=seed), torch.no_grad():
        for start in range(0, num_draws, chunk):
            yield {k: v[start:start + chunk] for k, v in draws.items()}


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


def discrete_cost(facts: StoryFacts, num_draws: int) -> int:
    """Bytes the recovered discrete draws take (one byte per element and draw, as int8)."""
    return num_draws * sum(int(np.prod(facts.value_shapes[n])) for n in facts.discrete)


def _mention_discrete_cost(model, facts: StoryFacts, num_draws: int) -> None:
    cost = discrete_cost(facts, num_draws)
    if cost > DISCRETE_BYTES_TO_MENTION:
        logger.warning(
            "recovering the discrete sites of story %r for every draw takes %.2f GB; "
            "recover_discrete=False skips it, and fewer draws (num_draws= for VI, thin= "
            "for NUTS) thin it", getattr(model, "name", model), cost / 1e9)


def posterior_of(model, data: Mapping[str, Any], draws: Mapping[str, torch.Tensor],
                 facts: StoryFacts, *, recover_discrete: bool, seed: int, order=None,
                 unconstrained: bool = False) -> tuple[dict[str, np.ndarray], DrawEvaluation]:
    """Every method's posterior from draws of its continuous (or guide) sites.

    The draws are evaluated (:func:`evaluate_draws`; ``unconstrained`` draws are mapped
    to their supports by the same run); the result holds the latent sites in the story's
    order (``order``; ``facts.latent`` when not given) with the recovered discrete sites
    among them, then the deterministic sites; arrays keep the leading draw dim.
    """
    if recover_discrete:
        _mention_discrete_cost(model, facts, next(iter(draws.values())).shape[0])
    evaluation = evaluate_draws(model, data, draws, facts, recover_discrete=recover_discrete,
                                seed=seed, unconstrained=unconstrained)
    values = (dict(evaluation.constrained) if unconstrained else
              {k: v.detach().cpu().numpy() for k, v in draws.items()})
    values.update(evaluation.discrete)
    return in_story_order(values, evaluation.deterministic, facts, order), evaluation


def in_story_order(latent: Mapping[str, np.ndarray], deterministic: Mapping[str, np.ndarray],
                   facts: StoryFacts, order=None) -> dict[str, np.ndarray]:
    """A posterior's variables as the tree holds them.

    The latent sites in the story's order (``order``; ``facts.latent`` when not given),
    then the deterministic sites.
    """
    order = facts.latent if order is None else order
    ordered = {n: latent[n] for n in order if n in latent}
    ordered.update(deterministic)
    return ordered


def discrete_draws(model, data: Mapping[str, Any], values: Mapping[str, torch.Tensor],
                   facts: StoryFacts, *, seed: int) -> dict[str, np.ndarray]:
    """The discrete sites drawn from p(z | x, theta) at draws of the continuous ones.

    ``values`` are on the sites' own scale, draws first; the draws come in the same
    chunks from the same ``seed`` as :func:`evaluate_draws`'s: a method that first decides
    which draws it keeps (VI's importance step) recovers them once, for those.
    """
    path = choose_path(model, data, facts)
    _mention_discrete_cost(model, facts, next(iter(values.values())).shape[0])
    pieces = [{n: _compact(v) for n, v in recover_discrete_sites(model, data, facts, part,
                                                             path).items()}
              for part in _in_batches(model, data, facts, values, seed)]
    return {n: np.concatenate([p[n] for p in pieces]) for n in pieces[0]} if pieces else {}


def _evaluate_chunk(model, data, values, facts, path, recover_discrete,
                    unconstrained=False) -> DrawEvaluation:
    in_the_run = bool(facts.discrete) and bool(recover_discrete) and path != "plate"
    evaluation = evaluate(model, data, facts, values, unconstrained=unconstrained, path=path,
                          jacobian=False, discrete=in_the_run)
    result = DrawEvaluation(
        deterministic={k: v.detach().cpu().numpy() for k, v in evaluation.deterministic.items()},
        log_likelihood={k: v.detach().cpu().numpy() for k, v in evaluation.pointwise.items()},
        log_joint=evaluation.total.detach().double().cpu().numpy())
    if unconstrained:
        values = {n: evaluation.constrained[n].detach() for n in values}
        result.constrained = {n: v.cpu().numpy() for n, v in values.items()}
        result.log_jacobian = evaluation.log_jacobian.detach().double().cpu().numpy()
    if evaluation.discrete:  # drawn in the evaluation's own run: a chain
        result.discrete = {n: _compact(v.numpy()) for n, v in evaluation.discrete.items()}
    elif facts.discrete and recover_discrete is True:
        result.discrete = {n: _compact(v) for n, v in
                           recover_discrete_sites(model, data, facts, values, path).items()}
    return result


def recover_discrete_sites(model, data, facts, values, path) -> dict[str, np.ndarray]:
    """Each draw's discrete sites from p(z | x, theta) (Pyro's ``infer_discrete``)."""
    num = next(iter(values.values())).shape[0]
    nesting = facts.plate_nesting
    with run_dtype(facts.dtype), pyro.validation_enabled(False):
        if path == "plate" and facts.local_discrete:
            local = _local_discrete(model, data, facts, values)
            if local is not None:
                return local
        if path == "plate":
            shaped = in_draw_plate(facts, {n: v.to(facts.dtype) for n, v in values.items()})
            conditioned = poutine.condition(model, data=shaped)

            def story(**kwargs):
                with pyro.plate("_draws", num, dim=-(nesting + 1)):
                    return conditioned(**kwargs)

            sampler = infer_discrete(config_enumerate(story), first_available_dim=-(nesting + 2),
                                     temperature=1)
            trace = poutine.trace(sampler).get_trace(**data)
            return {n: trace.nodes[n]["value"].reshape((num,) + facts.value_shapes[n]).numpy()
                    for n in facts.discrete}
        def one(draw):
            conditioned = poutine.condition(model, data={k: v.to(facts.dtype)
                                                         for k, v in draw.items()})
            sampler = infer_discrete(config_enumerate(conditioned),
                                     first_available_dim=-(nesting + 1), temperature=1)
            trace = poutine.trace(sampler).get_trace(**data)
            return {n: trace.nodes[n]["value"].reshape(facts.value_shapes[n])
                    for n in facts.discrete}

        if path == "vmap":
            try:
                with vmap_safe_contraction():
                    drawn = torch.func.vmap(one, randomness="different")(dict(values))
                return {n: v.numpy() for n, v in drawn.items()}
            except Exception as error:  # noqa: BLE001 - any failure: one draw at a time, said
                logger.info("story %r: discrete sites drawn one draw at a time (%s: %s)",
                            getattr(model, "name", model), type(error).__name__, error)
        pieces = [one({k: v[i] for k, v in values.items()}) for i in range(num)]
    return {n: torch.stack([p[n] for p in pieces]).numpy() for n in facts.discrete}


def _local_discrete(model, data, facts, values) -> dict[str, np.ndarray] | None:
    r"""Discrete sites local to each observation, drawn from their exact conditional.

    Where every discrete site sits in the plates of the one observed site
    (``facts.local_discrete``: a mixture's component per observation), the observations
    are independent given the continuous sites, and
    :math:`p(z_i \mid x, \theta) \propto p(z_i \mid \theta)\, p(x_i \mid z_i, \theta)`
    is one softmax per observation over its enumerated values: the factor the pointwise
    log-likelihood sums out (``logsumexp``) is sampled from instead. One enumerated run
    of the story over the draws does it, where Pyro's ``infer_discrete`` (forward filter,
    backward sample) runs it twice and contracts generically: on Galton's heights (4000
    draws, 934 people) 1.1 s became 0.45 s. None where a site has an event shape (a
    one-hot value), which ``infer_discrete`` handles.
    """
    num, nesting = next(iter(values.values())).shape[0], facts.plate_nesting
    trace, _, _ = trace_in_draw_plate(model, data, facts,
                                      {n: v.to(facts.dtype) for n, v in values.items()}, False)
    if any(trace.nodes[n]["fn"].event_shape for n in facts.discrete):
        return None
    factor = sum(trace.nodes[n]["log_prob"] for n in facts.discrete + facts.observed)
    enum_shape = factor.shape[:factor.dim() - nesting - 1]
    rest = factor.shape[len(enum_shape):]
    if not bool(torch.isfinite(torch.logsumexp(factor.reshape((-1,) + rest), 0)).all()):
        raise ValueError("p(z | x, theta) of the discrete sites is not finite at some "
                         "observation and draw (NaN, or every value impossible)")
    # inverse CDF over the few enumerated values: one uniform per observation and draw
    chosen = categorical_draw(factor.reshape((-1,) + rest)).unsqueeze(0)
    drawn = {}
    for name in facts.discrete:
        value = trace.nodes[name]["value"]  # enumerated: its values along its own dim
        value = value.reshape((1,) * (factor.dim() - value.dim()) + value.shape)
        options = value.expand(factor.shape).reshape((-1,) + rest)
        picked = options.gather(0, chosen).squeeze(0)
        drawn[name] = picked.reshape((num,) + facts.value_shapes[name]).numpy()
    return drawn


def sum_to_draws(log_prob: torch.Tensor, num: int) -> torch.Tensor:
    """Sum a log-probability computed in a plate over ``num`` draws (leftmost) per draw."""
    return log_prob.expand((num,) + log_prob.shape[1:]).reshape(num, -1).sum(-1).double()


def sample_guide(guide, data: Mapping[str, Any], num_draws: int, plate_nesting: int, seed: int,
                 sites: tuple[str, ...] | None = None, dtype: torch.dtype = torch.float64):
    r"""Draw ``num_draws`` values of every guide site, and log q of each draw.

    The draws are taken in one run of the guide inside a plate over the draws where that
    is checked to give, at a few draws, the log q that the guide gives one draw at a
    time; otherwise the guide runs once per draw.

    Returns
    -------
    (dict of Tensor, numpy.ndarray)
        Site values with a leading draw dim, and :math:`\log q(\theta_s)`.
    """
    with pyro.poutine.seed(rng_seed=seed), torch.no_grad(), run_dtype(dtype):
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
            every = {n: trace.nodes[n]["value"].reshape((num_draws,) + shapes[n]) for n in drawn}
            log_q = sum(sum_to_draws(trace.nodes[n]["log_prob"], num_draws) for n in drawn)
            point_masses = {n for n, s in drawn.items() if distribution_name(s["fn"]) == "Delta"}
            _check_guide_draws(guide, data, every, log_q, point_masses)
            values = {n: every[n] for n in names}
        except (RuntimeError, ValueError, IndexError, KeyError, NotImplementedError) as error:
            # KeyError, NotImplementedError: a flow that cannot be inverted (Pyro's
            # BlockAutoregressive) has a log q only at the draws it made itself, so the
            # check, which conditions on them, cannot be run
            logger.info("guide does not broadcast over draws (%s); drawing one at a time", error)
            traces = []
            try:
                for _ in range(num_draws):  # log q as each is drawn: a flow that cannot be
                    # inverted (BlockAutoregressive) holds only its last draw's inverse
                    traces.append(poutine.trace(guide).get_trace(**data))
                    traces[-1].compute_log_prob()
            except (KeyError, NotImplementedError) as failure:
                raise no_log_q_error(guide, failure) from failure
            values = {n: torch.stack([t.nodes[n]["value"] for t in traces]) for n in names}
            log_q = torch.stack([sum(t.nodes[n]["log_prob_sum"] for n in drawn) for t in traces])
    return values, np.asarray(log_q, dtype=float)


def no_log_q_error(guide, failure: Exception) -> InferenceError:
    """The error for a guide whose log density fails at its own draws (a BNAF's)."""
    return InferenceError(
        f"the guide {getattr(guide, '__name__', type(guide).__name__)!r} gives no log "
        f"density at its own draws ({type(failure).__name__}: {failure}): ppl_notes needs "
        "log q at every draw for its importance weights and k-hat, and a flow Pyro cannot "
        "invert, such as block_autoregressive, cannot give it. Use an invertible flow "
        "(affine_autoregressive, spline_coupling) or guide='flow'")


def _check_guide_draws(guide, data, values, log_q, point_masses, count: int = 3) -> None:
    """Raise ``ValueError`` where the batched draws' log q is not the one-draw guide's.

    Point masses (an autoguide's constrained values) are recomputed from the conditioned
    draws rather than conditioned on: their density is defined only at exactly their value.
    """
    for i in range(min(count, log_q.shape[0])):
        given = {n: v[i] for n, v in values.items() if n not in point_masses}
        trace = poutine.trace(poutine.condition(guide, data=given)).get_trace(**data)
        single = float(sum(site["fn"].log_prob(site["value"]).sum()
                           for n, site in sample_sites(trace).items() if n in values))
        if not np.isclose(single, float(log_q[i]), rtol=1e-6, atol=1e-8):
            raise ValueError(f"the guide drawn in a plate gives log q {float(log_q[i]):.6g} at "
                             f"draw {i}, one draw at a time {single:.6g}")
