r"""When default SVI goes on from its Gaussian to a flow, and which of the two it keeps.

A Gaussian cannot be a posterior that is not Gaussian in the unconstrained coordinates:
a funnel, a skewed or heavy tail, a curved ridge. Pareto :math:`\hat k` of the
importance ratios :math:`p/q` at q's draws says how much it misses (Yao et al. 2018;
above 0.7 the importance-corrected estimates cannot be trusted: Vehtari et al. 2024).
So default SVI (no guide given) fits its Gaussian first, and where that Gaussian's
:math:`\hat k` exceeds 0.7 it fits a flow (:mod:`~ppl_notes.vi.flow_family`) started
at the best pooled restart's Gaussian (the highest importance-weighted evidence). The
flow is kept where its ELBO, estimated at its own draws, is above the Gaussian's by more
than two standard errors: the ELBO is :math:`\log p(x) - \mathrm{KL}(q\,\|\,p)`, so the
higher one is the closer q, whatever either's :math:`\hat k`. Else the Gaussian fit is
returned, and ``info["escalation"]`` says why. ``guide="flow"`` always fits and keeps
the flow; ``guide="fullrank"`` and the other families never do: they are exactly what
they say.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ppl_notes.vi.flow_vi import WINDOW
from ppl_notes.vi.importance import ESS_SHARE_EXACT, KHAT_USABLE

__all__ = ["escalation_wanted", "pooled_indices", "flow_verdict", "ESCALATION_MODES",
           "FLOW_SEED", "FLOW_MAX_DIM", "FLOW_RESTARTS", "elbo_at_draws"]

#: ``auto``: default SVI, escalating on k-hat; ``always``: ``guide="flow"``; ``never``: a
#: family named by the caller
ESCALATION_MODES = ("auto", "always", "never")
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


def _worst_khat(result) -> tuple[float, float]:
    """The worst k-hat and the smallest raw-weight ESS share over the pooled restarts."""
    importance = result.info.get("importance") or {}
    khat, share = importance.get("khat"), importance.get("ess_share")
    if not khat:
        return math.nan, math.nan
    restarts = result.info.get("restarts")  # in the order of the importance step's lists
    pooled = [i for i, r in enumerate(restarts) if r.get("pooled", True)] if restarts \
        else [0]
    return (max(float(khat[i]) for i in pooled), min(float(share[i]) for i in pooled))


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
    khat, share = _worst_khat(result)
    if not math.isfinite(share):
        return False, "no importance step (importance='none'): no k-hat to decide by"
    if share >= ESS_SHARE_EXACT:
        return False, (f"the Gaussian's importance weights are near uniform (ESS share "
                       f"{share:.3f}): it is the posterior")
    if not khat > KHAT_USABLE:
        return False, f"the Gaussian's Pareto k-hat is {khat:.2f} (<= {KHAT_USABLE})"
    return True, (f"the Gaussian's Pareto k-hat is {khat:.2f} (> {KHAT_USABLE}): it misses "
                  "part of the posterior")


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


def flow_verdict(gaussian, flow, reason: str, traces: list, seconds: float, mode: str,
                 num_draws: int) -> dict[str, Any]:
    """``info["escalation"]``: both fits' ELBOs and k-hats, the flow's fit, which is kept.

    ``num_draws``: q's own draws per restart, at which the ELBOs are estimated.
    """
    gaussian_khat, _ = _worst_khat(gaussian)
    flow_khat, _ = _worst_khat(flow)
    gaussian_elbo, gaussian_error = elbo_at_draws(gaussian, num_draws)
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
            "flow_steps": [len(t.elbo) for t in traces],
            "flow_stopped": [t.stopped for t in traces],
            "flow_final_elbo": [float(np.nanmean(t.elbo[-WINDOW:])) if t.elbo else math.nan
                                for t in traces],
            "flow_gradients": int(sum(t.evaluations for t in traces)),
            "flow_seconds": float(seconds)}
