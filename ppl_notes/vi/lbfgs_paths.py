r"""L-BFGS for several starting points at once, keeping each path's iterates and gradients.

Pathfinder (Zhang, Carpenter, Gelman & Vehtari 2022, JMLR 23(306)) builds a Gaussian at
every iterate of an L-BFGS run from the iterates and gradients it passed through; Gaussian
VI starts each restart where its path ended. Both need the whole path, and both run
several paths, so the paths here advance in lockstep: every iteration evaluates one
trial point per path in one call of the batched potential (the tape NUTS runs).

Each path minimises :math:`U(x) = -\log p(x)` (unconstrained, Jacobian included) by the
two-loop recursion over its last ``history`` pairs :math:`s = x_{l+1} - x_l`,
:math:`y = \nabla U(x_{l+1}) - \nabla U(x_l)` (Nocedal & Wright 2006, Algorithm 7.4,
initial scaling :math:`s^\top y / y^\top y`), with a backtracking line search that asks
for Armijo's sufficient decrease (:math:`c_1 = 10^{-4}`); a pair whose curvature
:math:`s^\top y` is not positive is not stored (as Pathfinder's Algorithm 3 drops it). A
path ends when its relative decrease is below ``tolerance``, its gradient vanishes, or
its line search fails (a density that grows without bound: a funnel's neck).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LBFGSPath", "lbfgs_paths"]

_ARMIJO = 1e-4
_MAX_HALVINGS = 40


@dataclass
class LBFGSPath:
    r"""One path: its accepted iterates, their potentials and gradients.

    Attributes
    ----------
    positions, gradients : list of ndarray
        :math:`x_0, \\dots, x_L` and :math:`\\nabla U` there.
    values : list of float
        :math:`U(x_l)`.
    stopped : str
        ``converged``, ``steps`` or ``line search`` (no decrease could be found).
    """

    positions: list[np.ndarray] = field(default_factory=list)
    gradients: list[np.ndarray] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    stopped: str = "steps"

    def pairs(self, last: int, history: int) -> tuple[np.ndarray, np.ndarray]:
        """The (s, y) pairs of positive curvature among ``history`` before iterate ``last``.

        As ``(pairs, d)`` arrays, oldest first.
        """
        s_list, y_list = [], []
        for at in range(max(0, last - history), last):
            s = self.positions[at + 1] - self.positions[at]
            y = self.gradients[at + 1] - self.gradients[at]
            if s @ y > 1e-12 * (y @ y):
                s_list.append(s)
                y_list.append(y)
        d = self.positions[0].shape[0]
        return (np.array(s_list).reshape(-1, d), np.array(y_list).reshape(-1, d))


def _direction(gradient: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    r""":math:`-H\nabla U` by the two-loop recursion."""
    q = gradient.copy()
    alphas = []
    for si, yi in zip(s[::-1], y[::-1], strict=True):
        alpha = (si @ q) / (yi @ si)
        q -= alpha * yi
        alphas.append(alpha)
    gamma = (s[-1] @ y[-1]) / (y[-1] @ y[-1]) if len(s) else 1.0
    r = gamma * q
    for si, yi, alpha in zip(s, y, alphas[::-1], strict=True):
        beta = (yi @ r) / (yi @ si)
        r += si * (alpha - beta)
    return -r


def lbfgs_paths(potential: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                starts: np.ndarray, max_iterations: int = 1000, history: int = 6,
                tolerance: float = 1e-8) -> tuple[list[LBFGSPath], int]:
    """Minimise ``potential`` from each row of ``starts``, in lockstep.

    Parameters
    ----------
    potential : callable
        ``points (K, d) -> (U (K,), grad U (K, d))`` for exactly ``len(starts)`` points.
    starts : ndarray
        ``(K, d)`` starting points.
    max_iterations : int
        Accepted iterations per path at most.
    history : int
        Pairs the two-loop recursion keeps (Pathfinder's default is 6).
    tolerance : float
        A path ends when an iteration lowers U by less than ``tolerance * max(1, |U|)``.

    Returns
    -------
    (list of LBFGSPath, int)
        The paths and the gradient evaluations spent (points evaluated).
    """
    starts = np.asarray(starts, dtype=float)
    count = starts.shape[0]
    values, grads = potential(starts)
    evaluations = count
    paths = [LBFGSPath([starts[i].copy()], [np.array(grads[i])], [float(values[i])])
             for i in range(count)]
    active = [i for i in range(count)
              if np.isfinite(values[i]) and np.isfinite(grads[i]).all()]
    for i in set(range(count)) - set(active):
        paths[i].stopped = "line search"
    steps = {i: 1.0 for i in active}
    halvings = {i: 0 for i in active}
    directions = {}
    while active:
        trial = np.array([p.positions[-1] for p in paths])
        for i in active:
            path = paths[i]
            if i not in directions:
                s, y = path.pairs(len(path.positions) - 1, history)
                direction = _direction(path.gradients[-1], s, y)
                if not len(s):  # the first step: at most a unit move
                    direction /= max(1.0, float(np.linalg.norm(direction)))
                if direction @ path.gradients[-1] >= 0:  # not a descent direction: restart
                    direction = -path.gradients[-1] / max(
                        1.0, float(np.linalg.norm(path.gradients[-1])))
                directions[i] = direction
            trial[i] = path.positions[-1] + steps[i] * directions[i]
        values, grads = potential(trial)
        evaluations += len(active)
        for i in list(active):
            path, direction = paths[i], directions[i]
            slope = float(direction @ path.gradients[-1])
            value = float(values[i])
            finite = np.isfinite(value) and np.isfinite(grads[i]).all()
            if finite and value <= path.values[-1] + _ARMIJO * steps[i] * slope:
                decrease = path.values[-1] - value
                path.positions.append(trial[i].copy())
                path.gradients.append(np.array(grads[i]))
                path.values.append(value)
                del directions[i]
                steps[i], halvings[i] = 1.0, 0
                if (decrease <= tolerance * max(1.0, abs(value))
                        or np.abs(grads[i]).max() <= 1e-10):
                    path.stopped = "converged"
                    active.remove(i)
                elif len(path.positions) > max_iterations:
                    active.remove(i)
                continue
            steps[i] /= 2
            halvings[i] += 1
            if halvings[i] > _MAX_HALVINGS:
                path.stopped = "line search"
                active.remove(i)
    return paths, evaluations


def inverse_hessian(path: LBFGSPath, history: int = 6, last: int | None = None) -> np.ndarray:
    r"""The L-BFGS estimate of :math:`(\nabla^2 U)^{-1}` at iterate ``last`` (default: the end).

    The BFGS inverse update :math:`H \leftarrow (I-\rho sy^\top)H(I-\rho ys^\top) + \rho
    ss^\top`, :math:`\rho = 1/s^\top y`, applied to :math:`H_0 = \gamma I` over the stored
    pairs: the matrix the two-loop recursion multiplies by, written out (``(d, d)``).
    """
    last = len(path.positions) - 1 if last is None else last
    s, y = path.pairs(last, history)
    d = path.positions[0].shape[0]
    gamma = (s[-1] @ y[-1]) / (y[-1] @ y[-1]) if len(s) else 1.0
    h = gamma * np.eye(d)
    for si, yi in zip(s, y, strict=True):
        rho = 1.0 / (si @ yi)
        left = np.eye(d) - rho * np.outer(si, yi)
        h = left @ h @ left.T + rho * np.outer(si, si)
    return (h + h.T) / 2
