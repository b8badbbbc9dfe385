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
for VI need.

References
----------
Wingate, D. & Weber, T. (2013). Automated Variational Inference in Probabilistic
Programming. Ranganath, R., Gerrish, S. & Blei, D. (2014). Black Box Variational
Inference. Kingma, D. P. & Welling, M. (2014). Auto-Encoding Variational Bayes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.optim import ExponentialLR
from tqdm.auto import tqdm

from ppl_notes._pool import stop_requested
from ppl_notes._result import RunResult
from ppl_notes._sites import (
    dispersed_value,
    latent_sites,
    strip_independent,
    trace_model,
    unconstrained_value,
)
from ppl_notes.errors import CheckpointError, InferenceError, PartialResultWarning, StoryError
from ppl_notes.evaluation import choose_path, facts_of
from ppl_notes.evaluation.draws import posterior_of, sample_guide
from ppl_notes.evaluation.fingerprint import run_fingerprint
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
from ppl_notes.vi.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ppl_notes.vi.compiled_svi import AdamState, CompiledELBO, adam_step
from ppl_notes.vi.convergence import (
    ELBO_TOLERANCE,
    ConvergenceMonitor,
    convergence_window,
    elbo_settled,
)
from ppl_notes.vi.guide_distance import GuideDistance
from ppl_notes.vi.laplace_start import LaplaceStart, apply_scales, laplace_start
from ppl_notes.vi.potential_svi import FAMILY_GUIDES, run_on_potential

logger = logging.getLogger(__name__)


#: Pyro's JitTrace_ELBO traces the story and guide before the first step (seconds for a
#: small story, minutes for one with hundreds of sites); shorter runs stay uncompiled.
_STEPS_FOR_JIT = 500

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
    positive_int("num_draws", 1000, "posterior draws taken from the fitted guide"),
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
           f"{_STEPS_FOR_JIT} steps (tracing a story of hundreds of sites takes minutes, which "
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

_ELBOS = {"Trace_ELBO": Trace_ELBO, "TraceEnum_ELBO": TraceEnum_ELBO,
          "TraceMeanField_ELBO": TraceMeanField_ELBO}
_JIT_ELBOS = {"Trace_ELBO": JitTrace_ELBO, "TraceEnum_ELBO": JitTraceEnum_ELBO,
              "TraceMeanField_ELBO": JitTraceMeanField_ELBO}


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
    from ppl_notes.errors import OptionError

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


def _choose_elbo(requested: str, enumerated: list[str]) -> str:
    if requested == "auto":
        return "TraceEnum_ELBO" if enumerated else "Trace_ELBO"
    return requested


