"""A hand-written mean-field guide for the heights story.

Each latent global gets a family on its own support: a Dirichlet for the mixing weights
(simplex), a Normal pushed through the ordered transform for the means (ordered vector),
a LogNormal for each component's sd (positive). Each person's gender is left to exact
enumeration, so ``infer`` uses TraceEnum_ELBO and q(gender | globals) is the exact
conditional posterior.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform
from torch.distributions import constraints

from ppl_notes.models.heights import model as heights
from ppl_notes.story import guide as _guide

__all__ = ["meanfield"]


def _initial_means(height, num_groups, dtype):
    if height is None:
        return torch.linspace(160.0, 180.0, num_groups, dtype=dtype)
    quantiles = torch.linspace(0.25, 0.75, num_groups, dtype=dtype)
    return torch.quantile(height, quantiles)


@_guide(heights, name="meanfield")
def meanfield(height=None, num_people=None, num_groups=2, mu_loc=170.0, mu_scale=20.0,
              sigma_median=7.0, sigma_spread=0.5, alpha_concentration=1.0):
    """q(alpha) Dirichlet, q(mu) ordered Normal, q(sigma_k) LogNormal; gender enumerated."""
    dtype = height.dtype if height is not None else torch.float64
    concentration = pyro.param(
        "alpha_concentration_q", lambda: 10.0 * torch.ones(num_groups, dtype=dtype),
        constraint=constraints.positive,
    )
    pyro.sample("alpha", dist.Dirichlet(concentration))

    ordered = OrderedTransform()
    mu_loc_q = pyro.param(
        "mu_loc_q", lambda: ordered.inv(_initial_means(height, num_groups, dtype))
    )
    mu_scale_q = pyro.param(
        "mu_scale_q", lambda: 0.1 * torch.ones(num_groups, dtype=dtype),
        constraint=constraints.positive,
    )
    pyro.sample(
        "mu",
        dist.TransformedDistribution(dist.Normal(mu_loc_q, mu_scale_q).to_event(1), [ordered]),
    )
    sigma_loc_q = pyro.param(
        "sigma_loc_q", lambda: torch.full((num_groups,), 1.7, dtype=dtype)
    )
    sigma_scale_q = pyro.param(
        "sigma_scale_q", lambda: 0.1 * torch.ones(num_groups, dtype=dtype),
        constraint=constraints.positive,
    )
    with pyro.plate("components", num_groups):
        pyro.sample("sigma", dist.LogNormal(sigma_loc_q, sigma_scale_q))
