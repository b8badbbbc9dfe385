"""An enumerated mixture against its hand-marginalised form and NumPyro (issue 42 part 3).

Run by hand (never in CI)::

    .venv/bin/python benchmarks/bench_mixture.py --seeds 3
    .venv/bin/python benchmarks/bench_mixture.py --numpyro-python /path/to/python

The story is posteriordb's ``low_dim_gauss_mix`` (``tests/corpus/low_dim_gauss_mix.py``)
on 1000 simulated values. Two figures:

* the gradient: one call of the recorded potential at 4 points, ``with_assignment``
  (``k`` enumerated, as users write it) against ``marginal`` (``MixtureSameFamily``),
  the median of 2000 calls;
* NUTS, 4 chains x (1000 warmup + 1000 draws), each run in a fresh process (imports and
  compiling counted): ppl_notes' default on both forms, and NumPyro's NUTS on
  ``MixtureSameFamily`` with its chains in parallel on every core (its documented
  strongest set-up), when a Python with NumPyro is given (``--numpyro-python``; this
  one's by default). Min bulk ESS over the 5 parameters, per second of wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _fresh import ROOT, run_fresh  # benchmarks/ is on the path

OURS = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
started = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np, arviz_stats
import ppl_notes as pn
from tests.corpus import low_dim_gauss_mix as mix
fit = pn.infer(getattr(mix, {form!r}), data=mix.simulated(), method="nuts", seed={seed},
               progress=False)
wall = time.perf_counter() - started
ess = min(float(arviz_stats.ess(np.asarray(fit[n]).reshape(4, 1000, -1)
                                [..., j], method="bulk"))
          for n in ("mu", "sigma", "theta") for j in range(2 if n != "theta" else 1))
print(json.dumps({{"wall": wall, "ess": ess}}))
"""

NUMPYRO = r"""
import json, sys, time
started = time.perf_counter()
import numpyro
numpyro.set_host_device_count(4)
numpyro.enable_x64()
import jax, jax.numpy as jnp, numpy as np
import numpyro.distributions as dist
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
rng = np.random.default_rng(0)
first = rng.random(1000) < 0.4
y = np.where(first, rng.normal(-0.75, 1.0, 1000), rng.normal(0.75, 1.0, 1000))
def model(y):
    mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.ordered_vector, (),
                                                   event_shape=(2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0 * jnp.ones(2)).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    mixture = dist.MixtureSameFamily(dist.Categorical(jnp.stack([theta, 1 - theta])),
                                     dist.Normal(mu, sigma))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", mixture, obs=y)
mcmc = MCMC(NUTS(model), num_warmup=1000, num_samples=1000, num_chains=4,
            chain_method="parallel", progress_bar=False)
mcmc.run(jax.random.PRNGKey({seed}), jnp.asarray(y))
draws = {{k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}}
wall = time.perf_counter() - started
ess = min(float(effective_sample_size(v.reshape(4, 1000, -1)[..., j]))
          for v in draws.values() for j in range(v.reshape(4, 1000, -1).shape[-1]))
print(json.dumps({{"wall": wall, "ess": ess}}))
"""


def gradient_times(repeats: int = 2000) -> dict[str, float]:
    """Median seconds of one potential call at 4 points, per form."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from ppl_notes.evaluation.potential import BatchedPotential
    from tests.corpus import low_dim_gauss_mix as mix

    data, points = mix.simulated(), np.random.default_rng(0).normal(size=(4, 5)) * 0.5
    times = {}
    for form in ("with_assignment", "marginal"):
        potential = BatchedPotential(getattr(mix, form), data, 4, compiler="tape")
        potential(points)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            potential(points)
            samples.append(time.perf_counter() - started)
        times[form] = statistics.median(samples)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--numpyro-python", default=sys.executable,
                        help="a Python that has NumPyro and JAX")
    args = parser.parse_args()
    times = gradient_times()
    print(f"gradient at 4 points: enumerated {times['with_assignment'] * 1e3:.3f} ms, "
          f"marginal {times['marginal'] * 1e3:.3f} ms, ratio "
          f"{times['with_assignment'] / times['marginal']:.2f}")
    rows = {}
    for seed in range(args.seeds):
        for form in ("with_assignment", "marginal"):
            rows.setdefault(form, []).append(
                run_fresh(OURS.format(root=str(ROOT), form=form, seed=seed)))
        rows.setdefault("numpyro", []).append(_numpyro(args.numpyro_python, seed))
    print(f"{'contender':<18} {'seed':>4} {'wall s':>7} {'min ESS':>8} {'ESS/s':>7}")
    for contender, runs in rows.items():
        for seed, run in enumerate(runs):
            if "error" in run:
                print(f"{contender:<18} {seed:>4} {run['error']}")
                continue
            print(f"{contender:<18} {seed:>4} {run['wall']:7.1f} {run['ess']:8.0f} "
                  f"{run['ess'] / run['wall']:7.1f}")
    rates = {c: [r["ess"] / r["wall"] for r in runs if "error" not in r]
             for c, runs in rows.items()}
    if rates.get("numpyro") and rates.get("with_assignment"):
        ratio = statistics.median(rates["with_assignment"]) / statistics.median(rates["numpyro"])
        print(f"median ESS/s, enumerated / NumPyro: {ratio:.2f}")


def _numpyro(python: str, seed: int) -> dict:
    import json
    import subprocess

    done = subprocess.run([python, "-c", NUMPYRO.format(seed=seed)], capture_output=True,
                          text=True, timeout=3600)
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:160]}


if __name__ == "__main__":
    main()
