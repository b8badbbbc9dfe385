r"""When SVI stops by itself: the convergence rule, and the iterate average it ends with.

``steps`` is a cap. The run is cut into *windows* of :math:`W` steps (5% of the cap, at
least 100), and each window's iterates are averaged (Polyak & Juditsky 1992):
:math:`\bar\phi_k`. Adam at a constant rate never stops jittering, but the averages do
stop moving once the iterates are stationary. How far the *guide* moved is measured as
a KL divergence per free parameter (:mod:`ppl_notes.vi.guide_distance`), so the
yardstick is the posterior's own width, not the parameters' units or the ELBO's noise:

.. math::

    D_{k,j} = \mathrm{KL}\big(q_{\bar\phi_k} \,\|\, q_{\bar\phi_j}\big) / p .

The run stops at the end of window :math:`k` when the guide has stopped moving and the
ELBO has stopped rising:

.. math::

    D_{k,k-1} \le \varepsilon, \quad D_{k,h} \le \varepsilon
    \quad\text{and}\quad G_k \le \varepsilon\, p,

with :math:`\varepsilon` = ``tolerance`` (default 0.01), :math:`h = \min(k-2,
\lfloor k/2 \rfloor)` the window half the run back (windows counted from 0, the first
check at :math:`k = 2`) and :math:`G_k = \mathrm{ELBO}(\bar\phi_k) -
\mathrm{ELBO}(\bar\phi_h)`, both ELBOs
estimated on the same 32 fixed draws of the base noise (common random numbers), so
:math:`G_k`'s Monte Carlo error shrinks with the move instead of carrying the ELBO's own
noise (its standard error is reported). The parameters are then the average of the last
three windows' iterates (Polyak & Juditsky 1992): the test has just found them
stationary, and averaging all three takes out more of Adam's wander than one window.

- **The distances.** :math:`\varepsilon = 0.01` lets every mean of a mean-field Gaussian
  move by at most a fifth of a posterior sd (:math:`d^2/4` per parameter). The long lag
  is half the run, because jitter of the averages saturates with the lag while a drift's
  distance grows with its square: a scale creeping towards its optimum by 5% a window
  passes any fixed lag (its KL is 0.0025 a window) and stopped hand-written guides of
  the conjugate Normal 15% wide of the closed form (measured); half the run back it has
  moved by its whole remaining distance. A fit that starts at its optimum (an autoguide
  from the Laplace start on a Gaussian posterior) stops at the first check; one with a
  transient of T steps stops near 2T. The tolerance must sit above the jitter's floor,
  which constant-rate Adam never lowers (running longer only averages the same wander
  again): at lag 2 on eight schools it is about 0.005 per parameter for both guides.
- **The ELBO's gain**, in the same units: near the optimum the ELBO lost by a guide is
  its KL divergence from the optimal one, so averages that jitter by :math:`\varepsilon`
  per parameter make the ELBO wobble by about :math:`\varepsilon p`; a steady rise beyond
  that is a transient. A guide that is wide where the posterior is wide moves a long way
  in the story's units while moving little against its own width: eight schools'
  full-rank guide, from the Laplace start at :math:`\tau \approx 27`, travels to
  :math:`\tau \approx 3` over 1000 steps at 0.005 per parameter a window, while its ELBO
  rises by 0.8-1.0 nats every two windows (:math:`\varepsilon p` = 0.65). The distances
  alone stopped that fit at its first check (measured). The point estimate is tested,
  not an upper bound: with one or two latent elements, :math:`\varepsilon p` is 0.02-0.05
  nats, no more than :math:`G_k`'s own standard error, and a test with two standard
  errors to spare sent the conjugate Normal to its cap.

This is the idea of RAABBVI (Welandawe et al. 2022, arXiv:2203.15945: the symmetrised KL
between successive iterate averages, against a tolerance) and of Dhaka et al. (2020),
"Robust, Accurate Stochastic Optimization for Variational Inference" (NeurIPS): detect
that the iterates are stationary, then average them. At the stop the parameters are set
to the last window's average, which removes most of Adam's jitter around the optimum.

Two tests it replaced, both measured on posteriordb (benchmarks/vi_verdicts.py):

- *The windowed ELBO changed by less than 0.1 nats, with 2 standard errors to spare.*
  The ELBO's own Monte Carlo noise is larger than that on most stories (eight schools:
  2 SE = 0.4-1.0 nats a window), so every fit ran to its cap.
- *R-hat between two windows' iterates at most 1.1.* Constant-rate Adam's iterates wander
  with a correlation time longer than a window, so stationary fits read 2.5-5.5 on
  eight schools and never passed.

A stop is not a proof of a good optimum: R-hat across restarts (``restarts=``) and
Pareto k-hat check that (:meth:`ppl_notes.posterior.Posterior.check`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ppl_notes.diagnostics import window_change
from ppl_notes.vi.guide_distance import GuideDistance

__all__ = ["ELBO_TOLERANCE", "ConvergenceMonitor", "convergence_window", "elbo_settled"]

#: The smallest window, and the share of the step cap a window is otherwise
_MIN_WINDOW, _WINDOW_SHARE = 100, 0.05
#: Standard errors the ELBO's change plus its noise may reach, and the nats they must fit
#: in (elbo_settled)
Z, ELBO_TOLERANCE = 2.0, 0.1


def long_lag(windows: int) -> int:
    """The longer lag of the rule after ``windows`` windows: half the run, at least 2."""
    return max(2, math.ceil((windows - 1) / 2))


def convergence_window(steps: int) -> int:
    """The window of the convergence rule: 5% of the step cap, at least 100 steps."""
    return max(_MIN_WINDOW, int(steps * _WINDOW_SHARE))


def elbo_settled(elbo: np.ndarray, window: int, tolerance: float) -> bool:
    r"""Whether the last two windows' mean ELBOs differ by less than ``tolerance`` nats.

    With :math:`\hat\sigma^2` the per-step noise (half the variance of successive
    differences, which a slow trend does not inflate), the change's standard error is
    :math:`s = \hat\sigma\sqrt{2/W}`, and the test is
    :math:`|\bar L_k - \bar L_{k-1}| + 2s \le` ``tolerance``. Reported with a fit
    (``info["elbo_settled"]``); no longer what stops it (module docstring).
    """
    change, standard_error = window_change(elbo, window)
    if not (np.isfinite(change) and np.isfinite(standard_error)):
        return False
    return abs(change) + Z * standard_error <= tolerance


class ConvergenceMonitor:
    r"""Apply the rule step by step: :meth:`observe` after every step.

    Parameters
    ----------
    steps : int
        The step cap (sets the window).
    tolerance : float
        The :math:`\varepsilon` of the rule: KL per free parameter.
    read : callable
        Returns the parameters now (tensors; their shapes are kept).
    write : callable
        Takes tensors of the same shapes and makes them the parameters.
    distance : GuideDistance
        ``distance(phi, psi)``: KL(q_phi || q_psi) per free parameter, for two lists of
        parameters, and ``distance.elbo(phi)``: per-draw ELBOs on fixed seeds
        (:class:`ppl_notes.vi.guide_distance.GuideDistance`).

    Attributes
    ----------
    moves : list of tuple
        At each window's end from the third on: the step, :math:`D_{k,k-1}`,
        :math:`D_{k,h}`, and the ELBO's gain :math:`G_k` and its standard error (NaN
        where the distances already failed, and the ELBO was not evaluated).
    """

    def __init__(self, steps: int, tolerance: float, read: Callable[[], list[torch.Tensor]],
                 write: Callable[[list[torch.Tensor]], None],
                 distance: GuideDistance) -> None:
        self.window = convergence_window(steps)
        self.tolerance, self.read, self.write, self.distance = tolerance, read, write, distance
        self._sum: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        self._count = 0
        self._averages: list[dict] = []  # per window: its average ("flat", "values"), ELBOs
        self.moves: list[tuple[int, float, float, float, float]] = []

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        values, start = [], 0
        for p in self.read():
            values.append(flat[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        return values

    def observe(self, done: int, elbo: np.ndarray) -> bool:  # noqa: ARG002 - the loop's call
        """Record the iterate after ``done`` steps; True once converged.

        The parameters are then the average of the last three windows' iterates.
        """
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.read()])
        if self._sum is None:  # sums about the window's first iterate: no cancellation
            self._shift, self._sum = flat.clone(), torch.zeros_like(flat)
        self._sum.add_(flat - self._shift)
        self._count += 1
        if done % self.window != 0:
            return False
        full = self._count == self.window
        flat_average = self._shift + self._sum / self._count
        average = self._unflatten(flat_average)
        self._sum, self._count = None, 0
        if not full:  # a resumed run's first, partial window
            self._averages = []
            return False
        self._averages.append({"flat": flat_average, "values": average})
        if len(self._averages) < 3:
            return False
        lags = (1, long_lag(len(self._averages)))
        moves = [self.distance(average, self._averages[-1 - lag]["values"]) for lag in lags]
        gain, standard_error = math.nan, math.nan
        if max(moves) <= self.tolerance and self.distance.loss is not None:
            gain, standard_error = self._gain(self._averages[-1 - lags[1]], self._averages[-1])
        self.moves.append((done, *moves, gain, standard_error))
        if max(moves) > self.tolerance:
            return False
        if self.distance.loss is not None and not gain <= self.tolerance * self.distance.scale:
            return False
        self.write(self._unflatten(torch.stack([a["flat"] for a in self._averages[-3:]])
                                   .mean(0)))
        return True

    def _gain(self, before: dict, after: dict) -> tuple[float, float]:
        """The ELBO's gain from one window average to another, and its standard error."""
        for average in (before, after):
            if "elbo" not in average:
                average["elbo"] = self.distance.elbo(average["values"])
        difference = after["elbo"] - before["elbo"]
        return (float(difference.mean()),
                float(difference.std() / math.sqrt(len(difference))))
