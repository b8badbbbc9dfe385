"""Guides for the correlated Gaussian: mean-field (too narrow) and full-rank (exact)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_notes.models.correlated import gaussian
from ppl_notes.story import guide as _guide

__all__ = ["meanfield", "fullrank"]


@_guide(gaussian, name="meanfield")
def meanfield(rho=0.9):
    """q(z1) q(z2): two independent Normals."""
    for site in ("z1", "z2"):
        loc = pyro.param(f"{site}_loc_q", torch.tensor(0.5, dtype=torch.float64))
        scale = pyro.param(f"{site}_scale_q", torch.tensor(1.0, dtype=torch.float64),
                           constraint=constraints.positive)
        pyro.sample(site, dist.Normal(loc, scale))


@_guide(gaussian, name="fullrank")
def fullrank(rho=0.9):
    """q(z1) q(z2 | z1): a bivariate Normal written as a story of its own (exact family)."""
    loc = pyro.param("loc_q", torch.tensor([0.5, 0.5], dtype=torch.float64))
    scale = pyro.param("scale_q", torch.ones(2, dtype=torch.float64),
                       constraint=constraints.positive)
    slope = pyro.param("slope_q", torch.tensor(0.0, dtype=torch.float64))
    z1 = pyro.sample("z1", dist.Normal(loc[0], scale[0]))
    pyro.sample("z2", dist.Normal(loc[1] + slope * (z1 - loc[0]), scale[1]))
