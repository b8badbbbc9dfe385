"""The notes' heights story: a K-component Gaussian mixture with a latent gender.

Notes §2.a: "first pick a distribution k with probability alpha (choose a gender), then
draw a data point from k's Gaussian (a height for that gender)." Inference runs the story
backwards (§2.b): someone is 180 cm tall, how likely are they male?
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from ppl_notes.data import load_galton_heights
from ppl_notes.distributions import OrderedNormal
from ppl_notes.story import model as _model

__all__ = ["model", "component_probabilities"]


def _coords(data):
    num_groups = int(data.get("num_groups", 2))
    height = data.get("height")
    coords = {"components": np.arange(num_groups)}
    if height is not None:
        coords["people"] = np.arange(len(height))
    return coords


@_model(
    observed="height",
    data=load_galton_heights,
    dims={"alpha": ["components"], "mu": ["components"]},
    coords=_coords,
    name="heights",
)
def model(
    height=None,
    num_people=None,
    num_groups=2,
    mu_loc=170.0,
    mu_scale=20.0,
    sigma_scale=10.0,
    alpha_concentration=1.0,
):
    """Pick a gender with probability alpha, then a height from that gender's Normal.

    alpha ~ Dirichlet(alpha_concentration), mu ~ OrderedNormal(mu_loc, mu_scale) (so
    component 0 is the shorter), sigma_k ~ HalfNormal(sigma_scale); for each person,
    gender ~ Categorical(alpha), height ~ Normal(mu[gender], sigma[gender]). Heights in cm.
    """
    dtype = height.dtype if height is not None else torch.float64
    if height is not None:
        num_people = height.shape[-1]
    elif num_people is None:
        num_people = 100
    ones = torch.ones(num_groups, dtype=dtype)
    alpha = pyro.sample("alpha", dist.Dirichlet(alpha_concentration * ones))
    mu = pyro.sample(
        "mu", OrderedNormal(torch.tensor(mu_loc, dtype=dtype), torch.tensor(mu_scale, dtype=dtype),
                            num_groups)
    )
    with pyro.plate("components", num_groups):
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(sigma_scale, dtype=dtype)))
    # The components plate is the rightmost batch dim of sigma; moving it to an event dim
    # lets Vindex broadcast it against enumerated and vectorised (draw) batch dims.
    sigma_by_component = sigma.unsqueeze(-2)
    with pyro.plate("people", num_people):
        gender = pyro.sample("gender", dist.Categorical(alpha))
        pyro.sample(
            "height",
            dist.Normal(Vindex(mu)[..., gender], Vindex(sigma_by_component)[..., gender]),
            obs=height,
        )


def component_probabilities(height, alpha, mu, sigma) -> np.ndarray:
    r"""P(gender = k | height) by Bayes' rule for known parameters (notes §2.b).

    .. math:: p(k \mid x) = \frac{\alpha_k \mathcal N(x\mid\mu_k,\sigma_k)}
                                 {\sum_j \alpha_j \mathcal N(x\mid\mu_j,\sigma_j)}

    Parameters broadcast: pass draws with shape ``(..., K)`` and a scalar height to get
    one probability vector per draw.
    """
    height = np.asarray(height, dtype=float)[..., None]
    alpha, mu, sigma = (np.asarray(a, dtype=float) for a in (alpha, mu, sigma))
    log_joint = np.log(alpha) - np.log(sigma) - 0.5 * ((height - mu) / sigma) ** 2
    log_joint -= log_joint.max(-1, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(-1, keepdims=True)
