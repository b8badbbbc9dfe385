"""Cold-start import times, each in a fresh process (median of 5), printed as a table.

Run by hand: ``python benchmarks/bench_import.py``. Issue 15 asks ``import ppl_notes`` to
take at most 1.5 s; torch and Pyro alone set the floor, so they are timed too, and
NumPyro + JAX where installed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import torch": "import torch",
    "import pyro": "import pyro",
    "import ppl_notes": "import ppl_notes",
    "from ppl_notes import model, infer": "from ppl_notes import model, infer",
    "from ppl_notes import write_report": "from ppl_notes import write_report",
    "import numpyro (+ jax)": "import numpyro",
}


def seconds(statement: str, repeats: int = 5) -> float | None:
    """The median wall time of a fresh ``python -c statement``, interpreter start included."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", statement], capture_output=True)
        if done.returncode != 0:
            return None
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Print each statement's median time and its ratio to ``import torch``."""
    base = seconds("pass")
    torch_time = seconds("import torch")
    print(f"{'statement':40s} {'seconds':>8s} {'x torch':>8s}")
    print(f"{'python -c pass':40s} {base:8.2f}")
    for label, statement in STATEMENTS.items():
        value = seconds(statement)
        if value is None:
            print(f"{label:40s} {'n/a':>8s}")
            continue
        print(f"{label:40s} {value:8.2f} {value / torch_time:8.2f}")


if __name__ == "__main__":
    main()
