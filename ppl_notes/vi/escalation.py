r"""When default SVI goes on from its Gaussian to a flow, and which of the two it keeps.

A Gaussian cannot be a posterior that is not Gaussian in the unconstrained coordinates:
a funnel, a skewed or heavy tail, a curved ridge. Pareto :math:`\hat k` of the
importance ratios :math:`p/q` at q's draws says how much it misses (Yao et al. 2018;
above 0.7 the importance-corrected estimates cannot be trusted: Vehtari et al. 2024).
So default SVI (no guide given) fits its Gaussian first, and where that Gaussian's
:math:`\hat k` exceeds 0.7 it fits a flow (:mod:`~ppl_notes.vi.flow_family`) started
at the pooled restarts' Gaussians with the highest importance-weighted evidence.

It goes on only where the importance step could not correct the Gaussian's draws, and
either that :math:`\hat k` or a low share of the draws counted by the weights (their
effective sample size, Kong 1992, under half: :data:`ESS_SHARE_FAR`) says the Gaussian
misses. The Gaussian's :math:`\hat k` is the median over its pooled restarts: one restart's
estimate moves by about 0.1 between seeds at a few thousand draws, and a single restart
just over 0.7 while the others sit below is that noise, not a family that misses (the
HMM's restarts at 0.74, 0.61, 0.72, 0.63 on one seed, where the Gaussian lands; a flow
there took 12 s against NUTS's 3.4 s for an ELBO gain of 0.045 nats). Where the family
misses, the restarts agree that it does (heights: 0.90, 0.68, 0.80, 0.79; the Poisson GP
0.68-0.96; the centred eight schools 0.63 to infinity).

The flow is kept where its ELBO, estimated at its own draws, is above the Gaussian's by
more than two standard errors: the ELBO is :math:`\log p(x) - \mathrm{KL}(q\,\|\,p)`,
so the higher one is the closer q, whatever either's :math:`\hat k`. Else the Gaussian
fit is returned, and ``info["escalation"]`` says why. Flows that have not risen above
the Gaussian's ELBO by two standard errors after :data:`~ppl_notes.vi.flow_vi.GAIN_CHECK`
steps are stopped there, and the Gaussian is kept. ``guide="flow"`` always fits and keeps
the flow; ``guide="fullrank"`` and the other families never do: they are exactly what
they say.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ppl_notes.vi.flow_vi import GAIN_CHECK, WINDOW
from ppl_notes.vi.importance import ESS_SHARE_EXACT, KHAT_USABLE

__all__ = ["escalation_wanted", "pooled_indices", "flow_verdict", "ESCALATION_MODES",
           "FLOW_SEED", "FLOW_MAX_DIM", "FLOW_RESTARTS", "ESS_SHARE_FAR", "elbo_at_draws",
           "flow_facts", "no_gain"]

#: ``auto``: default SVI, escalating on k-hat; ``always``: ``guide="flow"``; ``never``: a
#: family named by the caller
ESCALATION_MODES = ("auto", "always", "never")
#: Below this median ESS share of uncorrected weights the Gaussian is far from the
#: posterior whatever k-hat's tail fit says: the banana's Gaussian at one seed had shares
#: of 3-15% and k-hats of 0.6-0.7, and sds 0.36-0.53 of the truth's; the HMM's, which
#: lands, 72-90%
ESS_SHARE_FAR = 0.5
#: Offsets the flows' seeds from their Gaussians'
FLOW_SEED = 104729
#: Flows fitted, from the pooled restarts' Gaussians with the highest evidence: two are
#: enough for R-hat across them to say whether they agree, and each further one costs
#: its draws' potential at every step (heights: 13 ms a step with four, 9 with two)
FLOW_RESTARTS = 2
#: Default SVI goes on to a flow up to this many unconstrained elements (the full-rank
#: family's limit, whose Cholesky factor is the flow's base)
FLOW_MAX_DIM = 200


def pooled_indices(result) -> list[int]:
    """The restarts whose draws a (stacked) result pools; ``[0]`` for a single fit."""
    restarts = result.info.get("restarts")
    if not restarts:
        return [0]
    return [r["restart"] for r in restarts if r.get("pooled", True)]


def _pooled_khats(result) -> tuple[list[float], list[float]]:
    """The pooled restarts' k-hats and raw-weight ESS shares (empty without importance)."""
    importance = result.info.get("importance") or {}
    khat, share = importance.get("khat"), importance.get("ess_share")
    if not khat:
        return [], []
    restarts = result.info.get("restarts")  # in the order of the importance step's lists
    pooled = [i for i, r in enumerate(restarts) if r.get("pooled", True)] if restarts \
        else [0]
    return [float(khat[i]) for i in pooled], [float(share[i]) for i in pooled]


def _worst_khat(result) -> float:
    """The worst k-hat over the pooled restarts (NaN without importance)."""
    khat, _ = _pooled_khats(result)
    return max(khat) if khat else math.nan


