r"""Standard-normal draws whose first two moments are exact: the fixed draws of Gaussian VI.

A Gaussian family's ELBO is an expectation over :math:`\varepsilon \sim \mathcal N(0, I)`
(:math:`z = \mu + L\varepsilon`). Estimated with the same :math:`M` draws at every step,
it becomes a deterministic function of :math:`(\mu, L)` that a second-order optimiser
can minimise to convergence (DADVI: Giordano, Ingram & Broderick 2024, "Black Box
Variational Inference with a Deterministic Objective", JMLR 25(18)).

Plain random draws leave that objective wrong even where the posterior is Gaussian: its
optimum then depends on the draws' sample mean and covariance. These draws are built so
that, over the :math:`M` of them,

.. math:: \tfrac1M \textstyle\sum_m \varepsilon_m = 0, \qquad
          \tfrac1M \textstyle\sum_m \varepsilon_m \varepsilon_m^\top = I,

and every odd moment vanishes: half of them are drawn, whitened so that their second
moment is exactly :math:`I` (a Cholesky factor of their own second-moment matrix), and
the other half are their negatives (antithetic pairs). On a Gaussian posterior
:math:`\mathcal N(m, P^{-1})` the fixed-draw objective is then
:math:`\tfrac12(\mu-m)^\top P(\mu-m) + \tfrac12\operatorname{tr}(L^\top P L) - \log|L|`
plus a constant, exactly the true negative ELBO, so its optimum is the exact posterior
for the full-rank family and the exact KL(q||p) optimum for the mean-field one. Where
there are fewer than :math:`d` halves, each coordinate is standardised alone (its mean
0 and mean square 1; the cross moments are then only right on average).
"""

from __future__ import annotations

import torch

__all__ = ["draws_per_fit", "moment_matched_normal"]

#: The fewest antithetic pairs per fit; the paper's M = 30 draws is about this many pairs
MIN_PAIRS = 16
#: The most pairs per fit (the whitening needs pairs >= d + 1; beyond this the
#: coordinates are standardised one by one)
MAX_PAIRS = 512
#: Above this many dimensions a fit is mean-field (no full-rank phase) and its draws are
#: standardised coordinate by coordinate, which any number of pairs allows
WHITENED_DIM = 200


def draws_per_fit(dim: int) -> int:
    """Draws per fit: ``2 * max(16, d + 4)`` up to :data:`WHITENED_DIM` dims, else 32.

    ``2 * max(16, d + 4)`` pairs whiten ``d`` dims; above :data:`WHITENED_DIM` (a VAE's
    thousands of codes) the draws are standardised coordinate by coordinate.
    """
    if dim > WHITENED_DIM:
        return 2 * MIN_PAIRS
    return 2 * min(max(MIN_PAIRS, dim + 4), MAX_PAIRS)


def moment_matched_normal(count: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, dim)`` standard-normal draws with exact mean 0 and second moment I.

    Parameters
    ----------
    count : int
        An even number of draws (antithetic pairs).
    dim : int
        Their dimension.
    generator : torch.Generator
        The random stream (the fit's seed).
    """
    if count % 2:
        raise ValueError(f"moment-matched draws come in antithetic pairs; got {count}")
    half = torch.randn(count // 2, dim, generator=generator, dtype=torch.float64)
    if count // 2 > dim:
        second = half.T @ half / half.shape[0]
        try:
            factor = torch.linalg.cholesky(second)
            half = torch.linalg.solve_triangular(factor, half.T, upper=False).T
        except RuntimeError:  # a singular draw set (measure zero): standardise alone
            half = half / half.pow(2).mean(0).sqrt()
    else:
        half = half / half.pow(2).mean(0).sqrt()
    return torch.cat([half, -half])
