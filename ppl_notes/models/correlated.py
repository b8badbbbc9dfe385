r"""A 2-D correlated Gaussian: where mean-field VI is too narrow, in closed form.

The story: pick :math:`z_1 \sim \mathcal N(0, 1)`, then
:math:`z_2 \mid z_1 \sim \mathcal N(\rho z_1, \sqrt{1-\rho^2})`. Its density (it has no
data: the target is the density itself) is the bivariate Normal with unit variances and
correlation :math:`\rho`.

Notes §2.e: VI minimises KL(q‖p). For a Gaussian target with precision :math:`\Lambda`
the best factorised :math:`q(z_1)q(z_2)` has the right means and variances
:math:`1/\Lambda_{ii}` (Bishop 2006, §10.1.2), here :math:`1-\rho^2`: each sd is
:math:`\sqrt{1-\rho^2}` of the true one. KL(q‖p) is mode-seeking: q stays where p has
mass and is under-dispersed; :func:`meanfield_sd_ratio` gives the closed form.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from ppl_notes.errors import DataError
from ppl_notes.story import model as _model

__all__ = ["gaussian", "meanfield_sd_ratio"]


def meanfield_sd_ratio(rho: float) -> float:
    r"""The sd of the KL(q‖p)-optimal mean-field q over the true sd: :math:`\sqrt{1-\rho^2}`."""
    return math.sqrt(1.0 - rho**2)


# Mean-field SVI moves along the correlated ridge slowly (each factor's update is held
# back by the other's): more steps and a higher starting rate than SVI's defaults.
@_model(observed=(), data={"rho": 0.9}, name="correlated_gaussian",
        defaults={"svi": {"steps": 4000, "learning_rate": 0.05, "learning_rate_decay": 0.01,
                          "num_draws": 4000}})
def gaussian(rho=0.9):
    """Pick z1 ~ Normal(0, 1); then z2 | z1 ~ Normal(rho z1, sqrt(1 - rho^2)).

    A bivariate Normal with unit variances and correlation rho (no data).
    """
    if not -1.0 < float(rho) < 1.0:

        raise DataError(f"story 'correlated_gaussian': rho must lie in (-1, 1), got {rho}")
    zero = torch.tensor(0.0, dtype=torch.float64)
    z1 = pyro.sample("z1", dist.Normal(zero, 1.0))
    pyro.sample("z2", dist.Normal(rho * z1, math.sqrt(1.0 - float(rho) ** 2)))
