"""Run any benchmark (or command) beside busy processes, one per core, as users' machines are.

Run by hand:

    .venv/bin/python benchmarks/under_load.py [--busy N] -- python benchmarks/vi_verdicts.py ...

Each busy process spins on arithmetic in pure Python (no threads, no I/O), so the load
average reads about N higher while the command runs. The command's own output is passed
through; the line ``under_load: ...`` says how many busy processes ran, the load average
before and after and the command's wall time. The busy processes stop with the command,
also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def _spin(stop) -> None:
    value = 0
    while not stop.is_set():
        for step in range(100_000):
            value = (value * 31 + step) % 1_000_003


def run_under_load(command: list[str], busy: int) -> int:
    """Run ``command`` beside ``busy`` spinning processes; its exit status."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    workers = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
    for worker in workers:
        worker.start()
    time.sleep(2.0)  # the spinners are running before the command starts
    before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        status = subprocess.run(command, check=False).returncode
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
    print(f"under_load: {busy} busy process(es); load average {before:.1f} before the command, "
          f"{os.getloadavg()[0]:.1f} at its end; the command took {seconds:.1f} s",
          file=sys.stderr)
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                        help="busy processes (default: one per core)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return run_under_load(command, args.busy)


if __name__ == "__main__":
    sys.exit(main())
