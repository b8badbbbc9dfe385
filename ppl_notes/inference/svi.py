r"""Stochastic variational inference: maximise the ELBO over the guide's parameters.

.. math:: \mathrm{ELBO}(\lambda) = \mathbb E_{q(z;\lambda)}[\log p(x, z) - \log q(z;\lambda)]
          = \log p(x) - \mathrm{KL}(q(z;\lambda)\,\|\,p(z\mid x))

(notes §2.f). Gradients are Pyro's: reparameterised where the guide allows it, score
function otherwise (Trace_ELBO), with discrete latent sites that the guide leaves out
summed exactly (TraceEnum_ELBO, chosen automatically). After fitting, ``num_draws``
draws from the guide become the posterior; each draw carries log p(x, θ) and log q(θ)
(``sample_stats``), which the Pareto k-hat diagnostic and LOO for VI need.

References
----------
Wingate, D. & Weber, T. (2013). Automated Variational Inference in Probabilistic
Programming. Ranganath, R., Gerrish, S. & Blei, D. (2014). Black Box Variational
Inference. Kingma, D. P. & Welling, M. (2014). Auto-Encoding Variational Bayes.
"""

from __future__ import annotations

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
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceMeanField_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoNormal
from pyro.optim import ExponentialLR
from tqdm.auto import tqdm

from ppl_notes._sites import latent_sites, trace_model, trace_plate_nesting
from ppl_notes.errors import InferenceError
from ppl_notes.gradients import ESTIMATORS, force_estimator
from ppl_notes.inference._compiled_svi import AdamState, CompiledELBO, adam_step
from ppl_notes.inference._draws import posterior_of, sample_guide
from ppl_notes.inference._options import Option, choice, positive_float, positive_int
from ppl_notes.inference._result import RunResult

logger = logging.getLogger(__name__)

TAKES_GUIDE = True

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
    choice("engine", "auto", "'fast': the Trace_ELBO step compiled as one graph "
           "(torch.compile) with Adam on one flat parameter vector; 'pyro': Pyro's SVI loop "
           "(always used for TraceEnum_ELBO, TraceMeanField_ELBO and autoguides); 'auto': "
           "'fast' when steps x observed values >= 1e7, where it repays its compilation",
           ("auto", "fast", "pyro")),
    Option("jit", (bool,), True, "engine='pyro' only: compile the ELBO with TorchScript "
           "(Pyro's JitTrace* ELBOs); a story or guide that cannot be traced runs "
           "uncompiled, with a warning"),
)

_ELBOS = {"Trace_ELBO": Trace_ELBO, "TraceEnum_ELBO": TraceEnum_ELBO,
          "TraceMeanField_ELBO": TraceMeanField_ELBO}
_JIT_ELBOS = {"Trace_ELBO": JitTrace_ELBO, "TraceEnum_ELBO": JitTraceEnum_ELBO,
              "TraceMeanField_ELBO": JitTraceMeanField_ELBO}


def _choose_elbo(requested: str, enumerated: list[str]) -> str:
    if requested == "auto":
        return "TraceEnum_ELBO" if enumerated else "Trace_ELBO"
    return requested


def run(model, data: dict[str, Any], *, guide, seed: int, progress: bool,
        options: dict[str, Any]) -> RunResult:
    """Fit the guide by SVI, then draw from it. See the module docstring."""
    started = time.perf_counter()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    story_trace = trace_model(model, data, 0)
    plate_nesting = trace_plate_nesting(story_trace)
    latent = latent_sites(story_trace)
    discrete = [n for n, site in latent.items() if site["fn"].support.is_discrete]
    guide_name = getattr(guide, "name", None)
    if guide is None:
        guide = AutoNormal(poutine.block(model, hide=discrete))
        guide_name = "AutoNormal"
    guide_sites = _guide_sites(guide, data)
    enumerated = [d for d in discrete if d not in guide_sites]
    elbo_name = _choose_elbo(options["elbo"], enumerated)
    story = config_enumerate(model) if enumerated else model
    marginal = bool(enumerated) and elbo_name == "TraceEnum_ELBO" and model.marginal is not model
    if marginal:
        # The story's hand-marginalised likelihood gives the same ELBO with fewer operations.
        story, elbo_name = model.marginal, "Trace_ELBO"
    elbo_options = dict(num_particles=options["num_particles"], max_plate_nesting=plate_nesting,
                        vectorize_particles=options["num_particles"] > 1)
    engine, jit = _choose_engine(options["engine"], options["steps"], model, data), options["jit"]
    if engine == "fast" and elbo_name != "Trace_ELBO":
        logger.info("SVI: the fast engine compiles Trace_ELBO; %s runs in Pyro's loop", elbo_name)
        engine = "pyro"
    if engine == "fast" and isinstance(getattr(guide, "fn", guide), torch.nn.Module):
        # Module guides (autoguides) keep their parameters as module attributes, which
        # the compiled step cannot swap for its flat vector.
        logger.info("SVI: the fast engine takes function guides; %s runs in Pyro's loop",
                    guide_name)
        engine = "pyro"
    fit_guide = force_estimator(guide, options["estimator"])
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
    loop_started = time.perf_counter()
    if engine == "fast":
        pyro.set_rng_seed(seed)
        loop_started = time.perf_counter()
        history = _optimise_compiled(compiled, options, progress)
        jit = False
    else:
        history = _pyro_loop(story, fit_guide, data, seed, elbo_name, elbo_options, jit,
                             model.name, options, progress)
        jit = history.attrs["jit"]
    steps_per_second = options["steps"] / (time.perf_counter() - loop_started)
    params = {k: v.detach().cpu().numpy().copy() for k, v in pyro.get_param_store().items()}
    values, log_q = sample_guide(guide, data, options["num_draws"], plate_nesting, seed + 1,
                                 tuple(guide_sites))
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
        info={"elbo": elbo_name, "guide": guide_name, "enumerated": enumerated,
              "marginal_story": marginal, "engine": engine, "jit": jit,
              "steps_per_second": steps_per_second,
              "final_elbo": float(history["elbo"].iloc[-1]),
              "estimator": options["estimator"]},
        seconds=time.perf_counter() - started,
    )


