r"""Variational restarts as chains: K independent fits, their draws on a ``chain`` dim.

A single SVI fit says nothing about whether another start would have ended elsewhere:
a local optimum of the ELBO (a mixture's collapsed component, a funnel's neck) looks
converged from inside. Run K fits from dispersed starts and treat them as MCMC treats
chains: the draws of restart :math:`k` become chain :math:`k`, so R-hat and ESS across
restarts (Vehtari et al. 2021, the split-R-hat ArviZ computes) measure whether they
agree, as ArviZ users asked for VI (arviz-devs/arviz#498), and as RAABBVI uses R-hat of
the iterates across runs (Welandawe et al. 2022, Dhaka et al. 2020).

Restart 0 is the fit a plain run gives (same seed, same start). Restart :math:`k \ge 1`
gets its own seed, and an autoguide's locations start from a point drawn uniformly in
(-2, 2) around the feasible origin of the unconstrained space (Stan's default inits);
a guide written by hand starts where its ``pyro.param`` calls say, and differs only by
its seed (its stochastic gradients).

Restarts whose posteriors sit apart are grouped into modes: two restarts share a mode
when every continuous element's means differ by less than ``MODE_SEPARATION`` pooled
standard deviations. More than one mode is a finding (:mod:`ppl_notes.diagnostics`).

They run in worker processes on this machine (one per core), or as tasks on a Dask
cluster given ``scheduler`` (:mod:`ppl_notes._cluster`). Ctrl-C asks every running
restart to stop; each returns the guide it has (``partial``).
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ppl_notes._cluster import client_for, completed
from ppl_notes._dtype import run_dtype
from ppl_notes._pool import run_in_processes, set_stop_event
from ppl_notes._result import RunResult
from ppl_notes.errors import DiagnosticWarning, PartialResultWarning
from ppl_notes.evaluation import RunContext
from ppl_notes.relabel import align_chains, components_of

__all__ = ["run_restarts", "restart_seed", "modes_of", "stack_rows", "MODE_SEPARATION",
           "LEFT_OUT_BELOW", "pooled_restarts", "restart_log_evidence"]

#: Restarts whose means differ by more pooled sds than this, on some element, found
#: different optima.
MODE_SEPARATION = 1.0


def restart_seed(seed: int, restart: int) -> int:
    """Restart ``restart``'s seed: ``seed`` itself for restart 0, else one drawn from both."""
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0] % 2**31)


def run_restarts(fit: Callable[[RunContext], RunResult], context: RunContext) -> RunResult:
    """Run ``context.options["restarts"]`` fits of ``fit`` and stack them as chains.

    Parameters
    ----------
    fit : callable
        A back end's run function, ``fit(context)``, which fits restart
        ``context.restart`` (pickled by reference for worker processes).
    context : RunContext
        As :func:`ppl_notes.infer` passes it to a back end; its options hold
        ``restarts``, ``processes`` and ``scheduler``. Every restart fits its own copy of
        the story, data and guide (a guide that is a ``PyroModule`` keeps its trained
        weights in itself); restarts in this process share the context's facts, and a
        worker reads them from its copy of the data.
    """
    import cloudpickle

    started = time.perf_counter()
    options, model, progress = context.options, context.model, context.progress
    count = options["restarts"]
    single = context.replace(options={**options, "restarts": 1, "scheduler": None,
                                      "processes": None})
    job = cloudpickle.dumps({"fit": fit, "context": single})
    results: dict[int, RunResult] = {}
    interrupted = False
    from tqdm.auto import tqdm

    bar = tqdm(total=count, desc=f"{fit.__module__.rsplit('.', 1)[-1].upper()} restarts",
               disable=not progress)

    def keep(pair: tuple[int, RunResult]) -> None:
        results[pair[0]] = pair[1]
        bar.update(1)

    try:
        if options["scheduler"] is not None:
            _on_cluster(job, count, keep, options["scheduler"], model.name)
        elif count == 1 or options["processes"] == 1:
            for restart in range(count):
                keep(_one_restart(job, restart, progress=progress, facts_from=single))
                if results[restart].partial:  # Ctrl-C reached this restart's loop
                    break
        else:

            run_in_processes(_one_restart, job, [(r,) for r in range(count)], keep,
                             processes=options["processes"], on_interrupt="stop")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not results:
        raise KeyboardInterrupt("interrupted before any restart finished")
    done = [results[r] for r in sorted(results)]
    cut = sum(r.partial for r in done)
    if interrupted or len(done) < count or cut:
        warnings.warn(f"restarts interrupted: {len(done)} of {count} fits came back, {cut} of "
                      "them stopped early with the guide they had (partial=True)",
                      PartialResultWarning, stacklevel=4)

    combined = stack_restarts(done, sorted(results), options,
                              components_of(context.facts), model.name)
    combined.partial = combined.partial or interrupted or len(done) < count
    combined.seconds = time.perf_counter() - started
    return combined


