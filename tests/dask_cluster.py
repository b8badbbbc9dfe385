"""A Dask scheduler and workers on 127.0.0.1, as subprocesses (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DASK = [sys.executable, "-m", "dask"]


class Cluster:
    """The scheduler's address and the worker processes (to kill one in a test)."""

    def __init__(self, address: str, scheduler, workers: list) -> None:
        self.address, self.scheduler, self.workers = address, scheduler, workers


@contextlib.contextmanager
def dask_cluster(workers: int = 2, timeout: float = 60.0):
    """Start ``dask scheduler`` and ``workers`` x ``dask worker --no-nanny``; tear down after.

    Each worker has one thread, so a worker is one core's worth of fits.
    """
    folder = Path(tempfile.mkdtemp(prefix="ppl-notes-dask-"))
    file = folder / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    scheduler = subprocess.Popen(DASK + ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                         "--no-dashboard", "--scheduler-file", str(file)],
                                 env=env, **quiet)
    started = []
    try:
        deadline = time.time() + timeout
        while not file.exists() or not file.read_text().strip():
            if time.time() > deadline or scheduler.poll() is not None:
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        for i in range(workers):
            started.append(subprocess.Popen(
                DASK + ["worker", address, "--no-nanny", "--nthreads", "1", "--name", f"w{i}",
                        "--no-dashboard", "--memory-limit", "0", "--local-directory",
                        str(folder / f"w{i}")], env=env, **quiet))
        _wait_for_workers(address, workers, deadline)
        yield Cluster(address, scheduler, started)
    finally:
        for process in started:  # nothing of theirs needs keeping
            process.kill()
        scheduler.terminate()
        for process in started + [scheduler]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_workers(address: str, count: int, deadline: float) -> None:
    import distributed

    with distributed.Client(address, timeout=30, set_as_default=False) as client:
        client.wait_for_workers(count, timeout=max(1.0, deadline - time.time()))
