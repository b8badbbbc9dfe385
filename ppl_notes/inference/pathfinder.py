r"""Pathfinder: Gaussians along L-BFGS paths, the best of each, PSIS across paths.

Zhang, Carpenter, Gelman & Vehtari (2022), "Pathfinder: Parallel quasi-Newton
variational inference", JMLR 23(306), as CmdStan, BlackJAX and pymc-extras ship it
(Pyro and NumPyro have none). On the unconstrained potential
:math:`U(x) = -\log p(x, T(x)) - \log|J_T(x)|`:

1. ``num_paths`` L-BFGS runs minimise :math:`U` from dispersed starts (a prior draw, or
   uniform in (-2, 2) where the prior cannot be drawn, as Stan starts),
   in lockstep (:mod:`~ppl_notes.vi.lbfgs_paths`).
2. At every iterate :math:`x_l` of a path the L-BFGS inverse Hessian :math:`H_l` (its last
   ``history`` pairs) gives a Gaussian :math:`q_l = \mathcal N(x_l - H_l\nabla U(x_l), H_l)`,
   a Newton step's mean with the local covariance (the paper's Algorithms 3-4; here
   :math:`H_l` is written out as a dense matrix, at most :data:`MAX_DIM` elements).
3. Each :math:`q_l`'s ELBO is estimated from ``num_elbo_draws`` draws; the path keeps
   the best :math:`q_l` and draws ``draws_per_path`` from it.
4. The draws of all paths are pooled, weighted by :math:`p(x, z)/q_{\text{path}}(z)` with
   Pareto smoothing (Vehtari et al. 2024), and ``num_draws`` are resampled with
   replacement: the multi-path estimate, which mixes paths that found different modes in
   proportion to their mass. The Pareto :math:`\hat k` of those weights says how far the
   pooled Gaussians are from the posterior (``info["khat"]``).

Every potential evaluation (gradients included) is counted in
``info["gradient_evaluations"]``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from ppl_notes._result import RunResult
from ppl_notes.errors import InferenceError, OptionError
from ppl_notes.evaluation import RunContext, StoryFacts
from ppl_notes.evaluation.compile import resolve_compiler
from ppl_notes.evaluation.draws import posterior_of
from ppl_notes.evaluation.potential import BatchedPotential, ChunkedPotential
from ppl_notes.inference._options import Option, positive_int
from ppl_notes.psis import importance_ess_share, psis_weights
from ppl_notes.vi.lbfgs_paths import LBFGSPath, inverse_hessian, lbfgs_paths
from ppl_notes.vi.restarts import restart_seed

__all__ = ["OPTIONS", "run", "best_gaussians", "starting_points", "MAX_DIM"]

#: The most unconstrained elements Pathfinder's dense covariances are written out for
MAX_DIM = 1000

OPTIONS = (
    positive_int("num_paths", 4, "L-BFGS paths from dispersed starts (Stan's default: 4)"),
    positive_int("draws_per_path", 1000, "draws from each path's best Gaussian, pooled "
                 "before the importance resampling"),
    positive_int("num_draws", 1000, "posterior draws resampled from the pooled draws"),
    positive_int("num_elbo_draws", 25, "draws per ELBO estimate along a path (Stan: 25)"),
    positive_int("history", 6, "L-BFGS pairs kept (Stan: 6)"),
    positive_int("max_iterations", 1000, "L-BFGS iterations per path at most"),
    Option("tolerance", (int, float), 1e-8, "a path ends when an iteration lowers U by less "
           "than this share of |U|", lambda v: v > 0, "a number > 0"),
    Option("recover_discrete", (bool,), True, "draw enumerated discrete sites for each draw"),
    Option("psis_resample", (bool,), True, "resample the pooled draws by their Pareto-"
           "smoothed importance weights (False: keep every path's draws, unweighted)"),
)


def _compiler() -> str:
    return resolve_compiler("auto")


def _gaussian_at(path: LBFGSPath, at: int, history: int):
    """``(mean, covariance Cholesky factor)`` of :math:`q_l`, or None where not defined."""
    covariance = inverse_hessian(path, history, last=at)
    factor, info = torch.linalg.cholesky_ex(torch.as_tensor(covariance))
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        return None
    mean = path.positions[at] - covariance @ path.gradients[at]
    return mean, factor.numpy()


def _log_normal(points: np.ndarray, mean: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Log density of ``N(mean, factor factor^T)`` at ``points (n, d)``."""
    from scipy.linalg import solve_triangular

    whitened = solve_triangular(factor, (points - mean).T, lower=True)
    return (-0.5 * (whitened**2).sum(0) - np.log(np.abs(np.diag(factor))).sum()
            - 0.5 * mean.shape[0] * math.log(2 * math.pi))


def best_gaussians(evaluate: ChunkedPotential, paths: list[LBFGSPath], history: int,
                   num_elbo_draws: int, rng: np.random.Generator) -> list[dict]:
    """Each path's Gaussian of highest estimated ELBO: ``{mean, factor, elbo, iterate}``.

    A path with no usable Gaussian (its first iterate only, or no positive curvature)
    gets the Gaussian of its last point with the identity covariance.
    """
    best = []
    for path in paths:
        chosen = None
        for at in range(1, len(path.positions)):
            gaussian = _gaussian_at(path, at, history)
            if gaussian is None:
                continue
            mean, factor = gaussian
            draws = mean + rng.standard_normal((num_elbo_draws, mean.shape[0])) @ factor.T
            potentials, _ = evaluate(draws)
            elbo = float(np.mean(-potentials - _log_normal(draws, mean, factor)))
            if np.isfinite(elbo) and (chosen is None or elbo > chosen["elbo"]):
                chosen = {"mean": mean, "factor": factor, "elbo": elbo, "iterate": at}
        if chosen is None:
            d = path.positions[-1].shape[0]
            chosen = {"mean": path.positions[-1], "factor": np.eye(d), "elbo": -math.inf,
                      "iterate": len(path.positions) - 1}
        best.append(chosen)
    return best


