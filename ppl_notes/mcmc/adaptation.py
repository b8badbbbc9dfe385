r"""Warmup: the step size by dual averaging, the metric in windows.

* :class:`DualAveraging`: Nesterov's dual averaging of the log step size towards a target
  acceptance (Hoffman & Gelman 2014);
* :class:`WarmupSchedule` and :class:`_StanWindows`: Stan's windows (a fast start, slow
  windows that double, a fast end), the metric set from each slow window's draws;
* :class:`_SwitchingWindows`: nutpie's windows, which follow every draw: two estimators
  overlap and the newer takes over.

References
----------
Stan Development Team. Stan Reference Manual, "MCMC Sampling" (windowed adaptation).
Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Preconditioning Hamiltonian Monte Carlo
by minimizing Fisher divergence (nutpie).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ppl_notes.mcmc.metrics import _FisherDiagonal, _LowRankFisher


@dataclass
class DualAveraging:
    """Nesterov dual averaging of log step size towards a target acceptance (H&G 2014)."""

    target: float
    mu: float = 0.0
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75
    counter: int = 0
    s_bar: float = 0.0
    x_bar: float = 0.0

    def restart(self, step_size: float) -> None:
        """Start again around ``10 * step_size`` (after each mass-matrix update)."""
        self.mu = math.log(10 * step_size)
        self.counter, self.s_bar, self.x_bar = 0, 0.0, 0.0

    def update(self, accept_prob: float) -> float:
        """Take one acceptance statistic; return the next step size."""
        self.counter += 1
        accept_prob = min(1.0, accept_prob)
        eta = 1.0 / (self.counter + self.t0)
        self.s_bar = (1 - eta) * self.s_bar + eta * (self.target - accept_prob)
        x = self.mu - self.s_bar * math.sqrt(self.counter) / self.gamma
        weight = self.counter ** (-self.kappa)
        self.x_bar = (1 - weight) * self.x_bar + weight * x
        return math.exp(x)

    def final(self) -> float:
        """The averaged step size used after warmup."""
        return math.exp(self.x_bar)


@dataclass
class WarmupSchedule:
    """Stan's windows: a fast initial buffer, doubling slow windows, a terminal buffer."""

    num_warmup: int
    init_buffer: int = 75
    term_buffer: int = 50
    base_window: int = 25
    window_ends: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.num_warmup
        if n < 20:
            self.init_buffer, self.term_buffer, self.base_window = n, 0, 0
            return
        if self.init_buffer + self.base_window + self.term_buffer > n:
            self.init_buffer = int(0.15 * n)
            self.term_buffer = int(0.1 * n)
            self.base_window = n - self.init_buffer - self.term_buffer
        end_of_slow = n - self.term_buffer
        start, size = self.init_buffer, self.base_window
        while start < end_of_slow:
            end = start + size
            if end + 2 * size > end_of_slow:
                end = end_of_slow
            self.window_ends.append(end)
            start, size = end, 2 * size

    def in_slow_window(self, iteration: int) -> bool:
        """Whether draws at ``iteration`` feed the mass-matrix estimate."""
        return bool(self.window_ends) and self.init_buffer <= iteration < self.window_ends[-1]


class _StanWindows:
    """Stan's warmup: the metric is estimated afresh over each doubling slow window."""

    def __init__(self, num_warmup: int, new_window: Callable) -> None:
        self.schedule, self.new_window = WarmupSchedule(num_warmup), new_window
        self.window = new_window()

    def update(self, iteration: int, q: np.ndarray, grad: np.ndarray):
        """Take the draw after ``iteration``: ``(new metric or None, restart step size)``."""
        if self.schedule.in_slow_window(iteration):
            self.window.add(q, grad)
        if iteration + 1 in self.schedule.window_ends:
            metric, self.window = self.window.metric(), self.new_window()
            return metric, True
        return None, False


class _SwitchingWindows:
    """nutpie's warmup: the metric follows every draw, from a window that keeps moving.

    Two estimators take every warmup draw. The metric is re-estimated after each draw from
    the foreground one; when the background one holds ``switch`` draws (10 in the first
    30% of warmup, 80 after) it becomes the foreground and a fresh background starts, so
    the estimate always rests on the last one to two windows of draws and forgets the
    transient. The last 15% of warmup adapts the step size only, to the metric it starts
    with: dual averaging starts afresh there, so the final step size averages over that
    metric alone (nutpie's final step-size window; without the restart the average also
    spans the early, coarser metrics, and on posteriordb's GP it left 218 divergences in
    4000 draws). The step size is also searched for again at the first change of metric;
    between, dual averaging follows the changing metric.
    (nuts-rs ``GlobalStrategy``: ``early_window`` 0.3, ``step_size_window`` 0.15,
    switch frequencies 10 and 80.) An estimator whose ``update_every`` is above 1 (the
    low-rank one: SVDs and eigendecompositions, milliseconds at a hundred parameters) is
    re-estimated at each switch and every ``update_every`` draws between.
    """

    def __init__(self, num_warmup: int, new_window: Callable, early: float = 0.3,
                 final: float = 0.15, early_switch: int = 10, switch: int = 80) -> None:
        self.early_end = int(early * num_warmup)
        self.final_start = num_warmup - int(final * num_warmup)
        self.early_switch, self.switch, self.new_window = early_switch, switch, new_window
        self.foreground, self.background = new_window(), new_window()
        self.changed = False
        self.update_every = getattr(self.foreground, "update_every", 1)

    def update(self, iteration: int, q: np.ndarray, grad: np.ndarray):
        """Take the draw after ``iteration``: ``(new metric or None, restart step size)``."""
        if iteration >= self.final_start:
            return None, False
        self.foreground.add(q, grad)
        self.background.add(q, grad)
        switch = self.early_switch if iteration < self.early_end else self.switch
        switched = self.background.n >= switch and iteration + switch <= self.final_start
        if switched:
            self.foreground, self.background = self.background, self.new_window()
        last = iteration + 1 == self.final_start
        if self.foreground.n < 3 or not (switched or last or iteration % self.update_every == 0):
            return None, False
        first, self.changed = not self.changed, True
        return self.foreground.metric(), first or last


#: The windows that estimate the metric from draws and gradients, by adaptation name.
_GRADIENT_WINDOWS = {"fisher": _FisherDiagonal, "lowrank": _LowRankFisher}
