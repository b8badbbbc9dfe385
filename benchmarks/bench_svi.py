"""SVI steps per second on the heights mixture: ppl_notes, plain Pyro and NumPyro.

Run by hand:  .venv/bin/python benchmarks/bench_svi.py [--sizes 1000 100000]
(needs the ``bench`` extra). Data: N heights drawn from a two-component mixture fitted
to Galton's heights. Every contender fits the same marginal mixture (gender summed out)
with the same mean-field family (Dirichlet weights, ordered Normal means, LogNormal sds)
by single-particle Trace_ELBO and Adam(0.01), in a fresh process. ``steps/s`` is the
steady rate of the optimisation loop (compilation excluded: each contender runs once to
compile, then is timed); ``first run`` is the wall time of the first run, compilation
included.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np


def _data(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    male = rng.random(size) < 0.5
    return np.where(male, rng.normal(175.9, 6.6, size), rng.normal(162.8, 6.0, size))


def _ppl_notes(size: int, steps: int, engine: str) -> dict:
    from ppl_notes import infer
    from ppl_notes.guides.heights import meanfield
    from ppl_notes.models import heights

    data = {"height": _data(size)}
    started = time.perf_counter()
    infer(heights.model, data, method="svi", guide=meanfield, steps=steps, num_draws=10,
          recover_discrete=False, engine=engine, progress=False)
    first = time.perf_counter() - started
    fit = infer(heights.model, data, method="svi", guide=meanfield, steps=steps, num_draws=10,
                recover_discrete=False, engine=engine, progress=False)
    return {"steps_per_second": fit.info["steps_per_second"], "first_run": first}


def _plain_pyro(size: int, steps: int) -> dict:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    from ppl_notes.distributions import OrderedNormal
    from ppl_notes.guides.heights import meanfield

    def marginal(height):  # the heights story as a Pyro user writes it: MixtureSameFamily
        alpha = pyro.sample("alpha", dist.Dirichlet(torch.ones(2, dtype=torch.float64)))
        mu = pyro.sample("mu", OrderedNormal(torch.tensor(170.0, dtype=torch.float64),
                                             torch.tensor(20.0, dtype=torch.float64), 2))
        with pyro.plate("components", 2):
            log_median = torch.tensor(math.log(7.0), dtype=torch.float64)
            sigma = pyro.sample("sigma", dist.LogNormal(log_median, 0.5))
        with pyro.plate("people", height.shape[-1]):
            pyro.sample("height", dist.MixtureSameFamily(dist.Categorical(alpha),
                                                         dist.Normal(mu, sigma)), obs=height)

    data = {"height": torch.as_tensor(_data(size))}
    pyro.set_rng_seed(0)
    svi = SVI(marginal, meanfield, Adam({"lr": 0.01}), loss=Trace_ELBO())
    started = time.perf_counter()
    for _ in range(steps):
        svi.step(**data)
    seconds = time.perf_counter() - started
    return {"steps_per_second": steps / seconds, "first_run": seconds}


def _numpyro(size: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions.transforms import OrderedTransform
    from numpyro.infer import SVI, Trace_ELBO

    jax.config.update("jax_enable_x64", True)
    x = jnp.asarray(_data(size))

    def model(x):
        alpha = numpyro.sample("alpha", dist.Dirichlet(jnp.ones(2)))
        mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.ordered_vector, (),
                                                       event_shape=(2,)))
        numpyro.factor("mu_prior", dist.Normal(170.0, 20.0).log_prob(mu).sum())
        sigma = numpyro.sample("sigma", dist.LogNormal(jnp.log(7.0), 0.5).expand([2])
                               .to_event(1))
        with numpyro.plate("people", x.shape[0]):
            numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(alpha),
                                                       dist.Normal(mu, sigma)), obs=x)

    def guide(x):
        positive = dist.constraints.positive
        concentration = numpyro.param("c", 10.0 * jnp.ones(2), constraint=positive)
        numpyro.sample("alpha", dist.Dirichlet(concentration))
        loc = numpyro.param("mu_loc", jnp.array([160.0, 2.5]))
        scale = numpyro.param("mu_scale", 0.1 * jnp.ones(2), constraint=positive)
        numpyro.sample("mu", dist.TransformedDistribution(
            dist.Normal(loc, scale).to_event(1), OrderedTransform()))
        sigma_loc = numpyro.param("sigma_loc", 1.7 * jnp.ones(2))
        sigma_scale = numpyro.param("sigma_scale", 0.1 * jnp.ones(2), constraint=positive)
        numpyro.sample("sigma", dist.LogNormal(sigma_loc, sigma_scale).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    started = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(0), steps, x, progress_bar=False)
    result.losses.block_until_ready()
    first = time.perf_counter() - started
    started = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(1), steps, x, progress_bar=False)
    result.losses.block_until_ready()
    return {"steps_per_second": steps / (time.perf_counter() - started), "first_run": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runners = {"ppl_notes": lambda n, s: _ppl_notes(n, s, "fast"),
               "ppl_notes pyro engine": lambda n, s: _ppl_notes(n, s, "pyro"),
               "plain Pyro": _plain_pyro, "numpyro": _numpyro}
    if args.child:
        print("RESULT " + json.dumps(runners[args.child[0]](int(args.child[1]), args.steps)))
        return
    print(f"SVI on the heights mixture, {args.steps} steps; each contender in a fresh process")
    print(f"{'N':>8s} {'contender':24s} {'steps/s':>9s} {'first run s':>12s} {'vs numpyro':>11s}")
    for size in args.sizes:
        rates = {}
        for name in ("numpyro", "ppl_notes", "ppl_notes pyro engine", "plain Pyro"):
            command = [sys.executable, __file__, "--child", name, str(size),
                       "--steps", str(args.steps)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads([r for r in output.splitlines() if r.startswith("RESULT ")][-1][7:])
            rates[name] = result["steps_per_second"]
            print(f"{size:8d} {name:24s} {rates[name]:9.0f} {result['first_run']:12.1f} "
                  f"{rates[name] / rates['numpyro']:11.2f}")


if __name__ == "__main__":
    main()
