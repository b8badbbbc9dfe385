"""posteriordb's ``low_dim_gauss_mix``, written as users write it and hand-marginalised.

Stan's program::

    parameters { ordered[2] mu; array[2] real<lower=0> sigma; real<lower=0, upper=1> theta; }
    model { sigma ~ normal(0, 2); mu ~ normal(0, 2); theta ~ beta(5, 5);
            for (n in 1:N) target += log_mix(theta, normal_lpdf(y[n] | mu[1], sigma[1]),
                                                    normal_lpdf(y[n] | mu[2], sigma[2])); }

:func:`with_assignment` draws each observation's component ``k`` (enumerated, as Pyro's
mixture tutorial writes it); :func:`marginal` writes ``log_mix`` as
``MixtureSameFamily``, as NumPyro users do. The data are not posteriordb's file (not in
this repository): :func:`simulated` draws them as its generator does, N = 1000 values
from 0.4 N(-0.75, 1) + 0.6 N(0.75, 1), seeded.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate

import ppl_notes as pn


def simulated(num: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"y": ...}``: ``num`` draws of the mixture posteriordb's data come from."""
    rng = np.random.default_rng(seed)
    first = rng.random(num) < 0.4
    y = np.where(first, rng.normal(-0.75, 1.0, num), rng.normal(0.75, 1.0, num))
    return {"y": torch.tensor(y, dtype=torch.float64)}


def _globals():
    # Stan's ordered[2] mu with mu ~ normal(0, 2): an ordered vector, its prior a factor
    mu = pyro.sample("mu", dist.ImproperUniform(dist.constraints.ordered_vector, (), (2,)))
    pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.full((2,), 2.0, dtype=torch.float64))
                        .to_event(1))
    theta = pyro.sample("theta", dist.Beta(torch.tensor(5.0, dtype=torch.float64), 5.0))
    return mu, sigma, torch.stack([theta, 1 - theta])


@pn.model(observed="y")
@config_enumerate
def with_assignment(y):
    """Each observation's component drawn, then its value from that component."""
    mu, sigma, weights = _globals()
    with pyro.plate("observations", y.shape[0]):
        k = pyro.sample("k", dist.Categorical(weights))
        pyro.sample("y", dist.Normal(mu[k], sigma[k]), obs=y)


@pn.model(observed="y")
def marginal(y):
    """The same density with the component summed out by hand (``log_mix``)."""
    mu, sigma, weights = _globals()
    with pyro.plate("observations", y.shape[0]):
        pyro.sample("y", dist.MixtureSameFamily(dist.Categorical(weights),
                                                 dist.Normal(mu, sigma)), obs=y)
