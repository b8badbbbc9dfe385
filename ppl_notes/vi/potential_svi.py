r"""SVI for the autoguides on the compiled potential: K restarts in one process, in lockstep.

``guide="meanfield"``, ``"fullrank"`` and ``"lowrank"`` are Gaussians over the flat
unconstrained vector of the continuous latent sites (Pyro's AutoNormal,
AutoMultivariateNormal and AutoLowRankMultivariateNormal). Their ELBO needs nothing of a
Pyro trace: only the potential and its gradient at a batch of draws, which
:class:`~ppl_notes.evaluation.potential.BatchedPotential` gives from the tape that NUTS
runs (discrete sites summed out exactly, as TraceEnum_ELBO sums them). Stan's ADVI and
NumPyro's autoguides fit on the compiled log density the same way.

Every restart is a Gaussian of :mod:`~ppl_notes.vi.gaussian_vi`, all of them
evaluated in one potential call per step, so ``restarts=4`` (the default) costs about
what one fit costs in Pyro's loop. Restart 0 starts at the prior's median, restart
:math:`k \ge 1` at a prior draw (a uniform (-2, 2) point where a prior cannot be drawn).
With ``init="map"`` (the default) each then runs L-BFGS to the mode of the unconstrained
density (:mod:`~ppl_notes.vi.lbfgs_paths`, all restarts in lockstep, one gradient
per restart and iteration) and starts at :math:`\mathcal N(\hat x, H)` with :math:`H`
the L-BFGS inverse Hessian there, Pathfinder's Gaussian at the path's end; a few Newton
steps of many draws each then finish the fit, where from the prior's point they took
15-40 (measured on posteriordb). ``init="prior"`` starts at
:math:`\mathcal N(x_0, 0.1^2 I)`, Pyro's initial scale. Each restart has its own fixed
draws. The fitted Gaussians are written into the Pyro autoguides, so the result, its
saved parameters, ``predict`` and ``log_evidence`` are those of an autoguide fit.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import (
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn.module import PyroParam

from ppl_notes._result import RunResult
from ppl_notes._sites import unconstrained_value
from ppl_notes.errors import PartialResultWarning
from ppl_notes.evaluation import RunContext
from ppl_notes.evaluation.draws import discrete_draws, in_story_order, posterior_of
from ppl_notes.evaluation.potential import BatchedPotential, ChunkedPotential
from ppl_notes.evaluation.propriety import flat_direction
from ppl_notes.relabel import components_of
from ppl_notes.vi.fixed_draws import draws_per_fit, moment_matched_normal
from ppl_notes.vi.gaussian_family import FAMILY_GUIDES, Gaussian
from ppl_notes.vi.gaussian_vi import FitTrace, fit_gaussians
from ppl_notes.vi.importance import Correction, correction_of, proposals_needed, weighed
from ppl_notes.vi.lbfgs_paths import inverse_hessian, lbfgs_paths
from ppl_notes.vi.restarts import restart_seed, stack_restarts

__all__ = ["run_on_potential", "FAMILY_GUIDES", "INITIAL_SCALE"]

#: The starting Gaussians' sd in every unconstrained direction (Pyro's init_scale)
INITIAL_SCALE = 0.1


def _rank(dim: int) -> int:
    """The low-rank family's rank: Pyro's default, the square root of the dimension."""
    return max(1, int(round(math.sqrt(dim))))


def _start(family: str, point: np.ndarray, generator: torch.Generator,
           covariance: np.ndarray | None = None) -> Gaussian:
    """The starting Gaussian at ``point``.

    Its covariance is ``covariance`` (an L-BFGS inverse Hessian) where given and positive
    definite, else :data:`INITIAL_SCALE` in every direction.
    """
    mean = torch.as_tensor(point, dtype=torch.float64)
    dim = mean.shape[0]
    tril = None
    if covariance is not None:
        tril, info = torch.linalg.cholesky_ex(torch.as_tensor(covariance, dtype=torch.float64))
        tril = tril if int(info) == 0 and bool(torch.isfinite(tril).all()) else None
    if tril is None:
        tril = INITIAL_SCALE * torch.eye(dim, dtype=torch.float64)
    if family == "fullrank":
        return Gaussian(family, mean, tril=tril)
    # the mean-field optimum for that Gaussian: 1 / sqrt of the precision's diagonal
    scale = torch.cholesky_inverse(tril).diagonal().rsqrt()
    if family == "meanfield":
        return Gaussian(family, mean, scale=scale)
    factor = 0.01 * scale[:, None] * torch.randn(dim, _rank(dim), generator=generator,
                                                 dtype=torch.float64)
    return Gaussian(family, mean, scale=scale, factor=factor)


#: The most unconstrained elements for which the L-BFGS start's covariance is written out
_DENSE_START = 1000


def _lbfgs_starts(chunked, points: list[np.ndarray]) -> tuple[list, list, int]:
    """Each restart's L-BFGS mode search from its point: ``(points, covariances, gradients)``.

    A path whose line search failed (a density that grows without bound) keeps its point
    and gets no covariance.
    """
    paths, evaluations = lbfgs_paths(chunked, np.stack(points), max_iterations=_START_STEPS,
                                     tolerance=1e-7)
    ends, covariances = [], []
    for point, path in zip(points, paths, strict=True):
        usable = path.stopped != "line search" and len(path.positions) > 1
        ends.append(path.positions[-1] if usable else point)
        covariances.append(inverse_hessian(path) if usable and len(point) <= _DENSE_START
                           else None)
    return ends, covariances, evaluations


#: L-BFGS iterations of the start's mode search at most
_START_STEPS = 200


def _shrunk_until_finite(potential, q: Gaussian, draws: torch.Tensor) -> Gaussian:
    """The start, its scales shrunk tenfold (up to 4 times) while a draw's density is not finite."""
    for _ in range(4):
        values, _ = potential(np.ascontiguousarray(q.draw(draws).numpy()))
        if np.isfinite(values).all():
            return q
        q = Gaussian(q.family, q.mean, None if q.scale is None else q.scale / 10,
                     None if q.tril is None else q.tril / 10,
                     None if q.factor is None else q.factor / 10)
    return q


