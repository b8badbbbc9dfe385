"""Eight schools (Rubin 1981): a hierarchical story, centred and non-centred.

Each school's coaching effect theta_j is drawn around a common mean mu with spread tau;
each school reports its estimate y_j with a known standard error sigma_j. In the centred
form the posterior is a funnel in (theta, tau) where NUTS diverges; the non-centred form
draws standardised effects and rescales them, which removes the funnel.

References
----------
Rubin, D. B. (1981). Estimation in parallel randomized experiments. Journal of
Educational Statistics 6(4), 377-401.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ppl_notes.story import model as _model

__all__ = ["centered", "noncentered", "load_eight_schools"]

EFFECTS = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
STANDARD_ERRORS = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def load_eight_schools() -> dict[str, np.ndarray]:
    """Rubin's (1981) SAT coaching data: estimated effects and their standard errors."""
    return {"y": EFFECTS.copy(), "sigma": STANDARD_ERRORS.copy()}


def _coords(data):
    return {"schools": np.array(list("ABCDEFGH"))[: len(data["sigma"])]}


def _hyperpriors(sigma):
    dtype = sigma.dtype
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=dtype)))
    return mu, tau


@_model(observed="y", data=load_eight_schools, coords=_coords, name="eight_schools")
def centered(y=None, sigma=None):
    """Draw a common mean mu and a spread tau, then each school's effect and estimate.

    theta_j ~ Normal(mu, tau); y_j ~ Normal(theta_j, sigma_j).
    """
    mu, tau = _hyperpriors(sigma)
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


# Without the funnel, a step size tuned for 80% acceptance still diverges now and then
# where tau is near 0 (1 in 4000 draws at seed 1); 90% acceptance, the usual advice for
# this story (Stan, PyMC), leaves none.
@_model(observed="y", data=load_eight_schools, coords=_coords,
        name="eight_schools_noncentered", defaults={"nuts": {"target_accept": 0.9}})
def noncentered(y=None, sigma=None):
    """The centred story, with each effect drawn standardised and then rescaled.

    theta_j = mu + tau * theta_tilde_j, theta_tilde_j ~ Normal(0, 1): the same posterior
    without the funnel.
    """
    mu, tau = _hyperpriors(sigma)
    with pyro.plate("schools", sigma.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.zeros_like(sigma), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
