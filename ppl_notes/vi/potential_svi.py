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
from ppl_notes.evaluation.potential import BatchedPotential, ChunkedPotential
from ppl_notes.evaluation.propriety import flat_direction
from ppl_notes.relabel import components_of
from ppl_notes.vi.centring import chosen_centring
from ppl_notes.vi.draws_of_q import evaluated_draws
from ppl_notes.vi.escalation import (
    FLOW_RESTARTS,
    FLOW_SEED,
    elbo_at_draws,
    escalation_wanted,
    flow_facts,
    flow_verdict,
    no_gain,
    pooled_indices,
)
from ppl_notes.vi.fixed_draws import draws_per_fit, moment_matched_normal
from ppl_notes.vi.flow_family import FLOW_GUIDE, flows_from_gaussians, hidden_width
from ppl_notes.vi.flow_vi import DRAWS_PER_STEP as FLOW_DRAWS_PER_STEP
from ppl_notes.vi.flow_vi import fit_flows
from ppl_notes.vi.gaussian_family import FAMILY_GUIDES, Gaussian
from ppl_notes.vi.gaussian_vi import FitTrace, fit_gaussians
from ppl_notes.vi.importance import Correction
from ppl_notes.vi.lbfgs_paths import inverse_hessian, lbfgs_paths
from ppl_notes.vi.restarts import restart_log_evidence, restart_seed, stack_restarts

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


def _restart_result(facts, family: str, trace: FitTrace, params: dict[str, np.ndarray],
                    evaluated: tuple, options: dict[str, Any], start_gradients: int = 0,
                    flat: dict[str, Any] | None = None) -> RunResult:
    """One restart's RunResult: its evaluated draws, and its autoguide's parameters.

    ``flat`` is the fit's flat direction (:func:`flat_direction`), found once for all
    restarts at the first one's draws.
    """
    enumerated = [n for n in facts.latent if n in facts.discrete or n in facts.unenumerable]
    guide_name = FLOW_GUIDE if family == "flow" else FAMILY_GUIDES[family][1]
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
              "stopped": trace.stopped, "elbo_settled": trace.stopped == "converged" or getattr(
                  trace, "settled", False),
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
    evaluated, correction = evaluated_draws(model, data, facts, traces, potential, seeds,
                                            options)
    flat = flat_direction(model, data, facts, evaluated[0][0], potential.path)
    params = _guide_parameters(model, data, facts, family, [t.q for t in traces], potential)
    result = _results_of(model, facts, family, traces, params, evaluated, correction,
                         options, list(range(count)), start_gradients // count, flat,
                         {"draws_per_fit": per_fit, "compiler": potential.compiler,
                          "fit_seconds": fit_seconds})
    if any(trace.stopped == "interrupted" for trace in traces):
        warnings.warn("SVI interrupted: the Gaussians are those of the last kept step "
                      "(partial=True)", PartialResultWarning, stacklevel=4)
        return _timed(result, traces, fit_seconds, started)
    mode = options.get("escalate", "never")
    escalate, reason = escalation_wanted(mode, result, dim)
    result.info["escalation"] = {"to_flow": escalate, "reason": reason}
    if escalate and mode == "auto" and options.get("centring") != "tried":
        decentred = chosen_centring(context, lambda c: run_on_potential(c, compiler),
                                    result, dim)
        if decentred is not None:
            decentred.seconds = time.perf_counter() - started
            return decentred
    if escalate:
        result = _escalated(context, potential, chunked, result, traces, seeds, flat,
                            reason, fit_seconds, mode)
        kept_gaussian = result.info.get("family") != "flow"
        return _timed(result, traces if kept_gaussian else None, fit_seconds, started)
    return _timed(result, traces, fit_seconds, started)


def _timed(result: RunResult, traces, fit_seconds: float, started: float) -> RunResult:
    """``result`` with its steps per second (where ``traces`` are given) and seconds."""
    if traces is not None:
        result.info["steps_per_second"] = (max(len(t.elbo) for t in traces) - 1) / max(
            fit_seconds, 1e-9)
    result.seconds = time.perf_counter() - started
    return result


def _results_of(model, facts, family: str, traces: list, params: list[dict],
                evaluated: list[tuple], correction: Correction | None, options: dict[str, Any],
                restarts: list[int], start_gradients: int, flat, extra: dict[str, Any]
                ) -> RunResult:
    """The fits' RunResults, stacked as chains where there is more than one."""
    results = [_restart_result(facts, family, trace, guide, drawn, options,
                               start_gradients, flat)
               for trace, guide, drawn in zip(traces, params, evaluated, strict=True)]
    for r, result in zip(restarts, results, strict=True):
        result.info.update(restart=r, **extra,
                           importance=None if correction is None else correction.summary())
    if len(results) == 1:
        return results[0]
    result = stack_restarts(results, restarts, options, components_of(facts), model.name)
    result.info.update(**extra, gradient_evaluations=sum(t.evaluations for t in traces))
    return result


