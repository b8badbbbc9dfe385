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
   the conjugate Normal): the ELBO alone cannot see it. The iterates of the last two
   windows are treated as two chains, and every parameter element's R-hat between them
   must be at most 1.1 (Dhaka et al. 2020 use R-hat of the iterates this way; Gelman &
   Rubin 1992): the windows' means differ by less than about 0.65 of the iterates' own
   spread, so Adam's jitter around a fixed point passes and a drift does not -- unless
   the change is below a tenth of one Adam step (``0.1 * learning_rate``, in the
   unconstrained units Adam moves in): near a noiseless optimum (an exact family, a
   decayed rate) the iterates creep without jitter, and a creep that slow no longer
   matters. (A test of the change against its batch-means standard error was tried
   first: Adam's iterates wander with a correlation time longer than the batches, and it
   called every stationary fit of the conjugate Normal "drifting".)

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
#: Standard errors the ELBO's change plus its noise may reach
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


#: The largest R-hat between two windows' iterates that counts as settled
RHAT = 1.1


def parameters_settled(before: tuple[torch.Tensor, torch.Tensor],
                       after: tuple[torch.Tensor, torch.Tensor], size: int,
                       floor: float = 0.0) -> bool:
    """Test 2 of the module docstring.

    ``before`` and ``after`` are (mean, variance) of each element's ``size`` iterates in
    two windows; a change below ``floor`` never counts as a drift.
    """
    (mean_1, var_1), (mean_2, var_2) = before, after
    within = (var_1 + var_2) / 2
    between_over_n = (mean_1 - mean_2) ** 2 / 2  # B / n for two chains
    pooled = (size - 1) / size * within + between_over_n
    rhat = torch.sqrt(pooled / within.clamp(min=1e-300))
    drifting = (rhat > RHAT) & ((mean_1 - mean_2).abs() > floor)
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
    floor : float
        Changes below it are never a drift (test 2): a tenth of Adam's learning rate.
    """

    def __init__(self, steps: int, tolerance: float, read: Callable[[], list[torch.Tensor]],
                 write: Callable[[list[torch.Tensor]], None], floor: float = 0.0) -> None:
        self.floor = floor
        self.window = convergence_window(steps)
        self.tolerance, self.read, self.write = tolerance, read, write
        self._sum: torch.Tensor | None = None
        self._squares: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        self._count = 0
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._quiet = 0

    def observe(self, done: int, elbo: np.ndarray) -> bool:
        """Record the iterate after ``done`` steps; True once converged.

        The parameters are then the last window's average.
        """
        parameters = self.read()
        flat = torch.cat([p.detach().reshape(-1).double() for p in parameters])
        if self._sum is None:  # sums about the window's first iterate: no cancellation
            self._shift = flat.clone()
            self._sum, self._squares = torch.zeros_like(flat), torch.zeros_like(flat)
        centred = flat - self._shift
        self._sum.add_(centred)
        self._squares.add_(centred**2)
        self._count += 1
        if done % self.window != 0:
            return False
        count = self._count
        centred_mean = self._sum / count
        mean = self._shift + centred_mean
        moments = (mean, (self._squares / count - centred_mean**2).clamp(min=0) * count
                   / max(count - 1, 1))
        self._sum, self._squares, self._count = None, None, 0
        quiet = (count == self.window and self._previous is not None
                 and elbo_settled(elbo[:done], self.window, self.tolerance)
                 and parameters_settled(self._previous, moments, count, self.floor))
        self._previous = moments if count == self.window else None
        self._quiet = self._quiet + 1 if quiet else 0
        if self._quiet < 2:
            return False
        average, start = mean, 0
        values = []
        for p in parameters:
            values.append(average[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        self.write(values)
        return True