#: Compiling the ELBO step costs about 5 s with a warm torch-inductor cache and 20 s on a
#: cold one; Pyro's loop costs about 2.5 ms per step plus 0.15 us per observed value per
#: step here. Below this much work (steps x observed values) the compilation does not pay.
_WORK_FOR_FAST_ENGINE = 10_000_000


def _choose_engine(requested: str, steps: int, model, data) -> str:
    if requested != "auto":
        return requested
    observed = sum(data[name].numel() for name in model.observed if name in data)
    return "fast" if steps * observed >= _WORK_FOR_FAST_ENGINE else "pyro"


def _guide_sites(guide, data) -> list[str]:
    with pyro.poutine.seed(rng_seed=0), torch.no_grad():
        trace = poutine.trace(guide).get_trace(**data)
    return list(latent_sites(trace))


def _run_steps(step: Callable[[int], float], steps: int, progress: bool) -> pd.DataFrame:
    """Call ``step(i) -> loss`` ``steps`` times with a progress bar; the ELBO history."""
    elbo = np.full(steps, np.nan)
    with tqdm(total=steps, desc="SVI", disable=not progress) as bar:
        for index in range(steps):
            try:
                loss = step(index)
            except ValueError as error:  # Pyro's validation: a parameter left its support
                reason = str(error).splitlines()[0]
                raise InferenceError(
                    f"SVI: at step {index} the guide's or story's parameters became invalid "
                    f"({reason}); lower the learning rate or check the guide's initial values"
                ) from error
            if not math.isfinite(loss):
                raise InferenceError(
                    f"SVI: the ELBO became {-loss} at step {index}; lower the learning rate "
                    "or check the story's priors and the guide's initial values"
                )
            elbo[index] = -loss
            if index % 50 == 0 or index == steps - 1:
                bar.set_postfix(elbo=f"{-loss:.4g}", refresh=False)
                bar.update(index + 1 - bar.n)
    return pd.DataFrame({"elbo": elbo}, index=pd.RangeIndex(steps, name="step"))


def _pyro_loop(story, guide, data, seed, elbo_name, elbo_options, jit, name, options,
               progress) -> pd.DataFrame:
    """Pyro's own SVI loop (optionally with a TorchScript-compiled ELBO)."""
    if jit:
        try:
            svi = SVI(story, guide, _decaying_adam(options),
                      loss=_JIT_ELBOS[elbo_name](ignore_jit_warnings=True, **elbo_options))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                svi.evaluate_loss(**data)  # traces now: a failure shows before any step
        except Exception as error:  # noqa: BLE001 - any tracing failure: say so, run uncompiled
            logger.warning("SVI: the ELBO of %r could not be compiled (%s: %s); running it "
                           "uncompiled", name, type(error).__name__, error)
            jit = False
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = (_JIT_ELBOS if jit else _ELBOS)[elbo_name]
    extra = {"ignore_jit_warnings": True} if jit else {}
    optimizer = _decaying_adam(options)
    svi = SVI(story, guide, optimizer, loss=loss(**extra, **elbo_options))

    def step(_index: int) -> float:
        loss = svi.step(**data)
        optimizer.step()  # the learning rate's decay, one factor per step
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = _run_steps(step, options["steps"], progress)
    history.attrs["jit"] = jit
    return history


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


def _optimise_compiled(compiled: CompiledELBO, options: dict[str, Any],
                       progress: bool) -> pd.DataFrame:
    """Adam on the flat parameter vector, one compiled ELBO call per step."""
    learning_rate, decay = options["learning_rate"], _decay_per_step(options)
    flat = compiled.initial.clone()
    state = AdamState(0, torch.zeros_like(flat), torch.zeros_like(flat))

    def step(index: int) -> float:
        nonlocal flat
        loss, grad = compiled(flat)
        value = float(loss)
        if math.isfinite(value) and bool(torch.isfinite(grad).all()):
            flat = adam_step(flat, grad, state, learning_rate * decay**index)
            return value
        return value if not math.isfinite(value) else float("nan")  # a non-finite gradient

    try:
        return _run_steps(step, options["steps"], progress)
    finally:
        compiled.write_back(flat)  # the last finite state stays in the param store
