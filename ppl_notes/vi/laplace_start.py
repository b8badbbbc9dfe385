r"""Where an autoguide starts: a quick MAP, and the Laplace approximation's scales there.

An autoguide made with its defaults starts with every scale at 0.1 in the unconstrained
space. Adam moves a log-scale by about one learning rate (0.01) a step, so a posterior
sd of 1 is some 250 noisy steps away, and SVI spends most of a run getting there
(eight schools: about 800 of its steps, measured). The Laplace approximation at the mode
is a far better start (MacKay 2003, ch. 27; Rue, Martino & Chopin 2009 start INLA the
same way):

.. math::

    \hat u = \arg\max_u \log p(x, T(u)) + \log|J_T(u)|, \qquad
    H = -\nabla^2_u \big[\log p(x, T(u)) + \log|J_T(u)|\big]_{u=\hat u},

with :math:`T` each site's map from the real line onto its support. The full-rank guide
starts at :math:`\mathcal N(\hat u, H^{-1})`; the mean-field guide at the mean-field
optimum for that Gaussian, sds :math:`1/\sqrt{H_{ii}}` (its KL(q||p) minimiser). The
mode is the one of :func:`ppl_notes.optim.mode.map_start` (the density of the
sites themselves, discrete sites summed out); :math:`H` is taken there by central
differences of the gradient, :math:`2n` gradient evaluations, in one batch. Where
:math:`H` is not positive definite the full-rank start falls back to the diagonal, and
an element whose :math:`H_{ii}` is not positive keeps Pyro's 0.1; stories with more than
:data:`MAX_DIM` unconstrained elements keep 0.1 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroParam

from ppl_notes.evaluation import StoryFacts
from ppl_notes.optim.mode import map_start

__all__ = ["LaplaceStart", "MAX_DIM", "apply_scales", "laplace_start"]

#: The most unconstrained elements for which the Hessian is taken (2n gradients)
MAX_DIM = 200
#: Central-difference step of the Hessian, in unconstrained units
_STEP = 1e-4
#: Pyro's initial scale, kept where the Hessian says nothing
_DEFAULT_SCALE = 0.1


@dataclass
class LaplaceStart:
    """A MAP and the Laplace approximation's precision there (unconstrained space).

    Attributes
    ----------
    values : dict of str to Tensor
        Each latent site's MAP value, on its support.
    names, sizes : list
        The unconstrained coordinates' sites, in the order of ``precision``.
    precision : Tensor or None
        :math:`H`, ``(n, n)``; None where it was not taken (more than
        :data:`MAX_DIM` elements, or not finite).
    gradients : int
        Gradient evaluations spent: the MAP search's and the Hessian's.
    """

    values: dict[str, torch.Tensor]
    names: list[str]
    sizes: list[int]
    precision: torch.Tensor | None
    gradients: int


def laplace_start(model, data: dict[str, Any], seed: int, dispersed: bool,
                  facts: StoryFacts | None = None) -> LaplaceStart | None:
    """The MAP of :func:`~ppl_notes.optim.mode.map_start` and :math:`H` there.

    None where there is no MAP start (the fit then starts from the prior). ``facts``: the
    story's, where the caller has them.
    """
    found = map_start(model, data, seed, dispersed=dispersed, jacobian=True, facts=facts)
    if found is None:
        return None
    values, sites, flat, evaluations = found
    precision = None
    if flat.numel() <= MAX_DIM:
        precision = _precision(sites, flat)
        evaluations += 2 * flat.numel()
    return LaplaceStart(values, list(sites.names), list(sites.sizes), precision, evaluations)


def _precision(sites, flat: torch.Tensor) -> torch.Tensor | None:
    r""":math:`-\nabla^2` of the unconstrained log density (with Jacobian) at ``flat``."""
    dim = flat.numel()
    step = _STEP * torch.eye(dim, dtype=torch.float64)
    points = torch.cat([flat + step, flat - step]).requires_grad_(True)
    try:
        total = sites._evaluate(points, jacobian=True, priors=True).total
        (gradient,) = torch.autograd.grad(total.sum(), points)
    except (RuntimeError, ValueError):
        return None
    hessian = (gradient[:dim] - gradient[dim:]).T / (2 * _STEP)
    precision = -(hessian + hessian.T) / 2
    return precision.detach() if bool(torch.isfinite(precision).all()) else None


def _order(start: LaplaceStart, names: list[str]) -> torch.Tensor:
    """Indices into ``start``'s coordinates that put them in the order of ``names``."""
    offsets, at = {}, 0
    for name, size in zip(start.names, start.sizes, strict=True):
        offsets[name] = torch.arange(at, at + size)
        at += size
    return torch.cat([offsets[name] for name in names])


def _diagonal_scales(precision: torch.Tensor) -> torch.Tensor:
    diagonal = precision.diagonal()
    return torch.where(diagonal > 0, diagonal.clamp(min=1e-300).rsqrt(),
                       torch.full_like(diagonal, _DEFAULT_SCALE))


def apply_scales(guide, start: LaplaceStart | None, data: dict[str, Any]) -> bool:
    """Give ``guide`` (AutoNormal or AutoMultivariateNormal) the Laplace start's scales.

    The guide's parameters are created here (its prototype trace runs once). Returns
    whether the scales were set; a guide of another kind, a start without a precision or
    a guide whose sites differ from the start's keeps Pyro's initial scales.
    """
    if start is None or start.precision is None:
        return False
    if not isinstance(guide, (AutoNormal, AutoMultivariateNormal)):
        return False
    guide._setup_prototype(**data)
    if isinstance(guide, AutoNormal):
        names = list(guide._event_dims)
    else:
        names = list(guide._unconstrained_shapes)
    if sorted(names) != sorted(start.names):
        return False
    index = _order(start, names)
    precision = start.precision[index][:, index]
    dtype = torch.get_default_dtype()
    if isinstance(guide, AutoNormal):
        scales, at = _diagonal_scales(precision), 0
        for name in names:
            loc = attrgetter(name)(guide.locs)
            piece = scales[at:at + loc.numel()].reshape(loc.shape).to(loc.dtype)
            at += loc.numel()
            deep_setattr(guide.scales, name,
                         PyroParam(piece, guide.scale_constraint, guide._event_dims[name]))
        return True
    try:
        tril = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(precision)))
    except RuntimeError:  # not positive definite: the diagonal start
        tril = torch.diag(_diagonal_scales(precision))
    scale = tril.diagonal()
    guide.scale = PyroParam(scale.to(dtype), guide.scale_constraint)
    guide.scale_tril = PyroParam((tril / scale[:, None]).to(dtype), guide.scale_tril_constraint)
    return True
