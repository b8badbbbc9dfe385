r"""The evidence log p(x) from a variational fit, and the KL gap (notes §2.e–2.f).

For any q,

.. math:: \log p(x) = \mathrm{ELBO}(q) + \mathrm{KL}\big(q(z)\,\|\,p(z\mid x)\big),
          \qquad \mathrm{ELBO}(q) = \mathbb E_q[\log p(x,z) - \log q(z)] \le \log p(x).

With draws :math:`z_s \sim q` and log weights :math:`w_s = \log p(x, z_s) - \log q(z_s)`:

* the ELBO estimate :math:`\bar w`, standard error :math:`\mathrm{sd}(w)/\sqrt S`;
* the importance-sampling estimate :math:`\log \frac1S\sum_s e^{w_s}` of
  :math:`\log p(x)` (consistent; biased low for small S by Jensen), standard error by the
  delta method, :math:`\mathrm{sd}(e^{w})/(\sqrt S\,\overline{e^{w}})`;
* their difference, the KL gap :math:`\mathrm{KL}(q\,\|\,p)`, with the delta-method
  standard error of the difference computed on the same draws.

The importance estimate is trustworthy only when the weights are not heavy-tailed: the
Pareto k-hat of the weights (Yao et al. 2018) says when.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

__all__ = ["Estimate", "elbo_estimate", "importance_estimate", "kl_gap_estimate"]


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate with its standard error."""

    value: float
    standard_error: float
    num_samples: int
    how: str
    #: where the draws came from, where a fit had several guides (its restarts)
    source: str = ""

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return (f"Estimate({self.how}: {self.value:.6g} ± {self.standard_error:.2g}, "
                f"S={self.num_samples}{'; ' + self.source if self.source else ''})")


def _weights(log_p, log_q) -> np.ndarray:
    weights = (np.asarray(log_p, dtype=float).reshape(-1)
               - np.asarray(log_q, dtype=float).reshape(-1))
    if weights.size < 2 or not np.all(np.isfinite(weights)):
        raise ValueError("log weights log p - log q must be at least two finite numbers")
    return weights


def elbo_estimate(log_p, log_q) -> Estimate:
    """The ELBO: the mean log weight, with its standard error."""
    weights = _weights(log_p, log_q)
    return Estimate(float(weights.mean()), float(weights.std(ddof=1) / math.sqrt(weights.size)),
                    weights.size, "elbo")


def importance_estimate(log_p, log_q) -> Estimate:
    """Log p(x) by importance sampling with q as the proposal."""
    weights = _weights(log_p, log_q)
    scaled = np.exp(weights - weights.max())
    error = scaled.std(ddof=1) / (math.sqrt(weights.size) * scaled.mean())
    return Estimate(float(logsumexp(weights) - math.log(weights.size)), float(error),
                    weights.size, "importance")


def kl_gap_estimate(log_p, log_q) -> Estimate:
    r"""KL(q || p(z|x)) = importance estimate of log p(x) − ELBO, on the same draws."""
    weights = _weights(log_p, log_q)
    scaled = np.exp(weights - weights.max())
    influence = scaled / scaled.mean() - weights  # delta method for log mean e^w − mean w
    value = importance_estimate(log_p, log_q).value - weights.mean()
    return Estimate(float(value), float(influence.std(ddof=1) / math.sqrt(weights.size)),
                    weights.size, "kl_gap")
