r"""q's draws, evaluated in one pass through the story, and corrected by importance.

Whatever the family (a Gaussian of :mod:`~ppl_notes.vi.gaussian_family` or a flow of
:mod:`~ppl_notes.vi.flow_family`: anything with ``dim``, ``draw(epsilon)`` and
``log_prob(points)``), every restart's draws go through the story once, which maps them
onto the supports, recovers the discrete sites and computes the pointwise
log-likelihood; the importance step (:mod:`~ppl_notes.vi.importance`) then decides
whether to draw more proposals and resample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ppl_notes.evaluation.draws import discrete_draws, in_story_order, posterior_of
from ppl_notes.vi.importance import Correction, correction_of, proposals_needed, weighed

__all__ = ["evaluated_draws", "EXTRA_SEED"]


#: Offsets the seeds of the importance step's further proposals from those of q's own draws
EXTRA_SEED = 7919


def _proposals(qs: list, count: int, seeds: list[int]) -> list[torch.Tensor]:
    """``count`` draws of each ``q`` in the unconstrained space, each restart's own seed."""
    points = []
    for q, seed in zip(qs, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        width = q.dim + (q.factor.shape[1] if q.family == "lowrank" else 0)
        points.append(q.draw(torch.randn(count, width, generator=generator,
                                         dtype=torch.float64)))
    return points


def _evaluate(model, data, facts, qs: list, potential, points, seed: int,
              options: dict[str, Any]) -> dict[str, Any]:
    r"""The kept ``points`` of every restart in one pass: values, posterior, densities.

    Every restart's draws go through the story in one pass (a story with a Python loop
    pays its per-call cost once, as NUTS's draws do), which maps them to the supports,
    honouring a support that moves with another site (GARCH's), gives the log-Jacobian,
    recovers the discrete sites and computes the pointwise log-likelihood. ``log_p`` and
    ``log_q`` are each restart's on the sites' own scale (``sample_stats``:
    :math:`\log q(\theta) = \log q(u) - \log|\det J_T(u)|`); ``log_p_u`` is
    :math:`\log p(x, T(u)) + \log|J|`, the unconstrained density that the importance
    weights compare with ``log_q_u``.
    """
    ends = np.cumsum([p.shape[0] for p in points]).tolist()
    joined = potential.unflatten(torch.cat(points))
    posterior, evaluation = posterior_of(model, data, joined, facts, unconstrained=True,
                                         recover_discrete=options["recover_discrete"],
                                         seed=seed, order=facts.latent)
    parts = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    log_q_u = [q.log_prob(p).numpy() for q, p in zip(qs, points, strict=True)]
    log_jacobian = [evaluation.log_jacobian[part] for part in parts]
    joined = {n: torch.from_numpy(v) for n, v in evaluation.constrained.items()}
    log_p = [evaluation.log_joint[part] for part in parts]
    return {"values": [{k: v[part] for k, v in joined.items()} for part in parts],
            "posterior": [{k: v[part] for k, v in posterior.items()} for part in parts],
            "log_likelihood": [{k: v[part] for k, v in evaluation.log_likelihood.items()}
                               for part in parts],
            "log_p": log_p, "log_q": [q - j for q, j in zip(log_q_u, log_jacobian,
                                                            strict=True)],
            "log_p_u": [p + j for p, j in zip(log_p, log_jacobian, strict=True)],
            "log_q_u": log_q_u}


def _kept(model, data, facts, qs: list, potential, found: dict[str, Any],
          more: list[torch.Tensor], chosen: list[np.ndarray], seed: int,
          options: dict[str, Any]) -> dict[str, Any]:
    """:func:`_evaluate`'s result for the draws the importance step kept.

    ``chosen[r]`` indexes restart ``r``'s proposals: its own draws, evaluated in ``found``
    already, then ``more[r]``. Only the further proposals kept are evaluated, once each
    (``seed`` gives their discrete states other uniforms than q's own draws had); a
    proposal kept twice repeats its row, discrete states included.
    """
    size = len(found["log_p"][0])
    fresh = [np.unique(c[c >= size]) for c in chosen]
    new = _evaluate(model, data, facts, qs, potential,
                    [m[torch.as_tensor(f - size, dtype=torch.long)] for m, f in
                     zip(more, fresh, strict=True)], seed, options) if any(
        f.size for f in fresh) else None
    kept: dict[str, list] = {key: [] for key in found}
    for r, (c, f) in enumerate(zip(chosen, fresh, strict=True)):
        rows = np.where(c < size, c, size + np.searchsorted(f, c))  # into own + fresh
        for key, per_restart in found.items():
            own, extra = per_restart[r], None if new is None else new[key][r]
            kept[key].append(_rows(own, extra, rows))
    return kept


def _rows(own, extra, rows: np.ndarray):
    """``rows`` of ``own`` followed by ``extra``: arrays, tensors, or dicts of them."""
    if isinstance(own, dict):
        return {k: _rows(v, None if extra is None else extra[k], rows) for k, v in own.items()}
    if torch.is_tensor(own):
        table = own if extra is None else torch.cat([own, extra])
        return table[torch.as_tensor(rows, dtype=torch.long)]
    table = own if extra is None else np.concatenate([own, extra])
    return table[rows]


def _add_discrete(model, data, facts, found: dict[str, Any], seed: int) -> None:
    """Recover the discrete sites of every restart's kept draws into their posteriors."""
    values = {n: torch.cat([v[n] for v in found["values"]]) for n in found["values"][0]}
    drawn = discrete_draws(model, data, values, facts, seed=seed)
    at = 0
    for r, posterior in enumerate(found["posterior"]):
        size = len(next(iter(posterior.values())))
        latent = {k: v for k, v in posterior.items() if k not in facts.deterministic}
        latent.update({n: v[at:at + size] for n, v in drawn.items()})
        deterministic = {k: v for k, v in posterior.items() if k in facts.deterministic}
        found["posterior"][r] = in_story_order(latent, deterministic, facts)
        at += size


def evaluated_draws(model, data, facts, traces: list, potential, seeds: list[int],
                     options: dict[str, Any]) -> tuple[list[tuple], Correction | None]:
    """Every restart's draws, evaluated in one pass, after the importance step.

    With ``importance="psis"``, q's own draws decide whether more proposals are drawn
    and the draws resampled from them (:mod:`ppl_notes.vi.importance`). Returns
    ``[(values, posterior, log p, log q, log-likelihood, proposals)]`` per restart
    (``proposals``: their unconstrained ``log_p`` and ``log_q``), and the correction
    (None without the importance step).
    """
    size, qs = options["num_draws"], [t.q for t in traces]
    points = _proposals(qs, size, [s + 1 for s in seeds])
    # the discrete sites are recovered once, for the draws finally kept, unless the
    # evaluation draws them in its own run (a chain's) anyway
    deferred = (options["importance"] == "psis" and options["recover_discrete"]
                and bool(facts.discrete))
    evaluating = {**options, "recover_discrete": "same_run"} if deferred else options
    found = _evaluate(model, data, facts, qs, potential, points, seeds[0] + 2, evaluating)
    correction, proposals = None, [{} for _ in qs]
    if options["importance"] == "psis":
        log_p, log_q = found["log_p_u"], found["log_q_u"]
        correction = weighed(log_p, log_q, size)
        observed = sum(int(np.prod(facts.value_shapes[n], dtype=int)) for n in facts.observed)
        count, correction.reason = proposals_needed(correction, size, observed)
        if count > size:
            more = _proposals(qs, count - size, [s + EXTRA_SEED for s in seeds])
            extra = potential.unconstrained_log_density(torch.cat(more)).numpy()
            log_p = [np.concatenate([p, extra[r * (count - size):(r + 1) * (count - size)]])
                     for r, p in enumerate(log_p)]
            log_q = [np.concatenate([q_r, q.log_prob(m).numpy()])
                     for q_r, q, m in zip(log_q, qs, more, strict=True)]
            correction = correction_of(log_p, log_q, size, seeds[0] + 3)
            if correction.applied:
                found = _kept(model, data, facts, qs, potential, found, more,
                              correction.chosen, seeds[0] + 4, evaluating)
        proposals = [{"log_p": p, "log_q": q} for p, q in zip(log_p, log_q, strict=True)]
    if deferred and any(n not in found["posterior"][0] for n in facts.discrete):
        _add_discrete(model, data, facts, found, seeds[0] + 2)
    keys = ("values", "posterior", "log_p", "log_q", "log_likelihood")
    return ([tuple(found[k][r] for k in keys) + (proposals[r],) for r in range(len(qs))],
            correction)