def run(model, data: dict[str, Any], *, guide, seed: int, progress: bool,
        options: dict[str, Any], restart: int = 0) -> RunResult:
    """Fit the guide by SVI, then draw from it. See the module docstring.

    ``restart`` > 0 starts an autoguide from a dispersed point (a restart of
    :mod:`ppl_notes.vi.restarts`, which runs this function once per restart).
    """
    facts = facts_of(model, data)
    if guide is None:
        guide = default_family(facts)
    optimizer = resolve_optimizer(guide, options, getattr(model, "defaults", {}).get("svi", {}),
                                  facts.subsampled)
    if restart == 0 and isinstance(guide, str) and optimizer == "adam":
        # the potential maps each draw with the supports of that draw; Pyro's autoguides
        # map with the supports they saw when built
        _refuse_moving_supports(model, data, guide)  # before any worker
    if options["restarts"] is None:
        restarts = DEFAULT_RESTARTS["adam" if optimizer == "adam" else "potential"]
        options = {**options, "restarts": restarts}
    options = {**options, "optimizer": optimizer}
    if optimizer != "adam":
        from ppl_notes.inference.nuts import resolve_compiler

        return run_on_potential(model, data, family=guide, seed=seed,
                                progress=progress, options=options,
                                compiler=resolve_compiler("auto"))
    if options["restarts"] > 1 or options["scheduler"] is not None:
        _check_restartable(options)
        from ppl_notes.vi.restarts import run_restarts

        return run_restarts(run, model, data, guide=guide, seed=seed, progress=progress,
                            options=options)
    started = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    facts = facts_of(model, data)
    plate_nesting = facts.plate_nesting
    latent = facts.latent
    discrete = [n for n in latent if n in facts.discrete or n in facts.unenumerable]
    # Particles are vectorised in a plate only where the story is checked to be batch-safe.
    vectorize = options["num_particles"] > 1 and choose_path(model, data, facts) == "plate"
    guide_name = getattr(guide, "name", None)
    start_gradients = 0
    if guide is None or isinstance(guide, str):
        family, guide_name = AUTOGUIDES[guide or "meanfield"]
        start = (laplace_start(model, data, seed, dispersed=restart > 0)
                 if options["init"] == "map" else None)
        guide = family(poutine.block(model, hide=discrete),
                       init_loc_fn=_autoguide_start(start, restart))
        apply_scales(guide, start, data)
        start_gradients = 0 if start is None else start.gradients
        pyro.set_rng_seed(seed)
    guide_sites = _guide_sites(guide, data)
    if vectorize and not _vectorizable(guide, data, plate_nesting):
        # A value with a dim more than its site's batch (a joint Normal split into sites
        # inside a plate) would broadcast the story's log densities across particles:
        # particle i's prior and likelihood evaluated at particle j's values, P x P terms
        # (found as sds 4x too small at num_particles=4). Particles then run one by one.
        logger.info("SVI: guide %r is not batch-safe under the particle plate; its %d "
                    "particles run one after another", guide_name, options["num_particles"])
        vectorize = False
    enumerated = [d for d in discrete if d not in guide_sites]
    elbo_name = _choose_elbo(options["elbo"], enumerated)
    story = config_enumerate(model) if enumerated else model
    marginal = bool(enumerated) and elbo_name == "TraceEnum_ELBO" and model.marginal is not model
    if marginal:
        # The story's hand-marginalised likelihood gives the same ELBO with fewer operations.
        story, elbo_name = model.marginal, "Trace_ELBO"
    elbo_options = dict(num_particles=options["num_particles"], max_plate_nesting=plate_nesting,
                        vectorize_particles=vectorize)
    engine = _choose_engine(options["engine"], options["steps"], model, data)
    jit = options["jit"] if options["jit"] != "auto" else options["steps"] >= _STEPS_FOR_JIT
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
            from ppl_notes.errors import OptionError

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
        _guide_sites(fit_guide, data)  # names a site without rsample before any step
    if engine == "fast":
        try:
            compiled = CompiledELBO(story, fit_guide, data, _ELBOS[elbo_name](**elbo_options))
        except Exception as error:  # noqa: BLE001 - any capture failure: say so, use Pyro's loop
            logger.warning("SVI: the ELBO step of %r could not be compiled (%s: %s); using "
                           "Pyro's SVI loop", model.name, type(error).__name__, error)
            engine = "pyro"
            pyro.clear_param_store()
    identity = _identity(model, guide, guide_name, data, seed, engine, options)
    loop_started = time.perf_counter()
    if engine == "fast":
        pyro.set_rng_seed(seed)
        loop_started = time.perf_counter()
        history = _optimise_compiled(compiled, story, fit_guide, data, seed, plate_nesting,
                                     options, progress, identity)
        jit = False
    else:
        history = _pyro_loop(story, fit_guide, fit_data, loop_seed, elbo_name, elbo_options,
                             jit, model.name, options, progress and (parallel is None
                                                                      or parallel.rank == 0),
                             identity, parallel)
        jit = history.attrs["jit"]
    steps_per_second = len(history) / max(time.perf_counter() - loop_started, 1e-9)
    params = {k: v.detach().cpu().numpy().copy() for k, v in pyro.get_param_store().items()}
    values, log_q = sample_guide(guide, data, options["num_draws"], plate_nesting, seed + 1,
                                 tuple(guide_sites), dtype=facts.dtype)
    posterior, evaluation = posterior_of(
        model, data, {k: v for k, v in values.items() if k not in enumerated},
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


def _choose_engine(requested: str, steps: int, model, data) -> str:
    if requested != "auto":
        return requested
    facts = facts_of(model, data)
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


def _check_restartable(options: dict[str, Any]) -> None:
    from ppl_notes.errors import OptionError

    for name in ("checkpoint", "resume"):
        if options[name] is not None:
            raise OptionError(f"method 'svi': restarts and scheduler run independent fits, and "
                              f"option {name!r} names one run's file; leave it unset")
    if options["distributed"]:
        raise OptionError("method 'svi': distributed=True (one data-parallel fit) does not "
                          "combine with restarts or scheduler")


def _data_parallel(facts, data, options):
    from ppl_notes.errors import OptionError
    from ppl_notes.vi.data_parallel import DataParallel

    if options["checkpoint"] is not None or options["resume"] is not None:
        raise OptionError("method 'svi': distributed=True does not checkpoint (every process "
                          "would write the same file); leave checkpoint and resume unset")
    return DataParallel(facts, data)


def _guide_sites(guide, data) -> list[str]:
    with pyro.poutine.seed(rng_seed=0), torch.no_grad():
        trace = poutine.trace(guide).get_trace(**data)
    return list(latent_sites(trace))


def _support_bounds(support) -> list:
    """A constraint's bounds (``Interval(0, 1 - alpha1)``'s 0 and 1 - alpha1), unwrapped."""
    support = strip_independent(support)
    return [getattr(support, name) for name in ("lower_bound", "upper_bound")
            if hasattr(support, name)]


def moving_supports(model, data: dict[str, Any], latent) -> dict[str, tuple]:
    """The latent sites whose support depends on other latent sites, with two examples.

    The story is traced at two prior draws; a site whose support's bounds differ between
    them (GARCH's ``beta1 ~ Uniform(0, 1 - alpha1)``) is returned as ``{name: (support
    in one draw, support in the other)}``.
    """
    try:
        first, second = (trace_model(model, data, seed) for seed in (11, 12))
    except Exception:  # noqa: BLE001 - a story that fails at a prior draw: no evidence here
        return {}
    moving = {}
    for name in latent:
        if name not in first.nodes or name not in second.nodes:
            continue
        a, b = first.nodes[name]["fn"].support, second.nodes[name]["fn"].support
        bounds_a, bounds_b = _support_bounds(a), _support_bounds(b)
        if len(bounds_a) != len(bounds_b) or any(
                not torch.equal(torch.as_tensor(x), torch.as_tensor(y))
                for x, y in zip(bounds_a, bounds_b, strict=True)):
            moving[name] = (a, b)
    return moving


def _refuse_moving_supports(model, data: dict[str, Any], family: str) -> None:
    """An autoguide cannot follow a support that moves: say so before any step.

    Only the sites the autoguide fits count (enumerated discrete sites are hidden from it).
    """
    facts = facts_of(model, data)
    fitted = [n for n in facts.latent if n not in facts.discrete and n not in facts.unenumerable]
    moving = moving_supports(model, data, fitted)
    if not moving:
        return
    name, (a, b) = next(iter(moving.items()))
    raise StoryError(
        f"site {name!r}: its support depends on other latent sites ({a} at one prior draw, "
        f"{b} at another), and the {family!r} autoguide maps {name!r} into the support it "
        f"sees when it is built, so later draws leave the moving bound and the fit fails "
        f"mid-way. Reparameterise the story ({name} = bound * u with u on a fixed "
        f"interval, plus the log-Jacobian as a pyro.factor), or pass a guide that draws "
        f"{name!r} inside the bound its own draws of the other sites give. NUTS and the "
        f"default optimizer='newton' take such stories as they are")


def _vectorizable(guide, data, plate_nesting: int, particles: int = 3) -> bool:
    """Whether the guide's draws can be vectorised over particles.

    Every latent value drawn under a particle plate must have the particle dim where
    Pyro puts it (``-(plate_nesting + 1)`` left of the event dims) and no dim left of
    it, as ``vectorize_particles`` needs.
    """
    dim = -(plate_nesting + 1)
    try:
        with (poutine.seed(rng_seed=0), torch.no_grad(),
              pyro.plate("_particles", particles, dim=dim)):
            trace = poutine.trace(guide).get_trace(**data)
    except (RuntimeError, ValueError, IndexError):
        return False
    for site in latent_sites(trace).values():
        value = site["value"]
        batch = value.shape[:value.dim() - site["fn"].event_dim]
        if len(batch) > -dim or (len(batch) == -dim and batch[0] not in (1, particles)):
            return False
    return True


class _NonFinite(Exception):
    """A step whose loss or gradients are not finite (raised before any update)."""

    def __init__(self, loss: float, parameters: list[str]) -> None:
        super().__init__(loss, parameters)
        self.loss, self.parameters = loss, parameters


class _Loop:
    """The optimisation loop both engines share: steps, progress bar, ELBO history, stops.

    ``step(i) -> loss`` runs one step and raises :class:`_NonFinite` *before* updating
    anything when the loss or a gradient is not finite, so the parameters keep their last
    finite values. ``state()`` returns what a checkpoint needs to continue the run.
    Ctrl-C (KeyboardInterrupt) ends the loop early: the history so far is kept and the
    run is marked interrupted (and checkpointed, when asked).
    """

    def __init__(self, options: dict[str, Any], progress: bool, identity: dict[str, Any]):
        self.options, self.progress, self.identity = options, progress, identity
        self.elbo = np.full(options["steps"], np.nan)
        self.start = 0
        self.interrupted_at: int | None = None
        self.converged_at: int | None = None
        self.monitor: ConvergenceMonitor | None = None

    def resume_from(self, checkpoint: dict[str, Any]) -> None:
        """Continue after the steps a checkpoint holds (its ELBO history included)."""
        done = np.asarray(checkpoint["elbo"], dtype=float)
        if len(done) > self.options["steps"]:
            raise CheckpointError(f"the checkpoint holds {len(done)} steps, more than "
                                  f"steps={self.options['steps']}")
        self.elbo[:len(done)] = done
        self.start = len(done)

    def _checkpoint(self, state: Callable[[], dict], done: int) -> None:
        path = self.options["checkpoint"]
        if path is not None:
            save_checkpoint(path, {**self.identity, **state(),
                                   "elbo": torch.as_tensor(self.elbo[:done])})

    def run(self, step: Callable[[int], float], state: Callable[[], dict],
            iterate: tuple[Callable[[], list[torch.Tensor]],
                           Callable[[list[torch.Tensor]], None], GuideDistance]
            | None = None) -> pd.DataFrame:
        """Run the steps, and return the ELBO history.

        ``iterate`` = (read, write, distance): read and write the parameters, and the
        guide's KL distance between two of their values and its ELBO at one -- for the
        convergence rule and the average of the last three windows' iterates that a
        converged run ends with (:mod:`ppl_notes.vi.convergence`).
        """
        steps, every = self.options["steps"], self.options["checkpoint_every"]
        index = self.start
        monitor = (ConvergenceMonitor(steps, self.options["tolerance"], *iterate)
                   if self.options["stop"] == "converged" and iterate is not None else None)
        self.monitor = monitor
        with (tqdm(total=steps, initial=self.start, desc="SVI", disable=not self.progress) as bar,
              warnings.catch_warnings()):
            # Pyro's "Encountered NaN: loss" (warn_explicit, so no module filter catches
            # it): a non-finite loss or gradient is an InferenceError here, said once.
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
            try:
                for index in range(self.start, steps):
                    if index % 50 == 0 and stop_requested():  # Ctrl-C in the main process
                        raise KeyboardInterrupt
                    loss = self._one(step, index)
                    self.elbo[index] = -loss
                    if monitor is not None and monitor.observe(index + 1, self.elbo):
                        self.converged_at = index + 1
                        bar.update(index + 1 - bar.n)
                        break
                    if (index + 1) % every == 0 and index + 1 < steps:
                        self._checkpoint(state, index + 1)
                    if index % 50 == 0 or index == steps - 1:
                        bar.set_postfix(elbo=f"{-loss:.4g}", refresh=False)
                        bar.update(index + 1 - bar.n)
            except KeyboardInterrupt:
                self.interrupted_at = index
                self._checkpoint(state, index)
                warnings.warn(
                    f"SVI interrupted at step {index} of {steps}: the posterior is the guide "
                    f"as it was then (partial=True)"
                    + (f"; resume with resume={self.options['checkpoint']!r}"
                       if self.options["checkpoint"] else ""),
                    PartialResultWarning, stacklevel=2)
        done = (self.interrupted_at if self.interrupted_at is not None
                else self.converged_at if self.converged_at is not None else steps)
        self._checkpoint(state, done)
        return pd.DataFrame({"elbo": self.elbo[:done]},
                            index=pd.RangeIndex(done, name="step"))

    @property
    def stopped(self) -> str:
        """Why the run ended: ``converged``, ``steps`` (the cap) or ``interrupted``."""
        if self.interrupted_at is not None:
            return "interrupted"
        return "converged" if self.converged_at is not None else "steps"

    @staticmethod
    def _one(step: Callable[[int], float], index: int) -> float:
        try:
            return step(index)
        except _NonFinite as fault:
            which = (f"the gradients of {fault.parameters} are not finite" if fault.parameters
                     else "its gradient is not finite")
            if index == 0:  # before any update: no step size is to blame
                raise InferenceError(
                    f"SVI: at step 0, before any update, the ELBO is {-fault.loss:.6g} and "
                    f"{which}: the story's or the guide's log density is not finite at the "
                    "guide's starting point. Check the story (a parameter outside its "
                    "domain, log or sqrt of a negative) and the guide's initial values") \
                    from None
            raise InferenceError(
                f"SVI: at step {index} the ELBO is {-fault.loss:.6g} and {which}. The "
                "parameters keep their last finite values (pyro.get_param_store()). Lower "
                "the learning rate, start the guide's scales smaller, or check the story's "
                "priors and the guide's initial values") from None
        except ValueError as error:  # Pyro's validation: a parameter left its support
            reason = str(error).splitlines()[0]
            if index == 0:
                raise InferenceError(
                    f"SVI: at step 0, before any update, the story or guide is invalid at "
                    f"the guide's starting point ({reason}); check the story's distributions "
                    "and the guide's initial values") from error
            raise InferenceError(
                f"SVI: at step {index} the guide's or story's parameters became invalid "
                f"({reason}); lower the learning rate or check the guide's initial values"
            ) from error


def _check_resumable(path: str, checkpoint: dict[str, Any],
                     identity: dict[str, Any]) -> None:
    """Refuse a checkpoint of another run, naming what differs (story, guide, data...)."""
    for key, value in identity.items():
        stored = checkpoint.get(key)
        if stored == value:
            continue
        if key == "data" and isinstance(stored, dict):
            changed = sorted(k for k in set(stored) | set(value) if stored.get(k) != value.get(k))
            raise CheckpointError(
                f"checkpoint {path!r} was written for other data: argument(s) {changed} "
                "differ from this run's; resume with the data it was fitted to, or start "
                "afresh without resume=")
        if key in ("story", "guide"):
            raise CheckpointError(
                f"checkpoint {path!r} was written by another {key}: it records "
                f"{str(stored).split(' ')[0]!r} with other code than this run's "
                f"{str(value).split(' ')[0]!r}; start afresh without resume=")
        if key == "options" and isinstance(stored, str):
            before, now = json.loads(stored), json.loads(value)
            changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
                       if before.get(k) != now.get(k)}
            raise CheckpointError(
                f"checkpoint {path!r} was written with other options, which change the "
                "objective: " + ", ".join(f"{k}={a!r} there, {b!r} here"
                                          for k, (a, b) in changed.items()))
        raise CheckpointError(
            f"checkpoint {path!r} was written by another run: its {key} is {stored!r}, "
            f"this run's is {value!r}")


