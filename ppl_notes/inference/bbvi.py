r"""Black-box variational inference: the notes' Algorithm 1 (Ranganath, Gerrish & Blei 2014).

Repeat: draw :math:`z_1..z_S \sim q(z;\lambda)`; take the Robbins–Monro step

.. math:: \lambda \leftarrow \lambda + \rho_t\,\frac1S\sum_{s=1}^S
          \nabla_\lambda \log q(z_s;\lambda)\,\big(\log p(x, z_s) - \log q(z_s;\lambda)
          - b_s\big),

until :math:`\lambda` stops changing. Only :math:`\log q` is differentiated, so the
story may be any black box with a log density; the price is the estimator's variance
(:mod:`ppl_notes.gradients`). Robbins & Monro (1951) guarantee convergence to a local
optimum when :math:`\sum_t\rho_t = \infty` and :math:`\sum_t\rho_t^2 < \infty`; here

.. math:: \rho_t = \eta\,(t + \tau)^{-\kappa}, \qquad \tfrac12 < \kappa \le 1,

either as is (``schedule="robbins_monro"``) or divided, per coordinate, by the root of
the running mean of the squared gradient (``schedule="scaled"``, the default: the
running mean over the last ~100 steps settles, so the conditions hold in effect, and
one :math:`\eta` suits parameters whose gradients differ by orders of magnitude, as
AdaGrad did for Ranganath et al.).

The baseline :math:`b_s` is a control variate that keeps the estimator unbiased:
``"leave_one_out"`` (the default: the mean of the other samples'
:math:`\log p - \log q`; Kool, van Hoof & Welling 2019) or ``"none"``
(:math:`b_s = 0`, Algorithm 1 as written). On the conjugate Normal story the baseline
turns a run that wanders for thousands of steps and stops away from the optimum into
one that stops on it after a few hundred.

Stopping: a single step's change of :math:`\lambda` is mostly noise, so the change is
measured between the averages of consecutive windows of ``window`` steps; the run stops
when no coordinate's average moved more than ``tolerance`` (default 0.01, as in the
notes), or after ``steps`` steps. The last window's average (Polyak–Ruppert averaging)
is the fitted :math:`\lambda`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ppl_notes._result import RunResult
from ppl_notes._sites import trace_model, unconstrained_value
from ppl_notes.errors import InferenceError, OptionError, StoryError
from ppl_notes.evaluation import RunContext, choose_path
from ppl_notes.evaluation.draws import posterior_of, sample_guide, sum_to_draws
from ppl_notes.gradients import force_estimator
from ppl_notes.inference._options import Option, choice, positive_float, positive_int

logger = logging.getLogger(__name__)


#: The scaled schedule averages squared gradients over about this many recent steps.
_MEMORY = 100

OPTIONS = (
    positive_int("steps", 20000, "at most this many steps"),
    positive_int("num_samples", 16, "S: draws from q per gradient estimate"),
    positive_float("learning_rate", 1.0, "eta, the scale of the step sizes rho_t"),
    Option("power", (float, int), 0.6, "kappa in rho_t = eta (t + delay)^-kappa",
           lambda v: 0.5 < v <= 1, "a number in (0.5, 1] (Robbins-Monro conditions)"),
    Option("delay", (float, int), 10.0, "tau in rho_t = eta (t + tau)^-kappa",
           lambda v: v >= 0, "a number >= 0"),
    choice("schedule", "scaled", "'robbins_monro': rho_t as is; 'scaled': rho_t divided "
           "per coordinate by the root mean square of the gradient so far",
           ("scaled", "robbins_monro")),
    choice("baseline", "leave_one_out", "control variate b_s: 'leave_one_out' or 'none' "
           "(Algorithm 1 verbatim; far noisier)", ("leave_one_out", "none")),
    Option("tolerance", (float, int), 0.01, "stop when no coordinate of lambda's window "
           "average moved more than this", lambda v: v > 0, "a number > 0"),
    positive_int("window", 100, "steps per window of the stopping rule", minimum=2),
    positive_int("num_draws", 1000, "posterior draws taken from the fitted guide"),
    Option("recover_discrete", (bool,), True, "draw enumerated discrete sites for each draw"),
)


def rho(step: int, learning_rate: float, power: float, delay: float) -> float:
    r"""The Robbins–Monro step size :math:`\rho_t = \eta (t + \tau)^{-\kappa}` (t from 1)."""
    return learning_rate * (step + delay) ** (-power)


class ScoreFunctionGradient:
    r"""The notes' score-function estimate of :math:`\nabla_\lambda\mathrm{ELBO}`.

    One call draws S samples from the guide at once (an outer plate), evaluates
    :math:`\log p(x, z_s)` by replaying the story and :math:`\log q(z_s;\lambda)` with
    gradients, and returns the ELBO estimate and the gradient of each parameter.
    """

    def __init__(self, model, guide, data, num_samples: int, baseline: str, plate_nesting: int):
        self.model, self.data, self.num_samples = model, data, num_samples
        self.guide = force_estimator(guide, "score")
        self.baseline, self.dim = baseline, -(plate_nesting + 1)

    def _particles(self, fn):
        def vectorised(**kwargs):
            with pyro.plate("_particles", self.num_samples, dim=self.dim):
                return fn(**kwargs)
        return vectorised

    def __call__(self, params: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """The ELBO estimate and the score-function gradient at the current parameters."""
        guide_trace = poutine.trace(self._particles(self.guide)).get_trace(**self.data)
        model_trace = poutine.trace(
            poutine.replay(self._particles(self.model), trace=guide_trace)).get_trace(**self.data)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        num = self.num_samples
        log_q = sum(sum_to_draws(s["log_prob"], num)
                    for s in guide_trace.nodes.values() if s["type"] == "sample")
        with torch.no_grad():
            log_p = sum(sum_to_draws(s["log_prob"], num)
                        for s in model_trace.nodes.values() if s["type"] == "sample")
            weight = log_p - log_q.detach()
            if self.baseline == "leave_one_out" and num > 1:
                weight = weight - (weight.sum() - weight) / (num - 1)
        surrogate = (log_q * weight).mean()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params,
                                                                               strict=True)]
        return float((log_p - log_q.detach()).mean()), grads


def run(context: RunContext) -> RunResult:
    """Algorithm 1 with a Robbins–Monro schedule; see the module docstring."""
    started = time.perf_counter()
    model, data, guide, seed = context.model, context.data, context.guide, context.seed
    options, progress = context.options, context.progress
    _check(options)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    facts = context.facts
    plate_nesting = facts.plate_nesting
    latent = {n: facts.trace.nodes[n] for n in facts.latent}
    if choose_path(model, data, facts) != "plate":
        raise StoryError(
            f"bbvi draws its S samples in one plate, and story {model.name!r} is not "
            f"batch-safe in a plate ({facts.path_reason}); fit it with method='svi', "
            "estimator='score' (the same score-function gradient, one sample per run)")
    guide, guide_name = _guide_for(model, guide, latent)
    with torch.no_grad():
        guide_trace = trace_model(guide, data, seed)
    missing = [n for n in latent if n not in guide_trace.nodes]
    story = model
    if missing:
        if model.marginal is model or any(not latent[n]["fn"].support.is_discrete
                                          for n in missing):
            raise StoryError(
                f"bbvi: the guide draws no value for {missing}; black-box VI needs q over "
                "every latent site (or a story whose discrete sites are summed out by hand, "
                "marginal=...)")
        story = model.marginal
    store = pyro.get_param_store()
    names = list(store.keys())
    if not names:
        raise StoryError(f"bbvi: guide {guide_name!r} has no parameters to fit")
    params = [store._params[n] for n in names]
    estimator = ScoreFunctionGradient(story, guide, data, options["num_samples"],
                                      options["baseline"], plate_nesting)
    history = _ascend(estimator, params, options, progress)
    draws, log_q = sample_guide(guide, data, options["num_draws"], plate_nesting, seed + 1,
                                tuple(n for n in latent if n in guide_trace.nodes))
    enumerated = [n for n in latent if n not in guide_trace.nodes]
    posterior, evaluation = posterior_of(model, data, draws, facts, order=latent, seed=seed + 2,
                                         recover_discrete=options["recover_discrete"])
    converged = bool(history.attrs["converged"])
    if not converged:
        logger.warning("bbvi: lambda still moved more than tolerance=%g between the last "
                       "two windows after %d steps; raise steps or learning_rate",
                       options["tolerance"], len(history))
    return RunResult(
        method="bbvi", sample_dims=("sample",), posterior=posterior,
        sample_stats={"log_p": evaluation.log_joint, "log_q": log_q},
        log_likelihood=evaluation.log_likelihood, history=history,
        params={k: v.detach().cpu().numpy().copy() for k, v in store.items()},
        options=options,
        info={"guide": guide_name, "enumerated": enumerated, "converged": converged,
              "steps_taken": len(history), "estimator": "score",
              "final_elbo": float(history["elbo"].iloc[-options["window"]:].mean())},
        seconds=time.perf_counter() - started)


def _guide_for(model, guide, latent):
    if guide is not None:
        return guide, getattr(guide, "name", getattr(guide, "__name__", "guide"))
    from pyro.infer.autoguide import AutoNormal

    discrete = [n for n, s in latent.items() if s["fn"].support.is_discrete]
    return (AutoNormal(poutine.block(model, hide=discrete), init_loc_fn=unconstrained_value),
            "AutoNormal")


def _ascend(estimator: ScoreFunctionGradient, params: list[torch.Tensor],
            options: dict[str, Any], progress: bool) -> pd.DataFrame:
    """Robbins–Monro ascent with the window-average stopping rule; λ ends at its average."""
    window, steps = options["window"], options["steps"]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    mean_square = torch.zeros_like(flat)
    window_sum, previous_average = torch.zeros_like(flat), None
    elbo, change = np.full(steps, np.nan), np.full(steps, np.nan)
    converged = False
    with tqdm(total=steps, desc="BBVI", disable=not progress) as bar:
        for step in range(1, steps + 1):
            value, grads = estimator(params)
            gradient = torch.cat([g.reshape(-1) for g in grads])
            if not (np.isfinite(value) and bool(torch.isfinite(gradient).all())):
                raise InferenceError(
                    f"bbvi: the ELBO estimate or its gradient became non-finite at step {step};"
                    " lower learning_rate or check the guide's initial values")
            size = rho(step, options["learning_rate"], options["power"], options["delay"])
            if options["schedule"] == "scaled":
                mean_square += (gradient**2 - mean_square) / min(step, _MEMORY)
                size = size / (mean_square.sqrt() + 1e-12)
            flat = flat + size * gradient
            _assign(params, flat)
            elbo[step - 1] = value
            window_sum += flat
            if step % window == 0:
                average = window_sum / window
                if previous_average is not None:
                    change[step - 1] = float((average - previous_average).abs().max())
                    converged = change[step - 1] < options["tolerance"]
                previous_average, window_sum = average, torch.zeros_like(flat)
                if converged:
                    _assign(params, average)
                    elbo, change = elbo[:step], change[:step]
                    break
            if step % 50 == 0 or step == steps:
                bar.set_postfix(elbo=f"{value:.4g}", refresh=False)
                bar.update(step - bar.n)
    if not converged and previous_average is not None:
        _assign(params, previous_average)
    history = pd.DataFrame({"elbo": elbo, "lambda_change": change},
                           index=pd.RangeIndex(len(elbo), name="step"))
    history.attrs["converged"] = converged
    return history


def _assign(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    with torch.no_grad():
        for param, piece in zip(params, torch.split(flat, [p.numel() for p in params]),
                                strict=True):
            param.copy_(piece.reshape(param.shape))


def _check(options: dict[str, Any]) -> None:
    if options["num_samples"] < 2 and options["baseline"] == "leave_one_out":
        raise OptionError("bbvi: baseline='leave_one_out' needs num_samples >= 2")
