"""The eight posteriordb programs, translated from Stan to Pyro as a user would.

Stan's implicit flat priors become ``ImproperUniform`` on the parameter's support; a
bound that depends on another parameter (GARCH's ``beta1 < 1 - alpha1``) becomes a
Uniform on that bound plus the factor that makes it flat, as Stan's density is; loops
stay loops. Each story's data are posteriordb's, read by :func:`load`.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to

HERE = Path(__file__).parent / "posteriordb"


def load(name: str) -> tuple[dict, pd.DataFrame]:
    """posteriordb's data for ``name`` and its reference summary (index: Stan's names)."""
    folder = HERE / name
    data = json.loads((folder / "data.json").read_text())
    reference = pd.read_csv(folder / "reference.csv", index_col="parameter")
    return data, reference


def flat(support, shape=()):
    """Stan's implicit flat prior on ``support``."""
    return dist.ImproperUniform(support, (), shape)


def eight_schools_noncentered(y, sigma):
    """theta = mu + tau * theta_trans; y_j ~ N(theta_j, sigma_j)."""
    J = len(y)
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", theta_trans * tau + mu)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    """A linear trend in summer temperature over years 1952-2013; sigma flat."""
    alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = pyro.sample("sigma", flat(constraints.positive))
    with pyro.plate("years", len(y)):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def arK(y, K):
    """AR(K) with the Stan program's double loop."""
    K = int(K)
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    for t in range(K, len(y)):
        mu = alpha
        for k in range(K):
            mu = mu + beta[k] * y[t - k - 1]
        pyro.sample(f"y_{t}", dist.Normal(mu, sigma), obs=y[t])


def garch11(y, sigma1):
    """GARCH(1,1): a volatility recursion; beta1's upper bound depends on alpha1."""
    mu = pyro.sample("mu", flat(constraints.real))
    alpha0 = pyro.sample("alpha0", flat(constraints.positive))
    alpha1 = pyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1 = pyro.sample("beta1", dist.Uniform(0.0, 1.0 - alpha1))
    pyro.factor("beta1_flat", torch.log1p(-alpha1))  # Stan's beta1 is flat, not 1/(1-alpha1)
    sigma = [torch.as_tensor(sigma1)]
    for t in range(1, len(y)):
        sigma.append(torch.sqrt(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * sigma[-1] ** 2))
    with pyro.plate("time", len(y)):
        pyro.sample("y", dist.Normal(mu, torch.stack(sigma)), obs=y)


def garch11_guide(y, sigma1):
    """A guide that follows the story's bound: beta1 on (0, 1 - alpha1) of alpha1's draw."""
    def site(name, support, init):
        loc = pyro.param(f"{name}_loc", torch.tensor(init))
        scale = pyro.param(f"{name}_scale", torch.tensor(0.1), constraint=constraints.positive)
        return pyro.sample(name, dist.TransformedDistribution(dist.Normal(loc, scale),
                                                               biject_to(support)))

    site("mu", constraints.real, float(torch.as_tensor(y).mean()))
    site("alpha0", constraints.positive, 0.0)
    alpha1 = site("alpha1", constraints.unit_interval, 0.0)
    site("beta1", constraints.interval(0.0, 1.0 - alpha1), 0.0)


def gp_pois_regr(x, k):
    """A latent GP (squared-exponential kernel, Cholesky factor) with Poisson counts."""
    N = len(x)
    rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = pyro.sample("f_tilde", dist.Normal(torch.zeros(N), 1.0).to_event(1))
    distance = x[:, None] - x[None, :]
    cov = alpha**2 * torch.exp(-0.5 * distance**2 / rho**2) + 1e-10 * torch.eye(N)
    f = pyro.deterministic("f", torch.linalg.cholesky(cov) @ f_tilde)
    with pyro.plate("data", N):
        pyro.sample("k", dist.Poisson(torch.exp(f)), obs=k)


def hmm_example(y, K):
    """Two-state HMM: simplex rows, positive ordered means, states enumerated by Pyro."""
    K = int(K)
    theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(K)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(K)))
    mu = pyro.sample("mu", flat(constraints.positive_ordered_vector, (K,)))
    pyro.factor("mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[0])
                + dist.Normal(10.0, 1.0).log_prob(mu[1]))
    theta = torch.stack([theta1, theta2])
    state = pyro.sample("state_0", dist.Categorical(torch.ones(K) / K),
                        infer={"enumerate": "parallel"})
    pyro.sample("y_0", dist.Normal(mu[state], 1.0), obs=y[0])
    for t in pyro.markov(range(1, len(y))):
        state = pyro.sample(f"state_{t}", dist.Categorical(theta[state]),
                            infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(mu[state], 1.0), obs=y[t])