def _write_guide(guide, q: Gaussian, names: list[str], sizes: list[int], data) -> None:
    """Set a Pyro autoguide's parameters to the Gaussian ``q`` (flat order ``names``).

    The guide's prototype is set up first (one run of the story), where it is not yet.
    """
    if guide.prototype_trace is None:
        guide._setup_prototype(**data)
    dtype = torch.get_default_dtype()
    offsets, at = {}, 0
    for name, size in zip(names, sizes, strict=True):
        offsets[name] = torch.arange(at, at + size)
        at += size
    if isinstance(guide, AutoNormal):
        for name in guide._event_dims:
            loc = guide.locs
            for part in name.split("."):
                loc = getattr(loc, part)
            shape = loc.shape
            index = offsets[name]
            deep_setattr(guide.locs, name, PyroParam(q.mean[index].reshape(shape).to(dtype)))
            deep_setattr(guide.scales, name, PyroParam(q.scale[index].reshape(shape).to(dtype),
                                                       guide.scale_constraint,
                                                       guide._event_dims[name]))
        return
    index = torch.cat([offsets[name] for name in guide._unconstrained_shapes])
    guide.loc = torch.nn.Parameter(q.mean[index].to(dtype))
    if isinstance(guide, AutoMultivariateNormal):
        covariance = q.covariance()[index][:, index]
        tril = torch.linalg.cholesky(covariance)
        scale = tril.diagonal()
        guide.scale = PyroParam(scale.to(dtype), guide.scale_constraint)
        guide.scale_tril = PyroParam((tril / scale[:, None]).to(dtype),
                                     guide.scale_tril_constraint)
        return
    scale = q.scale[index]
    guide.scale = PyroParam(scale.to(dtype), guide.scale_constraint)
    guide.cov_factor = torch.nn.Parameter((q.factor[index] / scale[:, None]).to(dtype))