def _pooled_draws(evaluate: ChunkedPotential, best: list[dict], per_path: int,
                  rng: np.random.Generator):
    """Draws from each path's best Gaussian, their log p and log q under that Gaussian."""
    draws, log_p, log_q = [], [], []
    for gaussian in best:
        mean, factor = gaussian["mean"], gaussian["factor"]
        points = mean + rng.standard_normal((per_path, mean.shape[0])) @ factor.T
        potentials, _ = evaluate(points)
        draws.append(points)
        log_p.append(-potentials)
        log_q.append(_log_normal(points, mean, factor))
    return np.concatenate(draws), np.concatenate(log_p), np.concatenate(log_q)


def _pathfinder(model, data, seed: int, options: dict[str, Any], facts: StoryFacts):
    """The multi-path run, steps 1-3 of the module docstring (``facts``: the story's).

    Returns ``(potential, evaluator, paths, best, flat, log p, log q, finite mask, lbfgs
    evaluations)``.
    """
    paths_count = options["num_paths"]
    potential = BatchedPotential(model, data, paths_count, compiler=_compiler(), facts=facts)
    if potential.dim > MAX_DIM:
        raise OptionError(f"method 'pathfinder': story {model.name!r} has {potential.dim} "
                          f"unconstrained elements; Pathfinder's dense covariances are "
                          f"written out up to {MAX_DIM}. Use method='svi' (mean-field)")
    evaluate = ChunkedPotential(potential)
    seeds = [restart_seed(seed, r + 1) for r in range(paths_count)]
    starts = np.stack([potential.initial_points("sample", [s], "Pathfinder")[0] for s in seeds])
    paths, lbfgs_evaluations = lbfgs_paths(evaluate, starts, options["max_iterations"],
                                           options["history"], options["tolerance"])
    rng = np.random.default_rng(seed)
    best = best_gaussians(evaluate, paths, options["history"], options["num_elbo_draws"], rng)
    flat, log_p, log_q = _pooled_draws(evaluate, best, options["draws_per_path"], rng)
    finite = np.isfinite(log_p)
    if not finite.any():
        raise InferenceError(f"pathfinder: the log density of story {model.name!r} is not "
                             "finite at any draw of the paths' Gaussians; check the priors "
                             "and the data")
    return potential, evaluate, paths, best, flat, log_p, log_q, finite, lbfgs_evaluations


#: Pathfinder's settings when it starts NUTS's chains: Stan's, with fewer pooled draws
NUTS_START = {"num_paths": 4, "draws_per_path": 100, "num_elbo_draws": 25, "history": 6,
              "max_iterations": 1000, "tolerance": 1e-8}


def starting_points(model, data, count: int, seed: int, facts: StoryFacts
                    ) -> tuple[np.ndarray, int]:
    """NUTS's ``init="pathfinder"``: ``count`` points drawn by multi-path Pathfinder.

    The points are resampled from the pooled draws by their Pareto-smoothed weights (the
    chains start in the typical set, as Stan's and BlackJAX's Pathfinder initialisation
    does); the gradient evaluations spent come back with them.
    """
    _, evaluate, _, _, flat, log_p, log_q, finite, _ = _pathfinder(model, data, seed,
                                                                   NUTS_START, facts)
    kept = np.flatnonzero(finite)
    weights, _ = psis_weights(log_p[finite], log_q[finite])
    rng = np.random.default_rng(seed)
    replace = count > int((weights > 0).sum())
    chosen = kept[rng.choice(len(kept), size=count, replace=replace, p=weights)]
    return flat[chosen], evaluate.evaluations


def run(context: RunContext) -> RunResult:
    """Multi-path Pathfinder (module docstring)."""
    started = time.perf_counter()
    model, data, seed, options = context.model, context.data, context.seed, context.options
    facts = context.facts
    potential, evaluate, paths, best, flat, log_p, log_q, finite, lbfgs_evaluations = \
        _pathfinder(model, data, seed, options, facts)
    weights, khat = psis_weights(log_p[finite], log_q[finite])
    ess_share = importance_ess_share(log_p[finite], log_q[finite])
    kept = np.flatnonzero(finite)
    rng = np.random.default_rng(seed + 1)
    if options["psis_resample"]:
        chosen = kept[rng.choice(len(kept), size=options["num_draws"], replace=True,
                                 p=weights)]
    else:
        chosen = kept
    kept_draws = potential.unflatten(torch.as_tensor(flat[chosen], dtype=torch.float64))
    posterior, evaluation = posterior_of(model, data, kept_draws, facts, unconstrained=True,
                                         recover_discrete=options["recover_discrete"],
                                         seed=seed + 2, order=facts.latent)
    return RunResult(
        method="pathfinder", sample_dims=("sample",), posterior=posterior,
        sample_stats={"log_p": evaluation.log_joint},
        log_likelihood=evaluation.log_likelihood, options=options,
        info={"paths": [{"iterations": len(p.positions) - 1, "stopped": p.stopped,
                         "best_iterate": b["iterate"], "elbo": b["elbo"]}
                        for p, b in zip(paths, best, strict=True)],
              "khat": float(khat), "importance_ess_share": float(ess_share),
              "gradient_evaluations": int(evaluate.evaluations),
              "lbfgs_evaluations": int(lbfgs_evaluations),
              "compiler": potential.compiler, "path": facts.path,
              "enumerated": [n for n in facts.latent if n in facts.discrete]},
        seconds=time.perf_counter() - started)
