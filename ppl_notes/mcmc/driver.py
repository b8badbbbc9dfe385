r"""Chains as generators, and the driver that feeds them potentials in lockstep.

A chain (:func:`chain_process`) runs warmup and sampling and yields each position whose
potential and gradient it needs. :func:`drive_lockstep` advances every chain of a process
together, so one batched call of the potential serves them all, and hands whole
transitions to the C code (:class:`~ppl_notes.native.trajectory.NativeTransitions`) where
it is built, which builds every chain's tree without returning to Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from ppl_notes.mcmc.adaptation import (
    _GRADIENT_WINDOWS,
    DualAveraging,
    _StanWindows,
    _SwitchingWindows,
)
from ppl_notes.mcmc.kernel import NUTS, find_reasonable_step_size
from ppl_notes.mcmc.metrics import Metric, _Welford
from ppl_notes.native.trajectory import NativeTransitions, TransitionRequest, library

Potential = Callable[[np.ndarray], tuple[float, np.ndarray]]


#: A chain is a generator: it yields positions whose potential and gradient it needs,
#: receives ``(U, dU/dq)`` for each, and returns its :class:`ChainResult`.
ChainProcess = Generator[np.ndarray, tuple[float, np.ndarray], "ChainResult"]


@dataclass
class ChainResult:
    """Draws and statistics of one chain (warmup excluded), unconstrained positions."""

    positions: np.ndarray
    potential: np.ndarray
    accept_prob: np.ndarray
    num_steps: np.ndarray
    tree_depth: np.ndarray
    diverging: np.ndarray
    energy: np.ndarray
    step_size: float
    inv_mass: np.ndarray
    num_completed: int
    interrupted: bool = False
    #: how the potential ran: "tape", "inductor", "torchscript" or "none"
    compiler: str = "none"
    #: leapfrog steps (gradient evaluations) of the warmup's transitions
    warmup_steps: int = 0


class ChainInterrupted(Exception):
    """Thrown into a chain to stop it early; it then returns the draws it has."""


def chain_process(
    initial: np.ndarray,
    *,
    num_warmup: int,
    num_draws: int,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    adaptation: str = "welford",
    seed: int | tuple = 0,
    on_iteration: Callable[[int], None] | None = None,
) -> ChainProcess:
    """One chain's warmup and sampling, as a generator of potential requests.

    Parameters
    ----------
    initial : numpy.ndarray
        Starting point (unconstrained).
    num_warmup, num_draws : int
        Iterations of adaptation (discarded) and of sampling (kept).
    target_accept : float
        The dual-averaging target for the mean acceptance statistic.
    max_tree_depth : int
        Largest tree depth.
    dense_mass : bool
        Adapt a dense inverse mass matrix (the posterior covariance) instead of a diagonal.
    adaptation : {"welford", "fisher", "lowrank"}
        How the metric is estimated in each slow window: the draws' (co)variance (Stan),
        a diagonal from draws and gradients (:class:`_FisherDiagonal`, nutpie's), or that
        diagonal with a low-rank correction (:class:`_LowRankFisher`, nutpie's
        ``low_rank``); ``"fisher"`` and ``"lowrank"`` ignore ``dense_mass``.
    seed : int or tuple
        Seed of the chain's generator.
    on_iteration : callable, optional
        Called with the iteration number after each transition (progress bars).
    """
    rng = np.random.default_rng(seed)
    q = np.asarray(initial, dtype=float).copy()
    dim = q.size
    if adaptation not in ("welford", *_GRADIENT_WINDOWS):
        raise ValueError(f"adaptation must be 'welford', 'fisher' or 'lowrank', not "
                         f"{adaptation!r}")
    dense_mass = dense_mass and adaptation == "welford"
    sampler = NUTS(rng, Metric(np.eye(dim) if dense_mass else np.ones(dim)), max_tree_depth)
    stats = {k: np.zeros(num_draws) for k in ("potential", "accept_prob", "energy")}
    ints = {k: np.zeros(num_draws, dtype=np.int64) for k in ("num_steps", "tree_depth")}
    diverging = np.zeros(num_draws, dtype=bool)
    positions = np.zeros((num_draws, dim))
    completed, warmup_steps = 0, 0
    try:
        value, grad = yield q
        if not math.isfinite(value) or not np.all(np.isfinite(grad)):
            raise FloatingPointError("the potential energy is not finite at the initial point")
        sampler.step_size = yield from find_reasonable_step_size(sampler, q, value, grad, 1.0)
        adapt = DualAveraging(target=target_accept)
        adapt.restart(sampler.step_size)
        if adaptation == "welford":
            warmup = _StanWindows(num_warmup, lambda: _Welford(dim, dense_mass))
        else:
            warmup = _SwitchingWindows(num_warmup, lambda: _GRADIENT_WINDOWS[adaptation](dim))
        for iteration in range(num_warmup + num_draws):
            step = yield sampler.request(q, value, grad)
            q, value, grad = step.position, step.potential, step.grad
            if iteration < num_warmup:
                warmup_steps += step.num_steps
                sampler.step_size = adapt.update(step.accept_prob)
                metric, restart = warmup.update(iteration, q, grad)
                if metric is not None:
                    sampler.metric = metric
                if restart:
                    sampler.step_size = yield from find_reasonable_step_size(
                        sampler, q, value, grad, sampler.step_size)
                    adapt.restart(sampler.step_size)
                if iteration + 1 == num_warmup:
                    sampler.step_size = adapt.final()
            else:
                i = iteration - num_warmup
                positions[i] = q
                stats["potential"][i], stats["accept_prob"][i] = value, step.accept_prob
                stats["energy"][i] = step.energy
                ints["num_steps"][i], ints["tree_depth"][i] = step.num_steps, step.tree_depth
                diverging[i] = step.diverging
                completed = i + 1
            if on_iteration is not None:
                on_iteration(iteration)
    except (KeyboardInterrupt, ChainInterrupted):  # Ctrl-C: keep the draws made so far
        keep = slice(0, completed)
        return ChainResult(
            positions=positions[keep], diverging=diverging[keep], step_size=sampler.step_size,
            inv_mass=sampler.metric.inverse, num_completed=completed, interrupted=True,
            warmup_steps=warmup_steps,
            **{k: v[keep] for k, v in stats.items()}, **{k: v[keep] for k, v in ints.items()})
    return ChainResult(positions=positions, diverging=diverging, step_size=sampler.step_size,
                       inv_mass=sampler.metric.inverse, num_completed=num_draws,
                       warmup_steps=warmup_steps, **stats, **ints)


BatchPotential = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _python_transition(request: TransitionRequest):
    """The Python transition of ``request``: a generator of positions, as :class:`NUTS`."""
    sampler = NUTS(None, request.metric, request.max_tree_depth)
    sampler.step_size = request.step_size
    return sampler.transition(request)


def drive_lockstep(processes: list[ChainProcess], potential: BatchPotential,
                   native: bool = True) -> list[ChainResult]:
    """Run chains side by side: one batched potential call serves every chain's request.

    A chain asks either for the potential at a position (an array) or for a whole NUTS
    transition (a :class:`~ppl_notes.native.trajectory.TransitionRequest`). The
    transitions run in compiled C (:mod:`~ppl_notes.native.trajectory`: one call
    advances every chain by a leapfrog step) where it could be built and ``native`` is
    true, else as Python generators; both make the same draws. The chains' trees differ,
    so each asks for its own next position; a chain that has finished keeps its last
    position in the batch (its result is ignored). The cost per call is nearly that of
    one chain where per-operation overhead dominates. A potential whose ``native()``
    gives a C function (a :class:`~ppl_notes.native.tape.Tape`'s) is called by the C
    transitions themselves: Python then sees only finished transitions, not each
    leapfrog step.

    Parameters
    ----------
    processes : list of generators
        From :func:`chain_process`.
    potential : callable
        ``potential(Q) -> (U, dU/dQ)`` for a ``(chains, dim)`` batch; optionally with a
        ``native()`` method returning ``(function, context)`` addresses or None.
    native : bool
        Use the C transitions where they are available.
    """
    count = len(processes)
    lib = library() if native else None
    engine: NativeTransitions | None = None
    subtransitions: list = [None] * count  # Python transitions under way, per chain
    results: list[ChainResult | None] = [None] * count
    first = [next(process) for process in processes]
    dim = np.asarray(first[0].q if isinstance(first[0], TransitionRequest) else first[0]).size
    positions = np.zeros((count, dim))
    waiting: set[int] = set()  # chains waiting on a plain potential or a Python transition

    def take(chain: int, request) -> None:
        nonlocal engine, positions
        waiting.add(chain)
        if not isinstance(request, TransitionRequest):
            positions[chain] = request
        elif lib is not None:
            if engine is None:
                engine = NativeTransitions(lib, count, dim, request.max_tree_depth)
                engine.requests[:] = positions
                positions = engine.requests  # C writes the running chains' rows
            engine.begin(chain, request)
            waiting.discard(chain)
        else:
            subtransitions[chain] = _python_transition(request)
            positions[chain] = next(subtransitions[chain])

    for chain, request in enumerate(first):
        take(chain, request)
    active = set(range(count))
    # a potential that C can call itself (a tape): whole trajectories without Python
    native_potential = getattr(potential, "native", lambda: None)()
    try:
        while active:
            ready = None
            if native_potential is not None and not waiting and engine is not None \
                    and engine.running:
                ready = engine.run(native_potential)
            if ready is None:
                values, grads = potential(positions)
                ready = list(waiting)
                if engine is not None and engine.running:
                    ready.extend(engine.resume(values, grads))
            for chain in ready:
                if chain not in waiting:
                    reply = engine.result(chain)
                elif subtransitions[chain] is not None:
                    try:
                        positions[chain] = subtransitions[chain].send(
                            (float(values[chain]), grads[chain]))
                        continue
                    except StopIteration as done:
                        subtransitions[chain], reply = None, done.value
                else:
                    reply = (float(values[chain]), grads[chain])
                try:
                    take(chain, processes[chain].send(reply))
                except StopIteration as done:
                    results[chain] = done.value
                    active.discard(chain)
                    waiting.discard(chain)
                    if done.value.interrupted:  # Ctrl-C arrived inside this chain
                        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        # Stop every other chain where it is; each returns the draws it has made.
        for chain in sorted(active):
            try:
                processes[chain].throw(ChainInterrupted())
            except StopIteration as done:
                results[chain] = done.value
    finally:
        if engine is not None:
            engine.close()
    return results


def sample_chain(potential: Potential, initial: np.ndarray, native: bool = True,
                 **options) -> ChainResult:
    """Run one chain against a single-point potential ``potential(q) -> (U, dU/dq)``.

    Takes the keyword options of :func:`chain_process`; ``native`` as
    :func:`drive_lockstep`.
    """
    def batched(positions):
        value, grad = potential(positions[0])
        return np.array([value]), grad[None]

    return drive_lockstep([chain_process(initial, **options)], batched, native=native)[0]
