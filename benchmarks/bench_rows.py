"""A 3-parameter regression at a million rows and more: time, peak memory, result size.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_rows.py                    # 1e5 and 1e6 rows
    .venv/bin/python benchmarks/bench_rows.py --rows 1e6 1e7 --methods svi

Each fit runs in a fresh process: ``infer(story, method=...)`` with its defaults on
``y ~ Normal(a + b x, s)`` (``tests/corpus/user_stories_two.straight_line``), x and the
noise standard normal, a = 1, b = 2, s = 1. Peak memory is the largest resident set of
the process and of its worker processes (``ru_maxrss``); the result is saved with
``Posterior.save`` and its size is given. The pointwise log-likelihood is not stored
above its budget (:mod:`ppl_notes.evaluation.log_likelihood_budget`), so the file holds
the draws and the data, not draws x rows.
"""

from __future__ import annotations

import argparse

from _fresh import ROOT, run_fresh  # benchmarks/ is on the path

CHILD = r"""
import json, os, resource, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
import numpy as np, torch
import ppl_notes as pn
from tests.corpus.user_stories_two import straight_line

regression = pn.model(observed="y")(straight_line)

rng = np.random.default_rng(0)
x = rng.normal(size={rows})
y = 1 + 2 * x + rng.normal(size={rows})
started = time.perf_counter()
fit = pn.infer(regression, data={{"x": torch.tensor(x), "y": torch.tensor(y)}},
               method={method!r}, seed=0, progress=False)
seconds = time.perf_counter() - started
with tempfile.TemporaryDirectory() as folder:
    fit.save(os.path.join(folder, "fit.nc"))
    size = os.path.getsize(os.path.join(folder, "fit.nc"))
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
print(json.dumps({{"seconds": seconds, "peak": peak, "size": size,
                  "b": float(fit.draws("b").mean()),
                  "log_likelihood": fit.info.get("log_likelihood", "stored")}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=float, default=[1e5, 1e6])
    parser.add_argument("--methods", nargs="+", default=["svi", "nuts"])
    args = parser.parse_args()
    print(f"{'rows':>10} {'method':<6} {'seconds':>8} {'peak GB':>8} {'file MB':>8} "
          f"{'mean b':>7}  log-likelihood")
    for rows in args.rows:
        for method in args.methods:
            result = run_fresh(CHILD.format(root=str(ROOT), rows=int(rows), method=method))
            if "error" in result:
                print(f"{int(rows):>10} {method:<6} {result['error']}")
                continue
            stored = "stored" if result["log_likelihood"] == "stored" else "not stored"
            print(f"{int(rows):>10} {method:<6} {result['seconds']:8.1f} "
                  f"{result['peak'] / 1e9:8.2f} {result['size'] / 1e6:8.1f} "
                  f"{result['b']:7.3f}  {stored}")


if __name__ == "__main__":
    main()
