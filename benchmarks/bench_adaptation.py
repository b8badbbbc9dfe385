"""Mass-matrix adaptation on the posteriordb programs: Stan's Welford diagonal against
nutpie's gradient-based (Fisher) diagonal and its low-rank correction, by ESS per
gradient, ESS per second and against the reference.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_adaptation.py                  # every posteriordb story
    .venv/bin/python benchmarks/bench_adaptation.py eight_schools-eight_schools_noncentered
    .venv/bin/python benchmarks/bench_adaptation.py --metrics diag lowrank

Each (story, metric) runs in a fresh process: 4 chains x (1000 warmup + 1000 draws), the
same seed for every metric. Printed per row: the leapfrog steps after warmup (gradients),
the smallest bulk ESS over the parameters, ESS per 1000 gradients, wall seconds of the
whole process (import and compilation included), ESS per second, divergences, and the
check against posteriordb's reference draws (every mean within 4 combined MCSE, every sd
within 10%); then each metric's ratio to ``diag`` of ESS per gradient and ESS per second,
and the medians of those ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _fresh import CORPUS_PREAMBLE, ROOT, run_fresh  # benchmarks/ is on the path

CHILD = CORPUS_PREAMBLE + r"""
from ppl_notes import infer
options = {{**case.nuts, "chains": 4, "warmup": 1000, "draws": 1000, "seed": 1,
           "mass_matrix": {metric!r}}}
fit = infer(case.story, case.data, method="nuts", progress=False, **options)
wall = time.perf_counter() - started
stats = fit.to_arviz()["sample_stats"]
worst_mean, worst_sd, ess = 0.0, 0.0, float("inf")
for element, moments in case.truth.items():
    draws = case.draws(fit, element)
    mcse = float(arviz_stats.mcse(draws, method="mean"))
    mcse = (mcse ** 2 + case.reference_mcse.get(element, 0.0) ** 2) ** 0.5
    worst_mean = max(worst_mean, abs(float(draws.mean()) - float(moments.mean[0])) / mcse)
    worst_sd = max(worst_sd, abs(float(draws.std()) / float(moments.sd[0]) - 1))
    ess = min(ess, float(arviz_stats.ess(draws, method="bulk")))
print(json.dumps({{"gradients": int(stats["n_steps"].sum()), "ess": ess, "wall": wall,
                  "divergences": int(stats["diverging"].sum()),
                  "worst_mean_mcse": worst_mean, "worst_sd_rel": worst_sd}}))
"""


def run(name: str, metric: str) -> dict:
    """One fit in a fresh process; its figures as a dict."""
    return run_fresh(CHILD.format(root=str(ROOT), name=name, metric=metric))


def main(names: list[str], metrics: list[str]) -> None:
    """Print one row per (story, metric) and the median ratios to the first metric."""
    sys.path.insert(0, str(ROOT))
    from tests.corpus.cases import CASES

    names = names or [n for n, c in CASES.items() if c.source == "posteriordb"]
    base = metrics[0]
    print(f"{'story':42s} {'metric':7s} {'grads':>9s} {'minESS':>7s} {'ESS/1k':>7s} "
          f"{'wall s':>7s} {'ESS/s':>7s} {'div':>4s} {'mean/MCSE':>9s} {'sd rel':>7s} ok")
    ratios = {m: {"gradient": [], "second": []} for m in metrics[1:]}
    for name in names:
        rows = {}
        for metric in metrics:
            row = run(name, metric)
            if "error" in row:
                print(f"{name:42s} {metric:7s} failed: {row['error']}", flush=True)
                continue
            rows[metric] = row
            row["per_gradient"] = 1000 * row["ess"] / row["gradients"]
            row["per_second"] = row["ess"] / row["wall"]
            ok = row["worst_mean_mcse"] < 4 and row["worst_sd_rel"] < 0.1
            print(f"{name:42s} {metric:7s} {row['gradients']:9d} {row['ess']:7.0f} "
                  f"{row['per_gradient']:7.2f} {row['wall']:7.1f} {row['per_second']:7.1f} "
                  f"{row['divergences']:4d} {row['worst_mean_mcse']:9.2f} "
                  f"{row['worst_sd_rel']:7.3f} {'yes' if ok else 'NO'}", flush=True)
        for metric in metrics[1:]:
            if base in rows and metric in rows:
                for unit in ("gradient", "second"):
                    key = f"per_{unit}"
                    ratios[metric][unit].append(rows[metric][key] / rows[base][key])
                print(f"{'':42s} {metric} / {base}: ESS per gradient "
                      f"x{ratios[metric]['gradient'][-1]:.2f}, ESS per second "
                      f"x{ratios[metric]['second'][-1]:.2f}", flush=True)
    for metric, by_unit in ratios.items():
        if by_unit["gradient"]:
            print(f"median {metric} / {base} over {len(by_unit['gradient'])} posteriors: ESS "
                  f"per gradient x{statistics.median(by_unit['gradient']):.2f}, ESS per second "
                  f"x{statistics.median(by_unit['second']):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="posteriordb posteriors (default: all 8)")
    parser.add_argument("--metrics", nargs="+", default=["diag", "fisher", "lowrank"],
                        help="mass_matrix options to compare; ratios are to the first")
    arguments = parser.parse_args()
    main(arguments.names, arguments.metrics)