def _one_restart(payload: bytes, restart: int, progress: bool = False,
                 facts_from: RunContext | None = None) -> tuple[int, RunResult]:
    """Fit restart ``restart`` of the pickled job (in this process or a worker).

    ``facts_from``, in this process, is the caller's context: its facts serve the copy.
    """
    import cloudpickle


    job = cloudpickle.loads(payload)
    context = job["context"]
    if facts_from is not None:
        context = context.replace(known_facts=facts_from.facts,
                                  known_marginal=facts_from.known_marginal)
    with run_dtype(context.dtype):
        result = job["fit"](context.replace(seed=restart_seed(context.seed, restart),
                                            restart=restart, progress=progress))
    result.info["restart"] = restart
    return restart, result


def _one_restart_on_cluster(payload: bytes, restart: int, name: str) -> tuple[int, RunResult]:
    """One restart in a Dask worker; Ctrl-C reaches it through a Dask Event."""
    import distributed
    import torch


    torch.set_num_threads(1)
    set_stop_event(distributed.Event(name))
    try:
        return _one_restart(payload, restart)
    finally:
        set_stop_event(None)


def _on_cluster(job: bytes, count: int, keep, scheduler, story: str) -> None:
    import distributed


    with client_for(scheduler, "infer") as client:
        name = f"restarts-{story}-{uuid.uuid4().hex[:8]}"
        stop = distributed.Event(name, client)
        results = completed(client, _one_restart_on_cluster, job,
                            [(r, name) for r in range(count)], name)
        while True:
            try:
                keep(next(results))
            except StopIteration:
                return
            except KeyboardInterrupt:
                if stop.is_set():
                    raise
                stop.set()  # each restart returns the guide it has; a second Ctrl-C gives up


def stack_restarts(results: list[RunResult], restarts: list[int], options: dict[str, Any],
                   components: dict | None = None, story: str = "") -> RunResult:
    """The restarts' runs as one run with sample dims ``(chain, draw)``.

    Restarts that found a mixture (``components``, :func:`ppl_notes.relabel.components_of`)
    with permuted labels are relabelled to restart 0's first, with a warning.
    """
    def stacked(key: str) -> dict[str, np.ndarray]:
        first = getattr(results[0], key)
        return {name: stack_rows([getattr(r, key)[name] for r in results]) for name in first}

    evidence = [restart_log_evidence(result) for result in results]
    pooled = pooled_restarts(evidence)
    histories = [r.history["elbo"].to_numpy() for r in results if r.history is not None]
    length = max((len(h) for h in histories), default=0)
    padded = np.full((len(histories), length), np.nan)
    for row, elbo in zip(padded, histories, strict=True):
        row[:len(elbo)] = elbo
    kept = padded[[i for i, keep in enumerate(pooled) if keep]] \
        if len(histories) == len(pooled) else padded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps no restart reached
        # the ELBO of the pooled restarts: one stalled at -1.6e13 would be all of a mean
        history = pd.DataFrame({"elbo": np.nanmean(kept, axis=0),
                                **{f"elbo_restart_{r}": row
                                   for r, row in zip(restarts, padded, strict=True)}},
                               index=pd.RangeIndex(length, name="step"))
    info = dict(results[0].info)
    info.pop("restart", None)
    per_restart = [{"restart": r, "final_elbo": result.info.get("final_elbo"),
                    "steps_done": result.info.get("steps_done"),
                    "start_gradients": result.info.get("start_gradients", 0),
                    "stopped": result.info.get("stopped"),
                    "elbo_settled": result.info.get("elbo_settled"), "partial": result.partial,
                    "log_evidence": evidence[i], "pooled": pooled[i]}
                   for i, (r, result) in enumerate(zip(restarts, results, strict=True))]
    everyone = per_restart
    results = [result for result, keep in zip(results, pooled, strict=True) if keep]
    per_restart = [p for p in per_restart if p["pooled"]]
    posterior = stacked("posterior")
    relabelled = align_chains(posterior, components)
    if relabelled:
        warnings.warn(f"SVI restarts on {story!r} found the mixture with permuted labels; "
                      f"relabelled to restart 0's ({'; '.join(relabelled)}; pivot "
                      "relabelling, Stephens 2000)", DiagnosticWarning, stacklevel=5)
    info.update(restarts=everyone, modes=modes_of(posterior, per_restart),
                components=components, relabelled=relabelled,
                left_out=[p["restart"] for p in everyone if not p["pooled"]],
                final_elbo=float(np.nanmean([p["final_elbo"] for p in per_restart])),
                steps_done=int(sum(p["steps_done"] or 0 for p in everyone)),
                start_gradients=int(sum(p["start_gradients"] or 0 for p in everyone)))
    return RunResult(
        method=results[0].method, sample_dims=("chain", "draw"), posterior=posterior,
        sample_stats=stacked("sample_stats"), log_likelihood=stacked("log_likelihood"),
        history=history, params=stacked("params"), importance=stacked("importance"),
        options=options, info=info,
        partial=any(r.partial for r in results))


