"""The eight posteriordb programs in NumPyro, written the way NumPyro's docs write them.

Vectorised where NumPyro's examples vectorise (AR lags as a matrix), ``lax.scan`` for the
GARCH recursion, the HMM's states summed out by the forward algorithm in ``lax.scan``
(NumPyro's own HMM example marginalises by hand the same way). Stan's flat priors are
``ImproperUniform`` on the support. Every function takes the keyword arguments of
``tests.corpus.posteriordb_stories.data_for``.
"""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax import lax
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

from tests.corpus.posteriordb_stories import PROGRAMS


def _flat(support, shape=()):
    return dist.ImproperUniform(support, (), shape)


def eight_schools_noncentered(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("schools", len(y)):
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", theta_trans * tau + mu)
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    with numpyro.plate("years", len(y)):
        numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def arK(y, K):
    K = int(K)
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(jnp.zeros(K), 10.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    lags = jnp.stack([y[K - k - 1:len(y) - k - 1] for k in range(K)], -1)
    with numpyro.plate("time", len(y) - K):
        numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y[K:])


def garch11(y, sigma1):
    mu = numpyro.sample("mu", _flat(constraints.real))
    alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.sample("beta1", dist.Uniform(0.0, 1.0 - alpha1))
    numpyro.factor("beta1_flat", jnp.log1p(-alpha1))  # Stan's beta1 is flat on its bound

    def step(previous, y_previous):
        current = jnp.sqrt(alpha0 + alpha1 * (y_previous - mu) ** 2 + beta1 * previous ** 2)
        return current, current

    _, rest = lax.scan(step, jnp.asarray(sigma1), y[:-1])
    sigma = jnp.concatenate([jnp.asarray(sigma1)[None], rest])
    with numpyro.plate("time", len(y)):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def gp_pois_regr(x, k):
    n = len(x)
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(jnp.zeros(n), 1.0).to_event(1))
    distance = x[:, None] - x[None, :]
    cov = alpha ** 2 * jnp.exp(-0.5 * distance ** 2 / rho ** 2) + 1e-10 * jnp.eye(n)
    f = numpyro.deterministic("f", jnp.linalg.cholesky(cov) @ f_tilde)
    with numpyro.plate("data", n):
        numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def hmm_example(y, K):
    K = int(K)
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(K)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(K)))
    mu = numpyro.sample("mu", _flat(constraints.positive_ordered_vector, (K,)))
    numpyro.factor("mu_prior", dist.Normal(3.0, 1.0).log_prob(mu[0])
                   + dist.Normal(10.0, 1.0).log_prob(mu[1]))
    log_theta = jnp.log(jnp.stack([theta1, theta2]))
    emission = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (time, state)

    def forward(gamma, emitted):
        gamma = logsumexp(gamma[:, None] + log_theta, axis=0) + emitted
        return gamma, None

    gamma, _ = lax.scan(forward, emission[0], emission[1:])
    numpyro.factor("y", logsumexp(gamma))


def diamonds(Y, X):
    Xc = X[:, 1:] - X[:, 1:].mean(0)
    b = numpyro.sample("b", dist.Normal(jnp.zeros(Xc.shape[1]), 1.0).to_event(1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
    with numpyro.plate("data", len(Y)):
        numpyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


def logearn_interaction(earn, height, male):
    log_earn = jnp.log(earn)
    beta = numpyro.sample("beta", _flat(constraints.real, (4,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    mean = beta[0] + beta[1] * height + beta[2] * male + beta[3] * height * male
    with numpyro.plate("people", len(earn)):
        numpyro.sample("log_earn", dist.Normal(mean, sigma), obs=log_earn)



#: posteriordb's name -> this module's translation
STORIES = {name: globals()[function] for name, function in PROGRAMS.items()}
