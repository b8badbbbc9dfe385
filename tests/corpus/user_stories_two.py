"""The corpus's second round (issue 30): more stories as Pyro users write them.

Kinds the first round lacked: a ``PyroModule`` with ``PyroSample`` priors on an
``nn.Linear`` (Pyro's Bayesian-regression tutorial), a ``pyro.param`` inside the model,
``poutine.scale``, zero-inflated and negative-binomial counts, ordinal regression
(``OrderedLogistic``), Student-t errors with a latent ``nu``, a Gaussian process written
with ``torch.cdist``, crossed random effects in nested plates, and a model conditioned
with ``pyro.condition`` instead of ``obs=``. :mod:`tests.corpus.cases` pairs each with
data and a truth from closed forms or quadrature.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroSample
from torch import nn


class BayesianRegression(PyroModule):
    """Pyro's Bayesian-regression tutorial, its noise known: priors on nn.Linear's weights."""

    def __init__(self, in_features, noise=0.5):
        super().__init__()
        self.noise = noise
        self.linear = PyroModule[nn.Linear](in_features, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, in_features])
                                        .to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, self.noise), obs=y)


def param_noise(x):
    """A ``pyro.param`` inside the model: a constant to NUTS and MAP, learnt by SVI."""
    noise = pyro.param("noise", torch.tensor(1.5), constraint=constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, noise), obs=x)


def weighted_likelihood(x):
    """``poutine.scale``: every observation counted twice (a tempered/power likelihood)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)), poutine.scale(scale=2.0):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def zero_inflated_counts(counts):
    """Zero-inflated Poisson: structural zeros with probability ``gate``."""
    gate = pyro.sample("gate", dist.Beta(1.0, 1.0))
    rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
    with pyro.plate("days", len(counts)):
        pyro.sample("counts", dist.ZeroInflatedPoisson(rate, gate=gate), obs=counts)


def negative_binomial_counts(counts):
    """Over-dispersed counts by mean and dispersion (Stan's neg_binomial_2)."""
    mean = pyro.sample("mean", dist.LogNormal(1.0, 1.0))
    dispersion = pyro.sample("dispersion", dist.Gamma(2.0, 0.5))
    with pyro.plate("sites", len(counts)):
        pyro.sample("counts", dist.NegativeBinomial(
            total_count=dispersion, probs=mean / (mean + dispersion)), obs=counts)


def ordinal_regression(x, rating):
    """Ratings 0, 1, 2 by OrderedLogistic: a slope, and cutpoints at -gap and +gap."""
    slope = pyro.sample("slope", dist.Normal(0.0, 2.0))
    gap = pyro.sample("gap", dist.HalfNormal(3.0))
    cutpoints = torch.stack([-gap, gap])
    with pyro.plate("ratings", len(rating)):
        pyro.sample("rating", dist.OrderedLogistic(slope * x, cutpoints), obs=rating)


def robust_mean(y):
    """Student-t errors whose degrees of freedom are learnt with the location."""
    nu = pyro.sample("nu", dist.Gamma(2.0, 0.1))
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.StudentT(nu, mu, 1.0), obs=y)


def gp_regression(X, y):
    """A GP prior on f at the inputs (squared-exponential kernel by ``torch.cdist``)."""
    distances = torch.cdist(X, X)
    kernel = 1.5**2 * torch.exp(-0.5 * distances**2 / 0.8**2)
    kernel = kernel + 1e-6 * torch.eye(len(X))
    f = pyro.sample("f", dist.MultivariateNormal(torch.zeros(len(X)), kernel))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(f, 0.3), obs=y)


def crossed_effects(y):
    """Rows x columns of a table: an effect per row and per column, in nested plates."""
    rows = pyro.plate("rows", y.shape[0], dim=-2)
    columns = pyro.plate("columns", y.shape[1], dim=-1)
    with columns:
        column = pyro.sample("column", dist.Normal(0.0, 1.0))
    with rows:
        row = pyro.sample("row", dist.Normal(0.0, 1.0))
    with rows, columns:
        pyro.sample("y", dist.Normal(row + column, 0.7), obs=y)


def unconditioned_mean(n):
    """A story with no ``obs=``: its data enter by ``pyro.condition`` (see cases)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", n):
        pyro.sample("x", dist.Normal(mu, 1.0))


def straight_line(x, y):
    """y = a + b x + noise, as a first regression is written: three parameters, any rows."""
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    s = pyro.sample("s", dist.HalfNormal(5.0))
    with pyro.plate("rows", x.shape[0]):
        pyro.sample("y", dist.Normal(a + b * x, s), obs=y)