@contextlib.contextmanager
def _restoring(path: str):
    """Turn a malformed entry found while restoring a checkpoint into a named error."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path!r} cannot be restored: "
                              f"{type(error).__name__}: {error}") from error


def _checked_state(path: str, checkpoint: dict[str, Any],
                   shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The checkpoint's entries, each present and of this run's shape, or a named error."""
    missing = [k for k in shapes if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}: it cannot continue "
                              "this run")
    for key, shape in shapes.items():
        found = checkpoint[key]
        if shape is None:
            continue
        if isinstance(shape, dict):  # a dict of named tensors (the guide's parameters)
            names = sorted(set(shape) ^ set(found)) if isinstance(found, dict) else sorted(shape)
            if names:
                raise CheckpointError(f"checkpoint {path!r}: its {key} and this run's differ "
                                      f"in {names}")
            for name, size in shape.items():
                if tuple(found[name].shape) != size:
                    raise CheckpointError(
                        f"checkpoint {path!r}: parameter {name!r} has shape "
                        f"{tuple(found[name].shape)} there and {size} in this run")
        elif not isinstance(found, torch.Tensor) or tuple(found.shape) != shape:
            raise CheckpointError(
                f"checkpoint {path!r}: {key!r} has shape "
                f"{tuple(getattr(found, 'shape', ()))} there and {shape} in this run")
    return checkpoint


