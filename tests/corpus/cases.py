"""The corpus: each user-style story with its data, its truth and the methods it runs on.

A :class:`Case`'s truth comes from outside the code under test: a closed form or numpy
quadrature (:mod:`tests.corpus.truth`) for the user-style stories, posteriordb's
reference draws (made with Stan) for the translated programs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ppl_notes import guide, model
from tests.corpus import posteriordb_stories as pdb
from tests.corpus import truth
from tests.corpus import user_stories as us


@dataclass
class Case:
    """One story of the corpus.

    ``truth`` maps element names (``"w[1]"``; ``derived`` names functions of the draws)
    to their posterior moments. ``reference_mcse`` holds the reference's own Monte Carlo
    error (posteriordb); closed forms and quadrature have none worth counting.
    """

    name: str
    story: object
    data: dict
    make_truth: Callable[[], dict]
    source: str
    methods: tuple[str, ...] = ("svi", "nuts", "map")
    nuts: dict = field(default_factory=dict)
    svi: dict = field(default_factory=dict)
    derived: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)
    reference_mcse: dict[str, float] = field(default_factory=dict)
    mode_known: bool = True
    svi_means_exact: bool = False
    guide: object = None

    @cached_property
    def truth(self) -> dict[str, truth.Moments]:
        """``{element: Moments}``, one per scalar element."""
        moments = self.make_truth()
        flat = {}
        for name, value in moments.items():
            if value.mean.size == 1:
                flat[name] = value
            else:
                for i in range(value.mean.size):
                    flat[f"{name}[{i}]"] = truth.Moments(
                        value.mean[i:i + 1], value.sd[i:i + 1],
                        None if value.mode is None else value.mode[i:i + 1])
        return flat

    def draws(self, fit, name: str) -> np.ndarray:
        """Draws of one element, sample dims kept (``(chain, draw)`` or ``(sample,)``)."""
        if name in self.derived:
            return self.derived[name](fit)
        match = re.fullmatch(r"([\w.]+)\[(\d+)\]", name)
        site, index = (match.group(1), int(match.group(2))) if match else (name, None)
        values = fit[site]
        lead = len(fit.sample_dims)
        values = values.reshape(values.shape[:lead] + (-1,))
        return values[..., 0 if index is None else index]


def _rng(seed):
    return np.random.default_rng(seed)


def _sorted_locs(which):
    return lambda fit: np.sort(fit["locs"], axis=-1)[..., which]


def _normal_case(name, fn, data_key, observed, seed=1, prior_sd=10.0, n=40, **extra):
    x = _rng(seed).normal(1.5, 1.0, n)
    return Case(name, model(observed=observed)(fn), {data_key: x},
                lambda: {"mu": truth.normal_mean(x, 1.0, prior_sd)}, "closed form",
                svi_means_exact=True, **extra)


def user_cases() -> list[Case]:
    """The user-style stories (20)."""
    cases = []
    x32 = _rng(0).normal(3.0, 2.0, 30).astype(np.float32)
    cases.append(Case(
        "normal_mean_float32",
        model(observed="x", dtype=torch.float32)(us.normal_mean_float32), {"x": x32},
        lambda: {"mu": truth.normal_mean(x32.astype(float), 2.0, 10.0)}, "closed form",
        svi_means_exact=True))

    flips = (_rng(1).random(30) < 0.7).astype(float)
    k = flips.sum()
    coin = model(observed=())(us.coin)
    cases.append(Case("coin", coin, {"data": flips},
                      lambda: {"latent_fairness": truth.beta(10 + k, 10 + len(flips) - k)},
                      "closed form", guide=guide(coin)(us.coin_guide), svi_means_exact=True))

    X = _rng(2).normal(size=(60, 3))
    X[:, 2] = 0.8 * X[:, 1] + 0.6 * X[:, 2]  # correlated columns: a correlated posterior
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.5 * _rng(3).normal(size=60)

    def linear_truth():
        mean, cov = truth.gaussian_linear(X, y, 0.5, np.eye(3))
        return {"w": truth.m(mean, np.sqrt(np.diag(cov)), mean)}

    cases.append(Case("linear_regression_matmul", model(observed="y")(us.linear_regression),
                      {"X": X, "y": y}, linear_truth, "closed form", svi_means_exact=True))

    cases.append(Case("poisson_total_scalar", model(observed="total")(us.poisson_total),
                      {"total": np.array(37.0), "exposure": 12.0},
                      lambda: {"rate": truth.gamma(2.0 + 37.0, 1.0 + 12.0)}, "closed form"))

    counts = np.concatenate([_rng(4).poisson(2.0, 25), _rng(5).poisson(7.0, 15)]).astype(float)

    def change_truth():
        moments, _ = truth.change_point(counts, 2.0, 0.5)
        return moments

    cases.append(Case("change_point_global_discrete", model(observed="y")(us.change_point),
                      {"y": counts}, change_truth, "closed form (enumeration)"))

    xf = _rng(6).normal(0.8, 1.0, 25)
    cases.append(Case("factor_and_deterministic",
                      model(observed="x")(us.factor_and_deterministic), {"x": xf},
                      lambda: {"mu": truth.normal_mean(xf, 1.0, 10.0, extra_precision=0.25)},
                      "closed form", svi_means_exact=True,
                      derived={"mu_squared_check": lambda fit: fit["mu_squared"] - fit["mu"] ** 2}))

    xm = _rng(7).normal(2.0, 1.0, 50)
    seen = _rng(8).random(50) < 0.6
    cases.append(Case("masked_mean", model(observed="x")(us.masked_mean), {"x": xm, "seen": seen},
                      lambda: {"mu": truth.normal_mean(xm[seen], 1.0, 10.0)}, "closed form",
                      svi_means_exact=True))

    cov = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    xv = _rng(9).multivariate_normal([1.0, -1.0, 0.5], cov, 20)

    def mvn_truth():
        precision = np.eye(3) / 25 + len(xv) * np.linalg.inv(cov)
        covariance = np.linalg.inv(precision)
        mean = covariance @ np.linalg.inv(cov) @ xv.sum(0)
        return {"mu": truth.m(mean, np.sqrt(np.diag(covariance)), mean)}

    cases.append(Case("multivariate_to_event", model(observed="x")(us.multivariate_mean),
                      {"x": xv, "covariance": cov}, mvn_truth, "closed form",
                      svi_means_exact=True))

    xl = _rng(10).normal(size=80)
    yl = (_rng(11).random(80) < 1 / (1 + np.exp(-(0.5 + 1.5 * xl)))).astype(float)

    def logistic_truth():
        def log_density(a, b):
            logits = a[..., None] + b[..., None] * xl
            return (np.sum(yl * logits - np.logaddexp(0, logits), axis=-1)
                    + truth.normal_log_pdf(a, 0, 2.5) + truth.normal_log_pdf(b, 0, 2.5))
        return truth.grid_2d(log_density, (-4, 4), (-4, 6), ("intercept", "slope"))

    cases.append(Case("logistic_regression", model(observed="y")(us.logistic_regression),
                      {"x": xl, "y": yl}, logistic_truth, "quadrature"))

    Xp = np.column_stack([np.ones(50), _rng(12).normal(size=50)])
    cp = _rng(13).poisson(np.exp(Xp @ np.array([1.0, 0.4]))).astype(float)

    def poisson_truth():
        def log_density(a, b):
            rate = a[..., None] * Xp[:, 0] + b[..., None] * Xp[:, 1]
            return (np.sum(cp * rate - np.exp(rate), axis=-1) + truth.normal_log_pdf(a, 0, 1)
                    + truth.normal_log_pdf(b, 0, 1))
        out = truth.grid_2d(log_density, (-2, 3), (-2, 2), ("w[0]", "w[1]"))
        return out

    cases.append(Case("poisson_regression_matmul", model(observed="counts")(us.poisson_regression),
                      {"X": Xp, "counts": cp}, poisson_truth, "quadrature"))

    ya = np.zeros(80)
    noise = _rng(14).normal(0, 0.7, 80)
    for t in range(1, 80):
        ya[t] = 0.6 * ya[t - 1] + noise[t]

    def ar_truth():
        def log_density(phi, sigma):
            resid = ya[1:] - phi[..., None] * ya[:-1]
            return (np.sum(truth.normal_log_pdf(resid, 0, sigma[..., None]), axis=-1)
                    - 0.5 * sigma**2)  # HalfNormal(1); Uniform(-1, 1) is flat
        return truth.grid_2d(log_density, (-0.999, 0.999), (0.05, 3.0), ("phi", "sigma"))

    cases.append(Case("ar1_python_loop", model(observed=())(us.ar1), {"y": ya}, ar_truth,
                      "quadrature"))

    xg = np.concatenate([_rng(15).normal(-2.0, 1.0, 40), _rng(16).normal(2.5, 1.0, 40)])

    def gmm_truth():
        def log_density(a, b):
            mix = np.logaddexp(truth.normal_log_pdf(xg, a[..., None], 1.0),
                               truth.normal_log_pdf(xg, b[..., None], 1.0)) + np.log(0.5)
            return (np.sum(mix, axis=-1) + truth.normal_log_pdf(a, 0, 10)
                    + truth.normal_log_pdf(b, 0, 10))
        # one label order (a < b) carries half the mass: the sorted means' moments
        both = truth.grid_2d(lambda a, b: np.where(a < b, log_density(a, b), -np.inf),
                             (-6, 4), (-4, 6), ("low", "high"))
        return {"locs_low": both["low"], "locs_high": both["high"]}

    sorted_locs = {"locs_low": _sorted_locs(0), "locs_high": _sorted_locs(1)}
    cases.append(Case("gmm_locs_assignment", model(observed="obs")(us.gmm), {"data": xg},
                      gmm_truth, "quadrature", methods=("svi", "nuts", "map", "em"),
                      derived=sorted_locs))
    cases.append(Case("gmm_vindex", model(observed="obs")(us.gmm_vindex), {"data": xg},
                      gmm_truth, "quadrature", methods=("svi", "nuts", "map", "em"),
                      derived=sorted_locs))

    groups = np.repeat(np.arange(5), 6)
    yg = _rng(17).normal(np.array([1.0, 2.0, 0.0, 3.0, 1.5])[groups], 1.0)

    def grouped_truth():
        # (mu, theta_1..5) jointly Gaussian: mu ~ N(0, 100), theta|mu ~ N(mu, 4), y ~ N(theta, 1)
        G = 5
        precision = np.zeros((G + 1, G + 1))
        precision[0, 0] = 1 / 100 + G / 4
        precision[0, 1:] = precision[1:, 0] = -1 / 4
        counts = np.bincount(groups, minlength=G)
        precision[1:, 1:] = np.diag(1 / 4 + counts)
        linear = np.concatenate([[0.0], np.bincount(groups, weights=yg, minlength=G)])
        covariance = np.linalg.inv(precision)
        mean = covariance @ linear
        sd = np.sqrt(np.diag(covariance))
        return {"mu": truth.m(mean[0], sd[0], mean[0]),
                "theta": truth.m(mean[1:], sd[1:], mean[1:])}

    cases.append(Case("grouped_means_index_covariate",
                      model(observed="y")(us.grouped_means),
                      {"group": groups, "y": yg, "num_groups": 5}, grouped_truth, "closed form",
                      svi_means_exact=True))

    cases.append(_normal_case("renamed_data", us.renamed_data, "data", "obs", seed=18))
    cases.append(_normal_case("closure", us.make_closure(3.0), "x", "x", seed=19, prior_sd=3.0,
                              nuts={"processes": 2}))
    cases.append(_normal_case("lambda_to_event", us.lambda_story, "x", "x", seed=20,
                              nuts={"processes": 2}))

    xv2 = _rng(21).normal(0.0, 1.7, 200)
    variance = model(observed="x")(us.unknown_variance)
    cases.append(Case("unknown_variance_stan_guide", variance, {"x": xv2},
                      lambda: {"variance": truth.inverse_gamma(3 + 100, 2 + np.sum(xv2**2) / 2)},
                      "closed form", guide=guide(variance)(us.unknown_variance_guide),
                      svi_means_exact=True))

    trials = _rng(22).integers(5, 20, 30).astype(float)
    successes = _rng(23).binomial(trials.astype(int), 0.3).astype(float)
    cases.append(Case("binomial_counts", model(observed="successes")(us.binomial_counts),
                      {"successes": successes, "trials": trials},
                      lambda: {"p": truth.beta(1 + successes.sum(),
                                               1 + (trials - successes).sum())},
                      "closed form"))

    transition = np.array([[0.9, 0.1], [0.2, 0.8]])
    states = [0]
    for _ in range(59):
        states.append(int(_rng(100 + len(states)).random() < transition[states[-1], 1]))
    yh = _rng(24).normal(np.array([0.0, 4.0])[states], 1.0)

    def hmm_truth():
        def log_density(a, b):
            emit = np.stack(np.broadcast_arrays(truth.normal_log_pdf(yh, a[..., None], 1.0),
                                                truth.normal_log_pdf(yh, b[..., None], 1.0)),
                            axis=-1)
            log_t = np.log(transition)
            alpha = emit[..., 0, :] + log_t[0]  # state_0 ~ transition[0] (from state 0)
            for t in range(1, len(yh)):
                alpha = special_logsumexp(alpha[..., :, None] + log_t, axis=-2) + emit[..., t, :]
            return (special_logsumexp(alpha, axis=-1) + truth.normal_log_pdf(a, 0, 1)
                    + truth.normal_log_pdf(b, 5, 1))
        return truth.grid_2d(log_density, (-3, 3), (1, 8), ("locs[0]", "locs[1]"))

    cases.append(Case("hmm_markov", model(observed=())(us.hmm_fixed_transition), {"y": yh},
                      hmm_truth, "quadrature (forward algorithm)"))
    return cases


def special_logsumexp(values, axis):
    from scipy.special import logsumexp

    return logsumexp(values, axis=axis)


#: name -> (story, observed, NUTS options, guide). GARCH has its own guide: Pyro's
#: autoguides map each site with the support of their first trace, and beta1's
#: (0, 1 - alpha1) moves with alpha1.
_PDB_STORIES = {
    name: (getattr(pdb, pdb.PROGRAMS[name]), pdb.OBSERVED[name], nuts, *guide_fn)
    for name, nuts, *guide_fn in [
        ("eight_schools-eight_schools_noncentered", {}),
        ("kilpisjarvi_mod-kilpisjarvi", {"mass_matrix": "dense"}),
        ("arK-arK", {}),
        ("garch-garch11", {}, pdb.garch11_guide),
        ("gp_pois_regr-gp_pois_regr", {}),
        ("hmm_example-hmm_example", {}),
        ("diamonds-diamonds", {}),
        ("earnings-logearn_interaction", {}),
    ]
}


def _stan_to_ours(name: str) -> str:
    """``beta[1]`` (Stan, 1-based) -> ``beta[0]``."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]", name)
    return f"{match.group(1)}[{int(match.group(2)) - 1}]" if match else name


def posteriordb_cases() -> list[Case]:
    """The eight posteriordb programs (8)."""
    cases = []
    for name, (fn, observed, nuts, *guide_fn) in _PDB_STORIES.items():
        _, reference = pdb.load(name)
        moments = {_stan_to_ours(p): truth.m(row["mean"], row["sd"])
                   for p, row in reference.iterrows()}
        mcse = {_stan_to_ours(p): float(row["mcse_mean"]) for p, row in reference.iterrows()}
        story = model(observed=observed, name=name.split("-")[1])(fn)
        # Pyro's JitTrace_ELBO did not get through GARCH's 200-step recursion in 8 minutes
        svi = {"jit": False, "steps": 300} if guide_fn else {}
        cases.append(Case(name, story, pdb.data_for(name), lambda moments=moments: moments,
                          "posteriordb", nuts=nuts, svi=svi, reference_mcse=mcse,
                          mode_known=False,
                          guide=guide(story)(guide_fn[0]) if guide_fn else None))
    return cases


def _round_two() -> list[Case]:
    from tests.corpus.cases_two import round_two_cases

    return round_two_cases(Case)


CASES = {case.name: case for case in user_cases() + posteriordb_cases() + _round_two()}
