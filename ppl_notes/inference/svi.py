r"""Stochastic variational inference: maximise the ELBO over the guide's parameters.

.. math:: \mathrm{ELBO}(\lambda) = \mathbb E_{q(z;\lambda)}[\log p(x, z) - \log q(z;\lambda)]
          = \log p(x) - \mathrm{KL}(q(z;\lambda)\,\|\,p(z\mid x))

(notes §2.f). Two engines maximise it:

* the autoguides (``guide=None``, ``"fullrank"``, ``"meanfield"``, ``"lowrank"``) are
  Gaussians over the unconstrained sites, fitted on the compiled potential NUTS runs by
  natural-gradient Newton steps on fixed draws (:mod:`~ppl_notes.vi.potential_svi`,
  :mod:`~ppl_notes.vi.gaussian_vi`), four restarts in lockstep;
* a guide function (or ``optimizer="adam"``) is fitted by Adam on Pyro's ELBO:
  reparameterised gradients where the guide allows it, score function otherwise
  (Trace_ELBO), with discrete latent sites that the guide leaves out summed exactly
  (TraceEnum_ELBO, chosen automatically).

After fitting, ``num_draws`` draws from the guide become the posterior; each draw carries
log p(x, θ) and log q(θ) (``sample_stats``), which the Pareto k-hat diagnostic and LOO
for VI need. On the potential, an importance step follows (``importance``;
:mod:`~ppl_notes.vi.importance`): where the draws' weights p/q are not near uniform and
can be trusted, the draws kept are resampled by them from more proposals, and the
proposals' log p and log q are kept in the result's ``importance`` group.

References
----------
Wingate, D. & Weber, T. (2013). Automated Variational Inference in Probabilistic
Programming. Ranganath, R., Gerrish, S. & Blei, D. (2014). Black Box Variational
Inference. Kingma, D. P. & Welling, M. (2014). Auto-Encoding Variational Bayes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import (
    config_enumerate,
)

from ppl_notes._result import RunResult
from ppl_notes._sites import (
    dispersed_value,
    unconstrained_value,
)
from ppl_notes.errors import OptionError
from ppl_notes.evaluation import RunContext, StoryFacts, choose_path
from ppl_notes.evaluation.compile import resolve_compiler
from ppl_notes.evaluation.draws import posterior_of, sample_guide
from ppl_notes.evaluation.propriety import flat_direction
from ppl_notes.gradients import ESTIMATORS, force_estimator
from ppl_notes.inference._options import (
    Option,
    choice,
    positive_float,
    positive_int,
    scheduler_option,
)
from ppl_notes.relabel import components_of
from ppl_notes.vi.compiled_svi import CompiledELBO
from ppl_notes.vi.convergence import (
    ELBO_TOLERANCE,
    convergence_window,
    elbo_settled,
)
from ppl_notes.vi.data_parallel import DataParallel
from ppl_notes.vi.guide_checks import guide_site_names, refuse_moving_supports, vectorizable
from ppl_notes.vi.laplace_start import LaplaceStart, apply_scales, laplace_start
from ppl_notes.vi.potential_svi import FAMILY_GUIDES, run_on_potential
from ppl_notes.vi.pyro_loop import (
    ELBOS,
    STEPS_FOR_JIT,
    choose_elbo,
    optimise_compiled,
    pyro_loop,
    run_identity,
)
from ppl_notes.vi.restarts import run_restarts

logger = logging.getLogger(__name__)


OPTIONS = (
    positive_int("steps", 2000, "optimisation steps"),
    positive_float("learning_rate", 0.01, "Adam's initial learning rate"),
    Option("learning_rate_decay", (float, int), 1.0,
           "the final learning rate as a fraction of the initial one, reached by an "
           "exponential decay over the run (1, the default: a constant rate, as Pyro's); "
           "in (0, 1]. Decay settles the parameters where the posterior is narrow "
           "relative to Adam's steps, but slows parameters whose gradients are mostly "
           "noise (a scale's), so a story that wants it says so in its defaults",
           check=lambda v: 0 < v <= 1, valid="a number in (0, 1]"),
    choice("stop", "converged", "when the run ends: 'converged' (the rule of ppl_notes."
           "inference.convergence: the window-averaged guide has stopped moving, in KL, and "
           "its ELBO has stopped rising; the last three windows' iterates are averaged; "
           "steps is then a cap) or 'steps' (after exactly steps steps)",
           ("converged", "steps")),
    choice("init", "map", "where the default autoguide (no guide given) starts: 'map' (the "
           "Laplace approximation: the mode of the unconstrained density by L-BFGS, discrete "
           "sites summed out, and the inverse Hessian there; each restart searches from its "
           "own prior draw) or 'prior' (the origin of the unconstrained space; restarts "
           "dispersed uniformly in (-2, 2) around it). A guide written by hand starts where "
           "its pyro.param calls say", ("map", "prior")),
    positive_float("tolerance", 0.01, "stop='converged': the run ends when the average of "
                   "a window's iterates has moved, as a guide, by at most this KL divergence "
                   "per free parameter from each of the two windows before, and its ELBO rose "
                   "by at most this many nats per free parameter over them (0.01: a fifth of "
                   "a posterior sd for a mean-field mean; ppl_notes.vi.convergence)"),
    positive_int("num_draws", 1000, "posterior draws taken from the fitted guide (per "
                 "restart)"),
    choice("importance", "auto", "'psis': draw up to 4 x num_draws proposals from each restart's "
           "q, and where their Pareto-smoothed weights p/q can be trusted (k-hat <= 0.7) and "
           "are not near uniform, keep num_draws resampled by those weights: draws of the "
           "posterior itself, not of q (as Pathfinder does; ppl_notes.vi.importance; "
           "info['importance'] says what was done). 'none': q's own draws. 'auto': 'psis' "
           "for the autoguides on the potential, 'none' in Pyro's loop (optimizer='adam')",
           ("auto", "psis", "none")),
    positive_int("num_particles", 1, "Monte Carlo samples per ELBO estimate"),
    choice("elbo", "auto", "which ELBO; 'auto' picks TraceEnum_ELBO when the story has "
           "discrete sites the guide leaves to enumeration, else Trace_ELBO",
           ("auto", "Trace_ELBO", "TraceEnum_ELBO", "TraceMeanField_ELBO")),
    Option("recover_discrete", (bool,), True, "draw enumerated discrete sites for each draw"),
    choice("estimator", "auto", "the ELBO gradient: 'auto' (reparameterised where the "
           "guide's distribution allows it, score function elsewhere), 'reparam' (every "
           "site; an error where impossible) or 'score' (every site by the score function, "
           "as black-box VI)", ESTIMATORS),
    Option("stl", (bool,), False, "'sticking the landing' (Roeder et al. 2017): drop the "
           "zero-mean score term of the reparameterised gradient, whose variance then "
           "vanishes as q reaches the posterior (ppl_notes.vi.stl); Trace_ELBO and "
           "Pyro's loop only"),
    choice("engine", "auto", "'fast': the Trace_ELBO step compiled as one graph "
           "(torch.compile) with Adam on one flat parameter vector; 'pyro': Pyro's SVI loop "
           "(always used for TraceEnum_ELBO, TraceMeanField_ELBO and autoguides); 'auto': "
           "'fast' when steps x observed values >= 1e7, where it repays its compilation",
           ("auto", "fast", "pyro")),
    Option("checkpoint", (str, type(None)), None, "a file to write the run's state to "
           "every checkpoint_every steps, at the end and on Ctrl-C (atomically; no pickle)"),
    positive_int("checkpoint_every", 500, "steps between checkpoints"),
    Option("resume", (str, type(None)), None, "a checkpoint to continue from: the same "
           "story, guide, seed and options (steps may be raised) reach the result of an "
           "uninterrupted run"),
    Option("resume_trusted", (bool,), False, "resume from a checkpoint not signed with "
           "your key (another user's); it still cannot run code"),
    Option("distributed", (bool,), False, "data-parallel SVI over the processes that "
           "`torchrun --nproc-per-node K` starts: each fits a shard of the data plate and the "
           "gradients are averaged before every step (ppl_notes.vi.data_parallel); "
           "Pyro's loop, no checkpoints"),
    Option("restarts", (int, type(None)), None, "independent fits from dispersed starts, "
           "stacked as the posterior's chains so that R-hat and ESS across them are reported, "
           "and restarts that found different optima are flagged (ppl_notes.inference."
           "restarts); None: 4 for an autoguide on the potential (they run in lockstep, in "
           "one process), 1 for Adam", lambda v: v is None or v >= 1,
           "None or an integer >= 1"),
    choice("optimizer", "auto", "how the guide is fitted: 'newton' (an autoguide's Gaussian "
           "by natural-gradient Newton steps on fixed moment-matched draws, on the compiled "
           "potential: exact on a Gaussian posterior, invariant to linear reparameterisation; "
           "ppl_notes.vi.gaussian_vi), 'dadvi' (the same fixed-draw objective by "
           "L-BFGS; every autoguide family), 'adam' (Pyro's loop: Adam on stochastic ELBO "
           "gradients, any guide) or 'auto': 'newton' for 'meanfield' and 'fullrank', "
           "'dadvi' for 'lowrank', 'adam' for a guide function or when an option of Pyro's "
           "loop is set (checkpoint, resume, distributed, stl, estimator, elbo, engine, jit, "
           "num_particles, learning_rate, learning_rate_decay)",
           ("auto", "newton", "dadvi", "adam")),
    Option("processes", (int, type(None)), None, "worker processes for Adam's restarts; "
           "None: one per core (on the potential the restarts run in lockstep in this "
           "process)", lambda v: v is None or v >= 1, "None or an integer >= 1"),
    scheduler_option("Adam's restarts run: None (worker processes on this machine), or a "
                     "Dask scheduler's address 'tcp://host:port' or a distributed.Client "
                     "(each restart a task on its workers); on the potential the restarts "
                     "run in lockstep in this process"),
    Option("jit", (bool, str), "auto", "engine='pyro' only: compile the ELBO with "
           "TorchScript (Pyro's JitTrace* ELBOs); 'auto' compiles runs of at least "
           f"{STEPS_FOR_JIT} steps (tracing a story of hundreds of sites takes minutes, which "
           "a short run does not repay); a story or guide that cannot be traced runs "
           "uncompiled, with a warning", lambda v: v in (True, False, "auto"),
           "True, False or 'auto'"),
)


#: The guides named by a string: ``guide="meanfield"`` (the default), ``"fullrank"`` or
#: ``"lowrank"``
AUTOGUIDES = FAMILY_GUIDES


#: Options only Pyro's loop (optimizer='adam') has: set to anything but their default,
#: they make optimizer='auto' choose it
PYRO_LOOP_OPTIONS = ("checkpoint", "resume", "resume_trusted", "distributed", "stl",
                     "estimator", "elbo", "engine", "jit", "num_particles", "learning_rate",
                     "learning_rate_decay")


#: Restarts when ``restarts=None``: on the potential, and in Pyro's loop
DEFAULT_RESTARTS = {"potential": 4, "adam": 1}


#: The default guide is full-rank up to this many unconstrained elements, mean-field above
FULLRANK_MAX_DIM = 200


def default_family(facts) -> str:
    """The autoguide a story gets without a guide.

    'fullrank' up to :data:`FULLRANK_MAX_DIM` unconstrained elements (a full-rank Newton
    step then costs at most a few ms and 400 gradients per fit), else 'meanfield'.
    """
    dim = sum(int(np.prod(facts.unconstrained_shapes[n], dtype=int)) for n in facts.continuous)
    return "fullrank" if dim <= FULLRANK_MAX_DIM else "meanfield"


def resolve_optimizer(guide, options: dict[str, Any], story_defaults=None,
                      subsampled: dict | None = None) -> str:
    """The optimiser ``optimizer`` stands for (its option's doc), checked against the guide.

    An option of Pyro's loop counts as set when it differs from both its default and the
    story's own default (``story_defaults``: a story that tunes Adam for its hand-written
    guide does not keep its autoguide off the potential). A story whose plates draw
    mini-batches (``subsampled``: ``{plate: (size, full size)}``) is fitted by Adam: its
    log density changes with every batch, which the fixed-draw optimisers cannot follow.

    Raises
    ------
    OptionError
        For 'newton' or 'dadvi' with a guide function, 'newton' with the low-rank family,
        or either with an option only Pyro's loop has.
    """
    requested = options.get("optimizer", "auto")
    autoguide = guide is None or isinstance(guide, str)
    defaults = {option.name: option.default for option in OPTIONS}
    story_defaults = story_defaults or {}
    loop_only = [name for name in PYRO_LOOP_OPTIONS if options.get(name) != defaults[name]
                 and (name not in story_defaults or options.get(name) != story_defaults[name])]
    if subsampled and requested in ("newton", "dadvi"):
        plate, (size, full) = next(iter(subsampled.items()))
        raise OptionError(f"method 'svi': optimizer={requested!r} needs the whole data at "
                          f"every step, and plate {plate!r} draws subsample_size={size} of "
                          f"{full}; optimizer='adam' (the default here) fits mini-batches")
    if requested == "auto":
        if not autoguide or loop_only or subsampled:
            return "adam"
        return "dadvi" if guide == "lowrank" else "newton"
    if requested == "adam":
        return "adam"
    if not autoguide:
        raise OptionError(f"method 'svi': optimizer={requested!r} fits the autoguides "
                          "('meanfield', 'fullrank', 'lowrank') on the story's potential; a "
                          "guide function is fitted by optimizer='adam'")
    if requested == "newton" and guide == "lowrank":
        raise OptionError("method 'svi': optimizer='newton' fits 'meanfield' and 'fullrank'; "
                          "the 'lowrank' guide is fitted by optimizer='dadvi' (or 'adam')")
    if loop_only:
        raise OptionError(f"method 'svi': option(s) {loop_only} belong to Pyro's loop "
                          f"(optimizer='adam'), not to optimizer={requested!r}; leave them "
                          "unset or pass optimizer='adam'")
    return requested


def run(context: RunContext) -> RunResult:
    """Fit the guide by SVI, then draw from it. See the module docstring.

    ``context.restart`` > 0 starts an autoguide from a dispersed point (a restart of
    :mod:`ppl_notes.vi.restarts`, which runs this function once per restart).
    """
    model, data, guide, seed = context.model, context.data, context.guide, context.seed
    options, progress, restart = context.options, context.progress, context.restart
    facts = context.facts
    _check_checkpoint_path(options["checkpoint"])
    # no guide: the default family, going on to a flow where its k-hat says it misses
    # (ppl_notes.vi.escalation); guide='flow': the flow, started at that family's fit
    escalate = "auto" if guide is None else "always" if guide == "flow" else "never"
    if guide is None or guide == "flow":
        guide = default_family(facts)
    optimizer = resolve_optimizer(guide, options, getattr(model, "defaults", {}).get("svi", {}),
                                  facts.subsampled)
    if escalate == "always" and optimizer == "adam":
        raise OptionError("method 'svi': guide='flow' is fitted on the story's potential "
                          "(optimizer 'newton' or 'dadvi'), not in Pyro's loop: leave "
                          "optimizer and Pyro's loop options unset, or pass a flow guide "
                          "function (e.g. AutoNormalizingFlow) with optimizer='adam'")
    if restart == 0 and isinstance(guide, str) and optimizer == "adam":
        # the potential maps each draw with the supports of that draw; Pyro's autoguides
        # map with the supports they saw when built
        refuse_moving_supports(model, data, guide, facts)  # before any worker
    if options["restarts"] is None:
        restarts = DEFAULT_RESTARTS["adam" if optimizer == "adam" else "potential"]
        options = {**options, "restarts": restarts}
    options = {**options, "optimizer": optimizer, "escalate": escalate}
    if options["importance"] == "psis" and optimizer == "adam":
        raise OptionError("method 'svi': importance='psis' resamples draws of the autoguides "
                          "fitted on the story's potential (optimizer 'newton' or 'dadvi'); "
                          "Pyro's loop (optimizer='adam') keeps q's own draws: leave "
                          "importance unset, or call posterior.importance_resampled()")
    if optimizer != "adam":
        options = {**options, "importance": "none" if options["importance"] == "none"
                   else "psis"}
        return run_on_potential(context.replace(guide=guide, options=options),
                                compiler=resolve_compiler("auto"))
    if options["restarts"] > 1 or options["scheduler"] is not None:
        _check_restartable(options)

        return run_restarts(run, context.replace(guide=guide, options=options))
    started = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    plate_nesting = facts.plate_nesting
    latent = facts.latent
    discrete = [n for n in latent if n in facts.discrete or n in facts.unenumerable]
    # Particles are vectorised in a plate only where the story is checked to be batch-safe.
    vectorize = options["num_particles"] > 1 and choose_path(model, data, facts) == "plate"
    guide_name = getattr(guide, "name", None)
    start_gradients = 0
    if guide is None or isinstance(guide, str):
        family, guide_name = AUTOGUIDES[guide or "meanfield"]
        start = (laplace_start(model, data, seed, dispersed=restart > 0, facts=facts)
                 if options["init"] == "map" else None)
        guide = family(poutine.block(model, hide=discrete),
                       init_loc_fn=_autoguide_start(start, restart))
        apply_scales(guide, start, data)
        start_gradients = 0 if start is None else start.gradients
        pyro.set_rng_seed(seed)
    guide_sites = guide_site_names(guide, data)
    if vectorize and not vectorizable(guide, data, plate_nesting):
        # A value with a dim more than its site's batch (a joint Normal split into sites
        # inside a plate) would broadcast the story's log densities across particles:
        # particle i's prior and likelihood evaluated at particle j's values, P x P terms
        # (found as sds 4x too small at num_particles=4). Particles then run one by one.
        logger.info("SVI: guide %r is not batch-safe under the particle plate; its %d "
                    "particles run one after another", guide_name, options["num_particles"])
        vectorize = False
    enumerated = [d for d in discrete if d not in guide_sites]
    elbo_name = choose_elbo(options["elbo"], enumerated)
    story = config_enumerate(model) if enumerated else model
    marginal = bool(enumerated) and elbo_name == "TraceEnum_ELBO" and model.marginal is not model
    if marginal:
        # The story's hand-marginalised likelihood gives the same ELBO with fewer operations.
        story, elbo_name = model.marginal, "Trace_ELBO"
    elbo_options = dict(num_particles=options["num_particles"], max_plate_nesting=plate_nesting,
                        vectorize_particles=vectorize)
    engine = _choose_engine(options["engine"], options["steps"], facts)
    jit = options["jit"] if options["jit"] != "auto" else options["steps"] >= STEPS_FOR_JIT
    if engine == "fast" and elbo_name != "Trace_ELBO":
        logger.info("SVI: the fast engine compiles Trace_ELBO; %s runs in Pyro's loop", elbo_name)
        engine = "pyro"
    if engine == "fast" and isinstance(getattr(guide, "fn", guide), torch.nn.Module):
        # Module guides (autoguides) keep their parameters as module attributes, which
        # the compiled step cannot swap for its flat vector.
        logger.info("SVI: the fast engine takes function guides; %s runs in Pyro's loop",
                    guide_name)
        engine = "pyro"
    if options["stl"]:
        if elbo_name != "Trace_ELBO":

            raise OptionError(f"method 'svi': stl=True changes Trace_ELBO's gradient, and this "
                              f"run uses {elbo_name}; pass elbo='Trace_ELBO' or leave stl")
        engine, jit = "pyro", False
    fit_guide = force_estimator(guide, options["estimator"])
    parallel, fit_data, loop_seed = None, data, seed
    if options["distributed"]:
        parallel, engine, jit = _data_parallel(facts, data, options), "pyro", False
        story, fit_guide = parallel.scaled(story), parallel.scaled(fit_guide)
        fit_data, loop_seed = parallel.shard, seed + parallel.rank
    if options["estimator"] == "reparam":
        guide_site_names(fit_guide, data)  # names a site without rsample before any step
    if engine == "fast":
        try:
            compiled = CompiledELBO(story, fit_guide, data, ELBOS[elbo_name](**elbo_options))
        except Exception as error:  # noqa: BLE001 - any capture failure: say so, use Pyro's loop
            logger.warning("SVI: the ELBO step of %r could not be compiled (%s: %s); using "
                           "Pyro's SVI loop", model.name, type(error).__name__, error)
            engine = "pyro"
            pyro.clear_param_store()
    identity = run_identity(model, guide, guide_name, data, seed, engine, options)
    loop_started = time.perf_counter()
    if engine == "fast":
        pyro.set_rng_seed(seed)
        loop_started = time.perf_counter()
        history = optimise_compiled(compiled, story, fit_guide, data, seed, plate_nesting,
                                     options, progress, identity)
        jit = False
    else:
        history = pyro_loop(story, fit_guide, fit_data, loop_seed, elbo_name, elbo_options,
                             jit, model.name, options, progress and (parallel is None
                                                                      or parallel.rank == 0),
                             identity, parallel)
        jit = history.attrs["jit"]
    steps_per_second = len(history) / max(time.perf_counter() - loop_started, 1e-9)
    params = {k: v.detach().cpu().numpy().copy() for k, v in pyro.get_param_store().items()}
    values, log_q = sample_guide(guide, data, options["num_draws"], plate_nesting, seed + 1,
                                 tuple(guide_sites), dtype=facts.dtype)
    posterior, evaluation = posterior_of(
        model, data, {k: v for k, v in values.items() if k not in enumerated}, facts,
        recover_discrete=options["recover_discrete"], seed=seed + 2, order=latent)
    return RunResult(
        method="svi",
        sample_dims=("sample",),
        posterior=posterior,
        sample_stats={"log_p": evaluation.log_joint, "log_q": log_q},
        log_likelihood=evaluation.log_likelihood,
        history=history,
        params=params,
        options=options,
        info={"elbo": elbo_name, "guide": guide_name, "optimizer": "adam",
              "enumerated": enumerated,
              "marginal_story": marginal, "engine": engine, "jit": jit,
              "steps_per_second": steps_per_second,
              "final_elbo": float(history["elbo"].iloc[-1]) if len(history) else math.nan,
              "estimator": options["estimator"], "steps_done": len(history),
              "start_gradients": start_gradients,
              "stopped": history.attrs.get("stopped", "steps"),
              "elbo_settled": bool(elbo_settled(history["elbo"].to_numpy(),
                                                convergence_window(options["steps"]),
                                                ELBO_TOLERANCE)),
              "guide_moves": history.attrs.get("guide_moves", []),
              "path": facts.path, "particles_vectorized": vectorize,
              "components": components_of(facts),
              "flat_direction": flat_direction(model, data, facts, values,
                                               choose_path(model, data, facts)),
              "distributed": None if parallel is None else {
                  "processes": parallel.size, "plate": parallel.plate,
                  "split": parallel.cut, "rank": parallel.rank}},
        seconds=time.perf_counter() - started,
        partial=history.attrs.get("interrupted_at") is not None,
    )


#: Compiling the ELBO step costs about 5 s with a warm torch-inductor cache and 20 s on a
#: cold one; Pyro's loop costs about 2.5 ms per step plus 0.15 us per observed value per
#: step here. Below this much work (steps x observed values) the compilation does not pay.
_WORK_FOR_FAST_ENGINE = 10_000_000


def _choose_engine(requested: str, steps: int, facts: StoryFacts) -> str:
    if requested != "auto":
        return requested
    observed = sum(int(np.prod(facts.value_shapes[name])) for name in facts.likelihood)
    return "fast" if steps * observed >= _WORK_FOR_FAST_ENGINE else "pyro"


def _autoguide_start(start: LaplaceStart | None, restart: int):
    """The autoguide's ``init_loc_fn``: at a quick MAP, else at the prior's origin."""
    fallback = unconstrained_value if restart == 0 else dispersed_value
    if start is None:
        return fallback

    def at_map(site):
        value = start.values.get(site["name"])
        return fallback(site) if value is None else value.to(torch.get_default_dtype())

    return at_map


def _check_checkpoint_path(path: str | None) -> None:
    """An OptionError before the first step where a checkpoint cannot be written there."""
    if path is None:
        return
    where = Path(path)
    if where.is_dir():
        raise OptionError(f"method 'svi': checkpoint={path!r} is a folder; give a file name "
                          "(run.ckpt)")
    folder = where.parent if str(where.parent) else Path(".")
    while not folder.exists() and folder != folder.parent:  # the checkpoint makes those
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OptionError(f"method 'svi': checkpoint={path!r}: the folder {str(folder)!r} "
                          "cannot be written")


def _check_restartable(options: dict[str, Any]) -> None:

    for name in ("checkpoint", "resume"):
        if options[name] is not None:
            raise OptionError(f"method 'svi': restarts and scheduler run independent fits, and "
                              f"option {name!r} names one run's file; leave it unset")
    if options["distributed"]:
        raise OptionError("method 'svi': distributed=True (one data-parallel fit) does not "
                          "combine with restarts or scheduler")


def _data_parallel(facts, data, options):

    if options["checkpoint"] is not None or options["resume"] is not None:
        raise OptionError("method 'svi': distributed=True does not checkpoint (every process "
                          "would write the same file); leave checkpoint and resume unset")
    return DataParallel(facts, data)
