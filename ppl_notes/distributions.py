"""Distributions the stories need that Pyro does not ship."""

from __future__ import annotations

import math

import torch
from pyro.distributions import MixtureSameFamily, Normal, TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

__all__ = ["NormalMixture", "OrderedNormal"]


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


class NormalMixture(MixtureSameFamily):
    r"""A mixture of univariate Normals, its log density laid out component-major.

    .. math:: p(x) = \sum_{k=1}^K w_k\,\mathcal N(x \mid \mu_k, \sigma_k^2)

    The same distribution as ``MixtureSameFamily(Categorical(w), Normal(mu, sigma))``
    (sampling, mean, variance are inherited), but :meth:`log_prob` puts the K components
    on the leading dim and sums them with a log-sum-exp over it. The data dim is then the
    innermost, contiguous one, so a compiled kernel (inductor) vectorises over the data
    instead of looping over a K-wide last dim: about 4x faster forward and backward at
    N=1e5, K=2 on a CPU (``benchmarks/bench_svi.py``).

    Parameters
    ----------
    weights : Tensor
        Mixture weights, shape ``(..., K)``, summing to one over the last dim.
    loc, scale : Tensor
        The components' means and sds, shape ``(..., K)``.
    """

    def __init__(self, weights, loc, scale, validate_args=None):
        from pyro.distributions import Categorical

        super().__init__(Categorical(probs=weights), Normal(loc, scale),
                         validate_args=validate_args)
        # The parameters before any plate expands them: the log density is computed on
        # these and broadcast against the data, never on (N, K) copies.
        self._log_weights = self.mixture_distribution.logits
        self._loc, self._scale = self.component_distribution.loc, self.component_distribution.scale

    def expand(self, batch_shape, _instance=None):
        """Expand the batch shape (as Pyro plates do); the log density keeps the originals."""
        new = self._get_checked_instance(NormalMixture, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._log_weights, new._loc, new._scale = self._log_weights, self._loc, self._scale
        return new

    def log_prob(self, value):
        r"""Log density, a log-sum-exp over a leading component dim.

        :math:`\log p(x) = \operatorname{logsumexp}_k\big(\log w_k - \log\sigma_k
        - \tfrac12 ((x-\mu_k)/\sigma_k)^2\big) - \tfrac12\log 2\pi`.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_weights = self._log_weights - self._log_weights.logsumexp(-1, keepdim=True)
        log_weights, loc, scale = (
            tensor.movedim(-1, 0)
            for tensor in torch.broadcast_tensors(log_weights, self._loc, self._scale))
        standardised = (value - loc) * scale.reciprocal()
        log_joint = (log_weights - scale.log()) - 0.5 * standardised * standardised
        return torch.logsumexp(log_joint, dim=0) - 0.5 * math.log(2 * math.pi)
