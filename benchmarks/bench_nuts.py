"""NUTS: ppl_notes against NumPyro and plain Pyro, same chains, warmup and draws.

Run by hand:  .venv/bin/python benchmarks/bench_nuts.py [--chains 4] [--pyro]
(needs the ``bench`` extra: ``pip install -e .[bench]``).

Each contender runs in its own fresh process (so compile caches and imports are counted
the way a user meets them) and reports total wall time, including tracing/compilation,
plus min bulk ESS per second of total wall time. The stories:

* eight schools, non-centred (Rubin 1981);
* the heights mixture on Galton's 934 heights (ppl_notes uses the story's
  hand-marginalised form; NumPyro gets the same marginal mixture written by hand);
* a user-written 2-component mixture whose assignments are enumerated by Pyro (no
  hand-marginalised form), on the same data; NumPyro enumerates too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONTENDERS = ("numpyro", "ppl_notes", "pyro")
STORIES = ("eight_schools", "heights", "user_mixture")


def _run_ppl_notes(story: str, chains: int, warmup: int, draws: int) -> dict:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.ops.indexing import Vindex

    from ppl_notes import infer, model
    from ppl_notes.models import heights
    from ppl_notes.models.eight_schools import noncentered

    if story == "eight_schools":
        fit = infer(noncentered, method="nuts", chains=chains, warmup=warmup, draws=draws,
                    progress=False)
    elif story == "heights":
        fit = infer(heights.model, method="nuts", chains=chains, warmup=warmup, draws=draws,
                    progress=False)
    else:
        @model(observed="x", data=heights.model.default_data)
        def user_mixture(x=None):
            """Two Normals; each height picks one; means ordered by a prior offset."""
            weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=x.dtype)))
            low = pyro.sample("low", dist.Normal(torch.tensor(165.0, dtype=x.dtype), 20.0))
            gap = pyro.sample("gap", dist.LogNormal(torch.tensor(2.0, dtype=x.dtype), 1.0))
            scale = pyro.sample("scale", dist.LogNormal(
                torch.tensor(2.0, dtype=x.dtype), 0.5).expand([2]).to_event(1))
            locs = torch.stack([low, low + gap], -1)
            with pyro.plate("data", x.shape[-1]):
                z = pyro.sample("z", dist.Categorical(weights))
                pyro.sample("x", dist.Normal(Vindex(locs)[..., z], Vindex(scale)[..., z]),
                            obs=x)

        fit = infer(user_mixture, {"x": heights.model.default_data()["height"]},
                    method="nuts", chains=chains, warmup=warmup, draws=draws, progress=False)
    return {"ess": float(fit.summary()["ess_bulk"].min()),
            "divergences": int(fit.tree["sample_stats"]["diverging"].sum())}


def _run_pyro(story: str, chains: int, warmup: int, draws: int) -> dict:
    from ppl_notes import infer
    from ppl_notes.models import heights
    from ppl_notes.models.eight_schools import noncentered

    target = {"eight_schools": noncentered, "heights": heights.model}.get(story)
    if target is None:
        return {}
    fit = infer(target, method="nuts", engine="pyro", chains=chains, warmup=warmup,
                draws=draws, progress=False)
    return {"ess": float(fit.summary()["ess_bulk"].min()),
            "divergences": int(fit.tree["sample_stats"]["diverging"].sum())}


def _run_numpyro(story: str, chains: int, warmup: int, draws: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.diagnostics import summary
    from numpyro.infer import MCMC, NUTS

    from ppl_notes.models import heights
    from ppl_notes.models.eight_schools import load_eight_schools

    jax.config.update("jax_enable_x64", True)
    if story == "eight_schools":
        data = {k: jnp.asarray(v) for k, v in load_eight_schools().items()}

        def fn(y, sigma):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
            with numpyro.plate("schools", sigma.shape[0]):
                tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
                numpyro.sample("y", dist.Normal(mu + tau * tilde, sigma), obs=y)
    else:
        data = {"x": jnp.asarray(heights.model.default_data()["height"])}
        if story == "heights":
            def fn(x):
                alpha = numpyro.sample("alpha", dist.Dirichlet(jnp.ones(2)))
                # ordered means, as ppl_notes' OrderedNormal (the order statistics of
                # i.i.d. Normal(170, 20); its constant log 2! does not change the posterior)
                mu = numpyro.sample("mu", dist.ImproperUniform(
                    dist.constraints.ordered_vector, (), event_shape=(2,)))
                numpyro.factor("mu_prior", dist.Normal(170.0, 20.0).log_prob(mu).sum())
                sigma = numpyro.sample("sigma", dist.LogNormal(jnp.log(7.0), 0.5)
                                       .expand([2]).to_event(1))
                with numpyro.plate("people", x.shape[0]):
                    numpyro.sample("x", dist.MixtureSameFamily(
                        dist.Categorical(alpha), dist.Normal(mu, sigma)), obs=x)
        else:
            from numpyro.contrib.funsor import config_enumerate

            @config_enumerate
            def fn(x):
                weights = numpyro.sample("weights", dist.Dirichlet(jnp.ones(2)))
                low = numpyro.sample("low", dist.Normal(165.0, 20.0))
                gap = numpyro.sample("gap", dist.LogNormal(2.0, 1.0))
                scale = numpyro.sample("scale", dist.LogNormal(2.0, 0.5).expand([2]).to_event(1))
                locs = jnp.stack([low, low + gap], -1)
                with numpyro.plate("data", x.shape[0]):
                    z = numpyro.sample("z", dist.Categorical(weights))
                    numpyro.sample("x", dist.Normal(locs[z], scale[z]), obs=x)
    mcmc = MCMC(NUTS(fn), num_warmup=warmup, num_samples=draws, num_chains=chains,
                chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), **data)
    samples = mcmc.get_samples(group_by_chain=True)
    ess = min(float(jnp.min(v["n_eff"])) for v in summary(samples).values())
    return {"ess": ess, "divergences": int(mcmc.get_extra_fields()["diverging"].sum())}


def _child(contender: str, story: str, chains: int, warmup: int, draws: int) -> None:
    started = time.perf_counter()
    runner = {"ppl_notes": _run_ppl_notes, "numpyro": _run_numpyro, "pyro": _run_pyro}
    result = runner[contender](story, chains, warmup, draws)
    result["seconds"] = time.perf_counter() - started
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--pyro", action="store_true", help="also plain Pyro (slow)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.chains, args.warmup, args.draws)
        return
    contenders = CONTENDERS if args.pyro else ("numpyro", "ppl_notes")
    print(f"NUTS, {args.chains} chains x ({args.warmup} warmup + {args.draws} draws); "
          "seconds are total wall time in a fresh process")
    print(f"{'story':16s} {'contender':10s} {'seconds':>8s} {'min ESS':>8s} {'ESS/s':>7s} "
          f"{'div':>4s} {'vs numpyro':>10s}")
    for story in STORIES:
        times = {}
        for contender in contenders:
            command = [sys.executable, __file__, "--child", contender, story,
                       "--chains", str(args.chains), "--warmup", str(args.warmup),
                       "--draws", str(args.draws)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            line = [row for row in output.splitlines() if row.startswith("RESULT ")]
            result = json.loads(line[-1][7:])
            if "ess" not in result:
                continue
            times[contender] = result["seconds"]
            ratio = result["seconds"] / times["numpyro"] if "numpyro" in times else float("nan")
            print(f"{story:16s} {contender:10s} {result['seconds']:8.1f} {result['ess']:8.0f} "
                  f"{result['ess'] / result['seconds']:7.1f} {result['divergences']:4d} "
                  f"{ratio:10.2f}")


if __name__ == "__main__":
    main()
