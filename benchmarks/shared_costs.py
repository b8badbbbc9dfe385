"""What SVI and NUTS both pay before and after their own work, on one posterior.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/shared_costs.py                    # the HMM, 3 repeats
    .venv/bin/python benchmarks/shared_costs.py earnings-logearn_interaction

Issue 28 asks SVI's wall time to be at most a quarter of NUTS's. Both methods run the
same steps around their own work: the data checks (the story on the data and at prior
draws), the choice of evaluation path, the recording of the potential, and the
evaluation of the 4000 draws (pointwise log-likelihood, deterministic sites, discrete
sites recovered). Printed per repeat, after a first fit of each method has warmed the
caches: each method's ``infer()`` time, their ratio, and each shared step timed on its
own, so that the floor the shared steps put under the ratio can be read off.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from ppl_notes import infer
    from ppl_notes.checks import check_data_runs
    from ppl_notes.evaluation import choose_path, story_facts
    from ppl_notes.evaluation.draws import posterior_of
    from ppl_notes.evaluation.paths import keep_check_points
    from ppl_notes.evaluation.potential import BatchedPotential
    from tests.corpus.cases import CASES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="hmm_example-hmm_example")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    case = CASES[args.case]
    story = case.story
    warnings.simplefilter("ignore")
    infer(story, case.data, method="nuts", progress=False, draws=10, warmup=10)
    infer(story, case.data, method="svi", progress=False, restarts=1, num_draws=50)
    for repeat in range(args.repeats):
        started = time.perf_counter()
        infer(story, case.data, method="nuts", progress=False)
        nuts = time.perf_counter() - started
        started = time.perf_counter()
        infer(story, case.data, method="svi", progress=False, seed=repeat)
        svi = time.perf_counter() - started
        data = story.prepare_data(case.data)
        marks = [time.perf_counter()]
        first, prior_runs = check_data_runs(story, data)
        marks.append(time.perf_counter())
        facts = story_facts(story, data, trace=first)
        keep_check_points(facts, prior_runs)
        choose_path(story, data, facts)
        marks.append(time.perf_counter())
        marginal = story.marginal
        potential = BatchedPotential(marginal, data, 4, compiler="tape",
                                     facts=facts if marginal is story else None)
        marks.append(time.perf_counter())
        draws = torch.randn(4000, potential.dim, dtype=torch.float64) * 0.1
        posterior_of(story, data, potential.unflatten(draws), facts, recover_discrete=True,
                     seed=0, unconstrained=True)
        marks.append(time.perf_counter())
        parts = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        print(f"NUTS {nuts:.2f} s, SVI {svi:.2f} s (ratio {svi / nuts:.2f}); shared: checks "
              f"{parts[0]:.2f} s, path {parts[1]:.2f} s, potential {parts[2]:.2f} s, 4000 "
              f"draws evaluated {parts[3]:.2f} s; floor {sum(parts) / nuts:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
