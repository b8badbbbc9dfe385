"""NUTS transitions in compiled C, for a batch of chains in lockstep.

The tree building of :class:`~ppl_notes.mcmc.kernel.NUTS` costs tens of
microseconds of Python per leapfrog step and chain, several times the compiled potential
of a small story (eight schools: 15 µs for four chains). ``trajectory.c`` is the same
algorithm as a resumable state machine: one C call advances every chain of the batch by
a leapfrog step, and Python only evaluates the potential and adapts between transitions.

The C source is compiled once per machine with the system's C compiler (``cc``, or
``$CC``) into ``~/.cache/ppl_notes`` (``$PPL_NOTES_CACHE``), keyed by the source's hash;
where no compiler works, or with ``PPL_NOTES_NATIVE=0``, the sampler runs its Python
transitions, which take the same random numbers (:class:`SplitMix64`) and make the same
decisions.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppl_notes.native.loader import build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("trajectory.c")
NEEDS_POTENTIAL = 1
_MASK = (1 << 64) - 1


class SplitMix64:
    """Steele, Lea & Flood's splitmix64 (2014): the uniforms of one NUTS transition.

    The C transition draws from the same generator, so both implementations consume the
    same numbers in the same order.
    """

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next_int(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """The next uniform on [0, 1), from the top 53 bits of the next output."""
        return (self.next_int() >> 11) * 2.0**-53


@dataclass
class TransitionRequest:
    """What a chain asks of its driver: one NUTS transition from ``q``.

    ``p0`` is the momentum already drawn, ``seed`` the transition's :class:`SplitMix64`
    seed, ``metric`` a :class:`~ppl_notes.mcmc.metrics.Metric` or
    :class:`~ppl_notes.mcmc.metrics.LowRankMetric`.
    """

    q: np.ndarray
    potential: float
    grad: np.ndarray
    p0: np.ndarray
    step_size: float
    seed: int
    metric: object
    max_tree_depth: int


@dataclass
class Transition:
    """One NUTS transition: the new point and its statistics."""

    position: np.ndarray
    potential: float
    grad: np.ndarray
    accept_prob: float
    num_steps: int
    tree_depth: int
    diverging: bool
    energy: float


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled transition library, built on first use; None where it cannot be."""
    lib = build(SOURCE, "the C NUTS transitions")
    if lib is not None:
        _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.nuts_new.argtypes, lib.nuts_new.restype = [integer, integer], pointer
    lib.nuts_free.argtypes, lib.nuts_free.restype = [pointer], None
    lib.nuts_set_metric.argtypes = [pointer, integer, pointer, pointer, pointer, pointer,
                                    integer]
    lib.nuts_set_metric.restype = None
    lib.nuts_begin.argtypes = [pointer, pointer, real, pointer, pointer, real,
                               ctypes.c_uint64, pointer]
    lib.nuts_begin.restype = integer
    lib.nuts_resume_batch.argtypes = [pointer, integer, pointer, pointer, pointer, pointer]
    lib.nuts_resume_batch.restype = integer
    lib.nuts_result.argtypes = [pointer, pointer, pointer, pointer]
    lib.nuts_result.restype = None
    lib.nuts_run_batch.argtypes = [pointer, integer, pointer, pointer, pointer, pointer,
                                   pointer, pointer]
    lib.nuts_run_batch.restype = integer


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


