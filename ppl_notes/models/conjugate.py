r"""Conjugate stories whose posterior and evidence are known in closed form.

They are the truth that inference is checked against: a Normal mean with known noise
under a Normal prior, and a coin's bias under a Beta prior (Beta–Bernoulli).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from scipy.special import betaln

from ppl_notes.story import model as _model

__all__ = [
    "normal_mean",
    "beta_bernoulli",
    "normal_mean_posterior",
    "normal_mean_log_evidence",
    "beta_bernoulli_posterior",
    "beta_bernoulli_log_evidence",
]


def _normal_mean_default_data():
    rng = np.random.default_rng(20210110)
    return {"x": rng.normal(1.5, 1.0, size=50)}


def _beta_bernoulli_default_data():
    rng = np.random.default_rng(20210110)
    return {"y": (rng.random(40) < 0.3).astype(float)}


@_model(observed="x", data=_normal_mean_default_data, name="normal_mean")
def normal_mean(x=None, num_obs=None, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0):
    """Draw a mean mu ~ Normal(prior_loc, prior_scale); then x_i ~ Normal(mu, noise_scale)."""
    dtype = x.dtype if x is not None else torch.float64
    num_obs = x.shape[-1] if x is not None else (num_obs or 20)
    mu = pyro.sample("mu", dist.Normal(torch.tensor(prior_loc, dtype=dtype),
                                       torch.tensor(prior_scale, dtype=dtype)))
    with pyro.plate("observations", num_obs):
        pyro.sample("x", dist.Normal(mu, torch.tensor(noise_scale, dtype=dtype)), obs=x)


@_model(observed="y", data=_beta_bernoulli_default_data, name="beta_bernoulli")
def beta_bernoulli(y=None, num_obs=None, prior_a=1.0, prior_b=1.0):
    """Draw a coin's bias p ~ Beta(prior_a, prior_b); then each flip y_i ~ Bernoulli(p)."""
    dtype = y.dtype if y is not None else torch.float64
    num_obs = y.shape[-1] if y is not None else (num_obs or 20)
    p = pyro.sample("p", dist.Beta(torch.tensor(prior_a, dtype=dtype),
                                   torch.tensor(prior_b, dtype=dtype)))
    with pyro.plate("observations", num_obs):
        pyro.sample("y", dist.Bernoulli(p), obs=y)


def normal_mean_posterior(x, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0):
    r"""Exact posterior of ``mu``: a Normal with.

    .. math:: \tau_n = \tau_0 + n/\sigma^2, \quad
              m_n = (\tau_0 m_0 + \textstyle\sum_i x_i/\sigma^2)/\tau_n .

    Returns
    -------
    (float, float)
        Posterior mean and standard deviation.
    """
    x = np.asarray(x, dtype=float)
    precision = 1.0 / prior_scale**2 + x.size / noise_scale**2
    mean = (prior_loc / prior_scale**2 + x.sum() / noise_scale**2) / precision
    return float(mean), float(precision**-0.5)


def normal_mean_log_evidence(x, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0) -> float:
    r"""Exact log evidence of the Normal-mean story.

    ``x`` is jointly Normal with mean ``prior_loc`` and covariance
    :math:`\sigma^2 I + s_0^2 \mathbf 1 \mathbf 1^\top`.
    """
    x = np.asarray(x, dtype=float) - prior_loc
    n, s2, v0 = x.size, noise_scale**2, prior_scale**2
    return float(
        -0.5 * n * math.log(2 * math.pi * s2)
        - 0.5 * math.log1p(n * v0 / s2)
        - 0.5 * (x @ x) / s2
        + 0.5 * v0 * x.sum() ** 2 / (s2 * (s2 + n * v0))
    )


def beta_bernoulli_posterior(y, prior_a=1.0, prior_b=1.0):
    """Exact posterior of ``p``: Beta(prior_a + heads, prior_b + tails), as (a, b)."""
    y = np.asarray(y, dtype=float)
    heads = float(y.sum())
    return prior_a + heads, prior_b + y.size - heads


def beta_bernoulli_log_evidence(y, prior_a=1.0, prior_b=1.0) -> float:
    r"""Exact :math:`\log p(y) = \log B(a + k, b + n - k) - \log B(a, b)`."""
    a, b = beta_bernoulli_posterior(y, prior_a, prior_b)
    return float(betaln(a, b) - betaln(prior_a, prior_b))
