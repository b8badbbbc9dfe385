r"""When SVI stops by itself: the convergence rule, and the iterate average it ends with.

``steps`` is a cap. Every :math:`W` steps (a *window*: 5% of the cap, at least 100) two
tests are made, and the run stops when both hold at two checks in a row:

1. **The ELBO has stopped moving.** With :math:`\bar L_k` the mean ELBO estimate over
   window :math:`k` and :math:`\hat\sigma^2` the per-step noise (half the variance of
   successive differences, which a slow trend does not inflate), the change's standard
   error is :math:`s = \hat\sigma\sqrt{2/W}`, and

   .. math:: |\bar L_k - \bar L_{k-1}| + 2s \le \varepsilon,

   i.e. with about 95% confidence the smoothed ELBO moved less than
   :math:`\varepsilon` = ``tolerance`` nats over the window. A change merely smaller
   than its noise is not enough: a slow climb hidden in a noisy estimator would stop
   early (6 nats short on posteriordb's arK, measured), so a noisy fit runs to its cap.
2. **The parameters have stopped drifting.** The ELBO is flat near its optimum, so a
   scale 6% short of the exact posterior's costs a few thousandths of a nat (measured on
   the conjugate Normal): the ELBO alone cannot see it. Each window's iterates are cut
   into 10 batches; for every parameter element, the difference of two windows' means is
   compared with its batch-means standard error (batch means absorb Adam's
   autocorrelation), and every :math:`|z|` must be below :math:`\max(2,
   \Phi^{-1}(1 - 0.025/n))` for :math:`n` elements (Bonferroni), so that jitter around a
   fixed point passes and a drift does not.

At the stop the parameters are set to the average of the last window's iterates
(Polyak & Juditsky 1992), which removes most of Adam's jitter around the optimum. Dhaka
et al. (2020), "Robust, Accurate Stochastic Optimization for Variational Inference"
(NeurIPS), argue for this combination: detect stationarity of the iterates, then average
them. A stop is not a proof of a good optimum: R-hat across restarts (``restarts=``) and
Pareto k-hat check that (:meth:`ppl_notes.posterior.Posterior.check`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["ConvergenceMonitor", "convergence_window", "elbo_settled", "parameters_settled"]

#: The smallest window, and the share of the step cap a window is otherwise
_MIN_WINDOW, _WINDOW_SHARE = 100, 0.05
#: Batches per window for the parameters' batch-means standard errors
BATCHES = 10
#: Standard errors a change may reach (before Bonferroni over many parameters)
Z = 2.0


def convergence_window(steps: int) -> int:
    """The window of the convergence rule: 5% of the step cap, at least 100 steps."""
    return max(_MIN_WINDOW, int(steps * _WINDOW_SHARE))


def elbo_settled(elbo: np.ndarray, window: int, tolerance: float) -> bool:
    """Test 1 of the module docstring on the ELBO estimates so far."""
    from ppl_notes.diagnostics import window_change

    change, standard_error = window_change(elbo, window)
    if not (np.isfinite(change) and np.isfinite(standard_error)):
        return False
    return abs(change) + Z * standard_error <= tolerance


def parameters_settled(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Test 2 of the module docstring: ``before``, ``after`` are (batches, elements) means."""
    from scipy.stats import norm

    batches, elements = after.shape
    difference = (after.mean(0) - before.mean(0)).abs()
    variance = (before.var(0) + after.var(0)) / batches
    limit = max(Z, float(norm.isf(0.025 / max(elements, 1))))
    drifting = difference > limit * variance.sqrt()
    return not bool(drifting.any())


class ConvergenceMonitor:
    """Apply the rule step by step: :meth:`observe` after every step.

    Parameters
    ----------
    steps : int
        The step cap (sets the window).
    tolerance : float
        The epsilon of test 1, in nats per window.
    read : callable
        Returns the parameters now (tensors; their shapes are kept).
    write : callable
        Takes tensors of the same shapes and makes them the parameters.
    """

    def __init__(self, steps: int, tolerance: float, read: Callable[[], list[torch.Tensor]],
                 write: Callable[[list[torch.Tensor]], None]) -> None:
        self.window = convergence_window(steps)
        self.batch = max(1, self.window // BATCHES)
        self.tolerance, self.read, self.write = tolerance, read, write
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._means: list[torch.Tensor] = []
        self._previous: torch.Tensor | None = None
        self._quiet = 0

    def observe(self, done: int, elbo: np.ndarray) -> bool:
        """Record the iterate after ``done`` steps; True once converged.

        The parameters are then the last window's average.
        """
        parameters = self.read()
        flat = torch.cat([p.detach().reshape(-1).double() for p in parameters])
        self._sum = flat.clone() if self._sum is None else self._sum.add_(flat)
        self._count += 1
        if done % self.batch == 0:
            self._means.append(self._sum / self._count)
            self._sum, self._count = None, 0
        if done % self.window != 0:
            return False
        means = torch.stack(self._means[-BATCHES:]) if len(self._means) >= 2 else None
        self._means = []
        quiet = (means is not None and self._previous is not None
                 and elbo_settled(elbo[:done], self.window, self.tolerance)
                 and parameters_settled(self._previous, means))
        self._previous = means
        self._quiet = self._quiet + 1 if quiet else 0
        if self._quiet < 2:
            return False
        average, start = means.mean(0), 0
        values = []
        for p in parameters:
            values.append(average[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        self.write(values)
        return True