def _identity(model, guide, guide_name, data, seed, engine, options) -> dict[str, Any]:
    """What must match between a checkpoint and the run that resumes it."""
    same = {k: v for k, v in options.items()
            if k not in ("steps", "checkpoint", "checkpoint_every", "resume", "resume_trusted",
                         "num_draws")}
    return {**run_fingerprint(model, guide, str(guide_name), data), "seed": seed,
            "engine": engine, "options": json.dumps(same, sort_keys=True, default=str)}


def _pyro_loop(story, guide, data, seed, elbo_name, elbo_options, jit, name, options,
               progress, identity, parallel=None) -> pd.DataFrame:
    """Pyro's ELBO (optionally TorchScript-compiled) with torch's Adam, step by step.

    The step is Pyro's ``SVI.step`` written out so that non-finite gradients are caught
    before the update and the optimizer's state can be checkpointed.
    """
    if jit:
        try:
            trial = _JIT_ELBOS[elbo_name](ignore_jit_warnings=True, **elbo_options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial.loss(story, guide, **data)  # traces now: a failure shows before any step
        except Exception as error:  # noqa: BLE001 - any tracing failure: say so, run uncompiled
            logger.warning("SVI: the ELBO of %r could not be compiled (%s: %s); running it "
                           "uncompiled", name, type(error).__name__, error)
            jit = False
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = (_JIT_ELBOS if jit else _ELBOS)[elbo_name]
    if options["stl"]:
        from ppl_notes.vi.stl import STLTrace_ELBO

        loss = STLTrace_ELBO
    extra = {"ignore_jit_warnings": True} if jit else {}
    elbo = loss(**extra, **elbo_options)
    optimizer = _decaying_adam(options)
    loop = _Loop(options, progress, identity)
    store = pyro.get_param_store()
    if options["resume"] is not None:
        checkpoint = load_checkpoint(options["resume"], options["resume_trusted"])
        _check_resumable(options["resume"], checkpoint, identity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elbo.loss_and_grads(story, guide, **data)  # creates (and compiles) everything
        for value in store._params.values():
            value.grad = None
        _checked_state(options["resume"], checkpoint, {
            "params": {k: tuple(v.shape) for k, v in store._params.items()},
            "optimizer": None, "rng": None, "elbo": None})
        with torch.no_grad():
            for key, value in checkpoint["params"].items():
                store._params[key].copy_(value)
        with _restoring(options["resume"]):
            optimizer.set_state(checkpoint["optimizer"])
            set_rng_state(checkpoint["rng"])
            loop.resume_from(checkpoint)

    if parallel is not None:  # create the parameters, then start every process at rank 0's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elbo.loss_and_grads(story, guide, **data)
        for value in store._params.values():
            value.grad = None
        parallel.share_parameters(dict(store._params))

    def step(_index: int) -> float:
        with poutine.trace(param_only=True) as capture:
            value = elbo.loss_and_grads(story, guide, **data)
        params = {key: site["value"].unconstrained() for key, site in capture.trace.nodes.items()}
        if parallel is not None:
            value = parallel.average(value, [params[key] for key in sorted(params)])
        bad = [key for key, p in params.items()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if not math.isfinite(value) or bad:
            pyro.infer.util.zero_grads(set(params.values()))
            raise _NonFinite(value, bad)
        optimizer(set(params.values()))
        pyro.infer.util.zero_grads(set(params.values()))
        optimizer.step()  # the learning rate's decay, one factor per step
        return value

    def state() -> dict[str, Any]:
        return {"params": {k: v.detach().clone() for k, v in store._params.items()},
                "optimizer": optimizer.get_state(), "rng": rng_state()}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pyro")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Pyro's JitTrace_ELBO uses torch.jit.trace, which torch now calls deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated",
                                category=FutureWarning)
        def read() -> list[torch.Tensor]:  # the store fills on the first step
            return list(store._params.values())

        def write(values: list[torch.Tensor]) -> None:
            with torch.no_grad():
                for parameter, value in zip(read(), values, strict=True):
                    parameter.copy_(value)

        distance = GuideDistance(
            guide, data, write, read,
            loss=_one_draw_loss(story, guide, data, elbo_name, elbo_options["max_plate_nesting"]),
            reduce=None if parallel is None else parallel.mean_of, seed=seed)
        history = loop.run(step, state, (read, write, distance))
    history.attrs["jit"] = jit
    _note_stop(history, loop)
    return history


def _one_draw_loss(story, guide, data: dict[str, Any], elbo_name: str,
                   plate_nesting: int) -> Callable[[], float]:
    """Minus a one-draw estimate of the run's ELBO at the parameters now (not compiled)."""
    estimate = _ELBOS[elbo_name](num_particles=1, max_plate_nesting=plate_nesting)
    return lambda: estimate.loss(story, guide, **data)


def _note_stop(history: pd.DataFrame, loop: _Loop) -> None:
    """Record how the loop ended in the history's attributes."""
    history.attrs["interrupted_at"] = loop.interrupted_at
    history.attrs["stopped"] = loop.stopped
    history.attrs["guide_moves"] = [] if loop.monitor is None else loop.monitor.moves


def _decay_per_step(options: dict[str, Any]) -> float:
    """The factor by which the learning rate shrinks each step."""
    return options["learning_rate_decay"] ** (1.0 / options["steps"])


def _decaying_adam(options: dict[str, Any]) -> ExponentialLR:
    """Torch's Adam with the rate decaying exponentially to ``learning_rate_decay`` of itself.

    Robbins & Monro (1951): a decreasing step lets the stochastic iterates settle instead
    of jittering around the optimum at a scale set by a constant rate.
    """
    return ExponentialLR({"optimizer": torch.optim.Adam,
                          "optim_args": {"lr": options["learning_rate"]},
                          "gamma": _decay_per_step(options)})


def _optimise_compiled(compiled: CompiledELBO, story, guide, data: dict[str, Any], seed: int,
                       plate_nesting: int, options: dict[str, Any], progress: bool,
                       identity: dict[str, Any]) -> pd.DataFrame:
    """Adam on the flat parameter vector, one compiled ELBO call per step."""
    learning_rate, decay = options["learning_rate"], _decay_per_step(options)
    flat = compiled.initial.clone()
    state_ = AdamState(0, torch.zeros_like(flat), torch.zeros_like(flat))
    loop = _Loop(options, progress, identity)
    if options["resume"] is not None:
        checkpoint = load_checkpoint(options["resume"], options["resume_trusted"])
        _check_resumable(options["resume"], checkpoint, identity)
        size = tuple(flat.shape)
        _checked_state(options["resume"], checkpoint, {
            "flat": size, "first_moment": size, "second_moment": size, "adam_step": None,
            "rng": None, "elbo": None})
        flat = checkpoint["flat"].clone()
        with _restoring(options["resume"]):
            state_ = AdamState(int(checkpoint["adam_step"]), checkpoint["first_moment"].clone(),
                               checkpoint["second_moment"].clone())
            set_rng_state(checkpoint["rng"])
            loop.resume_from(checkpoint)

    def step(index: int) -> float:
        nonlocal flat
        loss, grad = compiled(flat)
        value = float(loss)
        finite = torch.isfinite(grad)
        if not math.isfinite(value) or not bool(finite.all()):
            raise _NonFinite(value, compiled.names_where(~finite))
        flat = adam_step(flat, grad, state_, learning_rate * decay**index)
        return value

    def state() -> dict[str, Any]:
        return {"flat": flat.detach().clone(), "adam_step": state_.step,
                "first_moment": state_.first_moment.clone(),
                "second_moment": state_.second_moment.clone(), "rng": rng_state()}

    def write(values: list[torch.Tensor]) -> None:
        nonlocal flat
        flat = values[0]

    def read() -> list[torch.Tensor]:
        return [flat]

    distance = GuideDistance(guide, data, lambda values: compiled.write_back(values[0]), read,
                             loss=_one_draw_loss(story, guide, data, "Trace_ELBO",
                                                 plate_nesting),
                             seed=seed)
    try:
        history = loop.run(step, state, (read, write, distance))
    finally:
        compiled.write_back(flat)  # the last finite state stays in the param store
    _note_stop(history, loop)
    return history
