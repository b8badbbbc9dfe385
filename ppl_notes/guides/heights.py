"""Hand-written guides for the heights story: mean-field and full-rank.

Mean-field: each latent global gets a family on its own support: a Dirichlet for the mixing weights
(simplex), a Normal pushed through the ordered transform for the means (ordered vector),
a LogNormal for each component's sd (positive). Each person's gender is left to exact
enumeration, so ``infer`` uses TraceEnum_ELBO and q(gender | globals) is the exact
conditional posterior.

Full-rank: one multivariate Normal over all the globals' unconstrained coordinates
(stick-breaking logits of alpha, the ordered transform's coordinates of mu, log sigma),
pushed through the same bijections, as Pyro's ``AutoMultivariateNormal`` does, but
started from the data. The weights, means and sds of this posterior are strongly
correlated: mean-field VI gets their sds 2-4x too small and its means off by about half
a posterior sd; the full-rank family follows the correlations.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform
from torch.distributions import biject_to, constraints

from ppl_notes.models.heights import model as heights
from ppl_notes.story import guide as _guide

__all__ = ["meanfield", "fullrank"]


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


@_guide(heights, name="fullrank")
def fullrank(height=None, num_people=None, num_groups=2, mu_loc=170.0, mu_scale=20.0,
             sigma_median=7.0, sigma_spread=0.5, alpha_concentration=1.0):
    r"""q(alpha, mu, sigma): one multivariate Normal on the unconstrained coordinates.

    :math:`u \sim \mathcal N(m, LL^\top)` with :math:`u = (u_\alpha, u_\mu, u_\sigma)`;
    alpha = stick-breaking(:math:`u_\alpha`), mu = ordered(:math:`u_\mu`), sigma =
    exp(:math:`u_\sigma`), each a point mass carrying :math:`-\log|\det J|` so that
    log q is the density of the constrained values (Kucukelbir et al. 2017, ADVI).
    Gender is enumerated, as in :func:`meanfield`.
    """
    dtype = height.dtype if height is not None else torch.float64
    simplex, ordered, positive = (biject_to(constraints.simplex), OrderedTransform(),
                                  biject_to(constraints.positive))
    sizes = [num_groups - 1, num_groups, num_groups]

    def initial_loc():
        return torch.cat([
            simplex.inv(torch.full((num_groups,), 1.0 / num_groups, dtype=dtype)),
            ordered.inv(_initial_means(height, num_groups, dtype)),
            torch.full((num_groups,), 1.7, dtype=dtype),
        ])

    loc = pyro.param("loc_q", initial_loc)
    scale_tril = pyro.param("scale_tril_q", lambda: 0.1 * torch.eye(sum(sizes), dtype=dtype),
                            constraint=constraints.lower_cholesky)
    unconstrained = pyro.sample("_unconstrained",
                                dist.MultivariateNormal(loc, scale_tril=scale_tril),
                                infer={"is_auxiliary": True})
    u_alpha, u_mu, u_sigma = unconstrained.split(sizes, dim=-1)
    for site, transform, u in (("alpha", simplex, u_alpha), ("mu", ordered, u_mu)):
        value = transform(u)
        pyro.sample(site, dist.Delta(value, log_density=-transform.log_abs_det_jacobian(u, value),
                                     event_dim=1))
    # u has batch dims for any outer plates (a plate over draws at dim -2 makes it
    # (draws, 1, 5)); sigma lives in the components plate at dim -1, where that 1 is
    u_sigma = u_sigma.reshape(u_sigma.shape[:-2] + (num_groups,))
    sigma = positive(u_sigma)
    with pyro.plate("components", num_groups):
        pyro.sample("sigma", dist.Delta(
            sigma, log_density=-positive.log_abs_det_jacobian(u_sigma, sigma)))
