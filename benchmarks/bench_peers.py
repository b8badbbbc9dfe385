"""NUTS against each peer at its strongest documented set-up, on the 8 posteriordb posteriors.

Run by hand (never in CI), after ``pip install -e .[bench]``::

    .venv/bin/python benchmarks/bench_peers.py                       # every posterior
    .venv/bin/python benchmarks/bench_peers.py eight_schools-eight_schools_noncentered
    .venv/bin/python benchmarks/bench_peers.py --contenders ppl_notes numpyro
    .venv/bin/python benchmarks/bench_peers.py --settings reference   # posteriordb's adapt_delta

The contenders, each in a fresh Python process (imports, JIT and compile caches counted
as a user meets them), 4 chains x (1000 warmup + 1000 draws), float64 everywhere:

* ``ppl_notes``: ``infer(story, method="nuts")`` with its defaults, on the corpus's Pyro
  translation (``tests/corpus/posteriordb_stories.py``): the potential recorded as a
  tape run in C (inductor where it cannot be), trees built in C calling it, the
  low-rank metric, chains in lockstep in one process (worker processes on both cores
  from 20,000 observed values).
* ``numpyro``: NumPyro's NUTS with its chains in parallel, as its docs advise
  (``numpyro.set_host_device_count(4)``, ``chain_method="parallel"``), on
  ``benchmarks/numpyro_posteriordb.py``.
* ``nutpie``: nutpie on the PyMC translation (``benchmarks/pymc_posteriordb.py``)
  compiled with numba, 4 chains on 2 cores, its default gradient-based ("diag")
  adaptation; ``nutpie_lowrank`` is the same with ``adaptation="low_rank"``.
* ``pyro``: plain Pyro's ``MCMC(NUTS(story), num_chains=4)``, eight schools only unless
  named (the others take hours here).

Every contender runs at its default target acceptance (0.8), or with ``--settings
reference`` at the ``adapt_delta`` of posteriordb's reference run for that posterior (0.99
for the GP and diamonds, 0.95 for eight schools; ``REFERENCE_RUN`` in
``tests/corpus/posteriordb_stories.py``), which is where "no divergences where the
reference had none" is a fair test. ``max_tree_depth`` stays at 10 for every contender.

For each run: total wall time, min bulk ESS over posteriordb's reference elements, that
ESS per second of wall time, divergences, and agreement with the reference draws: the
largest |mean - reference| in units of the combined MCSE and the sd ratio furthest
from 1. A last table gives each contender's median ESS/s over the posteriors and its
ratio to NumPyro's and nutpie's.

Caches start cold, as on a fresh machine: each ppl_notes run gets an empty inductor
cache directory and an empty one for its compiled C transitions (``--warm`` shares them
across runs instead); JAX and numba keep no
compilation cache between processes by default.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time

from _fresh import ROOT, run_fresh  # benchmarks/ is on the path

CONTENDERS = ("ppl_notes", "numpyro", "nutpie", "nutpie_lowrank", "pyro")
CHILD = r"""
import sys, time
started = time.perf_counter()
sys.path[:0] = [{root!r}, {root!r} + "/benchmarks"]
import bench_peers
bench_peers.child({contender!r}, {name!r}, {chains}, {warmup}, {draws}, started, {accept!r})
"""


def _element(sites: dict, stan_name: str):
    """Draws ``(chain, draw)`` of one reference element (Stan's 1-based ``b[3]``)."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]", stan_name)
    site, index = (match.group(1), int(match.group(2)) - 1) if match else (stan_name, 0)
    values = sites[site]
    return values.reshape(values.shape[:2] + (-1,))[..., index]


def _score(sites: dict, name: str) -> dict:
    """Min bulk ESS and agreement with posteriordb's reference, over its elements."""
    import arviz_stats
    import numpy as np

    from tests.corpus.posteriordb_stories import load

    _, reference = load(name)
    ess, worst_z, worst_sd = [], 0.0, 1.0
    for stan_name, row in reference.iterrows():
        draws = np.asarray(_element(sites, stan_name), dtype=float)
        ess.append(float(arviz_stats.ess(draws, method="bulk")))
        mcse = float(arviz_stats.mcse(draws, method="mean"))
        z = abs(draws.mean() - row["mean"]) / np.hypot(mcse, row["mcse_mean"])
        worst_z = max(worst_z, float(z))
        ratio = float(draws.std() / row["sd"])
        worst_sd = ratio if abs(np.log(ratio)) > abs(np.log(worst_sd)) else worst_sd
    return {"ess": min(ess), "worst_z": worst_z, "worst_sd_ratio": worst_sd}


def _ppl_notes(name, chains, warmup, draws, accept):
    import numpy as np

    from ppl_notes import infer, model
    from tests.corpus import posteriordb_stories as pdb

    # as a user would: the one story, wrapped, and its data (NumPyro's child likewise)
    story = model(observed=pdb.OBSERVED[name])(getattr(pdb, pdb.PROGRAMS[name]))
    fit = infer(story, pdb.data_for(name), method="nuts", chains=chains, warmup=warmup,
                draws=draws, progress=False, **({"target_accept": accept} if accept else {}))
    tree = fit.to_arviz()
    sites = {site: np.asarray(tree["posterior"][site]) for site in tree["posterior"].data_vars}
    return sites, int(np.asarray(tree["sample_stats"]["diverging"]).sum())


def _numpyro(name, chains, warmup, draws, accept):
    import numpyro

    numpyro.set_host_device_count(chains)
    import jax
    import numpy as np
    import numpyro_posteriordb
    from numpyro.infer import MCMC, NUTS

    from tests.corpus.posteriordb_stories import data_for

    jax.config.update("jax_enable_x64", True)
    kernel = NUTS(numpyro_posteriordb.STORIES[name], target_accept_prob=accept or 0.8)
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=draws,
                num_chains=chains, chain_method="parallel", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), **data_for(name), extra_fields=("diverging",))
    sites = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    return sites, int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())


