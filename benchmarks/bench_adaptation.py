"""Mass-matrix adaptation on the posteriordb programs: Stan's Welford diagonal against the
gradient-based (Fisher) diagonal of nutpie, by ESS per gradient and against the reference.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_adaptation.py                  # every posteriordb story
    .venv/bin/python benchmarks/bench_adaptation.py eight_schools-eight_schools_noncentered

Each (story, metric) runs in a fresh process: 4 chains x (1000 warmup + 1000 draws), the
same seed for both metrics. Printed per row: the leapfrog steps in all (gradients), the
smallest bulk ESS over the parameters, ESS per 1000 gradients, wall seconds, divergences,
and the check against posteriordb's reference draws (every mean within 4 combined MCSE,
every sd within 10%); then the ratio fisher / diag of ESS per gradient.
"""

from __future__ import annotations

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


def main(names: list[str]) -> None:
    """Print one row per (story, metric) and the median ratio of ESS per gradient."""
    sys.path.insert(0, str(ROOT))
    from tests.corpus.cases import CASES

    names = names or [n for n, c in CASES.items() if c.source == "posteriordb"]
    print(f"{'story':42s} {'metric':6s} {'grads':>9s} {'minESS':>7s} {'ESS/1k':>7s} "
          f"{'wall s':>7s} {'div':>4s} {'mean/MCSE':>9s} {'sd rel':>7s} ok")
    ratios = []
    for name in names:
        per_gradient = {}
        for metric in ("diag", "fisher"):
            row = run(name, metric)
            if "error" in row:
                print(f"{name:42s} {metric:6s} failed: {row['error']}")
                continue
            per_gradient[metric] = 1000 * row["ess"] / row["gradients"]
            ok = row["worst_mean_mcse"] < 4 and row["worst_sd_rel"] < 0.1
            print(f"{name:42s} {metric:6s} {row['gradients']:9d} {row['ess']:7.0f} "
                  f"{per_gradient[metric]:7.2f} {row['wall']:7.1f} {row['divergences']:4d} "
                  f"{row['worst_mean_mcse']:9.2f} {row['worst_sd_rel']:7.3f} "
                  f"{'yes' if ok else 'NO'}", flush=True)
        if len(per_gradient) == 2:
            ratios.append(per_gradient["fisher"] / per_gradient["diag"])
            print(f"{'':42s} fisher / diag ESS per gradient: {ratios[-1]:.2f}", flush=True)
    if ratios:
        print(f"median fisher / diag ESS per gradient over {len(ratios)} posteriors: "
              f"{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
