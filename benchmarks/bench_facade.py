"""Time ``infer()`` against the same run written in plain Pyro; print the ratios.

Run by hand (not a test):  .venv/bin/python benchmarks/bench_facade.py [--nuts-heights]

The facade's overhead is measured where no faster path applies (``engine="pyro"``,
``jit=False``): the identical Pyro loop, plus what ``infer`` adds (argument and pairing
checks, posterior draws, each person's gender per draw, log p / log q, the pointwise
log-likelihood, the DataTree). The fast engines are listed against the same baseline.

* SVI: the heights story's marginal form with the mean-field guide, Trace_ELBO, 2000
  steps of Adam(0.01).
* NUTS: the Normal-mean story, 1 chain x (500 warmup + 1000 draws); ``--nuts-heights``
  adds the heights story, 1 chain x (300 + 300) (plain Pyro takes about 10 minutes).
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

    plain = plain_svi(args.steps, marginal=True)
    for engine in ("pyro", "fast"):
        fit = infer(heights.model, method="svi", guide=meanfield, steps=args.steps,
                    engine=engine, jit=False, progress=False)
        loop = args.steps / fit.info["steps_per_second"]
        rows.append((f"SVI heights engine={engine}: optimisation loop", loop, plain))
        rows.append((f"SVI heights engine={engine}: whole infer()", fit.seconds, plain))

    data = normal_mean.prepare_data(None)
    plain = plain_nuts(normal_mean, data, 500, 1000)
    for engine in ("pyro", "fast"):
        fit = infer(normal_mean, method="nuts", chains=1, warmup=500, draws=1000,
                    engine=engine, progress=False, processes=1)
        rows.append((f"NUTS normal_mean engine={engine}: whole infer()", fit.seconds, plain))

    if args.nuts_heights:
        data = heights.model.prepare_data(None)
        plain = plain_nuts(heights.model, data, 300, 300)
        fit = infer(heights.model, method="nuts", chains=1, warmup=300, draws=300,
                    progress=False, processes=1)
        rows.append(("NUTS heights 300+300 engine=fast: whole infer()", fit.seconds, plain))

    print(f"{'run':52s} {'seconds':>8s} {'plain Pyro':>11s} {'ratio':>6s}")
    for name, seconds, baseline in rows:
        print(f"{name:52s} {seconds:8.2f} {baseline:11.2f} {seconds / baseline:6.2f}")


if __name__ == "__main__":
    main()
