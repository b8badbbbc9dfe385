"""The notes' heights story: a K-component Gaussian mixture with a latent gender.

Notes §2.a: "first pick a distribution k with probability alpha (choose a gender), then
draw a data point from k's Gaussian (a height for that gender)." Inference runs the story
backwards (§2.b): someone is 180 cm tall, how likely are they male?
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from ppl_notes.data import load_galton_frame, load_galton_heights
from ppl_notes.distributions import NormalMixture, OrderedNormal
from ppl_notes.story import model as _model

__all__ = ["model", "marginal", "m_step", "component_probabilities", "report"]


def _coords(data):
    num_groups = int(data.get("num_groups", 2))
    height = data.get("height")
    coords = {"components": np.arange(num_groups)}
    if height is not None:
        coords["people"] = np.arange(len(height))
    return coords


def _globals(height, num_people, num_groups, mu_loc, mu_scale, sigma_median, sigma_spread,
             alpha_concentration):
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
        sigma = pyro.sample(
            "sigma", dist.LogNormal(torch.tensor(math.log(sigma_median), dtype=dtype),
                                    torch.tensor(sigma_spread, dtype=dtype)))
    # The components plate is the rightmost batch dim of sigma; moving it to an event dim
    # lets it broadcast against enumerated and vectorised (draw) batch dims.
    return num_people, alpha, mu, sigma.unsqueeze(-2)


def marginal(height=None, num_people=None, num_groups=2, mu_loc=170.0, mu_scale=20.0,
             sigma_median=7.0, sigma_spread=0.5, alpha_concentration=1.0):
    """The heights story with each person's gender summed out by hand.

    height ~ sum_k alpha_k Normal(mu_k, sigma_k), a :class:`NormalMixture` (a
    MixtureSameFamily whose log density is laid out for fast compiled kernels).
    """
    num_people, alpha, mu, sigma = _globals(height, num_people, num_groups, mu_loc, mu_scale,
                                            sigma_median, sigma_spread, alpha_concentration)
    with pyro.plate("people", num_people):
        pyro.sample("height", NormalMixture(alpha, mu, sigma), obs=height)


def m_step(data, responsibilities):
    r"""The closed-form maximum-likelihood M-step of EM for the Gaussian mixture.

    With :math:`r_{ki} = q(z_i = k)` from the E-step (Dempster, Laird & Rubin 1977):

    .. math:: \alpha_k = \tfrac1N \sum_i r_{ki},\quad
              \mu_k = \frac{\sum_i r_{ki} x_i}{\sum_i r_{ki}},\quad
              \sigma_k^2 = \frac{\sum_i r_{ki} (x_i-\mu_k)^2}{\sum_i r_{ki}}.
    """
    r, x = responsibilities["gender"], data["height"]
    weight = r.sum(-1)
    mu = (r * x).sum(-1) / weight
    sigma = ((r * (x - mu.unsqueeze(-1)) ** 2).sum(-1) / weight).sqrt()
    return {"alpha": weight / weight.sum(), "mu": mu, "sigma": sigma}


@_model(
    observed="height",
    marginal=marginal,
    m_step=m_step,
    # The weights, means and sds are strongly correlated a posteriori (a dense metric
    # cuts the trajectory from ~24 to ~7 steps), and the posterior narrows into a funnel
    # where one component's weight and sd are both small (target_accept=0.9 integrates
    # it without divergences).
    # SVI: the full-rank Gaussian over the unconstrained globals, fitted on the potential
    # with the genders summed out (4 restarts, about 1 s). Its sds are 0.74-0.82 of
    # NUTS's whatever the optimiser or the number of fixed draws (the KL(q||p) optimum of
    # that family: k-hat 0.8-0.9 says the posterior is not Gaussian in these
    # coordinates), so default SVI goes on to a flow (0.80-0.85, about 11 s); the
    # hand-written guides of ppl_notes.guides.heights are the Gaussian family and the
    # mean-field one, fitted by Adam.
    defaults={"nuts": {"target_accept": 0.9, "mass_matrix": "dense"}},
    data=load_galton_heights,
    # No guide named: SVI's default, the full-rank Gaussian (AutoNormal, mean-field, fits
    # this posterior 2-4x too narrow and can collapse a component), goes on to a flow
    # where its k-hat says it misses the posterior (ppl_notes.vi.escalation), as it does
    # here.
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
    sigma_median=7.0, sigma_spread=0.5,
    alpha_concentration=1.0,
):
    """Pick a gender with probability alpha, then a height from that gender's Normal.

    alpha ~ Dirichlet(alpha_concentration), mu ~ OrderedNormal(mu_loc, mu_scale) (so
    component 0 is the shorter), sigma_k ~ LogNormal(log sigma_median, sigma_spread); for
    each person, gender ~ Categorical(alpha), height ~ Normal(mu[gender], sigma[gender]).
    Heights in cm. The LogNormal prior vanishes as sigma -> 0, which keeps the posterior
    proper: a Gaussian mixture's likelihood is unbounded when one component shrinks onto
    a single height, and a prior with mass near 0 (HalfNormal) would let it.
    """
    num_people, alpha, mu, sigma = _globals(height, num_people, num_groups, mu_loc, mu_scale,
                                            sigma_median, sigma_spread, alpha_concentration)
    with pyro.plate("people", num_people):
        gender = pyro.sample("gender", dist.Categorical(alpha))
        pyro.sample(
            "height",
            dist.Normal(Vindex(mu)[..., gender], Vindex(sigma)[..., gender]),
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


def report(posterior, height_cm: float = 180.0) -> dict[str, float]:
    """What readers of the heights story ask of a posterior.

    * ``P(taller component | height=180 cm)``: Bayes' rule averaged over the posterior
      draws of (alpha, mu, sigma) -- the notes' "someone is 180 cm, how likely male?";
    * ``agreement with recorded gender``: on Galton's data, the share of people whose
      most probable component (taller = male) matches the recorded gender.
    """
    probabilities = component_probabilities(
        height_cm, posterior.draws("alpha"), posterior.draws("mu"), posterior.draws("sigma"))
    result = {f"P(taller component | height={height_cm:g} cm)": float(probabilities[:, -1].mean())}
    if "gender" in posterior.tree["posterior"].data_vars and _is_galton(posterior):

        recorded_male = load_galton_frame()["gender"].eq("male").to_numpy()
        taller = posterior.draws("gender").mean(0) > 0.5 * (posterior.draws("alpha").shape[-1] - 1)
        result["agreement with recorded gender"] = float((taller == recorded_male).mean())
    return result


def _is_galton(posterior) -> bool:
    observed = posterior.tree["observed_data"]["height"].values
    galton = load_galton_heights()["height"]
    return observed.shape == galton.shape and np.allclose(observed, galton)
