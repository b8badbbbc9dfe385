"""Run NUTS chains, in parallel worker processes where the machine has the cores.

Each worker rebuilds the story's traced potential (models travel by cloudpickle, so a
story written in a notebook works too), runs its chains and sends back the draws.
Progress messages come back through a queue and drive one tqdm bar per chain: first a
"compiling" phase (the bar's clock starts after it, so its rate is the sampler's), then
warmup and sampling, live.

Ctrl-C is the main process's to handle: workers ignore SIGINT, and the main process sets
a shared stop event that every chain checks each iteration, so each returns the draws it
has. A Ctrl-C that arrives while a worker is still compiling (there is nothing to keep)
stops the workers at once; one during the pool's shutdown, after every chain has
finished, is ignored until the results are in hand.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import cloudpickle
import numpy as np
import torch
from tqdm.auto import tqdm

from ppl_notes._cluster import client_for
from ppl_notes._pool import die_with_parent, leave_signals_to_the_parent, without_main_module
from ppl_notes.evaluation import StoryFacts
from ppl_notes.evaluation.potential import BatchedPotential
from ppl_notes.mcmc.driver import ChainResult, chain_process, drive_lockstep
from ppl_notes.native.loader import wait_for_builds

_PROGRESS_EVERY = 10
_progress_queue = None
_stop_event = None


def _init_worker(progress_queue, stop_event, parent: int) -> None:
    global _progress_queue, _stop_event
    _progress_queue, _stop_event = progress_queue, stop_event
    die_with_parent(parent)
    leave_signals_to_the_parent()  # the main process decides (module doc)
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    # One core per worker: no pool of compile subprocesses (they would see the Ctrl-C).
    inductor_config.compile_threads = 1


def _run_chains(payload: bytes, chains: list[int], progress_queue=None,
                stop_event=None, job: dict | None = None) -> list[dict[str, Any]]:
    """Run a group of chains in lockstep against one batched potential.

    Progress messages go to ``progress_queue`` and the chains stop when ``stop_event``
    is set (checked with each progress message); both default to this worker's own.
    ``job``, in this process, is the payload unpickled already, with the story's facts
    (``job["facts"]``: those of this ``infer()``, its evaluation path decided; a worker
    reads them again from its copy of the data, 12 more runs of the story).
    """
    progress_queue = progress_queue if progress_queue is not None else _progress_queue
    stop_event = stop_event if stop_event is not None else _stop_event

    def _say(chain: int, what: str | int) -> None:
        if progress_queue is not None:
            progress_queue.put((chain, what))

    job = cloudpickle.loads(payload) if job is None else job
    for chain in chains:
        _say(chain, "compiling")
    potential = BatchedPotential(job["model"], job["data"], len(chains),
                                 compiler=job["compiler"], facts=job.get("facts"))
    if isinstance(job["init"], str):
        initial = potential.initial_points(job["init"], [job["seed"] * 1000 + c for c in chains])
    else:  # one point per chain, given (Pathfinder's draws)
        initial = np.asarray(job["init"], dtype=float)[chains]
    total = job["warmup"] + job["draws"]
    for chain in chains:
        _say(chain, "warmup")

    def reporter(chain):
        def report(iteration):
            done = iteration + 1
            report = done % _PROGRESS_EVERY == 0 or done == total
            if report:
                _say(chain, done)
            if done == job["warmup"]:
                _say(chain, "sampling")
            if report and stop_event is not None and stop_event.is_set():
                raise KeyboardInterrupt  # the chain returns the draws it has
        return report

    processes = [
        chain_process(
            initial[i],
            num_warmup=job["warmup"],
            num_draws=job["draws"],
            target_accept=job["target_accept"],
            max_tree_depth=job["max_tree_depth"],
            dense_mass=job["dense_mass"],
            adaptation=job["adaptation"],
            seed=(job["seed"], chain),
            on_iteration=reporter(chain),
        )
        for i, chain in enumerate(chains)
    ]
    results = drive_lockstep(processes, potential)
    return [{"chain": chain, **asdict(result), "compiler": potential.compiler}
            for chain, result in zip(chains, results, strict=True)]


def run_chains(
    model,
    data: dict[str, Any],
    *,
    chains: int,
    warmup: int,
    draws: int,
    target_accept: float,
    max_tree_depth: int,
    seed: int,
    init: str | np.ndarray,
    compiler: str,
    dense_mass: bool,
    progress: bool,
    adaptation: str = "welford",
    processes: int | None = None,
    scheduler=None,
    facts: StoryFacts | None = None,
) -> list[ChainResult]:
    """Sample ``chains`` chains; results come back ordered by chain.

    ``scheduler`` (an address or a ``distributed.Client``) runs the groups of chains on
    a Dask cluster's workers instead of this machine's processes. ``facts``, the story's
    on ``data``, serve the chains run in this process (workers read their own).
    """
    job = dict(model=model, data=data, warmup=warmup, draws=draws, target_accept=target_accept,
               max_tree_depth=max_tree_depth, seed=seed, init=init, compiler=compiler,
               dense_mass=dense_mass, adaptation=adaptation)
    payload = cloudpickle.dumps(job)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(chains, processes if processes is not None else cores or 1)
    groups = [list(range(chains))[w::workers] for w in range(workers)]
    total = warmup + draws
    bars = _Bars(chains, total, progress)
    if scheduler is not None or workers > 1:
        wait_for_builds()  # the workers load what prebuild() compiles, never compile twice
    try:
        if scheduler is not None:
            outputs = _run_on_cluster(payload, list(range(chains)), bars, scheduler)
        elif workers == 1:
            global _progress_queue
            _progress_queue = bars  # in this process: messages go straight to the bars
            try:
                outputs = _run_chains(payload, groups[0], job={**job, "facts": facts})
            finally:
                _progress_queue = None
        else:
            outputs = _run_in_processes(payload, groups, bars)
    finally:
        bars.close()
    by_chain = {out["chain"]: out for out in outputs}
    return [
        ChainResult(**{k: v for k, v in by_chain[c].items() if k != "chain"})
        for c in range(chains)
    ]


class InterruptedWhileCompiling(KeyboardInterrupt):
    """Ctrl-C before any chain started: nothing to keep."""


def _run_in_processes(payload: bytes, groups: list[list[int]], bars) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    progress_queue, stop_event = context.Queue(), context.Event()
    outputs: list[dict[str, Any]] = []
    stopped_while_compiling = False
    pool = ProcessPoolExecutor(max_workers=len(groups), mp_context=context,
                               initializer=_init_worker,
                               initargs=(progress_queue, stop_event, os.getpid()))
    try:
        with without_main_module():
            futures = [pool.submit(_run_chains, payload, group) for group in groups]
        while not all(f.done() for f in futures):
            try:
                _drain(progress_queue, bars)
                time.sleep(0.1)
            except KeyboardInterrupt:
                if stop_event.is_set() or bars.compiling():
                    _stop_workers(pool)
                    stopped_while_compiling = True
                    break
                stop_event.set()  # each chain returns its draws; a second Ctrl-C gives up
        if not stopped_while_compiling:
            for future in futures:
                outputs.extend(future.result())
    finally:
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:  # the results are in hand: do not lose them now
            _stop_workers(pool)
    _drain(progress_queue, bars)
    if stopped_while_compiling:
        # Free the queue's and event's semaphores now, so that no "leaked semaphore"
        # remark follows the one line the interrupt deserves.
        del pool, futures, progress_queue, stop_event
        gc.collect()
        raise InterruptedWhileCompiling("interrupted while compiling: no chain had started")
    return outputs


def _chains_on_cluster_worker(payload: bytes, chains: list[int], name: str):
    """One group of chains in a Dask worker; progress and stop travel by the scheduler."""
    import distributed

    torch.set_num_threads(1)
    return _run_chains(payload, chains, progress_queue=distributed.Queue(name),
                       stop_event=distributed.Event(name))


def _run_on_cluster(payload: bytes, chains: list[int], bars, scheduler) -> list[dict[str, Any]]:
    """Each chain a task on the cluster; their progress streams back through a Dask Queue.

    A chain is the unit of work there (the cluster has the cores), and its result does
    not depend on which chains share its batch, so the draws equal a local run's.
    Ctrl-C sets a Dask Event that every chain checks with its progress messages.
    """
    import uuid

    import distributed


    with client_for(scheduler, "infer") as client:
        name = f"nuts-{uuid.uuid4().hex[:8]}"
        progress, stop = distributed.Queue(name, client=client), distributed.Event(name, client)
        shared = client.scatter(payload, broadcast=True, hash=False)  # once, not per chain
        futures = [client.submit(_chains_on_cluster_worker, shared, [chain], name,
                                 key=f"{name}-chain-{chain}", pure=False) for chain in chains]
        try:
            while not all(f.done() for f in futures):
                try:
                    for message in progress.get(batch=True):
                        bars.put(tuple(message))
                    time.sleep(0.2)
                except KeyboardInterrupt:
                    if stop.is_set() or bars.compiling():
                        client.cancel(futures)
                        raise InterruptedWhileCompiling(
                            "interrupted while compiling: no chain had started") from None
                    stop.set()
            outputs = [item for future in futures for item in future.result()]
            for message in progress.get(batch=True):
                bars.put(tuple(message))
        finally:
            client.cancel([f for f in futures if not f.done()])
    return outputs


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the workers now; the pool's manager sees them gone and closes its queues."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    with contextlib.suppress(KeyboardInterrupt):
        pool.shutdown(wait=True, cancel_futures=True)


_BAR = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


#: Without progress bars (``progress=False``, or on CI), a long run says how far it is,
#: one line to stderr at most this often (seconds): a NUTS run of a VAE's posterior
#: printed nothing for 11 minutes
HEARTBEAT_SECONDS = 60.0


class _Bars:
    """One bar per chain, and the phase each chain is in (compiling, warmup, sampling).

    Without bars, a line to stderr every :data:`HEARTBEAT_SECONDS` says how many
    iterations are done and how long the rest takes at the rate so far.
    """

    def __init__(self, chains: int, total: int, progress: bool) -> None:
        self.bars = [tqdm(total=total, desc=f"NUTS chain {c}", position=c, leave=True,
                          disable=not progress, bar_format=_BAR) for c in range(chains)]
        self.phases = ["starting"] * chains
        self.done, self.total = [0] * chains, total
        self.started = self.said = _now()

    def put(self, message: tuple[int, str | int]) -> None:
        """Apply one message: a phase name, or the iterations done so far."""
        chain, what = message
        bar = self.bars[chain]
        if isinstance(what, str):
            self.phases[chain] = what
            if bar.disable:
                return
            bar.set_description(f"NUTS chain {chain} ({what})", refresh=False)
            if what == "warmup":  # the compile time is not the sampler's rate
                bar.reset(total=bar.total)
            bar.refresh()
        else:
            self.done[chain] = what
            bar.update(what - bar.n)
        if bar.disable:
            self._heartbeat()

    def _heartbeat(self) -> None:
        now = _now()
        if now - self.said < HEARTBEAT_SECONDS:
            return
        self.said = now
        done, total = sum(self.done), self.total * len(self.done)
        elapsed = now - self.started
        left = (f"about {_duration((total - done) * elapsed / done)} left at the rate so far"
                if done else "no iteration done yet")
        phases = ", ".join(sorted(set(self.phases)))
        print(f"ppl_notes NUTS: {done:,} of {total:,} iterations of {len(self.done)} chains "
              f"({phases}) after {_duration(elapsed)}; {left}", file=sys.stderr, flush=True)

    def compiling(self) -> bool:
        """Whether some chain has not started sampling yet."""
        return any(p in ("starting", "compiling") for p in self.phases)

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def _now() -> float:
    """The heartbeat's clock (seconds)."""
    return time.monotonic()


def _duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // 60)} min" if seconds >= 60 else f"{int(seconds)} s"


def _drain(progress_queue, bars: _Bars) -> None:
    """Apply the workers' messages that have arrived."""
    while True:
        try:
            message = progress_queue.get_nowait()
        except (queue.Empty, OSError, ValueError):
            return
        bars.put(message)
