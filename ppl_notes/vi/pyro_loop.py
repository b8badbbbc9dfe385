r"""Pyro's SVI loop, and the compiled ELBO step: how a guide function is fitted by Adam.

:func:`pyro_loop` runs Pyro's ``SVI`` step (Trace_ELBO, TraceEnum_ELBO or
TraceMeanField_ELBO, JIT-compiled for long runs) with ppl_notes' stopping rule, restarts'
stop requests, checkpoints (:mod:`ppl_notes.vi.checkpoint`) and a guard against
non-finite losses; :func:`optimise_compiled` runs the same Adam on the ELBO step that
:mod:`ppl_notes.vi.compiled_svi` compiled. Both return the ELBO history.
:func:`refuse_moving_supports` stops, before any step, an autoguide on a story whose
supports move with its own draws (Pyro's autoguides map with the supports they saw when
built).

References
----------
Kingma, D. P. & Ba, J. (2015). Adam: A Method for Stochastic Optimization. ICLR.
Ranganath, R., Gerrish, S. & Blei, D. (2014). Black Box Variational Inference. AISTATS.
"""


from __future__ import annotations

import contextlib
import json
import logging
import math
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
)
from pyro.optim import ExponentialLR
from tqdm.auto import tqdm

from ppl_notes._pool import stop_requested
from ppl_notes.errors import CheckpointError, InferenceError, PartialResultWarning
from ppl_notes.evaluation.fingerprint import run_fingerprint
from ppl_notes.vi.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ppl_notes.vi.compiled_svi import AdamState, CompiledELBO, adam_step
from ppl_notes.vi.convergence import (
    ConvergenceMonitor,
)
from ppl_notes.vi.guide_distance import GuideDistance
from ppl_notes.vi.stl import STLTrace_ELBO

logger = logging.getLogger(__name__)


#: Pyro's ELBOs by name, as ``elbo=`` takes them, and their JIT-compiled forms
ELBOS = {"Trace_ELBO": Trace_ELBO, "TraceEnum_ELBO": TraceEnum_ELBO,
         "TraceMeanField_ELBO": TraceMeanField_ELBO}
JIT_ELBOS = {"Trace_ELBO": JitTrace_ELBO, "TraceEnum_ELBO": JitTraceEnum_ELBO,
             "TraceMeanField_ELBO": JitTraceMeanField_ELBO}


def choose_elbo(requested: str, enumerated: list[str]) -> str:
    """``elbo='auto'``: TraceEnum_ELBO where discrete sites are summed out, else Trace_ELBO."""
    if requested == "auto":
        return "TraceEnum_ELBO" if enumerated else "Trace_ELBO"
    return requested


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


def run_identity(model, guide, guide_name, data, seed, engine, options) -> dict[str, Any]:
    """What must match between a checkpoint and the run that resumes it."""
    same = {k: v for k, v in options.items()
            if k not in ("steps", "checkpoint", "checkpoint_every", "resume", "resume_trusted",
                         "num_draws")}
    return {**run_fingerprint(model, guide, str(guide_name), data), "seed": seed,
            "engine": engine, "options": json.dumps(same, sort_keys=True, default=str)}


def pyro_loop(story, guide, data, seed, elbo_name, elbo_options, jit, name, options,
               progress, identity, parallel=None) -> pd.DataFrame:
    """Pyro's ELBO (optionally TorchScript-compiled) with torch's Adam, step by step.

    The step is Pyro's ``SVI.step`` written out so that non-finite gradients are caught
    before the update and the optimizer's state can be checkpointed.
    """
    if jit:
        try:
            trial = JIT_ELBOS[elbo_name](ignore_jit_warnings=True, **elbo_options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # traces now, as the steps will (loss and gradients: a PyroModule guide,
                # AutoIAFNormal's, traces its loss but fails Pyro's check of its gradients'
                # parameters), so that a failure shows before any step
                trial.loss_and_grads(story, guide, **data)
            for value in pyro.get_param_store()._params.values():
                value.grad = None
        except Exception as error:  # noqa: BLE001 - any tracing failure: say so, run uncompiled
            logger.warning("SVI: the ELBO of %r could not be compiled (%s: %s); running it "
                           "uncompiled", name, type(error).__name__, error)
            jit = False
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = (JIT_ELBOS if jit else ELBOS)[elbo_name]
    if options["stl"]:

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
            reduce=None if parallel is None else parallel.mean_of, seed=seed,
            particle_dim=-1 - elbo_options["max_plate_nesting"])
        history = loop.run(step, state, (read, write, distance))
    history.attrs["jit"] = jit
    _note_stop(history, loop)
    return history


def _one_draw_loss(story, guide, data: dict[str, Any], elbo_name: str,
                   plate_nesting: int) -> Callable[[], float]:
    """Minus a one-draw estimate of the run's ELBO at the parameters now (not compiled)."""
    estimate = ELBOS[elbo_name](num_particles=1, max_plate_nesting=plate_nesting)
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


def optimise_compiled(compiled: CompiledELBO, story, guide, data: dict[str, Any], seed: int,
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


#: Pyro's JitTrace_ELBO traces the story and guide before the first step (seconds for a
#: small story, minutes for one with hundreds of sites); shorter runs stay uncompiled.
STEPS_FOR_JIT = 500