class NativeTransitions:
    """C transition states for ``count`` chains of dimension ``dim``.

    Row ``i`` of :attr:`requests` is the position chain ``i`` needs evaluated while its
    transition runs; :meth:`resume` advances every running chain by one leapfrog step and
    says which finished, whose :meth:`result` is then ready.
    """

    def __init__(self, lib: ctypes.CDLL, count: int, dim: int, max_tree_depth: int) -> None:
        self.lib, self.count, self.dim = lib, count, dim
        self.states = [lib.nuts_new(dim, max_tree_depth) for _ in range(count)]
        if not all(self.states):
            raise MemoryError("could not allocate the NUTS transition states")
        self._state_array = (ctypes.c_void_p * count)(*self.states)
        #: the positions to evaluate next, one row per chain (rows of chains without a
        #: transition under way are the caller's to fill)
        self.requests = np.zeros((count, dim))
        self.running = 0
        self._finished = np.zeros(count, dtype=np.intc)
        self._addresses = (_address(self.requests), _address(self._finished))
        self._metrics: list[object | None] = [None] * count
        self._stats = np.zeros(6)
        self._potentials: np.ndarray | None = None  # run()'s buffers
        self._grads: np.ndarray | None = None

    def close(self) -> None:
        """Free the C states."""
        for state in self.states:
            self.lib.nuts_free(state)
        self.states = []

    def __del__(self) -> None:
        if getattr(self, "states", None):
            self.close()

    def _set_metric(self, chain: int, metric) -> None:
        if self._metrics[chain] is metric:
            return
        state, null = self.states[chain], None
        if hasattr(metric, "vectors"):  # LowRankMetric
            stds = np.ascontiguousarray(metric.stds, dtype=float)
            vectors = np.ascontiguousarray(metric.vectors, dtype=float)
            values = np.ascontiguousarray(metric.values, dtype=float)
            self.lib.nuts_set_metric(state, 2, null, _address(stds), _address(vectors),
                                     _address(values), int(values.size))
        else:
            inverse = np.ascontiguousarray(metric.inverse, dtype=float)
            self.lib.nuts_set_metric(state, 1 if metric.dense else 0, _address(inverse),
                                     null, null, null, 0)
        self._metrics[chain] = metric

    def begin(self, chain: int, request: TransitionRequest) -> None:
        """Start chain ``chain``'s transition; its first position is in ``requests``."""
        self._set_metric(chain, request.metric)
        q = np.ascontiguousarray(request.q, dtype=float)
        grad = np.ascontiguousarray(request.grad, dtype=float)
        p0 = np.ascontiguousarray(request.p0, dtype=float)
        self.lib.nuts_begin(self.states[chain], _address(q), float(request.potential),
                            _address(grad), _address(p0), float(request.step_size),
                            request.seed, _address(self.requests[chain]))
        self.running += 1

    def resume(self, potentials: np.ndarray, grads: np.ndarray) -> list[int]:
        """Give every running chain its potential and gradient (rows of the batch).

        Returns the chains whose transition finished with this step.
        """
        potentials = np.ascontiguousarray(potentials, dtype=float)
        grads = np.ascontiguousarray(grads, dtype=float)
        done = self.lib.nuts_resume_batch(self._state_array, self.count, _address(potentials),
                                          _address(grads), *self._addresses)
        if not done:
            return []
        self.running -= done
        finished = self._finished[:done].tolist()
        return finished

    def run(self, native_potential: tuple[int, int]) -> list[int] | None:
        """Leapfrog steps with a C potential until a transition finishes.

        ``native_potential`` is ``(function, context)``, e.g.
        :meth:`~ppl_notes.native.tape.Tape.native`. Returns the chains that
        finished, or None where the potential failed (then nothing has moved: evaluate
        ``requests`` and :meth:`resume`).
        """
        if self._potentials is None:
            self._potentials, self._grads = np.zeros(self.count), np.zeros((self.count, self.dim))
        function, context = native_potential
        done = self.lib.nuts_run_batch(self._state_array, self.count, *self._addresses,
                                       function, context, _address(self._potentials),
                                       _address(self._grads))
        if done < 0:
            return None
        self.running -= done
        return self._finished[:done].tolist()

    def result(self, chain: int):
        """The finished transition of chain ``chain``."""
        q, grad, stats = np.empty(self.dim), np.empty(self.dim), self._stats
        self.lib.nuts_result(self.states[chain], _address(q), _address(grad), _address(stats))
        return Transition(position=q, potential=float(stats[0]), grad=grad,
                          accept_prob=float(stats[1]), num_steps=int(stats[2]),
                          tree_depth=int(stats[3]), diverging=bool(stats[4]),
                          energy=float(stats[5]))
