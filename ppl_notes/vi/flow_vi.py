r"""Fitting flows on the compiled potential: Adam on the sticking-the-landing gradient.

Each flow (:mod:`~ppl_notes.vi.flow_family`) maximises the ELBO

.. math:: \mathcal L(\phi) = \mathbb E_{\varepsilon}\big[-U(z_\phi(\varepsilon))
          - \log q_\phi(z_\phi(\varepsilon))\big],

with :math:`U` the potential NUTS runs (the negative log density of the unconstrained
space, Jacobians included), estimated at a fresh batch of standard-normal draws every
step. The potential and its gradient come from one batched call for every flow's draws
(no Pyro trace per step); the gradient reaches the flow's parameters through
:math:`z_\phi` by the chain rule, with the score term left out (sticking the landing:
Roeder, Wu & Duvenaud 2017, whose variance vanishes as q reaches the posterior, as
Agrawal, Sheldon & Domke 2020 use it for Real-NVP). Everything is float64.

Steps are Adam's (Kingma & Ba 2015), one for all restarts' flows (their parameters are
slices of the same tensors, and Adam's update is elementwise), :data:`FLOW_STEPS` of
them with the step size decaying exponentially from 1e-2 to 1e-3, so that the iterates
settle at the optimum rather than swing around it, as Robbins and Monro ask. A stopping
rule on the noisy ELBO was tried first (stop when a window of steps gains less than two
standard errors): on a banana it stopped at 350 steps, 0.11 nats short of
:math:`\log Z`, where the decaying schedule's 1000 steps come within 0.02 (``docs/vi.md``).
At the end each restart's ELBO is tested for having settled. A step where the potential
is not finite at some draw is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ppl_notes.vi.compiled_svi import AdamState, adam_step
from ppl_notes.vi.flow_family import Flows
from ppl_notes.vi.gaussian_vi import Potential

__all__ = ["FlowTrace", "fit_flows", "FLOW_STEPS", "LEARNING_RATES", "DRAWS_PER_STEP",
           "WINDOW", "GAIN_CHECK"]

#: Adam steps of a flow fit
FLOW_STEPS = 1000
#: Adam's first and last step size (the whitened coordinates have unit scale at the start)
LEARNING_RATES = (1e-2, 1e-3)
#: Draws of each flow per step
DRAWS_PER_STEP = 32
#: Steps per window of the settling test
WINDOW = 100
#: A last window's ELBO gain over the one before below this many nats is settled
SETTLED = 0.01
#: The step after which flows that gained nothing over their Gaussians are stopped
GAIN_CHECK = 200


@dataclass
class FlowTrace:
    """One flow's fit: the flow, and how it got there.

    Attributes
    ----------
    q : FlowRestart
        The fitted flow (one restart's of a :class:`~ppl_notes.vi.flow_family.Flows`).
    elbo : list of float
        The ELBO estimated at each step's draws (noisy: one batch each).
    evaluations : int
        Gradient evaluations of the potential.
    stopped : str
        ``steps`` (the schedule ran its course), ``no gain`` (no flow rose above its
        Gaussian's ELBO within :data:`GAIN_CHECK` steps), ``stalled`` (for a window of
        steps, no restart's draws were all finite) or ``interrupted`` (Ctrl-C).
    skipped : int
        Steps skipped because the potential was not finite at one of their draws.
    settled : bool
        Whether the ELBO had stopped rising at the end: its last window's mean less the
        one before is within two standard errors, or under :data:`SETTLED` nats.
    moves : list of float
        Empty: a flow's steps have no closed-form KL (the Gaussians' ``FitTrace`` has).
    """

    q: Any
    elbo: list[float] = field(default_factory=list)
    evaluations: int = 0
    stopped: str = "steps"
    skipped: int = 0
    settled: bool = False
    moves: list[float] = field(default_factory=list)


def _window_gain(elbo: list[float]) -> tuple[float, float]:
    """The last window's mean ELBO less the one before, and the difference's standard error."""
    last = np.asarray(elbo[-WINDOW:])
    before = np.asarray(elbo[-2 * WINDOW:-WINDOW])
    last, before = last[np.isfinite(last)], before[np.isfinite(before)]
    if len(last) < 2 or len(before) < 2:
        return math.nan, math.nan
    error = math.sqrt(last.var(ddof=1) / len(last) + before.var(ddof=1) / len(before))
    return float(last.mean() - before.mean()), error


def _gain_over(elbo: list[float], baseline: float) -> bool:
    """Whether the last window's mean ELBO is above ``baseline`` by two standard errors."""
    window = np.asarray(elbo[-WINDOW:])
    window = window[np.isfinite(window)]
    if len(window) < 2:
        return False
    return bool(window.mean() - baseline > 2 * window.std(ddof=1) / math.sqrt(len(window)))


def fit_flows(potential: Potential, flows: Flows, seed: int, steps: int = FLOW_STEPS,
              draws: int = DRAWS_PER_STEP, learning_rates: tuple[float, float] = LEARNING_RATES,
              baseline: float | None = None) -> list[FlowTrace]:
    """Fit every restart's flow in lockstep: one potential call per step for all their draws.

    Parameters
    ----------
    potential : callable
        ``points (N, d) -> (U (N,), grad U (N, d))`` (NumPy float64).
    flows : Flows
        The flows, at their start; fitted in place.
    seed : int
        Seeds the draws.
    steps : int
        Adam steps; the step size decays exponentially from the first of
        ``learning_rates`` to the second over them.
    draws : int
        Draws per flow per step.
    learning_rates : (float, float)
        Adam's first and last step size.
    baseline : float, optional
        The ELBO the flows must beat (their Gaussians'): where after
        :data:`GAIN_CHECK` steps no flow's last window is above it by two standard
        errors, the fit stops (``stopped="no gain"``): the posterior is as Gaussian as the
        Gaussian says, and the steps left would cost seconds for nothing.

    Returns
    -------
    list of FlowTrace
        One per restart, each holding that restart's view of ``flows``.
    """
    count, dim = flows.restarts, flows.dim
    traces = [FlowTrace(flows.restart(k)) for k in range(count)]
    generator = torch.Generator().manual_seed(seed)
    first, last = learning_rates
    # torch.optim.Adam's arithmetic on the flat vector of all flows' parameters (one
    # update of a few tensors; torch.optim would import torch._dynamo, 1.2 s, at its start)
    adam = AdamState(0, torch.zeros_like(flows.flat), torch.zeros_like(flows.flat))
    parameters = flows.parameters()
    try:
        for step in range(steps):
            learning_rate = first * (last / first) ** (step / max(steps - 1, 1))
            epsilon = torch.randn(count, draws, dim, generator=generator, dtype=torch.float64)
            points, log_q = flows.draw_for_training(epsilon)
            flat = points.detach().reshape(-1, dim).numpy()
            values, grads = potential(np.ascontiguousarray(flat))
            values = np.asarray(values, dtype=np.float64).reshape(count, draws)
            grads = np.asarray(grads, dtype=np.float64).reshape(count, draws, dim)
            finite = np.isfinite(values) & np.isfinite(grads).all(axis=-1)
            elbo = -(values + log_q.detach().numpy()).mean(axis=1)
            for k, trace in enumerate(traces):
                trace.evaluations += draws
                trace.elbo.append(float(elbo[k]) if finite[k].all() else math.nan)
            if not finite.all():  # a step that cannot be taken at every draw is skipped
                for trace in traces:
                    trace.skipped += 1
                if step + 1 >= WINDOW and not any(np.isfinite(t.elbo[-WINDOW:]).any()
                                                  for t in traces):
                    for trace in traces:
                        trace.stopped = "stalled"
                    return traces
                continue
            # d/dphi of mean(U(z) + log q(z)), each restart's: U's gradient enters through z
            loss = ((points * torch.from_numpy(grads)).sum() + log_q.sum()) / draws
            for parameter in parameters:
                parameter.grad = None
            loss.backward()
            with torch.no_grad():
                flows.flat.copy_(adam_step(flows.flat, flows.flat_grad(), adam, learning_rate))
            if baseline is not None and step + 1 == GAIN_CHECK and not any(
                    _gain_over(trace.elbo, baseline) for trace in traces):
                for trace in traces:
                    trace.stopped = "no gain"
                return traces
    except KeyboardInterrupt:
        for trace in traces:
            trace.stopped = "interrupted"
        return traces
    for trace in traces:
        gain, error = _window_gain(trace.elbo)
        trace.settled = bool(math.isfinite(gain) and gain <= max(2 * error, SETTLED))
    return traces
