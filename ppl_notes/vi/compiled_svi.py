r"""SVI with the whole ELBO step compiled: one graph, one flat parameter vector, Adam.

Pyro's SVI step traces the guide, replays the model, differentiates, and updates each
parameter with its own optimiser: thousands of small Python operations per step. Here
the guide's parameters are gathered once into one flat unconstrained vector; the ELBO
estimate (Pyro's ``Trace_ELBO`` arithmetic on Pyro's own traces, so the estimator is
unchanged: reparameterised where the guide allows it, score-function terms otherwise)
and its gradient are captured as one graph of tensor operations with ``make_fx`` -- the
guide's random draws included, so each call draws fresh noise -- and compiled with
inductor (:mod:`ppl_notes.evaluation.compile`). Adam then updates the flat vector with
the same arithmetic as :class:`torch.optim.Adam`.

References
----------
Kingma, D. P. & Ba, J. (2015). Adam: A Method for Stochastic Optimization. ICLR.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero

from ppl_notes.evaluation.compile import capture, compiler_available


@dataclass
class AdamState:
    """Adam's moment estimates for a flat parameter vector (``torch.optim.Adam`` math)."""

    step: int
    first_moment: torch.Tensor
    second_moment: torch.Tensor


def adam_step(params: torch.Tensor, grad: torch.Tensor, state: AdamState, learning_rate: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """One Adam update of ``params`` (a pure function of its inputs; ``state`` is updated)."""
    beta1, beta2 = betas
    state.step += 1
    state.first_moment.mul_(beta1).add_(grad, alpha=1 - beta1)
    state.second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**state.step
    bias_correction2 = 1 - beta2**state.step
    denominator = (state.second_moment.sqrt() / bias_correction2**0.5).add_(eps)
    return params.addcdiv(state.first_moment, denominator, value=-learning_rate / bias_correction1)


@contextlib.contextmanager
def _parameters_from(store, names: list[str], values: list[torch.Tensor]):
    """Let ``pyro.param`` read these tensors as the unconstrained parameters."""
    saved = {name: store._params[name] for name in names}
    try:
        for name, value in zip(names, values, strict=True):
            store._params[name] = value
        yield
    finally:
        store._params.update(saved)


def trace_elbo_loss(elbo, model, guide, data) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Pyro's ``Trace_ELBO`` estimate and surrogate, kept as tensors.

    The same arithmetic as ``Trace_ELBO._differentiable_loss_particle``, without its
    conversions to Python floats (which a captured graph cannot contain):

    .. math:: \widehat{\mathrm{ELBO}} = \frac1S\sum_s \log p(x, z_s) - \log q(z_s),

    and a surrogate whose gradient adds the score-function term
    :math:`\log r \,\nabla\log q` for sites without reparameterised samples.
    """
    value, surrogate = 0.0, 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, (), data):
        particle, surrogate_particle, log_r = 0.0, 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                particle = particle + site["log_prob_sum"]
                surrogate_particle = surrogate_particle + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            particle = particle - site["log_prob_sum"]
            if not is_identically_zero(entropy_term):
                surrogate_particle = surrogate_particle - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                weight = log_r.sum_to(site["cond_indep_stack"])
                surrogate_particle = surrogate_particle + (weight * score_function_term).sum()
        value = value + particle / elbo.num_particles
        surrogate = surrogate + surrogate_particle / elbo.num_particles
    return -value, -surrogate


class CompiledELBO:
    """Negative ELBO and its gradient on a flat unconstrained parameter vector.

    Parameters
    ----------
    model, guide : callables
        The story (or its hand-marginalised form) and the guide.
    data : dict
        Prepared data.
    elbo : pyro.infer.Trace_ELBO
        Its particles settings and traces define the estimator (:func:`trace_elbo_loss`).
    """

    def __init__(self, model, guide, data: Mapping[str, Any], elbo) -> None:
        self.model, self.guide, self.data, self.elbo = model, guide, dict(data), elbo
        store = pyro.get_param_store()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elbo.loss(model, guide, **self.data)  # creates the parameters
        self.store = store
        self.names = list(store._params)
        self.shapes = [tuple(store._params[n].shape) for n in self.names]
        self.sizes = [store._params[n].numel() for n in self.names]
        self.initial = torch.cat([store._params[n].detach().reshape(-1) for n in self.names])
        self.compiled = self._compile()

    def _loss(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [p.reshape(s) for p, s in
                  zip(torch.split(flat, self.sizes), self.shapes, strict=True)]
        with _parameters_from(self.store, self.names, pieces):
            return trace_elbo_loss(self.elbo, self.model, self.guide, self.data)

    def _value_and_grad(self, flat: torch.Tensor):
        flat = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, surrogate = self._loss(flat)
            (grad,) = torch.autograd.grad(surrogate, flat)
        return loss.detach(), grad.detach()

    def _compile(self):
        return capture(lambda flat: self._value_and_grad(flat), self.initial.clone(),
                       compile=compiler_available())

    def __call__(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative ELBO estimate and its gradient at ``flat``."""
        return self.compiled(flat)

    def names_where(self, mask: torch.Tensor) -> list[str]:
        """The parameters with any element flagged in a flat ``mask``."""
        pieces = torch.split(mask, self.sizes)
        return [name for name, piece in zip(self.names, pieces, strict=True) if bool(piece.any())]

    def write_back(self, flat: torch.Tensor) -> None:
        """Store ``flat`` as the param store's unconstrained parameters."""
        for name, piece, shape in zip(self.names, torch.split(flat.detach(), self.sizes),
                                      self.shapes, strict=True):
            tensor = piece.reshape(shape).clone().requires_grad_(True)
            self.store._params[name] = tensor
            self.store._param_to_name[tensor] = name
