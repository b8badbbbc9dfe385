r"""How far a guide moved between two parameter values, as a KL divergence.

For parameters :math:`\phi` and :math:`\psi` of one guide, write
:math:`r(\theta) = \log q_\psi(\theta) - \log q_\phi(\theta)`. Since
:math:`\mathbb E_{q_\phi}[e^{r}] = 1`, expanding the exponential gives

.. math::

    \mathrm{KL}(q_\phi \,\|\, q_\psi) = -\mathbb E_{q_\phi}[r]
      = \tfrac12\,\mathbb E_{q_\phi}[r^2] + O(\|\psi-\phi\|^3),

the Fisher-metric form of the KL divergence (Amari 1998). The second form is the one
estimated here, from ``draws`` draws of :math:`q_\phi`: for a small move its relative
standard error is about :math:`\sqrt{2/M}` whatever the size of the move, where the
first form's absolute error, :math:`\mathrm{sd}(r)/\sqrt M`, is of the order of
:math:`\sqrt{\mathrm{KL}/M}` and swamps a small KL. The draws come from a fixed seed, so
every call compares guides on the same noise and leaves the caller's random stream as it
was.

The number is divided by the guide's free parameters (the elements the optimiser moves),
or by as many as a full-rank Gaussian over the latent elements has, :math:`n + n(n+1)/2`,
where that is fewer (a network guide: most weights barely move the distribution). So one
threshold serves a guide of two sites and one of two hundred, and a mean-field guide and
a full-rank one: stochastic gradients jitter every parameter, and each adds its share to
the KL, so a full-rank guide's jitter in KL is about :math:`(n+3)/4` times a mean-field
guide's on the same story. For a mean-field Gaussian a move of every mean by :math:`d`
posterior sds gives :math:`d^2/4` per parameter. This is the measure RAABBVI's stopping
rule is built
on (Welandawe, Andersen, Vehtari & Huggins 2022, "Robust, Automated, and Accurate
Black-box Variational Inference", arXiv:2203.15945: the symmetrised KL between
successive iterate averages).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide

from ppl_notes._sites import sample_sites

__all__ = ["GuideDistance"]

#: Draws of the guide per distance (relative standard error about sqrt(2 / 32) = 25%)
DRAWS = 32


class GuideDistance:
    r"""How far the guide moved (``distance(phi, psi)``), and its ELBO at a point (``elbo``).

    ``distance(phi, psi)`` is KL(q_phi || q_psi) per free parameter, estimated as in the
    module docstring. ``elbo(phi)`` is the ELBO of the guide at ``phi``, one value per
    draw, each draw from its own fixed seed: the ELBOs of two parameter values are then
    compared on common random numbers, so their difference has a standard error that
    shrinks with the move instead of the ELBO's own Monte Carlo noise.

    Parameters
    ----------
    guide : callable
        The guide, called as ``guide(**data)``.
    data : mapping
        Its arguments.
    write : callable
        Takes a list of tensors and makes them the guide's parameters (as the optimiser
        sees them); the caller's values are put back after each call.
    read : callable
        Returns the guide's parameters now.
    loss : callable, optional
        ``loss()``: minus a one-draw ELBO estimate at the parameters now (Pyro's
        ``ELBO.loss`` with ``num_particles=1``); needed by :meth:`elbo` only.
    reduce : callable, optional
        Applied to every per-draw tensor before it is summarised: data-parallel SVI
        passes the mean over its processes, so that every process takes the same
        decision.
    draws : int
        Draws of q_phi per estimate.
    seed : int
        The seed of those draws (the same for every call: common random numbers).
    particle_dim : int, optional
        A dimension left of every plate of the story (``-(max_plate_nesting + 1)``):
        the draws of a Pyro autoguide are then made in one vectorised trace, in a plate
        at that dimension, where it runs so.

    Attributes
    ----------
    elements : int or None
        The latent elements the guide draws (known after the first distance).
    scale : int
        What a KL is divided by: the free parameters, at most a full-rank Gaussian's
        (known after the first distance).
    """

    def __init__(self, guide: Callable, data: Mapping[str, Any],
                 write: Callable[[list[torch.Tensor]], None],
                 read: Callable[[], list[torch.Tensor]],
                 loss: Callable[[], float] | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 draws: int = DRAWS, seed: int = 0, particle_dim: int | None = None) -> None:
        self.guide, self.data, self.write, self.read = guide, data, write, read
        # Pyro's autoguides are written to run in an outer plate (vectorize_particles);
        # a guide function may not be, and may not fail where it is not (a sum over all
        # of a tensor's dimensions): it is drawn one draw at a time
        self.particle_dim = particle_dim if isinstance(guide, AutoGuide) else None
        # whether the draws are made in one trace: known after the first draws
        self._vectorised: bool | None = None if self.particle_dim is not None else False
        self.loss, self.reduce = loss, reduce or (lambda values: values)
        self.draws, self.seed = draws, seed
        self.elements: int | None = None
        self.scale = 1
        # q_phi's draws and their log densities, kept for the next distance from the
        # same phi (the stopping rule measures each window's average against two others)
        self._drawn: tuple[list[torch.Tensor], list, torch.Tensor] | None = None

    def _log_q(self, trace) -> torch.Tensor:
        return sum(site["fn"].log_prob(site["value"]).sum()
                   for site in sample_sites(trace).values() if not site["is_observed"])

    def _log_q_per_draw(self, trace) -> torch.Tensor | None:
        """``(draws,)`` log densities of a trace drawn in the draws' plate, or None.

        None where some site's log density does not carry the draws' dimension (a guide
        that ignores an outer plate): its draws are not ``draws`` independent ones.
        """
        total, depth = torch.zeros(self.draws, dtype=torch.float64), -self.particle_dim
        for site in sample_sites(trace).values():
            if site["is_observed"]:
                continue
            log_prob = site["fn"].log_prob(site["value"])
            log_prob = log_prob.reshape((1,) * (depth - log_prob.dim()) + log_prob.shape)
            if log_prob.dim() != depth or log_prob.shape[0] != self.draws:
                return None
            total = total + log_prob.reshape(self.draws, -1).sum(-1).double()
        return total

    def _in_plate(self, guide):
        return pyro.plate("_guide_distance_draws", self.draws, dim=self.particle_dim)(guide)

    def _drawn_at_phi(self) -> tuple[list, torch.Tensor]:
        """q_phi's draws (traces) and their log densities ``(draws,)``, at the parameters now.

        In one vectorised trace, the draws' plate outside the guide's own (as Pyro's
        ``vectorize_particles``), where ``particle_dim`` is given and the guide runs so:
        one call instead of ``draws`` (an IAF guide's distances cost more than its
        steps, drawn one by one). Else, or where the guide fails in the plate, one trace
        per draw.
        """
        if self.particle_dim is not None and self._vectorised is not False:
            try:
                trace = poutine.trace(self._in_plate(self.guide)).get_trace(**self.data)
                at_phi = self._log_q_per_draw(trace)
            except Exception:  # noqa: BLE001 - a guide that cannot run in a plate: one by one
                at_phi = None
            self._vectorised = at_phi is not None and bool(torch.isfinite(at_phi).all())
            if self._vectorised:
                return [trace], at_phi
        traces = [poutine.trace(self.guide).get_trace(**self.data) for _ in range(self.draws)]
        return traces, torch.stack([self._log_q(t) for t in traces])

    def _at_psi(self, traces: list) -> torch.Tensor:
        """The log densities of the guide, at the parameters now, at ``traces``' draws."""
        if self._vectorised:
            replayed = poutine.replay(self._in_plate(self.guide), trace=traces[0])
            return self._log_q_per_draw(poutine.trace(replayed).get_trace(**self.data))
        return torch.stack([
            self._log_q(poutine.trace(poutine.replay(self.guide, trace=t))
                        .get_trace(**self.data)) for t in traces])

    def __call__(self, phi: list[torch.Tensor], psi: list[torch.Tensor]) -> float:
        """KL(q_phi || q_psi) per free parameter (module docstring)."""
        current = [p.detach().clone() for p in self.read()]
        try:
            with torch.no_grad(), pyro.poutine.seed(rng_seed=self.seed):
                if self._drawn is not None and self._drawn[0] is phi:
                    traces, at_phi = self._drawn[1:]  # the window's other lag drew them
                else:
                    self.write(phi)
                    traces, at_phi = self._drawn_at_phi()
                    self._drawn = phi, traces, at_phi
                self.write(psi)
                at_psi = self._at_psi(traces)
        except (KeyError, NotImplementedError):
            # a flow Pyro cannot invert (BlockAutoregressive) has no density at draws it
            # did not make: no distance, and the fit runs its steps
            return math.nan
        finally:
            self.write(current)
        elements = sum(site["value"].numel() for site in sample_sites(traces[0]).values()
                       if not site["is_observed"] and not site["infer"].get("is_auxiliary"))
        self.elements = elements // self.draws if self._vectorised else elements
        parameters = sum(p.numel() for p in phi)
        self.scale = max(min(parameters, self.elements * (self.elements + 3) // 2), 1)
        ratio = (at_psi - at_phi).double()
        return float(self.reduce(0.5 * (ratio**2).mean())) / self.scale

    def elbo(self, phi: list[torch.Tensor]) -> torch.Tensor:
        """The one-draw ELBO estimates at ``phi``, ``(draws,)``, on fixed seeds."""
        current = [p.detach().clone() for p in self.read()]
        values = []
        try:
            self.write(phi)
            with torch.no_grad():
                for draw in range(self.draws):
                    with pyro.poutine.seed(rng_seed=self.seed + 1 + draw):
                        values.append(-float(self.loss()))
        finally:
            self.write(current)
        return self.reduce(torch.tensor(values, dtype=torch.float64))
