"""Stories written the way Pyro users write them, not in ppl_notes' batch-aware style.

Each function is plain Pyro, as in Pyro's examples and tutorials (the GMM tutorial's
``locs[assignment]``, the SVI tutorial's coin with a loop over ``pyro.plate``, Bayesian
regression with ``X @ w``, ``pyro.markov``, ``Vindex``, ``pyro.factor``,
``pyro.deterministic``, masks, ``to_event``, float32 constants, scalar data, data under
another name than its site, closures and lambdas). Nothing in them knows about draws,
chains or particles. :mod:`tests.corpus.cases` wraps each with ``ppl_notes.model`` and
pairs it with data and the truth it is checked against.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.ops.indexing import Vindex


def normal_mean_float32(x):
    """A mean with float32 constants written out, next to float32 data."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float32),
                                       torch.tensor(10.0, dtype=torch.float32)))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, torch.tensor(2.0, dtype=torch.float32)), obs=x)


def coin(data):
    """Pyro's SVI tutorial, part I: a coin's fairness, the tosses in a sequential plate."""
    alpha0 = torch.tensor(10.0)
    beta0 = torch.tensor(10.0)
    f = pyro.sample("latent_fairness", dist.Beta(alpha0, beta0))
    for i in pyro.plate("data_loop", len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def coin_guide(data):
    """The same tutorial's guide: a Beta with positive parameters."""
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))


def linear_regression(X, y):
    """Bayesian linear regression with known noise: the weights as one vector, ``X @ w``."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)


def poisson_total(total, exposure):
    """One scalar count (a 0-dim tensor) from a Gamma-distributed rate."""
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    pyro.sample("total", dist.Poisson(rate * exposure), obs=total)


def change_point(y):
    """A count series whose rate switches once, at an unknown time (global discrete)."""
    T = len(y)
    rate_before = pyro.sample("rate_before", dist.Gamma(2.0, 0.5))
    rate_after = pyro.sample("rate_after", dist.Gamma(2.0, 0.5))
    tau = pyro.sample("tau", dist.Categorical(torch.ones(T) / T))
    rate = torch.where(torch.arange(T) < tau, rate_before, rate_after)
    with pyro.plate("time", T):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def factor_and_deterministic(x):
    """A mean with an extra Gaussian penalty by ``pyro.factor`` and a deterministic site."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    pyro.factor("shrinkage", -0.5 * mu**2 / 4.0)
    pyro.deterministic("mu_squared", mu**2)
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def masked_mean(x, seen):
    """Only the entries where ``seen`` is true count (``poutine.mask``)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)), poutine.mask(mask=seen):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def multivariate_mean(x, covariance):
    """A 3-vector mean (``to_event``) of MultivariateNormal observations."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 5.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(mu, covariance_matrix=covariance), obs=x)


def logistic_regression(x, y):
    """An intercept and a slope on the logit scale."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 2.5))
    slope = pyro.sample("slope", dist.Normal(0.0, 2.5))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=intercept + slope * x), obs=y)


def poisson_regression(X, counts):
    """Counts with a log-linear rate ``exp(X @ w)`` (an intercept column in X)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(counts)):
        pyro.sample("counts", dist.Poisson(torch.exp(X @ w)), obs=counts)


def ar1(y):
    """AR(1) with a Python loop over time, one observed site per step."""
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    for t in range(1, len(y)):
        pyro.sample(f"y_{t}", dist.Normal(phi * y[t - 1], sigma), obs=y[t])


def gmm(data):
    """Pyro's GMM tutorial (weights and scale known here): ``locs[assignment]``."""
    weights = torch.tensor([0.5, 0.5])
    scale = 1.0
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def gmm_vindex(data):
    """The same mixture indexed with ``Vindex``, as Pyro's enumeration tutorial does."""
    weights = torch.ones(2) / 2
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., assignment], 1.0), obs=data)


def grouped_means(group, y, num_groups):
    """Group means around a shared mean, each observation's group an integer covariate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("groups", num_groups):
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(theta[group], 1.0), obs=y)


def renamed_data(data):
    """The observed site is ``obs``; its data arrive as the argument ``data``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("N", len(data)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)


def make_closure(prior_scale):
    """A story built by a function: its prior scale is a closure variable."""

    def closure_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, prior_scale))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    return closure_model


#: A story as a lambda: the observations as one event of a Normal.
lambda_story = lambda x: pyro.sample(  # noqa: E731 - a lambda is the point
    "x", dist.Normal(pyro.sample("mu", dist.Normal(0.0, 10.0)), 1.0).expand([len(x)]).to_event(1),
    obs=x)


def unknown_variance(x):
    """Known zero mean, unknown variance with an InverseGamma prior (conjugate)."""
    variance = pyro.sample("variance", dist.InverseGamma(3.0, 2.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, variance.sqrt()), obs=x)


def unknown_variance_guide(x):
    """A guide written the Stan way: a Normal pushed through ``biject_to(support)``."""
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(0.5), constraint=constraints.positive)
    pyro.sample("variance", dist.TransformedDistribution(
        dist.Normal(loc, scale), biject_to(constraints.positive)))


def binomial_counts(successes, trials):
    """Successes out of a known number of trials each; a flat prior on the probability."""
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    with pyro.plate("data", len(successes)):
        pyro.sample("successes", dist.Binomial(total_count=trials, probs=p), obs=successes)


def hmm_fixed_transition(y):
    """Pyro's HMM style (known transitions): the hidden states in ``pyro.markov``."""
    transition = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    locs = pyro.sample("locs", dist.Normal(torch.tensor([0.0, 5.0]), 1.0).to_event(1))
    state = 0
    for t in pyro.markov(range(len(y))):
        state = pyro.sample(f"state_{t}", dist.Categorical(transition[state]),
                            infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[t])
