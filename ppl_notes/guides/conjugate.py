"""Exact variational families for the conjugate stories (the posterior is in the family)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_notes.models.conjugate import beta_bernoulli, normal_mean
from ppl_notes.story import guide as _guide

__all__ = ["normal_mean_guide", "beta_bernoulli_guide"]


@_guide(normal_mean, name="normal_mean_guide")
def normal_mean_guide(x=None, num_obs=None, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0):
    """q(mu) = Normal(loc, scale): the exact posterior's family."""
    dtype = x.dtype if x is not None else torch.float64
    loc = pyro.param("mu_loc", torch.tensor(0.0, dtype=dtype))
    scale = pyro.param("mu_scale", torch.tensor(1.0, dtype=dtype), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


@_guide(beta_bernoulli, name="beta_bernoulli_guide")
def beta_bernoulli_guide(y=None, num_obs=None, prior_a=1.0, prior_b=1.0):
    """q(p) = Beta(a, b): the exact posterior's family."""
    dtype = y.dtype if y is not None else torch.float64
    a = pyro.param("p_a", torch.tensor(1.0, dtype=dtype), constraint=constraints.positive)
    b = pyro.param("p_b", torch.tensor(1.0, dtype=dtype), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))
