r"""A Gaussian in the unconstrained space: mean-field, full-rank or low-rank.

The three autoguides of :mod:`ppl_notes.inference.svi` are Gaussians
:math:`q = \mathcal N(\mu, \Sigma)` over the flat vector of every continuous latent
element, mapped onto each site's support by its bijection. This module holds one such
Gaussian per fit as plain tensors, draws :math:`z = \mu + L\varepsilon` from it, and
gives what the optimisers need: its entropy's :math:`\log|L|`, its precision, and the
KL divergence between two of them (closed form: a step's size).

=============  ==================================  ====================================
family         parameters                          :math:`\Sigma`
=============  ==================================  ====================================
``meanfield``  ``mean`` (d,), ``scale`` (d,)       :math:`\operatorname{diag}(s^2)`
``fullrank``   ``mean``, ``tril`` (d, d)           :math:`LL^\top`
``lowrank``    ``mean``, ``scale``, ``factor``     :math:`\operatorname{diag}(s^2) + WW^\top`
               (d, r)
=============  ==================================  ====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

__all__ = ["Gaussian", "FAMILIES", "FAMILY_GUIDES", "kl_divergence"]

#: family -> (the Pyro autoguide it is, that autoguide's name): a fit on the potential is
#: handed back as the autoguide with the same Gaussian
FAMILY_GUIDES = {"meanfield": (AutoNormal, "AutoNormal"),
                 "fullrank": (AutoMultivariateNormal, "AutoMultivariateNormal"),
                 "lowrank": (AutoLowRankMultivariateNormal, "AutoLowRankMultivariateNormal")}

FAMILIES = ("meanfield", "fullrank", "lowrank")


@dataclass
class Gaussian:
    """One fit's Gaussian (module docstring); every tensor is float64."""

    family: str
    mean: torch.Tensor
    scale: torch.Tensor | None = None
    tril: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """The number of unconstrained elements."""
        return self.mean.shape[-1]

    def covariance(self) -> torch.Tensor:
        r""":math:`\\Sigma`, ``(d, d)``."""
        if self.family == "fullrank":
            return self.tril @ self.tril.T
        covariance = torch.diag(self.scale**2)
        if self.family == "lowrank":
            covariance = covariance + self.factor @ self.factor.T
        return covariance

    def cholesky(self) -> torch.Tensor:
        r"""A lower-triangular :math:`L` with :math:`LL^\\top = \\Sigma`."""
        if self.family == "fullrank":
            return self.tril
        if self.family == "meanfield":
            return torch.diag(self.scale)
        return torch.linalg.cholesky(self.covariance())

    def log_det_factor(self) -> torch.Tensor:
        r""":math:`\tfrac12\log|\Sigma|` (the entropy less :math:`\tfrac d2\log 2\pi e`)."""
        if self.family == "fullrank":
            return self.tril.diagonal().abs().log().sum()
        if self.family == "meanfield":
            return self.scale.abs().log().sum()
        inner = torch.eye(self.factor.shape[1], dtype=self.mean.dtype) + \
            (self.factor / self.scale[:, None] ** 2).T @ self.factor
        return self.scale.abs().log().sum() + 0.5 * torch.logdet(inner)

    def draw(self, epsilon: torch.Tensor) -> torch.Tensor:
        r"""Points :math:`z = \mu + L\varepsilon` for standard-normal ``epsilon`` ``(M, d)``.

        The low-rank family takes ``(M, d + r)``: :math:`z = \mu + s\circ\varepsilon_{:d}
        + W\varepsilon_{d:}`.
        """
        if self.family == "fullrank":
            return self.mean + epsilon @ self.tril.T
        if self.family == "meanfield":
            return self.mean + epsilon * self.scale
        d = self.dim
        return self.mean + epsilon[:, :d] * self.scale + epsilon[:, d:] @ self.factor.T

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        r"""The Gaussian's log density at ``points`` ``(n, d)``.

        :math:`-\tfrac12\|L^{-1}(x-\mu)\|^2 - \log|L| - \tfrac d2\log 2\pi`, written out
        (torch's distributions import their shape machinery on first use: 0.7 s).
        """
        centred = points - self.mean
        if self.family == "meanfield":
            whitened = centred / self.scale
            log_det = self.scale.abs().log().sum()
        else:
            tril = self.cholesky()
            whitened = torch.linalg.solve_triangular(tril, centred.T, upper=False).T
            log_det = tril.diagonal().abs().log().sum()
        return (-0.5 * whitened.pow(2).sum(-1) - log_det
                - 0.5 * self.dim * math.log(2 * math.pi))

    def entropy(self) -> float:
        """The Gaussian's differential entropy, in nats."""
        return float(self.log_det_factor()) + 0.5 * self.dim * (1 + math.log(2 * math.pi))

    def detached(self) -> Gaussian:
        """A copy whose tensors are detached from any graph."""
        def copy(t):
            return None if t is None else t.detach().clone()

        return Gaussian(self.family, copy(self.mean), copy(self.scale), copy(self.tril),
                        copy(self.factor))


def kl_divergence(p: Gaussian, q: Gaussian) -> float:
    r""":math:`\mathrm{KL}(p\,\|\,q)` of two Gaussians of the same dimension (closed form).

    .. math:: \tfrac12\big[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p)
              + (\mu_q-\mu_p)^\top\Sigma_q^{-1}(\mu_q-\mu_p) - d
              + \log|\Sigma_q| - \log|\Sigma_p|\big]
    """
    if p.family == q.family == "meanfield":
        ratio = (p.scale / q.scale) ** 2
        shift = ((q.mean - p.mean) / q.scale) ** 2
        return float(0.5 * (ratio + shift - 1 - ratio.log()).sum())
    lq, lp = q.cholesky(), p.cholesky()
    whitened = torch.linalg.solve_triangular(lq, lp, upper=False)
    shift = torch.linalg.solve_triangular(lq, (q.mean - p.mean)[:, None], upper=False)
    log_det = 2 * (lq.diagonal().abs().log().sum() - lp.diagonal().abs().log().sum())
    return float(0.5 * (whitened.pow(2).sum() + shift.pow(2).sum() - p.dim + log_det))