def _nutpie(name, chains, warmup, draws, accept, adaptation="diag"):
    import numpy as np
    import nutpie
    import pymc_posteriordb

    from tests.corpus.posteriordb_stories import data_for

    compiled = nutpie.compile_pymc_model(pymc_posteriordb.STORIES[name](**data_for(name)),
                                         backend="numba")
    trace = nutpie.sample(compiled, draws=draws, tune=warmup, chains=chains, cores=2, seed=0,
                          progress_bar=False, adaptation=adaptation,
                          **({"target_accept": accept} if accept else {}))
    sites = {k: np.asarray(v) for k, v in trace["posterior"].data_vars.items()}
    return sites, int(np.asarray(trace["sample_stats"]["diverging"]).sum())


def _pyro(name, chains, warmup, draws, accept):
    import numpy as np
    import torch
    from pyro.infer import MCMC, NUTS

    from tests.corpus import posteriordb_stories as pdb

    torch.set_default_dtype(torch.float64)
    story = getattr(pdb, name.split("-")[1])
    data = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
            for k, v in pdb.data_for(name).items()}
    mcmc = MCMC(NUTS(story, target_accept_prob=accept or 0.8), num_samples=draws,
                warmup_steps=warmup, num_chains=chains,
                disable_progbar=True)
    mcmc.run(**data)
    sites = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    if "theta" not in sites and "theta_trans" in sites:  # deterministic sites are not kept
        sites["theta"] = sites["theta_trans"] * sites["tau"][..., None] + sites["mu"][..., None]
    diverging = mcmc.diagnostics().get("divergences", {})
    return sites, int(sum(len(v) for v in diverging.values()))


def child(contender, name, chains, warmup, draws, started, accept=None):
    """One posterior by one contender (``accept``: target acceptance, None for the
    contender's default); prints a JSON line."""
    import warnings

    warnings.simplefilter("ignore")
    runner = {"ppl_notes": _ppl_notes, "numpyro": _numpyro, "nutpie": _nutpie, "pyro": _pyro,
              "nutpie_lowrank": lambda *a: _nutpie(*a, adaptation="low_rank")}[contender]
    sites, divergences = runner(name, chains, warmup, draws, accept)
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "divergences": divergences, **_score(sites, name)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--settings", choices=("defaults", "reference"), default="defaults",
                        help="target acceptance: each contender's default (0.8), or the "
                             "adapt_delta of posteriordb's reference run, for every contender")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--warm", action="store_true",
                        help="let ppl_notes runs share one inductor cache (default: each cold)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.corpus.cases import posteriordb_cases
    from tests.corpus.posteriordb_stories import REFERENCE_RUN

    names = args.names or [case.name for case in posteriordb_cases()]
    print(f"NUTS, {args.chains} chains x ({args.warmup} warmup + {args.draws} draws); "
          "wall time of a fresh process, imports and compilation included; target "
          "acceptance: " + ("the reference run's" if args.settings == "reference" else "default"))
    print(f"{'posterior':40s} {'contender':15s} {'wall s':>7s} {'min ESS':>8s} {'ESS/s':>8s} "
          f"{'div':>5s} {'max z':>6s} {'sd ratio':>8s}", flush=True)
    rates: dict[str, dict[str, float]] = {}
    for name in names:
        for contender in args.contenders:
            if contender == "pyro" and not name.startswith("eight_schools") and not args.names:
                continue
            accept = (REFERENCE_RUN[name]["adapt_delta"] if args.settings == "reference"
                      else None)
            code = CHILD.format(root=str(ROOT), contender=contender, name=name,
                                chains=args.chains, warmup=args.warmup, draws=args.draws,
                                accept=accept)
            cache = {} if args.warm else {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(),
                                          "PPL_NOTES_CACHE": tempfile.mkdtemp()}
            try:
                result = run_fresh(code, timeout=args.timeout, env=cache)
            except Exception as error:  # subprocess.TimeoutExpired
                result = {"error": type(error).__name__}
            if "error" in result:
                print(f"{name:40s} {contender:15s} {result['error']}", flush=True)
                rates.setdefault(contender, {})[name] = 0.0
                continue
            rate = result["ess"] / result["wall_s"]
            rates.setdefault(contender, {})[name] = rate
            print(f"{name:40s} {contender:15s} {result['wall_s']:7.1f} {result['ess']:8.0f} "
                  f"{rate:8.1f} {result['divergences']:5d} {result['worst_z']:6.2f} "
                  f"{result['worst_sd_ratio']:8.3f}", flush=True)
    print("\nmedian ESS/s over the posteriors (a run that failed or timed out counts as 0)")
    medians = {c: statistics.median(r.values()) for c, r in rates.items() if len(r) == len(names)}
    for contender, median in medians.items():
        against = "  ".join(f"x{median / medians[peer]:.2f} vs {peer}"
                            for peer in ("numpyro", "nutpie") if medians.get(peer))
        print(f"{contender:15s} {median:9.1f}  {against}")


if __name__ == "__main__":
    main()
