"""Time ``infer()`` against the same run written in plain Pyro; print the ratios.

Run by hand (not a test):  .venv/bin/python benchmarks/bench_facade.py [--nuts-heights]

* SVI: the heights story with the hand-written mean-field guide, 2000 steps. Plain Pyro
  runs the identical SVI loop (same story, guide, ELBO, optimiser, seed); ``infer``
  additionally draws 1000 posterior draws, each person's gender per draw, log p/log q
  and the pointwise log-likelihood, and builds the DataTree -- reported separately.
* NUTS: the Normal-mean story, 1 chain x (500 warmup + 1000 draws): plain Pyro's NUTS
  against ``infer(method="nuts")`` with both engines. ``--nuts-heights`` adds the heights
  story (plain Pyro takes about 10 minutes there).
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam

from ppl_notes import infer
from ppl_notes.guides.heights import meanfield
from ppl_notes.models import heights
from ppl_notes.models.conjugate import normal_mean


def plain_svi(steps: int, marginal: bool) -> float:
    data = heights.model.prepare_data(None)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    if marginal:
        story, elbo = heights.model.marginal, Trace_ELBO()
    else:
        story, elbo = config_enumerate(heights.model), TraceEnum_ELBO(max_plate_nesting=1)
    svi = SVI(story, meanfield, Adam({"lr": 0.01}), loss=elbo)
    started = time.perf_counter()
    for _ in range(steps):
        svi.step(**data)
    return time.perf_counter() - started


def plain_nuts(model, data, warmup: int, draws: int) -> float:
    pyro.set_rng_seed(0)
    started = time.perf_counter()
    kernel = NUTS(model, max_plate_nesting=1)
    MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True).run(**data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--nuts-heights", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []

    plain_enum = plain_svi(args.steps, marginal=False)
    plain_marginal = plain_svi(args.steps, marginal=True)
    fit = infer(heights.model, method="svi", guide=meanfield, steps=args.steps,
                progress=False)
    history_seconds = fit.seconds
    rows.append(("SVI heights, fit + draws (infer)", history_seconds, plain_marginal))
    rows.append(("SVI heights, plain Pyro TraceEnum_ELBO", plain_enum, plain_marginal))

    data = normal_mean.prepare_data(None)
    plain = plain_nuts(normal_mean, data, 500, 1000)
    for engine in ("pyro", "fast"):
        fit = infer(normal_mean, method="nuts", chains=1, warmup=500, draws=1000,
                    engine=engine, progress=False, processes=1)
        rows.append((f"NUTS normal_mean, infer engine={engine}", fit.seconds, plain))

    if args.nuts_heights:
        data = heights.model.prepare_data(None)
        plain = plain_nuts(heights.model, data, 300, 300)
        fit = infer(heights.model, method="nuts", chains=1, warmup=300, draws=300,
                    progress=False, processes=1)
        rows.append(("NUTS heights 1 chain 300+300, infer fast", fit.seconds, plain))

    print(f"{'run':48s} {'seconds':>9s} {'plain Pyro':>11s} {'ratio':>7s}")
    for name, seconds, baseline in rows:
        print(f"{name:48s} {seconds:9.2f} {baseline:11.2f} {seconds / baseline:7.2f}")


if __name__ == "__main__":
    main()
