"""torch's intra-op threads sized to the cores a fit can have, and safe across ``fork``.

torch's default is one intra-op thread per core. On an idle 2-core machine that pays:
default SVI on a 3-parameter regression (``benchmarks/bench_threads.py``) took 0.29 s
on 2 threads against 0.50 s on one at 3000 rows, 2.24 s against 3.71 s at 30000 (it
evaluates thousands of draws at once), and the same at 300 rows. Beside busy processes
every split operation waits on the pool's barrier while another process holds a core:
with two spinning processes on those 2 cores the same fits took 0.41 s on 2 threads
against 0.16 s on one at 300 rows, 2.51 s against 0.93 s at 3000 and 15.4 s against
6.6 s at 30000 (issue 42: an 8x8 Cholesky took about 10 ms a call). What decides is
not the data's size but whether the cores are free. So a fit runs on as many threads as
there are cores that no other process is running on at its start (the runnable tasks
the kernel counts in ``/proc/loadavg``, this one excepted: the median of a few reads),
at least one and at most the caller's setting, which is restored afterwards. A story
whose tensors are all below torch's grain size (32768 elements), which torch never
splits, runs on one.

A child made by ``fork`` inherits the parent's OpenMP thread team without its threads
(GNU libgomp is not fork-safe): its first parallel region waited forever in the team's
barrier after any fit in the parent on 2 threads. In a forked child torch is set to one
intra-op thread (:func:`os.register_at_fork`), as torch does for its DataLoader's
workers, so no OpenMP team of the parent's is used there; a child that wants more
threads sets them itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["busy_cores", "fit_threads", "threads_for"]

#: torch splits no elementwise operation on fewer elements than this (at::GRAIN_SIZE)
GRAIN_SIZE = 32768


def busy_cores(reads: int = 5) -> int:
    """Cores other processes are running on now: runnable tasks but this one.

    The median of ``reads`` reads of ``/proc/loadavg``'s running count (Linux); where
    there is none, the 1-minute load average less this process's one, rounded.
    """
    counts = []
    for _ in range(reads):
        try:
            with open("/proc/loadavg") as handle:
                counts.append(int(handle.read().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return max(0, round(os.getloadavg()[0] - 1)) if hasattr(os, "getloadavg") else 0
    return max(0, sorted(counts)[len(counts) // 2] - 1)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(data: Mapping[str, Any], caller: int, draws: int = 4000) -> int:
    """Intra-op threads for a fit on ``data``: the cores free now, from 1 to ``caller``.

    One where no tensor of a batch of ``draws`` reaches :data:`GRAIN_SIZE` (the largest
    data tensor's elements times ``draws``), which torch would not split anyway.
    """
    largest = max((value.numel() for value in data.values() if torch.is_tensor(value)),
                  default=1)
    if caller <= 1 or largest * draws < GRAIN_SIZE:
        return 1
    return max(1, min(caller, _cores() - busy_cores()))


@contextlib.contextmanager
def fit_threads(data: Mapping[str, Any]) -> Iterator[int]:
    """Run the body on :func:`threads_for` threads; the caller's number is restored after.

    ``PPL_NOTES_THREADS`` (an integer) fixes the number instead, for a user who knows
    the machine (a many-core server idle but for this fit).
    """
    caller = torch.get_num_threads()
    chosen = os.environ.get("PPL_NOTES_THREADS")
    threads = int(chosen) if chosen and chosen.isdigit() and int(chosen) > 0 \
        else threads_for(data, caller)
    if threads != caller:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != caller:
            torch.set_num_threads(caller)


def _one_thread_in_child() -> None:
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_in_child)