def diamonds(Y, X):
    """brms's regression on centred predictors: a badly conditioned posterior."""
    Xc = X[:, 1:] - X[:, 1:].mean(0)
    b = pyro.sample("b", dist.Normal(torch.zeros(Xc.shape[1]), 1.0).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
    with pyro.plate("data", len(Y)):
        pyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


def logearn_interaction(earn, height, male):
    """log earnings on height, sex and their interaction; flat priors."""
    log_earn = torch.log(earn)
    beta = pyro.sample("beta", flat(constraints.real, (4,)))
    sigma = pyro.sample("sigma", flat(constraints.positive))
    mean = beta[0] + beta[1] * height + beta[2] * male + beta[3] * height * male
    with pyro.plate("people", len(earn)):
        pyro.sample("log_earn", dist.Normal(mean, sigma), obs=log_earn)


#: posteriordb's name of each program -> the name of its story function (here, and in the
#: NumPyro and PyMC translations of benchmarks/).
PROGRAMS = {
    "eight_schools-eight_schools_noncentered": "eight_schools_noncentered",
    "kilpisjarvi_mod-kilpisjarvi": "kilpisjarvi",
    "arK-arK": "arK",
    "garch-garch11": "garch11",
    "gp_pois_regr-gp_pois_regr": "gp_pois_regr",
    "hmm_example-hmm_example": "hmm_example",
    "diamonds-diamonds": "diamonds",
    "earnings-logearn_interaction": "logearn_interaction",
}


#: The observed sites of each story (arK's and the HMM's likelihoods are factors).
OBSERVED = {
    "eight_schools-eight_schools_noncentered": "y",
    "kilpisjarvi_mod-kilpisjarvi": "y",
    "arK-arK": (),
    "garch-garch11": "y",
    "gp_pois_regr-gp_pois_regr": "k",
    "hmm_example-hmm_example": (),
    "diamonds-diamonds": "Y",
    "earnings-logearn_interaction": "log_earn",
}


#: How posteriordb's maintainers ran Stan for each reference posterior (its
#: ``reference_posteriors/draws/info/<name>.info.json``: 10 chains x 20,000 iterations,
#: thinned by 10; no reference run had a divergent transition). ``adapt_delta`` is the
#: target acceptance statistic a fair comparison of divergences uses;
#: ``max_treedepth`` is 10 (Stan's default) where absent.
REFERENCE_RUN = {
    "eight_schools-eight_schools_noncentered": {"adapt_delta": 0.95},
    "kilpisjarvi_mod-kilpisjarvi": {"adapt_delta": 0.8, "max_treedepth": 15},
    "arK-arK": {"adapt_delta": 0.8},
    "garch-garch11": {"adapt_delta": 0.8},
    "gp_pois_regr-gp_pois_regr": {"adapt_delta": 0.99, "max_treedepth": 15},
    "hmm_example-hmm_example": {"adapt_delta": 0.8},
    "diamonds-diamonds": {"adapt_delta": 0.99, "max_treedepth": 20},
    "earnings-logearn_interaction": {"adapt_delta": 0.8},
}


def data_for(name: str) -> dict:
    """The keyword arguments each story takes, from posteriordb's data."""
    raw, _ = load(name)
    arrays = {k: np.asarray(v, dtype=float) for k, v in raw.items()
              if isinstance(v, list)}
    scalars = {k: float(v) for k, v in raw.items() if not isinstance(v, list)}
    pick = {
        "eight_schools-eight_schools_noncentered": ["y", "sigma"],
        "kilpisjarvi_mod-kilpisjarvi": ["x", "y", "pmualpha", "psalpha", "pmubeta", "psbeta"],
        "arK-arK": ["y", "K"],
        "garch-garch11": ["y", "sigma1"],
        "gp_pois_regr-gp_pois_regr": ["x", "k"],
        "hmm_example-hmm_example": ["y", "K"],
        "diamonds-diamonds": ["Y", "X"],
        "earnings-logearn_interaction": ["earn", "height", "male"],
    }[name]
    every = {**arrays, **scalars}
    return {k: every[k] for k in pick}