def _listed(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def escalation_wanted(mode: str, result, dim: int) -> tuple[bool, str]:
    """Whether to fit a flow after the Gaussian ``result``, and why (a sentence).

    Parameters
    ----------
    mode : {"auto", "always", "never"}
        See :data:`ESCALATION_MODES`.
    result : RunResult
        The Gaussian fit, its importance step done (``info["importance"]``).
    dim : int
        Unconstrained elements.
    """
    if mode == "never":
        return False, "the family was named (guide=...): it is fitted as it is"
    if mode == "always":
        return True, "guide='flow'"
    if dim > FLOW_MAX_DIM:
        return False, (f"{dim} unconstrained elements (> {FLOW_MAX_DIM}): the flow is not "
                       "tried by default; guide='flow' fits one")
    khat, share = _pooled_khats(result)
    if not khat:
        return False, "no importance step (importance='none'): no k-hat to decide by"
    if min(share) >= ESS_SHARE_EXACT:
        return False, (f"the Gaussian's importance weights are near uniform (ESS share "
                       f"{min(share):.3f}): it is the posterior")
    if result.info["importance"].get("applied"):
        return False, ("the Gaussian's draws were resampled by importance weights that can "
                       "be trusted: they are the posterior's")
    median, median_share = float(np.median(khat)), float(np.median(share))
    if median > KHAT_USABLE:
        return True, (f"the Gaussian's Pareto k-hat is {median:.2f} (> {KHAT_USABLE}; median "
                      f"of the restarts' {_listed(khat)}): it misses part of the posterior")
    if median_share < ESS_SHARE_FAR:
        return True, (f"the Gaussian's importance weights count {median_share:.0%} of its "
                      f"draws (the median restart's ESS share, < {ESS_SHARE_FAR:.0%}) and "
                      "could not correct them: it is far from the posterior")
    return False, (f"the Gaussian's Pareto k-hat is {median:.2f} (<= {KHAT_USABLE}; median "
                   f"of the restarts' {_listed(khat)}) and its weights count "
                   f"{median_share:.0%} of its draws")


def elbo_at_draws(result, num_draws: int) -> tuple[float, float]:
    r"""The ELBO :math:`\frac1S\sum_s \log p(x, u_s) - \log q(u_s)` at q's own draws.

    The first ``num_draws`` proposals of each pooled restart's importance step (q's own
    draws, in the unconstrained coordinates both densities share), and its standard
    error; NaN where the fit holds no proposals.
    """
    if not result.importance:
        return math.nan, math.nan
    log_p = np.asarray(result.importance["log_p"], dtype=float)
    log_q = np.asarray(result.importance["log_q"], dtype=float)
    if log_p.ndim == 1:
        log_p, log_q = log_p[None], log_q[None]
    # a stacked result holds the pooled restarts' proposals only, one row each
    ratios = (log_p[:, :num_draws] - log_q[:, :num_draws]).reshape(-1)
    if not np.isfinite(ratios).all():
        return -math.inf, math.nan
    return float(ratios.mean()), float(ratios.std(ddof=1) / math.sqrt(ratios.size))


def flow_facts(traces: list, seconds: float) -> dict[str, Any]:
    """What ``info["escalation"]`` says of the flows' fit, whatever was kept."""
    return {"flow_steps": [len(t.elbo) for t in traces],
            "flow_stopped": [t.stopped for t in traces],
            "flow_gradients": int(sum(t.evaluations for t in traces)),
            "flow_seconds": float(seconds)}


def no_gain(reason: str, baseline: float, facts: dict[str, Any]) -> dict[str, Any]:
    """``info["escalation"]`` where the flows were stopped early, having gained nothing.

    ``facts``: :func:`flow_facts`.
    """
    return {"to_flow": True, "reason": reason, "kept": False,
            "why": (f"no flow's ELBO rose above the Gaussian's {baseline:.3f} by two "
                    f"standard errors in {GAIN_CHECK} steps: the Gaussian is kept"),
            "gaussian_elbo": baseline, **facts}


def flow_verdict(gaussian, flow, reason: str, traces: list, facts: dict[str, Any], mode: str,
                 num_draws: int, baseline: tuple[float, float]) -> dict[str, Any]:
    """``info["escalation"]``: both fits' ELBOs and k-hats, the flow's fit, which is kept.

    ``facts``: :func:`flow_facts`; ``num_draws``: q's own draws per restart, at which the
    flow's ELBO is estimated; ``baseline``: the Gaussian's, and its standard error
    (:func:`elbo_at_draws`).
    """
    gaussian_khat, flow_khat = _worst_khat(gaussian), _worst_khat(flow)
    gaussian_elbo, gaussian_error = baseline
    flow_elbo, flow_error = elbo_at_draws(flow, num_draws)
    margin = 2 * math.hypot(gaussian_error, flow_error)
    if mode == "always":
        kept, why = True, "guide='flow' keeps the flow"
    elif flow_elbo > gaussian_elbo + margin:
        kept, why = True, (f"the flow's ELBO {flow_elbo:.3f} is above the Gaussian's "
                           f"{gaussian_elbo:.3f} (by more than {margin:.3f}, two standard "
                           "errors): it is nearer the posterior in KL")
    else:
        kept, why = False, (f"the flow's ELBO {flow_elbo:.3f} is not above the Gaussian's "
                            f"{gaussian_elbo:.3f} by two standard errors ({margin:.3f}): "
                            "the Gaussian is kept")
    return {"to_flow": True, "reason": reason, "kept": kept, "why": why,
            "gaussian_family": gaussian.info.get("family"),
            "gaussian_elbo": gaussian_elbo, "flow_elbo": flow_elbo,
            "gaussian_khat": gaussian_khat, "flow_khat": flow_khat,
            "flow_final_elbo": [float(np.nanmean(t.elbo[-WINDOW:])) if t.elbo else math.nan
                                for t in traces],
            **facts}
