"""Independent fits on a Dask cluster: the scheduler argument, and tasks run there.

``scheduler=None`` keeps everything on this machine (worker processes of its own). An
address (``"tcp://10.0.0.5:8786"``) or a :class:`distributed.Client` sends the work to
that cluster's workers instead: each task is submitted with :meth:`Client.submit`
(arguments travel by cloudpickle), and when a worker dies its tasks are rescheduled on
the others by Dask's scheduler (``distributed.scheduler.allowed-failures``, 3 by
default). Seeds belong to the tasks, not to the workers, so a retried task gives the
result it would have given the first time.

Start a cluster by hand (any machines that share this environment)::

    dask scheduler --port 8786                        # prints tcp://HOST:8786
    dask worker tcp://HOST:8786 --nworkers 2 --nthreads 1   # on each machine

``pip install -e .[cluster]`` brings ``distributed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ppl_notes.errors import OptionError

__all__ = ["check_scheduler", "client_for", "completed"]


def check_scheduler(scheduler: Any, where: str) -> None:
    """Refuse a ``scheduler`` argument that is neither None, an address nor a Client."""
    if scheduler is None or isinstance(scheduler, str):
        if isinstance(scheduler, str) and "://" not in scheduler and ":" not in scheduler:
            raise OptionError(f"{where}: scheduler must be an address such as "
                              f"'tcp://host:8786', got {scheduler!r}")
        return
    if type(scheduler).__name__ == "Client" and hasattr(scheduler, "submit"):
        return
    raise OptionError(f"{where}: scheduler must be None, an address 'tcp://host:port' or a "
                      f"distributed.Client, got {type(scheduler).__name__}")


@contextlib.contextmanager
def client_for(scheduler: Any, where: str, timeout: float = 10.0) -> Iterator[Any]:
    """A :class:`distributed.Client` for ``scheduler``; one made here is closed after."""
    check_scheduler(scheduler, where)
    try:
        import distributed
    except ImportError as error:
        raise OptionError(f"{where}: a scheduler needs Dask's 'distributed' package: "
                          "pip install -e .[cluster]") from error
    if not isinstance(scheduler, str):
        yield scheduler
        return
    try:
        client = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise OptionError(f"{where}: no Dask scheduler answers at {scheduler!r} "
                          f"({type(error).__name__}: {error})") from error
    try:
        yield client
    finally:
        client.close()


def completed(client: Any, function: Callable, shared: bytes, arguments: list[tuple],
              key_prefix: str) -> Iterator[Any]:
    """Submit ``function(shared, *a)`` for each ``a`` and yield results as they finish.

    ``shared`` (the pickled story, data and options) is scattered to every worker once,
    not shipped with each task. Tasks are impure (never deduplicated by Dask) and named
    ``key_prefix-i``, which the dashboard shows. Leaving the iteration early (Ctrl-C)
    cancels what has not run.
    """
    import distributed

    payload = client.scatter(shared, broadcast=True, hash=False)
    futures = [client.submit(function, payload, *args, key=f"{key_prefix}-{i}", pure=False)
               for i, args in enumerate(arguments)]
    try:
        for future in distributed.as_completed(futures, loop=client.loop):
            yield future.result()
    finally:
        client.cancel([f for f in futures if not f.done()])
