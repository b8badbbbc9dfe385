"""What the benchmarks share: one corpus story, fitted in a fresh Python process.

``CORPUS_PREAMBLE`` opens a child script (format it with ``root`` and ``name``): it
starts the clock, puts the repository on the path and binds ``case`` to the corpus
story. :func:`run_fresh` runs a child and returns the JSON object it printed last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORPUS_PREAMBLE = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
started = time.perf_counter()
import numpy as np, arviz_stats
from tests.corpus.cases import CASES
case = CASES[{name!r}]
"""


def run_fresh(code: str, timeout: float = 3600, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its last JSON line, or ``{"error": ...}``.

    ``env`` adds to (or overrides) this process's environment variables.
    """
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child and any workers it started
        child.communicate()
        raise
    done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:160]}
