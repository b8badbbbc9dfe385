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

from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

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
                 draws: int = DRAWS, seed: int = 0) -> None:
        self.guide, self.data, self.write, self.read = guide, data, write, read
        self.loss, self.reduce = loss, reduce or (lambda values: values)
        self.draws, self.seed = draws, seed
        self.elements: int | None = None
        self.scale = 1

    def _log_q(self, trace) -> torch.Tensor:
        return sum(site["fn"].log_prob(site["value"]).sum()
                   for site in sample_sites(trace).values() if not site["is_observed"])

    def __call__(self, phi: list[torch.Tensor], psi: list[torch.Tensor]) -> float:
        """KL(q_phi || q_psi) per free parameter (module docstring)."""
        current = [p.detach().clone() for p in self.read()]
        try:
            with torch.no_grad(), pyro.poutine.seed(rng_seed=self.seed):
                self.write(phi)
                traces = [poutine.trace(self.guide).get_trace(**self.data)
                          for _ in range(self.draws)]
                at_phi = torch.stack([self._log_q(t) for t in traces])
                self.write(psi)
                at_psi = torch.stack([
                    self._log_q(poutine.trace(poutine.replay(self.guide, trace=t))
                                .get_trace(**self.data)) for t in traces])
        finally:
            self.write(current)
        self.elements = sum(site["value"].numel() for site in sample_sites(traces[0]).values()
                            if not site["is_observed"]
                            and not site["infer"].get("is_auxiliary"))
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
