"""The potential's tape against inductor: time to build, time per call, agreement.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_tape.py                     # the 8 posteriordb stories
    .venv/bin/python benchmarks/bench_tape.py arK-arK --chains 4
    .venv/bin/python benchmarks/bench_tape.py --compilers tape        # seconds, not minutes

For each posterior and each compiler, a fresh Python process with empty caches (the
tape's C interpreter and inductor's FX graph cache) builds the batched potential of
``--chains`` points (``BatchedPotential``, the check at prior draws included), then
calls it for about a second at a fixed point. It prints the build time, the time per
call, the largest relative difference from the eager story at random points, and the
ratios tape/inductor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from _fresh import ROOT, run_fresh  # benchmarks/ is on the path

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import numpy as np
from ppl_notes import model
from ppl_notes.evaluation.potential import BatchedPotential, _eager_value_and_grad
from tests.corpus import posteriordb_stories as pdb

name, compiler, chains = {name!r}, {compiler!r}, {chains}
story = model(observed=pdb.OBSERVED[name])(getattr(pdb, pdb.PROGRAMS[name]))
data = story.prepare_data(pdb.data_for(name))
started = time.perf_counter()
potential = BatchedPotential(story.marginal, data, chains, compiler=compiler)
built = time.perf_counter() - started
rng = np.random.default_rng(0)
worst = 0.0
for _ in range(3):
    x = rng.normal(0, 0.5, (chains, potential.dim))
    got, expected = potential(x), _eager_value_and_grad(potential._potential, x)
    for a, b in zip(got, expected):
        worst = max(worst, float(np.max(np.abs(a - b) / (1 + np.abs(b)))))
x = np.zeros((chains, potential.dim))
potential(x)
calls, started = 0, time.perf_counter()
while time.perf_counter() - started < 1.0:
    potential(x)
    calls += 1
per_call = (time.perf_counter() - started) / calls
print(json.dumps({{"used": potential.compiler, "build_s": built, "per_call_us": per_call * 1e6,
                  "max_rel_diff": worst}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--compilers", nargs="+", default=["tape", "inductor"],
                        choices=["tape", "inductor"], help="inductor's builds take minutes")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.corpus.posteriordb_stories import PROGRAMS

    names = args.names or list(PROGRAMS)
    print(f"batched potential of {args.chains} points, fresh process and empty caches each")
    print(f"{'posterior':40s} {'compiler':9s} {'build s':>8s} {'us/call':>9s} "
          f"{'max rel diff':>12s}")
    for name in names:
        rows = {}
        for compiler in args.compilers:
            code = CHILD.format(root=str(ROOT), name=name, compiler=compiler,
                                chains=args.chains)
            cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(),
                     "PPL_NOTES_CACHE": tempfile.mkdtemp()}
            try:
                rows[compiler] = run_fresh(code, timeout=args.timeout, env=cache)
            except Exception as error:  # subprocess.TimeoutExpired
                rows[compiler] = {"error": type(error).__name__}
            row = rows[compiler]
            if "error" in row:
                print(f"{name:40s} {compiler:9s} failed: {row['error']}", flush=True)
                continue
            print(f"{name:40s} {row['used']:9s} {row['build_s']:8.2f} "
                  f"{row['per_call_us']:9.1f} {row['max_rel_diff']:12.1e}", flush=True)
        if len(rows) == 2 and all("error" not in r for r in rows.values()):
            tape, inductor = rows["tape"], rows["inductor"]
            print(f"{'':40s} {'ratio':9s} {tape['build_s'] / inductor['build_s']:8.3f} "
                  f"{tape['per_call_us'] / inductor['per_call_us']:9.2f}  (tape / inductor)",
                  flush=True)


if __name__ == "__main__":
    main()
