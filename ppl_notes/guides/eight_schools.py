"""Mean-field guides for the eight-schools stories (Normal for real sites, LogNormal for tau)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_notes.models.eight_schools import centered, noncentered
from ppl_notes.story import guide as _guide

__all__ = ["centered_meanfield", "noncentered_meanfield"]


def _hyperposterior(dtype):
    mu_loc = pyro.param("mu_loc_q", torch.tensor(0.0, dtype=dtype))
    mu_scale = pyro.param("mu_scale_q", torch.tensor(1.0, dtype=dtype),
                          constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    tau_loc = pyro.param("tau_loc_q", torch.tensor(1.0, dtype=dtype))
    tau_scale = pyro.param("tau_scale_q", torch.tensor(0.5, dtype=dtype),
                           constraint=constraints.positive)
    pyro.sample("tau", dist.LogNormal(tau_loc, tau_scale))


def _effects(site, sigma):
    loc = pyro.param(f"{site}_loc_q", torch.zeros_like(sigma))
    scale = pyro.param(f"{site}_scale_q", torch.ones_like(sigma),
                       constraint=constraints.positive)
    with pyro.plate("schools", sigma.shape[-1]):
        pyro.sample(site, dist.Normal(loc, scale))


@_guide(centered, name="centered_meanfield")
def centered_meanfield(y=None, sigma=None):
    """q(mu) q(tau) prod_j q(theta_j): independent Normals, LogNormal for tau."""
    _hyperposterior(sigma.dtype)
    _effects("theta", sigma)


@_guide(noncentered, name="noncentered_meanfield")
def noncentered_meanfield(y=None, sigma=None):
    """q(mu) q(tau) prod_j q(theta_tilde_j): independent Normals, LogNormal for tau."""
    _hyperposterior(sigma.dtype)
    _effects("theta_tilde", sigma)
