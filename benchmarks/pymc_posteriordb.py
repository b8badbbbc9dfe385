"""The eight posteriordb programs in PyMC, for nutpie (``nutpie.compile_pymc_model``).

Written as PyMC's docs write them: vectorised AR lags, ``pytensor.scan`` for the GARCH
recursion and the HMM's forward algorithm, ``Flat``/``HalfFlat`` for Stan's flat priors.
Stan's ``positive_ordered`` mu of the HMM is a positive first mean plus a positive gap,
each log-transformed: the same unconstrained space as Stan's transform, and a flat
density on the ordered pair (the map has unit Jacobian). Every function returns a
``pm.Model`` from the keyword arguments of ``tests.corpus.posteriordb_stories.data_for``.
"""

import numpy as np
import pymc as pm
import pytensor
import pytensor.tensor as pt

from tests.corpus.posteriordb_stories import PROGRAMS


def eight_schools_noncentered(y, sigma):
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, 5.0)
        tau = pm.HalfCauchy("tau", 5.0)
        theta_trans = pm.Normal("theta_trans", 0.0, 1.0, shape=len(y))
        theta = pm.Deterministic("theta", theta_trans * tau + mu)
        pm.Normal("y", theta, sigma, observed=y)
    return model


def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    with pm.Model() as model:
        alpha = pm.Normal("alpha", pmualpha, psalpha)
        beta = pm.Normal("beta", pmubeta, psbeta)
        sigma = pm.HalfFlat("sigma")
        pm.Normal("y", alpha + beta * x, sigma, observed=y)
    return model


def arK(y, K):
    K = int(K)
    lags = np.stack([y[K - k - 1:len(y) - k - 1] for k in range(K)], -1)
    with pm.Model() as model:
        alpha = pm.Normal("alpha", 0.0, 10.0)
        beta = pm.Normal("beta", 0.0, 10.0, shape=K)
        sigma = pm.HalfCauchy("sigma", 2.5)
        pm.Normal("y", alpha + pt.dot(lags, beta), sigma, observed=y[K:])
    return model


def garch11(y, sigma1):
    with pm.Model() as model:
        mu = pm.Flat("mu")
        alpha0 = pm.HalfFlat("alpha0")
        alpha1 = pm.Uniform("alpha1", 0.0, 1.0)
        beta1 = pm.Uniform("beta1", 0.0, 1.0 - alpha1)
        pm.Potential("beta1_flat", pt.log1p(-alpha1))  # Stan's beta1 is flat on its bound

        def step(y_previous, previous, mu, alpha0, alpha1, beta1):
            return pt.sqrt(alpha0 + alpha1 * (y_previous - mu) ** 2 + beta1 * previous ** 2)

        rest = pytensor.scan(step, sequences=[pt.as_tensor(y[:-1])],
                             outputs_info=[pt.as_tensor(np.float64(sigma1))],
                             non_sequences=[mu, alpha0, alpha1, beta1], return_updates=False)
        sigma = pt.concatenate([pt.as_tensor([np.float64(sigma1)]), rest])
        pm.Normal("y", mu, sigma, observed=y)
    return model


def gp_pois_regr(x, k):
    n = len(x)
    distance = x[:, None] - x[None, :]
    with pm.Model() as model:
        rho = pm.Gamma("rho", 25.0, 4.0)
        alpha = pm.HalfNormal("alpha", 2.0)
        f_tilde = pm.Normal("f_tilde", 0.0, 1.0, shape=n)
        cov = alpha ** 2 * pt.exp(-0.5 * distance ** 2 / rho ** 2) + 1e-10 * np.eye(n)
        f = pm.Deterministic("f", pt.dot(pt.linalg.cholesky(cov), f_tilde))
        pm.Poisson("k", pt.exp(f), observed=k)
    return model


def hmm_example(y, K):
    K = int(K)
    with pm.Model() as model:
        theta1 = pm.Dirichlet("theta1", np.ones(K))
        theta2 = pm.Dirichlet("theta2", np.ones(K))
        first = pm.HalfFlat("mu_first", initval=3.0)
        gap = pm.HalfFlat("mu_gap", initval=7.0)
        mu = pm.Deterministic("mu", pt.stack([first, first + gap]))
        pm.Potential("mu_prior", pm.logp(pm.Normal.dist(3.0, 1.0), mu[0])
                     + pm.logp(pm.Normal.dist(10.0, 1.0), mu[1]))
        log_theta = pt.log(pt.stack([theta1, theta2]))
        emission = pm.logp(pm.Normal.dist(mu, 1.0), pt.as_tensor(y)[:, None])

        def forward(emitted, gamma, log_theta):
            return pt.logsumexp(gamma[:, None] + log_theta, axis=0) + emitted

        gammas = pytensor.scan(forward, sequences=[emission[1:]], outputs_info=[emission[0]],
                               non_sequences=[log_theta], return_updates=False)
        pm.Potential("y", pt.logsumexp(gammas[-1]))
    return model


def diamonds(Y, X):
    Xc = X[:, 1:] - X[:, 1:].mean(0)
    with pm.Model() as model:
        b = pm.Normal("b", 0.0, 1.0, shape=Xc.shape[1])
        intercept = pm.StudentT("Intercept", nu=3.0, mu=8.0, sigma=10.0)
        sigma = pm.HalfStudentT("sigma", nu=3.0, sigma=10.0)
        pm.Normal("Y", intercept + pt.dot(Xc, b), sigma, observed=Y)
    return model


def logearn_interaction(earn, height, male):
    log_earn = np.log(earn)
    with pm.Model() as model:
        beta = pm.Flat("beta", shape=4)
        sigma = pm.HalfFlat("sigma")
        mean = beta[0] + beta[1] * height + beta[2] * male + beta[3] * height * male
        pm.Normal("log_earn", mean, sigma, observed=log_earn)
    return model



#: posteriordb's name -> this module's translation
STORIES = {name: globals()[function] for name, function in PROGRAMS.items()}