def _guide_parameters(model, data, facts, family: str, qs: list[Gaussian], potential
                      ) -> list[dict[str, np.ndarray]]:
    """Each ``q`` as the parameters of the Pyro autoguide of ``family``.

    Keyed by their param store names. One guide, whose prototype runs the story once,
    serves every restart.
    """
    discrete = [n for n in facts.latent if n in facts.discrete or n in facts.unenumerable]
    guide_class, _ = FAMILY_GUIDES[family]
    guide = guide_class(poutine.block(model, hide=discrete), init_loc_fn=unconstrained_value)
    pyro.clear_param_store()
    guide._setup_prototype(**data)  # the story's own pyro.param sites enter the store here
    story_params = pyro.get_param_store().get_state()
    params = []
    for q in qs:
        pyro.clear_param_store()  # no restart reads another's guide parameters
        pyro.get_param_store().set_state(story_params)
        _write_guide(guide, q, potential.names, potential.sizes, data)
        with torch.no_grad(), poutine.seed(rng_seed=0), poutine.block():
            guide(**data)  # the module's parameters enter the param store when it runs
        params.append({k: v.detach().cpu().numpy().copy()
                       for k, v in pyro.get_param_store().items()})
    return params


#: Offsets the seeds of the importance step's further proposals from those of q's own draws
EXTRA_SEED = 7919


