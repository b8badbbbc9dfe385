r"""NUTS: Hamiltonian Monte Carlo with the No-U-Turn criterion (notes §2.c).

Discrete latent sites with finite support are summed out of the potential exactly
(Pyro's enumeration; the plate nesting is found from the story, no bookkeeping), and
after sampling each draw's discrete sites are drawn from p(z | x, θ) with
``infer_discrete``, so every person's gender is in the posterior.

Two engines compute the same posterior:

* ``engine="fast"`` (default): the potential and gradient of a batch of chains are
  recorded once as a tape of tensor operations that a C interpreter runs
  (:mod:`~ppl_notes.native.tape`: no compilation per story; inductor compiles the
  few stories it cannot record; the story's hand-marginalised form when it has one) and
  driven by ppl_notes' own NUTS: the tree
  building in C (:mod:`~ppl_notes.native.trajectory`, Python where no C compiler
  exists), the chains in lockstep so that one potential call serves them all, groups of
  chains in parallel worker processes; the metric is adapted as Stan does (the draws'
  variance, diagonal or dense, in doubling windows) or as nutpie does (``"fisher"``,
  ``"lowrank"``: from draws and gradients, in windows that follow every draw);
* ``engine="pyro"``: Pyro's :class:`~pyro.infer.mcmc.NUTS` and
  :class:`~pyro.infer.mcmc.api.MCMC`, chains one after another.

References
----------
Hoffman, M. D. & Gelman, A. (2014). The No-U-Turn Sampler: Adaptively Setting Path
Lengths in Hamiltonian Monte Carlo. JMLR 15, 1593-1623.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer.mcmc import MCMC
from pyro.infer.mcmc import NUTS as PyroNUTS

from ppl_notes._result import RunResult
from ppl_notes.errors import DiagnosticWarning, OptionError, PartialResultWarning
from ppl_notes.evaluation import RunContext, StoryFacts
from ppl_notes.evaluation.compile import resolve_compiler
from ppl_notes.evaluation.draws import posterior_of
from ppl_notes.evaluation.potential import INIT_STRATEGIES, BatchedPotential
from ppl_notes.inference._options import (
    Option,
    choice,
    open_unit,
    positive_int,
    scheduler_option,
)
from ppl_notes.inference.pathfinder import starting_points
from ppl_notes.mcmc.chains import run_chains
from ppl_notes.native import tape as _tape
from ppl_notes.native import trajectory as _trajectory
from ppl_notes.native.loader import prebuild
from ppl_notes.relabel import align_chains, components_of

OPTIONS = (
    positive_int("chains", 4, "independent chains"),
    positive_int("warmup", 1000, "adaptation iterations per chain (discarded)", minimum=0),
    positive_int("draws", 1000, "draws per chain after warmup"),
    positive_int("thin", 1, "keep every thin-th draw (draws / thin per chain): less memory "
                 "for large stories, above all for their recovered discrete sites"),
    open_unit("target_accept", 0.8, "target mean acceptance statistic of the step size"),
    positive_int("max_tree_depth", 10, "at most 2**max_tree_depth leapfrog steps"),
    choice("engine", "fast", "'fast' (traced potential, own NUTS, parallel chains) or "
           "'pyro' (Pyro's NUTS)", ("fast", "pyro")),
    choice("init", "median", "starting point: the prior median (vector sites too), a "
           "prior draw, or 'pathfinder': a draw of multi-path Pathfinder per chain (ppl_notes."
           "inference.pathfinder; the chains start in the typical set; its gradients are "
           "info['pathfinder_gradients'])",
           ("median", "sample", "pathfinder")),
    Option("processes", (int, type(None)), None, "worker processes for groups of chains; "
           "None: one per core when the data have at least 20,000 observed values, else the "
           "chains run in lockstep in this process",
           lambda v: v is None or v >= 1, "None or an integer >= 1"),
    choice("compiler", "auto", "how the fast engine runs the potential: 'tape' (recorded "
           "once, run by a C interpreter: no compilation), 'inductor' (torch.compile: "
           "seconds to minutes to build, fused loops), 'torchscript', 'none', or 'auto' "
           "(the tape where a C compiler exists, inductor for a story it cannot record)",
           ("auto", "tape", "inductor", "torchscript", "none")),
    choice("mass_matrix", "lowrank", "the adapted metric: 'lowrank' (a diagonal from draws "
           "and gradients plus a low-rank correction for the correlations, nutpie's "
           "low_rank: on 7 of the 8 posteriordb programs 2x to 400x the ESS per gradient of "
           "Stan's diagonal; on the Poisson GP more divergences than it, where 'diag' is "
           "the safer choice), 'fisher' (its diagonal alone), 'diag' (Stan's default: the "
           "draws' variance) or 'dense' (the full posterior covariance: few steps on "
           "correlated posteriors, but a noisy estimate on heavy-tailed ones)",
           ("lowrank", "fisher", "diag", "dense")),
    Option("recover_discrete", (bool,), True, "draw enumerated discrete sites for each draw"),
    scheduler_option("the chains run: None (this machine), or a Dask scheduler's address "
                     "'tcp://host:port' or a distributed.Client (each chain a task on its "
                     "workers)"),
)


def run(context: RunContext) -> RunResult:
    """Sample the posterior with NUTS. See the module docstring."""
    started = time.perf_counter()
    model, data, seed, options = context.model, context.data, context.seed, context.options
    if options["scheduler"] is not None and options["engine"] != "fast":

        raise OptionError("method 'nuts': option 'scheduler' runs the chains of ppl_notes' "
                          "own engine on a cluster; engine='pyro' runs on this machine only")
    if options["engine"] == "fast":
        flat, stats, potential, compiler, warmup_steps, started_by = _run_fast(context)
    else:
        flat, stats, potential = _run_pyro(context)
        compiler, warmup_steps, started_by = "none", None, {}
    chains = flat.shape[0]  # fewer than asked where Ctrl-C stopped Pyro's chains early
    partial = flat.shape[1] < options["draws"] or chains < options["chains"]
    thin = options["thin"]
    flat, stats = flat[:, ::thin], {k: v[:, ::thin] for k, v in stats.items()}
    draws = flat.shape[1]
    unconstrained = torch.as_tensor(flat.reshape(chains * draws, -1), dtype=torch.float64)
    flat_draws, evaluation = posterior_of(model, data, potential.unflatten(unconstrained),
                                          context.facts,
                                          recover_discrete=options["recover_discrete"],
                                          seed=seed + 1, unconstrained=True)
    posterior = {n: _chains_first(v, chains, draws).copy() for n, v in flat_draws.items()}
    components = components_of(context.facts)
    relabelled = align_chains(posterior, components)
    if relabelled:
        warnings.warn(f"NUTS on {model.name!r}: the chains found the mixture with permuted "
                      f"labels; relabelled to chain 0's ({'; '.join(relabelled)}; pivot "
                      "relabelling, Stephens 2000)", DiagnosticWarning, stacklevel=4)
    log_likelihood = {k: _chains_first(v, chains, draws)
                      for k, v in evaluation.log_likelihood.items()}
    return RunResult(
        method="nuts",
        sample_dims=("chain", "draw"),
        posterior=posterior,
        sample_stats=stats,
        log_likelihood=log_likelihood,
        options=options,
        info={"engine": options["engine"], "enumerated": list(evaluation.discrete),
              "parameters": potential.dim, "marginal_story": potential.model is not model,
              "compiler": compiler, **started_by,
              "path": potential.path, "path_reason": potential.facts.path_reason,
              "draws_kept": draws, "components": components, "relabelled": relabelled,
              "warmup_leapfrog_steps": warmup_steps},
        seconds=time.perf_counter() - started,
        partial=partial,
    )


def _chains_first(array: np.ndarray, chains: int, draws: int) -> np.ndarray:
    return array.reshape((chains, draws) + array.shape[1:])


def _run_fast(context: RunContext):
    prebuild(_tape.SOURCE, _trajectory.SOURCE)  # a fresh machine: both compilers at once
    data, seed, options = context.data, context.seed, context.options
    model, facts = context.marginal()
    potential = BatchedPotential(model, data, 1, compiler="none", facts=facts)
    compiler = resolve_compiler(options["compiler"])
    dense = options["mass_matrix"] == "dense"
    init, started_by = options["init"], {}
    if init == "pathfinder":
        init, spent = starting_points(model, data, options["chains"], seed, facts)
        started_by = {"pathfinder_gradients": spent}
    results = run_chains(
        model, data, chains=options["chains"], warmup=options["warmup"],
        draws=options["draws"], target_accept=options["target_accept"],
        max_tree_depth=options["max_tree_depth"], seed=seed, init=init,
        compiler=compiler,
        dense_mass=dense, progress=context.progress, processes=_processes(facts, options),
        scheduler=options["scheduler"], facts=facts,
        adaptation=_ADAPTATION[options["mass_matrix"]],
    )
    flats = [r.positions for r in results]
    stats = {
        "lp": [-r.potential for r in results],
        "acceptance_rate": [r.accept_prob for r in results],
        "n_steps": [r.num_steps for r in results],
        "tree_depth": [r.tree_depth for r in results],
        "diverging": [r.diverging for r in results],
        "energy": [r.energy for r in results],
        "step_size": [np.full(r.num_completed, r.step_size) for r in results],
    }
    if any(r.interrupted for r in results):
        flat, stats = _common_length(flats, stats, options["draws"])
    else:
        flat, stats = np.stack(flats), {k: np.stack(v) for k, v in stats.items()}
    stats["reached_max_tree_depth"] = stats["tree_depth"] >= options["max_tree_depth"]
    return (flat, stats, potential, results[0].compiler, [r.warmup_steps for r in results],
            started_by)


#: The sampler's estimator for each ``mass_matrix`` option.
_ADAPTATION = {"diag": "welford", "dense": "welford", "fisher": "fisher", "lowrank": "lowrank"}


def _common_length(flats: list[np.ndarray], stats: dict[str, list[np.ndarray]],
                   requested: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Chains stopped by Ctrl-C, cut to the draws every chain has (ArviZ needs equal chains).

    ``flats`` holds the chains that started sampling (Pyro's engine runs them one after
    another; the default engine runs them all at once).
    """
    kept = min((len(f) for f in flats), default=0)
    if kept == 0:
        warnings.warn("NUTS interrupted before any chain finished warmup: there are no draws "
                      "to return", PartialResultWarning, stacklevel=5)
        raise KeyboardInterrupt
    warnings.warn(f"NUTS interrupted: the posterior holds {len(flats)} chain(s) with the first "
                  f"{kept} of {requested} draws each (partial=True)", PartialResultWarning,
                  stacklevel=5)
    return (np.stack([f[:kept] for f in flats]),
            {k: np.stack([v[:kept] for v in values]) for k, values in stats.items()})


