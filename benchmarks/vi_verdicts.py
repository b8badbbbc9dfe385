"""Does VI's verdict (Posterior.check) ever call a wrong fit reliable? The acceptance run.

Run by hand (never in CI; about 20 minutes here)::

    .venv/bin/python benchmarks/vi_verdicts.py                    # every case, both guides
    .venv/bin/python benchmarks/vi_verdicts.py --cases arK-arK normal_mean --restarts 4

For each posterior -- the eight posteriordb programs translated as a user would
(tests/corpus; Stan's reference draws are the truth) and the shipped stories with a
closed form or a NUTS reference -- and each guide (``meanfield``: AutoNormal,
``fullrank``: AutoMultivariateNormal; both start from a quick MAP), fit SVI with
``restarts`` restarts and take ``check()``'s verdict. The fit *agrees* with the truth
when every element has |mean - truth| <= 0.25 truth sd and sd ratio in [0.8, 1.25]
(issue 17's rule). Printed: one row per fit, then the counts the issue asks for:
reliable verdicts among disagreeing fits (must be 0) and among agreeing fits (at least
half), and the gradient evaluations each fit took (steps x particles over all restarts,
plus each restart's start: the MAP search's and the Laplace Hessian's)
as a share of NUTS's on the same posterior (ppl_notes' NUTS, defaults; goal: median at
most 0.10).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AGREE_MEAN, AGREE_SD = 0.25, (0.8, 1.25)


def _shipped() -> dict:
    """Shipped stories with truth: {name: (story, data, {element: (mean, sd)})}."""
    from ppl_notes.models.conjugate import (
        beta_bernoulli,
        beta_bernoulli_posterior,
        normal_mean,
        normal_mean_posterior,
    )
    from ppl_notes.models.correlated import gaussian as correlated_gaussian

    cases = {}
    data = normal_mean.prepare_data(None)
    mean, sd = normal_mean_posterior(data["x"])
    cases["normal_mean"] = (normal_mean, None, {"mu": (mean, sd)})
    data = beta_bernoulli.prepare_data(None)
    a, b = beta_bernoulli_posterior(data["y"])
    cases["beta_bernoulli"] = (beta_bernoulli, None, {"p": (
        a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1))))})
    # unit variances by construction
    cases["correlated_gaussian"] = (correlated_gaussian, None, {"z1": (0.0, 1.0),
                                                                "z2": (0.0, 1.0)})
    from ppl_notes.models.heights import model as heights

    cases["heights"] = (heights, None, None)
    return cases


def _element_moments(draws: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    out = {}
    for site, values in draws.items():
        values = np.asarray(values, dtype=float)
        flat = values.reshape(values.shape[0], -1)
        for i in range(flat.shape[1]):
            name = site if flat.shape[1] == 1 and values.ndim == 1 else f"{site}[{i}]"
            out[name] = (float(flat[:, i].mean()), float(flat[:, i].std()))
    return out


def _nuts_truth(story, data) -> tuple[dict, float]:
    """NUTS's moments (the truth where there is no other) and its gradient evaluations.

    Gradients: every leapfrog step of every chain, warmup's transitions
    (``info["warmup_leapfrog_steps"]``) and the draws' (``n_steps``). The few steps of
    the step-size search are not counted.
    """
    from ppl_notes import infer

    fit = infer(story, data, method="nuts", progress=False)
    sites = [s for s in fit.tree["posterior"].data_vars if s not in fit.discrete_sites]
    gradients = (float(sum(fit.info["warmup_leapfrog_steps"]))
                 + float(fit.tree["sample_stats"]["n_steps"].values.sum()))
    return _element_moments({s: fit.draws(s) for s in sites}), gradients


def _verdict_row(name, story, data, truth, guide, restarts, nuts_gradients):
    from ppl_notes import infer

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = infer(story, data, method="svi", guide=guide, restarts=restarts, progress=False)
    seconds = time.perf_counter() - started
    fitted = _element_moments({s: fit.draws(s) for s in fit.tree["posterior"].data_vars
                               if s not in fit.discrete_sites})
    worst_mean, worst_ratio, agree = 0.0, 1.0, True
    for element, (mean, sd) in truth.items():
        if element not in fitted or not sd > 0:
            continue
        got_mean, got_sd = fitted[element]
        shift, ratio = abs(got_mean - mean) / sd, got_sd / sd
        worst_mean = max(worst_mean, shift)
        if abs(math.log(ratio)) > abs(math.log(worst_ratio)):
            worst_ratio = ratio
        agree &= shift <= AGREE_MEAN and AGREE_SD[0] <= ratio <= AGREE_SD[1]
    verdict = fit.check()
    particles = fit.options["num_particles"]
    # every restart's steps, and its start: the MAP search and the Laplace Hessian
    gradients = sum((r["steps_done"] or 0) * particles + (r["start_gradients"] or 0)
                    for r in fit.info["restarts"])
    return {"case": name, "guide": guide, "agrees": bool(agree), "reliable": verdict.reliable,
            "worst_mean_shift_sd": round(worst_mean, 3), "worst_sd_ratio": round(worst_ratio, 3),
            "gradients": gradients, "nuts_gradients": round(nuts_gradients),
            "share_of_nuts": round(gradients / nuts_gradients, 3),
            "stopped": sorted({str(r["stopped"]) for r in fit.info["restarts"]}),
            "seconds": round(seconds, 1),
            "why": "" if verdict.reliable else verdict.reasons[0][:90]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--guides", nargs="*", default=["meanfield", "fullrank"])
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from tests.corpus.cases import CASES
    from tests.corpus.posteriordb_stories import PROGRAMS

    todo = {}
    for name in PROGRAMS:
        case = CASES[name]
        todo[name] = (case.story, case.data,
                      {k: (float(v.mean[0]), float(v.sd[0])) for k, v in case.truth.items()})
    todo.update(_shipped())
    if args.cases:
        todo = {k: v for k, v in todo.items() if k in args.cases}
    rows = []
    for name, (story, data, truth) in todo.items():
        nuts_moments, nuts_gradients = _nuts_truth(story, data)
        truth = nuts_moments if truth is None else truth
        for guide in args.guides:
            try:
                row = _verdict_row(name, story, data, truth, guide, args.restarts,
                                   nuts_gradients)
            except Exception as error:  # noqa: BLE001 - a row says what failed
                row = {"case": name, "guide": guide, "error": f"{type(error).__name__}: "
                                                             f"{str(error)[:120]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    done = [r for r in rows if "error" not in r]
    wrong = [r for r in done if not r["agrees"]]
    right = [r for r in done if r["agrees"]]
    print(f"\nfits: {len(done)} ({len(rows) - len(done)} failed)")
    print(f"disagreeing with the truth: {len(wrong)}; called reliable: "
          f"{sum(r['reliable'] for r in wrong)} (goal 0)")
    print(f"agreeing: {len(right)}; called reliable: {sum(r['reliable'] for r in right)} "
          f"(goal >= {math.ceil(len(right) / 2)})")
    if done:
        print(f"median gradient evaluations per fit: "
              f"{np.median([r['gradients'] for r in done]):.0f}; median share of NUTS's "
              f"(warmup + draws): {np.median([r['share_of_nuts'] for r in done]):.3f} "
              "(goal <= 0.10)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