def _escalated(context: RunContext, potential, chunked, gaussian: RunResult,
               traces: list[FitTrace], seeds: list[int], flat, reason: str,
               fit_seconds: float, mode: str) -> RunResult:
    """A flow fitted from each pooled restart's Gaussian, kept where it does better.

    The flows (one per pooled restart, fitted in lockstep) have their draws evaluated and
    corrected as the Gaussians' are, and are kept by
    :func:`~ppl_notes.vi.escalation.flow_verdict`; else the Gaussian fit is returned,
    and ``info["escalation"]`` says why.
    """
    model, data, facts, options = context.model, context.data, context.facts, context.options
    # the pooled restarts with the highest evidence, FLOW_RESTARTS of them at most
    pooled = pooled_indices(gaussian)
    if len(pooled) > FLOW_RESTARTS:
        evidence = {r["restart"]: r["log_evidence"] for r in gaussian.info["restarts"]}
        pooled = sorted(sorted(pooled, key=lambda r: -evidence[r])[:FLOW_RESTARTS])
    started = time.perf_counter()
    flows = flows_from_gaussians([traces[r].q for r in pooled], seeds[0] + FLOW_SEED)
    baseline = elbo_at_draws(gaussian, options["num_draws"])
    flow_traces = fit_flows(chunked, flows, seeds[0] + FLOW_SEED,
                            baseline=baseline[0] if mode == "auto" else None)
    flow_seconds = time.perf_counter() - started
    facts_of_flows = flow_facts(flow_traces, flow_seconds)  # before the Gaussian's cost
    if all(t.stopped == "no gain" for t in flow_traces):
        gaussian.info["escalation"] = no_gain(reason, baseline[0], facts_of_flows)
        return gaussian
    gaussian_gradients = sum(t.evaluations for t in traces)
    for trace in flow_traces:  # the flow's cost includes the Gaussian's it started from
        trace.evaluations += gaussian_gradients // len(flow_traces)
    interrupted = any(t.stopped == "interrupted" for t in flow_traces)
    if interrupted:  # return what it has, at once
        options = {**options, "importance": "none"}
        warnings.warn("SVI interrupted while fitting the flow: its layers are those of the "
                      "last step (partial=True)", PartialResultWarning, stacklevel=5)
    evaluated, correction = evaluated_draws(model, data, facts, flow_traces, potential,
                                            [seeds[r] for r in pooled], options)
    params = [{k: v.numpy() for k, v in flows.state(i).items()} for i in range(len(pooled))]
    result = _results_of(model, facts, "flow", flow_traces, params, evaluated, correction,
                         options, pooled, 0, flat,
                         {"draws_per_fit": FLOW_DRAWS_PER_STEP,
                          "compiler": potential.compiler,
                          "fit_seconds": fit_seconds + flow_seconds})
    escalation = flow_verdict(gaussian, result, reason, flow_traces, facts_of_flows, mode,
                              context.options["num_draws"], baseline)
    if interrupted:  # what it has: the flow as it stood, marked partial
        escalation.update(kept=True, why="interrupted (Ctrl-C) while fitting the flow: the "
                          "flow of the last step is returned, partial")
    escalation.update(gaussian_gradients=gaussian_gradients, layers=len(flows.layers),
                      hidden=hidden_width(flows.dim))
    if not escalation["kept"]:
        gaussian.info["escalation"] = escalation
        return gaussian
    # the restarts the Gaussian stage left out stay listed as left out
    gaussian_left_out = [r for r in gaussian.info.get("restarts") or [] if not r["pooled"]]
    if gaussian_left_out:
        flows_listed = result.info.get("restarts") or [{
            "restart": pooled[0], "final_elbo": result.info["final_elbo"],
            "steps_done": result.info["steps_done"], "start_gradients": 0,
            "stopped": result.info["stopped"], "elbo_settled": result.info["elbo_settled"],
            "partial": result.partial, "log_evidence": restart_log_evidence(result),
            "pooled": True}]
        result.info["restarts"] = sorted(flows_listed + gaussian_left_out,
                                         key=lambda r: r["restart"])
        result.info["left_out"] = sorted(r["restart"] for r in result.info["restarts"]
                                         if not r["pooled"])
    escalation["flows_from_restarts"] = pooled
    result.info["escalation"] = escalation
    result.info["steps_per_second"] = max(len(t.elbo) for t in flow_traces) / max(
        flow_seconds, 1e-9)
    return result