#: Below this many observed values the chains run in lockstep in this process: a worker
#: costs its start-up (spawn, import torch, record the tape: about 3 s) and halves only
#: the potential's share of the time. Measured with the tape, 4 chains x 2000 iterations,
#: one process vs two: earnings (1,192 values) 3.3 s vs 8.5 s, diamonds (5,000 values,
#: 24 predictors) 16.4 s vs 16.1 s.
_OBSERVED_VALUES_FOR_PROCESSES = 20_000


def _processes(facts: StoryFacts, options) -> int | None:
    if options["processes"] is not None:
        return options["processes"]
    observed = sum(int(np.prod(facts.value_shapes[name])) for name in facts.likelihood)
    return None if observed >= _OBSERVED_VALUES_FOR_PROCESSES else 1


def _run_pyro(context: RunContext):
    model, data, seed, options = context.model, context.data, context.seed, context.options
    progress = context.progress
    potential = BatchedPotential(model, data, 1, compiler="none", facts=context.facts)
    if options["init"] == "pathfinder":

        raise OptionError("method 'nuts': init='pathfinder' starts ppl_notes' own engine; "
                          "engine='pyro' takes init='median' or 'sample'")
    init = INIT_STRATEGIES[options["init"]]
    flats, stats = [], {"lp": [], "diverging": [], "acceptance_rate": []}
    for chain in range(options["chains"]):
        pyro.set_rng_seed(seed * 1000 + chain)
        kernel = PyroNUTS(model, target_accept_prob=options["target_accept"],
                          max_tree_depth=options["max_tree_depth"],
                          max_plate_nesting=potential.facts.plate_nesting, init_strategy=init)
        kept: list[np.ndarray] = []

        def keep(_kernel, params, stage, _i, kept=kept):
            if stage.startswith("Sample"):  # unconstrained, as the potential's layout
                kept.append(torch.cat([params[n].reshape(-1) for n in potential.names])
                            .double().numpy())

        mcmc = MCMC(kernel, num_samples=options["draws"], warmup_steps=options["warmup"],
                    disable_progbar=not progress, hook_fn=keep)
        try:
            mcmc.run(**data)
        except KeyboardInterrupt:  # Ctrl-C: keep the chains (and draws) made so far
            if kept:
                flats.append(np.stack(kept))
                _pyro_stats(stats, kernel.diagnostics(), len(kept), potential, flats[-1])
            return _common_length(flats, stats, options["draws"]) + (potential,)
        flats.append(np.stack(kept))
        diagnostics = mcmc.diagnostics()
        _pyro_stats(stats, {"divergences": diagnostics["divergences"]["chain 0"],
                            "acceptance rate": diagnostics["acceptance rate"]["chain 0"]},
                    options["draws"], potential, flats[-1])
    return np.stack(flats), {k: np.stack(v) for k, v in stats.items()}, potential


def _pyro_stats(stats, diagnostics, draws, potential, flat) -> None:
    """One Pyro chain's divergences, acceptance rate and log density per draw."""
    divergences = np.zeros(draws, dtype=bool)
    divergences[[i for i in diagnostics["divergences"] if i < draws]] = True
    stats["diverging"].append(divergences)
    stats["acceptance_rate"].append(np.full(draws, float(diagnostics["acceptance rate"])))
    stats["lp"].append(-potential(flat)[0])
