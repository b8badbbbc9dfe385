"""The flow against closed forms: Neal's funnel (10-D) and a banana, as users write them.

Run by hand (never in CI)::

    .venv/bin/python benchmarks/flow_targets.py --seeds 3

For each target and seed, default SVI (the Gaussian, going on to the flow where its
k-hat exceeds 0.7), ``guide="fullrank"`` (the Gaussian alone) and NUTS are fitted; each
row gives the worst mean shift in truth sds and the sd ratios of the statistics with a
closed form, the Pareto k-hat, the gradient evaluations and the seconds (warm: a first
fit of each method is made before). Truth:

* funnel: v ~ N(0, 3), x_i | v ~ N(0, e^{v/2}), i = 1..9. v's mean 0 and sd 3; for the
  x_i the statistic is log|x_i| (their own sd, e^{9/4} = 9.49, has a Monte Carlo error
  of its estimate larger than itself at 4000 draws: their kurtosis is 3e^9):
  E log|x_i| = -(gamma + log 2)/2 = -0.635, sd sqrt(9/4 + pi^2/8) = 1.866;
* banana: a ~ N(0, 1), b | a ~ N(a^2, 0.5): a's mean 0 and sd 1; b's mean 1 and sd
  sqrt(2 + 0.25) = 1.5.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EULER_GAMMA = 0.5772156649015329


def _targets():
    import pyro
    import pyro.distributions as dist
    import torch

    import ppl_notes as pn

    @pn.model(observed=[])
    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        with pyro.plate("k", 9):
            pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))

    @pn.model(observed=[])
    def banana():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a**2, 0.5))

    def funnel_stats(fit):
        x = np.log(np.abs(fit.draws("x").reshape(-1, 9)))
        v = fit.draws("v").ravel()
        return {"v": (v.mean(), v.std()),
                **{f"log|x{i}|": (x[:, i].mean(), x[:, i].std()) for i in range(9)}}

    def banana_stats(fit):
        return {k: (fit.draws(k).mean(), fit.draws(k).std()) for k in ("a", "b")}

    log_x = (-(EULER_GAMMA + math.log(2)) / 2, math.sqrt(9 / 4 + math.pi**2 / 8))
    return {"funnel": (funnel, funnel_stats,
                       {"v": (0.0, 3.0), **{f"log|x{i}|": log_x for i in range(9)}}),
            "banana": (banana, banana_stats, {"a": (0.0, 1.0), "b": (1.0, 1.5)})}


def _row(name, story, stats, truth, how, seed):
    import ppl_notes as pn

    options = {"nuts": {"method": "nuts"}, "default": {"method": "svi"},
               "fullrank": {"method": "svi", "guide": "fullrank"}}[how]
    started = time.perf_counter()
    fit = pn.infer(story, data={}, seed=seed, progress=False, **options)
    seconds = time.perf_counter() - started
    got = stats(fit)
    shifts = [abs(got[k][0] - m) / s for k, (m, s) in truth.items()]
    ratios = [got[k][1] / s for k, (m, s) in truth.items()]
    escalation = fit.info.get("escalation") or {}
    if how == "nuts":
        gradients = (float(sum(fit.info["warmup_leapfrog_steps"]))
                     + float(fit.tree["sample_stats"]["n_steps"].values.sum()))
    else:
        gradients = fit.info.get("gradient_evaluations", math.nan)
    lands = max(shifts) <= 0.1 and 0.9 <= min(ratios) and max(ratios) <= 1.1
    return (f"{name:7s} {how:8s} seed {seed}: family {fit.info.get('family', '-'):8s} "
            f"worst shift {max(shifts):.3f} sd, sd ratios {min(ratios):.3f}-{max(ratios):.3f}"
            f" ({'lands' if lands else 'misses'}), k-hat "
            f"{escalation.get('flow_khat', escalation.get('gaussian_khat', math.nan)):.2f}, "
            f"gradients {gradients:.0f}, {seconds:.1f} s, reliable {fit.check().reliable}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    import ppl_notes as pn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (story, stats, truth) in _targets().items():
            for how in ("default", "fullrank", "nuts"):  # warm each method's caches
                pn.infer(story, data={}, method="svi" if how != "nuts" else "nuts",
                         progress=False, **({"draws": 10, "warmup": 10} if how == "nuts"
                                            else {"num_draws": 50}))
            for seed in range(args.seeds):
                for how in ("default", "fullrank", "nuts"):
                    print(_row(name, story, stats, truth, how, seed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
