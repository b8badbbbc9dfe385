"""Run NUTS chains, in parallel worker processes where the machine has the cores.

Each worker rebuilds the story's traced potential (models travel by cloudpickle, so a
story written in a notebook works too), runs its chains and sends back the draws.
Progress messages come back through a queue and drive one tqdm bar per chain.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any

import cloudpickle
import torch
from tqdm.auto import tqdm

from ppl_notes.inference._potential import BatchedPotential
from ppl_notes.inference.nuts_sampler import ChainResult, chain_process, drive_lockstep

_PROGRESS_EVERY = 25
_progress_queue = None


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    torch.set_num_threads(1)


def _run_chains(payload: bytes, chains: list[int]) -> list[dict[str, Any]]:
    """Run a group of chains in lockstep against one batched potential."""
    job = cloudpickle.loads(payload)
    potential = BatchedPotential(job["model"], job["data"], len(chains),
                                 compiler=job["compiler"])
    initial = potential.initial_points(job["init"], [job["seed"] * 1000 + c for c in chains])
    total = job["warmup"] + job["draws"]

    def reporter(chain):
        def report(iteration):
            done = iteration + 1
            if _progress_queue is not None and (done % _PROGRESS_EVERY == 0 or done == total):
                _progress_queue.put((chain, done))
        return report

    processes = [
        chain_process(
            initial[i],
            num_warmup=job["warmup"],
            num_draws=job["draws"],
            target_accept=job["target_accept"],
            max_tree_depth=job["max_tree_depth"],
            dense_mass=job["dense_mass"],
            seed=(job["seed"], chain),
            on_iteration=reporter(chain),
        )
        for i, chain in enumerate(chains)
    ]
    results = drive_lockstep(processes, potential)
    return [{"chain": chain, **asdict(result)}
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
    init: str,
    compiler: str,
    dense_mass: bool,
    progress: bool,
    processes: int | None = None,
) -> list[ChainResult]:
    """Sample ``chains`` chains; results come back ordered by chain."""
    job = dict(model=model, data=data, warmup=warmup, draws=draws, target_accept=target_accept,
               max_tree_depth=max_tree_depth, seed=seed, init=init, compiler=compiler,
               dense_mass=dense_mass)
    payload = cloudpickle.dumps(job)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(chains, processes if processes is not None else cores or 1)
    groups = [list(range(chains))[w::workers] for w in range(workers)]
    total = warmup + draws
    bars = [
        tqdm(total=total, desc=f"NUTS chain {c}", position=c, leave=True, disable=not progress)
        for c in range(chains)
    ]
    try:
        if workers == 1:
            global _progress_queue
            local: queue.Queue = queue.Queue()
            _progress_queue = local
            try:
                outputs = _run_chains(payload, groups[0])
            finally:
                _progress_queue = None
            _drain(local, bars)
        else:
            outputs = _run_in_processes(payload, groups, bars)
    finally:
        for bar in bars:
            bar.close()
    by_chain = {out["chain"]: out for out in outputs}
    return [
        ChainResult(**{k: v for k, v in by_chain[c].items() if k != "chain"})
        for c in range(chains)
    ]


@contextlib.contextmanager
def _without_main_module():
    """Start workers without re-running the user's script in them.

    ``spawn`` re-imports ``__main__`` in every child, which runs a script without an
    ``if __name__ == "__main__"`` guard again. The story travels by cloudpickle, so the
    children need nothing from ``__main__``: while the workers start, an empty module
    stands in for it.
    """
    real = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def _run_in_processes(payload: bytes, groups: list[list[int]], bars) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    outputs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(
        max_workers=len(groups), mp_context=context, initializer=_init_worker,
        initargs=(progress_queue,),
    ) as pool:
        with _without_main_module():
            futures = [pool.submit(_run_chains, payload, group) for group in groups]
        interrupted = False
        while not all(f.done() for f in futures):
            try:
                _drain(progress_queue, bars)
                time.sleep(0.1)
            except KeyboardInterrupt:
                # The workers got the same Ctrl-C and are returning the draws they have;
                # a second Ctrl-C gives up on them.
                if interrupted:
                    raise
                interrupted = True
        for future in futures:
            outputs.extend(future.result())
    _drain(progress_queue, bars)
    return outputs


def _drain(progress_queue, bars) -> None:
    while True:
        try:
            chain, done = progress_queue.get_nowait()
        except (queue.Empty, OSError, ValueError):
            return
        bars[chain].update(done - bars[chain].n)
