"""Pathfinder beside ADVI and the default SVI: distance to posteriordb's reference draws.

Run by hand (never in CI; a few minutes here)::

    .venv/bin/python benchmarks/bench_pathfinder.py
    .venv/bin/python benchmarks/bench_pathfinder.py --cases earnings-logearn_interaction

For each of the eight posteriordb programs (tests/corpus, written as a user would):

* ``advi``: Stan's ADVI's family and optimiser, a mean-field Gaussian fitted by
  stochastic gradients (``guide="meanfield", optimizer="adam"``, one fit);
* ``default``: ``infer(method="svi")`` (full-rank Gaussian VI on the potential, Newton
  steps on fixed draws, 4 restarts);
* ``pathfinder``: ``infer(method="pathfinder")`` (4 paths, PSIS resampling);

and for each the 1-Wasserstein distance of every element's draws to the reference draws
(Stan's, 10 chains x 1000, read from ``../shared/posteriordb`` where that folder is
beside the clone), in reference sds, averaged over the elements and at its worst; the
gradient evaluations as a share of NUTS's (ppl_notes' NUTS, defaults, warmup included);
and the wall time. Reference draws are Stan's names, 1-based; the stories' elements are
0-based.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "posteriordb"

CONTENDERS = {
    "advi": dict(method="svi", guide="meanfield", optimizer="adam", restarts=1),
    "default": dict(method="svi"),
    "pathfinder": dict(method="pathfinder"),
}


def reference_draws(name: str) -> dict[str, np.ndarray] | None:
    """posteriordb's reference draws, keyed by 0-based element names, or None."""
    archive = SHARED / name / "reference_draws.json.zip"
    if not archive.exists():
        return None
    with zipfile.ZipFile(archive) as opened:
        chains = json.loads(opened.read(opened.namelist()[0]))
    out = {}
    for key in chains[0]:
        values = np.concatenate([np.asarray(chain[key], dtype=float) for chain in chains])
        match = re.fullmatch(r"(\w+)\[(\d+)\]", key)
        out[f"{match[1]}[{int(match[2]) - 1}]" if match else key] = values
    return out


def element_draws(fit) -> dict[str, np.ndarray]:
    """Each continuous element's draws, named as the references are."""
    out = {}
    for site in fit.tree["posterior"].data_vars:
        values = np.asarray(fit.draws(site), dtype=float)
        flat = values.reshape(values.shape[0], -1)
        for i in range(flat.shape[1]):
            out[site if flat.shape[1] == 1 and values.ndim == 1 else f"{site}[{i}]"] = flat[:, i]
    return out


def distances(fit, reference: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean and largest W1 over the shared elements, in reference sds."""
    drawn = element_draws(fit)
    scaled = [wasserstein_distance(drawn[k], v) / v.std() for k, v in reference.items()
              if k in drawn and v.std() > 0]
    return float(np.mean(scaled)), float(np.max(scaled))


def nuts_gradients(story, data) -> float:
    from ppl_notes import infer

    fit = infer(story, data, method="nuts", progress=False)
    return (float(sum(fit.info["warmup_leapfrog_steps"]))
            + float(fit.tree["sample_stats"]["n_steps"].values.sum()))


def gradients(fit) -> float:
    if "gradient_evaluations" in fit.info:
        return float(fit.info["gradient_evaluations"])
    restarts = fit.info.get("restarts") or [fit.info]
    return float(sum((r["steps_done"] or 0) * fit.options.get("num_particles", 1)
                     + (r.get("start_gradients") or 0) for r in restarts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*")
    args = parser.parse_args(argv)
    from ppl_notes import infer
    from tests.corpus.cases import CASES
    from tests.corpus.posteriordb_stories import PROGRAMS

    names = args.cases or list(PROGRAMS)
    print(f"{'posterior':40s} {'method':11s} {'W1 mean':>8s} {'W1 max':>7s} "
          f"{'grad share':>10s} {'seconds':>8s}")
    for name in names:
        case, reference = CASES[name], reference_draws(name)
        if reference is None:
            print(f"{name}: no reference draws in {SHARED}; skipped")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nuts = nuts_gradients(case.story, case.data)
            for label, options in CONTENDERS.items():
                started = time.perf_counter()
                try:
                    fit = infer(case.story, case.data, progress=False, **options)
                except Exception as error:  # noqa: BLE001 - a row says what failed
                    print(f"{name:40s} {label:11s} {type(error).__name__}: {str(error)[:60]}")
                    continue
                seconds = time.perf_counter() - started
                mean, worst = distances(fit, reference)
                print(f"{name:40s} {label:11s} {mean:8.3f} {worst:7.3f} "
                      f"{gradients(fit) / nuts:10.3f} {seconds:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