#: A restart whose importance-weighted evidence lies this many nats below the best
#: restart's is left out of the pooled draws: the region it found holds less than
#: exp(-10) = 4.5e-5 of the best one's posterior mass. Restarts on one optimum differ by
#: their estimates' Monte Carlo error, well under a nat for 1000 draws where k-hat <= 0.7;
#: a restart stalled where a scale went to 0, or where a series exploded, lies 1e13 to
#: 1e201 nats below (baseball, an LKJ story, posteriordb's ARMA(1,1)).
LEFT_OUT_BELOW = 10.0


def restart_log_evidence(result: RunResult) -> float:
    r"""A restart's importance-weighted evidence at its own draws of q.

    :math:`\log \frac1S\sum_s p(x, \theta_s)/q(\theta_s)`. The draws are the importance
    step's proposals where the fit kept them (its kept draws may be resampled), else the
    draws it holds. A draw where the story's density is not finite weighs nothing;
    where none is finite, or the fit holds no densities (a guide without them), it is
    ``-inf`` or NaN.
    """
    group = result.importance if result.importance else result.sample_stats
    if "log_p" not in group or "log_q" not in group:
        return float("nan")
    ratios = np.asarray(group["log_p"], dtype=float) - np.asarray(group["log_q"], dtype=float)
    ratios = np.where(np.isfinite(ratios), ratios, -np.inf).reshape(-1)
    if not ratios.size or not np.isfinite(ratios).any():
        return float("-inf")
    top = ratios.max()
    return float(top + np.log(np.mean(np.exp(ratios - top))))


def pooled_restarts(evidence: list[float]) -> list[bool]:
    """Which restarts' draws are pooled: those within :data:`LEFT_OUT_BELOW` of the best.

    Weighing the regions the restarts found by their evidence, as a mixture of the
    restarts' q would (Yao et al. 2018's stacking weighs by predictive density instead),
    gives a restart :math:`e^{-10}` of the best one's weight or less only where its
    region holds next to no mass: it is left out rather than pooled with equal weight.
    Where no restart's evidence is known (NaN), every one is pooled, as before.
    """
    known = [e for e in evidence if not np.isnan(e)]
    if not known or not np.isfinite(max(known)):
        return [True] * len(evidence)
    best = max(known)
    return [bool(np.isnan(e) or e >= best - LEFT_OUT_BELOW) for e in evidence]


def stack_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.stack(arrays)``, without a copy where they are one array's blocks of rows.

    The restarts' draws are evaluated in one pass and split by rows, so their arrays
    usually are: a story with many observations then keeps one pointwise log-likelihood
    array, not two. A fresh array of 160 MB (diamonds: 4000 draws x 5000 values) took
    17-20 ms to fill here, and 0.9-1.3 s once in 30-60 tries, the kernel's page faults
    stalling (the same fit of diamonds took 0.7 s or 2.0-2.7 s).
    """
    arrays = [np.asarray(a) for a in arrays]
    first, base = arrays[0], arrays[0].base
    rows = first.shape[0] if first.ndim else 0
    if (rows and isinstance(base, np.ndarray) and base.dtype == first.dtype
            and base.shape == (rows * len(arrays),) + first.shape[1:]):
        start, step = base.__array_interface__["data"][0], rows * base.strides[0]
        if all(a.base is base and a.shape == first.shape and a.strides == base.strides
               and a.__array_interface__["data"][0] == start + i * step
               for i, a in enumerate(arrays)):
            return base.reshape((len(arrays), rows) + first.shape[1:])  # a view: C or F
    return np.stack(arrays)


def modes_of(posterior: dict[str, np.ndarray], per_restart: list[dict]) -> list[list[int]]:
    """Group restarts into modes, best final ELBO first (module docstring).

    ``posterior`` holds each site's draws with dims ``(restart, draw, ...)``; discrete
    (integer or boolean) sites are left out.
    """
    columns = [values.reshape(values.shape[0], values.shape[1], -1)
               for values in posterior.values()
               if np.issubdtype(values.dtype, np.floating)]
    if not columns:
        return [[p["restart"] for p in per_restart]]
    draws = np.concatenate(columns, axis=2)  # (restart, draw, element)
    means, variances = draws.mean(axis=1), draws.var(axis=1)
    order = sorted(range(len(per_restart)),
                   key=lambda i: -np.nan_to_num(per_restart[i]["final_elbo"] or -np.inf,
                                                nan=-np.inf))
    groups: list[list[int]] = []
    for i in order:
        for group in groups:
            leader = group[0]
            scale = np.sqrt((variances[i] + variances[leader]) / 2)
            apart = np.abs(means[i] - means[leader]) > MODE_SEPARATION * np.maximum(scale,
                                                                                    1e-12)
            if not apart.any():
                group.append(i)
                break
        else:
            groups.append([i])
    return [[per_restart[i]["restart"] for i in group] for group in groups]
