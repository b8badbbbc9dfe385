"""Independent tasks in worker processes on this machine: calibration replicates, VI restarts.

Each task is ``function(payload, *arguments)``; the payload (the story, data and options,
pickled by cloudpickle) is shipped with every task, and results are handed to ``keep`` as
they finish, in any order. Workers start by ``spawn`` without re-running the user's
script (:func:`without_main_module`), die with this process
(:func:`die_with_parent`), ignore SIGINT and use one torch
thread each.

Ctrl-C is this process's to handle, in one of two ways:

* ``on_interrupt="terminate"``: the workers end at once and KeyboardInterrupt propagates
  (a calibration replicate cut short has nothing worth keeping);
* ``on_interrupt="stop"``: a shared event is set, which long loops in the workers poll
  with :func:`stop_requested`; each task returns what it has, and ``keep`` gets it. A
  second Ctrl-C ends the workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

__all__ = ["die_with_parent", "run_in_processes", "stop_requested", "usable_cores",
           "without_main_module"]

_stop_event = None


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def stop_requested() -> bool:
    """Whether the process that started this worker asked its tasks to stop (Ctrl-C)."""
    return _stop_event is not None and bool(_stop_event.is_set())


def set_stop_event(event) -> None:
    """Make ``event`` (a multiprocessing or a Dask Event) the one :func:`stop_requested` reads."""
    global _stop_event
    _stop_event = event


def die_with_parent(parent: int) -> None:
    """End this worker process when ``parent``, the process that started it, ends.

    A parent killed outright (SIGKILL, a timeout, an out-of-memory kill) cannot stop its
    pool, and its workers would sample on, unseen, for as long as their chains last.
    Linux delivers SIGKILL to a child whose parent dies (``PR_SET_PDEATHSIG``); elsewhere
    a daemon thread watches the parent's pid once a second. ``parent`` is passed in, not
    read here: a parent that died while this worker was still starting is already gone.
    """
    if os.getppid() != parent:
        os._exit(1)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ppl-notes-parent-watch").start()


@contextlib.contextmanager
def without_main_module():
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


def leave_signals_to_the_parent() -> None:
    """In a worker: Ctrl-C and SIGTERM, which reach the whole process group, are ignored.

    The main process turns either into a stop that the workers hear from it, and its
    end takes them with it (:func:`die_with_parent`). A worker that died of the group's
    SIGTERM under GNU ``timeout`` left the main process a raw ``BrokenProcessPool``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_worker(parent: int, stop_event) -> None:
    import torch

    die_with_parent(parent)
    leave_signals_to_the_parent()
    torch.set_num_threads(1)
    set_stop_event(stop_event)


def run_in_processes(function: Callable, payload: bytes, arguments: Sequence[tuple],
                     keep: Callable[[Any], None], *, processes: int | None = None,
                     on_interrupt: str = "terminate") -> None:
    """Run ``function(payload, *a)`` for each ``a`` in ``arguments`` in worker processes.

    Parameters
    ----------
    function : callable
        A module-level function (workers import it by name).
    payload : bytes
        What every task shares.
    arguments : sequence of tuple
        One tuple per task.
    keep : callable
        Called in this process with each result as it arrives.
    processes : int, optional
        Worker processes; default one per core, never more than the tasks.
    on_interrupt : {"terminate", "stop"}
        What Ctrl-C does (module docstring).
    """
    workers = max(1, min(len(arguments), processes or usable_cores()))
    context = multiprocessing.get_context("spawn")
    stop_event = context.Event()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_init_worker, initargs=(os.getpid(), stop_event))
    try:
        with without_main_module():  # a script without a __main__ guard is not re-run
            pending = {pool.submit(function, payload, *args) for args in arguments}
        while pending:
            try:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                if on_interrupt != "stop" or stop_event.is_set():
                    raise
                stop_event.set()  # each task returns what it has; a second Ctrl-C ends them
                continue
            for future in finished:
                keep(future.result())
    except KeyboardInterrupt:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            pool.shutdown(wait=True, cancel_futures=True)