def _proposals(qs: list[Gaussian], count: int, seeds: list[int]) -> list[torch.Tensor]:
    """``count`` draws of each ``q`` in the unconstrained space, each restart's own seed."""
    points = []
    for q, seed in zip(qs, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        width = q.dim + (q.factor.shape[1] if q.family == "lowrank" else 0)
        points.append(q.draw(torch.randn(count, width, generator=generator,
                                         dtype=torch.float64)))
    return points


def _evaluate(model, data, facts, qs: list[Gaussian], potential, points, seed: int,
              options: dict[str, Any]) -> dict[str, Any]:
    r"""The kept ``points`` of every restart in one pass: values, posterior, densities.

    Every restart's draws go through the story in one pass (a story with a Python loop
    pays its per-call cost once, as NUTS's draws do), which maps them to the supports,
    honouring a support that moves with another site (GARCH's), gives the log-Jacobian,
    recovers the discrete sites and computes the pointwise log-likelihood. ``log_p`` and
    ``log_q`` are each restart's on the sites' own scale (``sample_stats``:
    :math:`\log q(\theta) = \log q(u) - \log|\det J_T(u)|`); ``log_p_u`` is
    :math:`\log p(x, T(u)) + \log|J|`, the unconstrained density that the importance
    weights compare with ``log_q_u``.
    """
    ends = np.cumsum([p.shape[0] for p in points]).tolist()
    joined = potential.unflatten(torch.cat(points))
    posterior, evaluation = posterior_of(model, data, joined, facts, unconstrained=True,
                                         recover_discrete=options["recover_discrete"],
                                         seed=seed, order=facts.latent)
    parts = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    log_q_u = [q.log_prob(p).numpy() for q, p in zip(qs, points, strict=True)]
    log_jacobian = [evaluation.log_jacobian[part] for part in parts]
    joined = {n: torch.from_numpy(v) for n, v in evaluation.constrained.items()}
    log_p = [evaluation.log_joint[part] for part in parts]
    return {"values": [{k: v[part] for k, v in joined.items()} for part in parts],
            "posterior": [{k: v[part] for k, v in posterior.items()} for part in parts],
            "log_likelihood": [{k: v[part] for k, v in evaluation.log_likelihood.items()}
                               for part in parts],
            "log_p": log_p, "log_q": [q - j for q, j in zip(log_q_u, log_jacobian,
                                                            strict=True)],
            "log_p_u": [p + j for p, j in zip(log_p, log_jacobian, strict=True)],
            "log_q_u": log_q_u}


def _kept(model, data, facts, qs: list[Gaussian], potential, found: dict[str, Any],
          more: list[torch.Tensor], chosen: list[np.ndarray], seed: int,
          options: dict[str, Any]) -> dict[str, Any]:
    """:func:`_evaluate`'s result for the draws the importance step kept.

    ``chosen[r]`` indexes restart ``r``'s proposals: its own draws, evaluated in ``found``
    already, then ``more[r]``. Only the further proposals kept are evaluated, once each
    (``seed`` gives their discrete states other uniforms than q's own draws had); a
    proposal kept twice repeats its row, discrete states included.
    """
    size = len(found["log_p"][0])
    fresh = [np.unique(c[c >= size]) for c in chosen]
    new = _evaluate(model, data, facts, qs, potential,
                    [m[torch.as_tensor(f - size, dtype=torch.long)] for m, f in
                     zip(more, fresh, strict=True)], seed, options) if any(
        f.size for f in fresh) else None
    kept: dict[str, list] = {key: [] for key in found}
    for r, (c, f) in enumerate(zip(chosen, fresh, strict=True)):
        rows = np.where(c < size, c, size + np.searchsorted(f, c))  # into own + fresh
        for key, per_restart in found.items():
            own, extra = per_restart[r], None if new is None else new[key][r]
            kept[key].append(_rows(own, extra, rows))
    return kept


def _rows(own, extra, rows: np.ndarray):
    """``rows`` of ``own`` followed by ``extra``: arrays, tensors, or dicts of them."""
    if isinstance(own, dict):
        return {k: _rows(v, None if extra is None else extra[k], rows) for k, v in own.items()}
    if torch.is_tensor(own):
        table = own if extra is None else torch.cat([own, extra])
        return table[torch.as_tensor(rows, dtype=torch.long)]
    table = own if extra is None else np.concatenate([own, extra])
    return table[rows]


def _add_discrete(model, data, facts, found: dict[str, Any], seed: int) -> None:
    """Recover the discrete sites of every restart's kept draws into their posteriors."""
    values = {n: torch.cat([v[n] for v in found["values"]]) for n in found["values"][0]}
    drawn = discrete_draws(model, data, values, facts, seed=seed)
    at = 0
    for r, posterior in enumerate(found["posterior"]):
        size = len(next(iter(posterior.values())))
        latent = {k: v for k, v in posterior.items() if k not in facts.deterministic}
        latent.update({n: v[at:at + size] for n, v in drawn.items()})
        deterministic = {k: v for k, v in posterior.items() if k in facts.deterministic}
        found["posterior"][r] = in_story_order(latent, deterministic, facts)
        at += size


def _evaluated_draws(model, data, facts, traces: list[FitTrace], potential, seeds: list[int],
                     options: dict[str, Any]) -> tuple[list[tuple], Correction | None]:
    """Every restart's draws, evaluated in one pass, after the importance step.

    With ``importance="psis"``, q's own draws decide whether more proposals are drawn
    and the draws resampled from them (:mod:`ppl_notes.vi.importance`). Returns
    ``[(values, posterior, log p, log q, log-likelihood, proposals)]`` per restart
    (``proposals``: their unconstrained ``log_p`` and ``log_q``), and the correction
    (None without the importance step).
    """
    size, qs = options["num_draws"], [t.q for t in traces]
    points = _proposals(qs, size, [s + 1 for s in seeds])
    # the discrete sites are recovered once, for the draws finally kept, unless the
    # evaluation draws them in its own run (a chain's) anyway
    deferred = (options["importance"] == "psis" and options["recover_discrete"]
                and bool(facts.discrete))
    evaluating = {**options, "recover_discrete": "same_run"} if deferred else options
    found = _evaluate(model, data, facts, qs, potential, points, seeds[0] + 2, evaluating)
    correction, proposals = None, [{} for _ in qs]
    if options["importance"] == "psis":
        log_p, log_q = found["log_p_u"], found["log_q_u"]
        correction = weighed(log_p, log_q, size)
        observed = sum(int(np.prod(facts.value_shapes[n], dtype=int)) for n in facts.observed)
        count, correction.reason = proposals_needed(correction, size, observed)
        if count > size:
            more = _proposals(qs, count - size, [s + EXTRA_SEED for s in seeds])
            extra = potential.unconstrained_log_density(torch.cat(more)).numpy()
            log_p = [np.concatenate([p, extra[r * (count - size):(r + 1) * (count - size)]])
                     for r, p in enumerate(log_p)]
            log_q = [np.concatenate([q_r, q.log_prob(m).numpy()])
                     for q_r, q, m in zip(log_q, qs, more, strict=True)]
            correction = correction_of(log_p, log_q, size, seeds[0] + 3)
            if correction.applied:
                found = _kept(model, data, facts, qs, potential, found, more,
                              correction.chosen, seeds[0] + 4, evaluating)
        proposals = [{"log_p": p, "log_q": q} for p, q in zip(log_p, log_q, strict=True)]
    if deferred and any(n not in found["posterior"][0] for n in facts.discrete):
        _add_discrete(model, data, facts, found, seeds[0] + 2)
    keys = ("values", "posterior", "log_p", "log_q", "log_likelihood")
    return ([tuple(found[k][r] for k in keys) + (proposals[r],) for r in range(len(qs))],
            correction)


def _restart_result(facts, family: str, trace: FitTrace, params: dict[str, np.ndarray],
                    evaluated: tuple, options: dict[str, Any], start_gradients: int = 0,
                    flat: dict[str, Any] | None = None) -> RunResult:
    """One restart's RunResult: its evaluated draws, and its autoguide's parameters.

    ``flat`` is the fit's flat direction (:func:`flat_direction`), found once for all
    restarts at the first one's draws.
    """
    enumerated = [n for n in facts.latent if n in facts.discrete or n in facts.unenumerable]
    _, guide_name = FAMILY_GUIDES[family]
    _, posterior, log_p, log_q, log_likelihood, proposals = evaluated
    history = pd.DataFrame({"elbo": np.asarray(trace.elbo, dtype=float)},
                           index=pd.RangeIndex(len(trace.elbo), name="step"))
    return RunResult(
        method="svi", sample_dims=("sample",), posterior=posterior,
        sample_stats={"log_p": log_p, "log_q": log_q},
        log_likelihood=log_likelihood, history=history, params=params,
        options=options, importance=proposals,
        info={"elbo": "TraceEnum_ELBO" if enumerated else "Trace_ELBO", "guide": guide_name,
              "family": family, "enumerated": enumerated, "marginal_story": False,
              "engine": "potential", "optimizer": options["optimizer"], "jit": False,
              "final_elbo": float(trace.elbo[-1]) if trace.elbo else math.nan,
              "estimator": "reparam", "steps_done": max(len(trace.elbo) - 1, 0),
              "start_gradients": start_gradients, "gradient_evaluations": trace.evaluations,
              "stopped": trace.stopped, "elbo_settled": trace.stopped == "converged",
              "guide_moves": [float(m) for m in trace.moves],
              "path": facts.path, "particles_vectorized": False,
              "components": components_of(facts),
              "flat_direction": flat,
              "distributed": None},
        partial=trace.stopped == "interrupted")


def run_on_potential(context: RunContext, compiler: str) -> RunResult:
    """Fit ``options["restarts"]`` Gaussians of ``family`` on the story's potential.

    Parameters
    ----------
    context : RunContext
        As :func:`ppl_notes.inference.svi.run` receives it, with ``guide`` the family
        (``"meanfield"``, ``"fullrank"`` or ``"lowrank"``) and the option ``optimizer``
        ``"newton"`` or ``"dadvi"``.
    compiler : str
        The potential's compiler (:class:`BatchedPotential`).

    Returns
    -------
    RunResult
        One restart's run, or the restarts stacked as chains
        (:func:`~ppl_notes.vi.restarts.stack_restarts`).
    """
    started = time.perf_counter()
    model, data, family, seed = context.model, context.data, context.guide, context.seed
    options, facts = context.options, context.facts
    count = options["restarts"]
    dim = sum(int(np.prod(facts.unconstrained_shapes[n], dtype=int)) for n in facts.continuous)
    per_fit = draws_per_fit(dim)
    # one recording for the batch of restarts: the draws go through it in chunks; a story's
    # hand-marginalised form where it has one (the same density, as NUTS uses it)
    marginal, marginal_facts = context.marginal()
    potential = BatchedPotential(marginal, data, count, compiler=compiler, facts=marginal_facts)
    chunked = ChunkedPotential(potential)
    seeds = [restart_seed(seed, r) for r in range(count)]
    # restart 0 at the prior median, the others at prior draws: the data checks' (seeded
    # by the fit's seed), then draws of their own
    drawn = potential.drawn_starts(count - 1)
    points = [potential.initial_points("median", seeds[:1], "SVI")[0], *drawn,
              *(potential.initial_points("sample", [s], "SVI")[0]
                for s in seeds[1 + len(drawn):])]
    fitted_at = time.perf_counter()
    covariances, start_gradients = [None] * count, 0
    if options["init"] == "map":
        points, covariances, start_gradients = _lbfgs_starts(chunked, points)
    starts, draws = [], []
    for point, covariance, fit_seed in zip(points, covariances, seeds, strict=True):
        generator = torch.Generator().manual_seed(fit_seed)
        width = dim + (_rank(dim) if family == "lowrank" else 0)
        draws.append(moment_matched_normal(per_fit, width, generator))
        start = _start(family, point, generator, covariance)
        starts.append(_shrunk_until_finite(chunked, start, draws[-1]))
    traces = fit_gaussians(chunked, starts, draws, options["optimizer"],
                           max_steps=options["steps"], tolerance=options["tolerance"])
    for trace in traces:
        trace.evaluations += start_gradients // count
    fit_seconds = time.perf_counter() - fitted_at
    if any(trace.stopped == "interrupted" for trace in traces):
        options = {**options, "importance": "none"}  # return what it has, at once
    evaluated, correction = _evaluated_draws(model, data, facts, traces, potential, seeds,
                                             options)
    flat = flat_direction(model, data, facts, evaluated[0][0], potential.path)
    params = _guide_parameters(model, data, facts, family, [t.q for t in traces], potential)
    results = [_restart_result(facts, family, trace, guide, drawn, options,
                               start_gradients // count, flat)
               for trace, guide, drawn in zip(traces, params, evaluated, strict=True)]
    for r, result in enumerate(results):
        result.info.update(restart=r, draws_per_fit=per_fit, compiler=potential.compiler,
                           fit_seconds=fit_seconds,
                           importance=None if correction is None else correction.summary())
    if any(trace.stopped == "interrupted" for trace in traces):
        warnings.warn("SVI interrupted: the Gaussians are those of the last kept step "
                      "(partial=True)", PartialResultWarning, stacklevel=4)
    if count == 1:
        result = results[0]
    else:
        result = stack_restarts(results, list(range(count)), options, components_of(facts),
                                model.name)
        result.info.update(draws_per_fit=per_fit, compiler=potential.compiler,
                           fit_seconds=fit_seconds,
                           gradient_evaluations=sum(t.evaluations for t in traces))
    result.info["steps_per_second"] = (max(len(t.elbo) for t in traces) - 1) / max(
        fit_seconds, 1e-9)
    result.seconds = time.perf_counter() - started
    return result
