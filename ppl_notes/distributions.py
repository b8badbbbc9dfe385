"""Distributions the stories need that Pyro does not ship."""

from __future__ import annotations

import math

import torch
from pyro.distributions import Normal, TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["OrderedNormal"]


class OrderedNormal(TorchDistribution):
    r"""The order statistics of ``size`` i.i.d. Normal draws: an ordered vector.

    It identifies exchangeable mixture components (no label switching): the components'
    means are i.i.d. :math:`\mathcal N(\text{loc}, \text{scale}^2)` a priori, then sorted,
    so component 0 is the one with the smallest mean. Its density on the ordered cone is

    .. math:: p(\mu_{1:K}) = K!\,\prod_k \mathcal N(\mu_k \mid \text{loc}, \text{scale}^2),
              \qquad \mu_1 < \dots < \mu_K .

    Parameters
    ----------
    loc, scale : float or Tensor
        Location and scale of the i.i.d. Normals (broadcast over batch dims).
    size : int
        The number of ordered elements (the event size).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector
    has_rsample = True

    def __init__(self, loc, scale, size: int, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        self.size = int(size)
        super().__init__(self.loc.shape, torch.Size([self.size]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """Expand the batch shape (as Pyro plates do)."""
        batch_shape = torch.Size(batch_shape)
        return OrderedNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape),
                             self.size, validate_args=False)

    def _base(self) -> Normal:
        return Normal(self.loc.unsqueeze(-1), self.scale.unsqueeze(-1))

    def rsample(self, sample_shape=()):
        """Draw i.i.d. Normals and sort them."""
        shape = self._extended_shape(sample_shape)
        draws = self._base().expand(shape).rsample()
        return torch.sort(draws, dim=-1).values

    def log_prob(self, value):
        """Log density on the ordered cone: the i.i.d. Normal log density plus log K!."""
        return self._base().log_prob(value).sum(-1) + math.lgamma(self.size + 1)
