r"""One NUTS transition in Python: the specification the C transition is held to.

Stan's ``base_nuts``: multinomial sampling with biased progressive sampling at the top of
the tree, the generalised no-U-turn criterion with the extra checks across merged
subtrees, a divergence when the energy error exceeds :data:`MAX_ENERGY_ERROR`. The tree is
built by generators that yield the positions whose potential and gradient they need, so
one driver can serve many chains. :mod:`ppl_notes.native.trajectory` is the same
transition in C, with the same uniforms (:class:`~ppl_notes.native.trajectory.SplitMix64`)
and the same decisions; ``tests/test_trajectory.py`` holds the two equal, draw for draw.

References
----------
Hoffman, M. D. & Gelman, A. (2014). The No-U-Turn Sampler. JMLR 15.
Betancourt, M. (2017). A Conceptual Introduction to Hamiltonian Monte Carlo. arXiv:1701.02434.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ppl_notes.mcmc.metrics import Metric
from ppl_notes.native.trajectory import SplitMix64, Transition, TransitionRequest

MAX_ENERGY_ERROR = 1000.0


@dataclass
class _Point:
    """A point of the trajectory: position, momentum, potential, gradient."""

    q: np.ndarray
    p: np.ndarray
    potential: float
    grad: np.ndarray


@dataclass
class _Subtree:
    """What building a subtree returns besides the moved end point."""

    valid: bool
    proposal: _Point
    log_sum_weight: float
    rho: np.ndarray
    p_sharp_begin: np.ndarray
    p_sharp_end: np.ndarray
    p_begin: np.ndarray
    p_end: np.ndarray
    num_steps: int
    sum_accept: float
    diverging: bool


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _criterion(p_sharp_minus, p_sharp_plus, rho) -> bool:
    return float(p_sharp_plus @ rho) > 0 and float(p_sharp_minus @ rho) > 0


def _no_u_turn(rho, rho_left, sharp_left_begin, sharp_left_end, p_left_end,
               rho_right, sharp_right_begin, sharp_right_end, p_right_begin) -> bool:
    """Stan's generalised no-U-turn check of two adjacent subtrees (left is backward).

    Across the whole (momentum sum ``rho``), and across each join with the neighbouring
    end point: the extra checks of Stan's ``base_nuts``.
    """
    return (_criterion(sharp_left_begin, sharp_right_end, rho)
            and _criterion(sharp_left_begin, sharp_right_begin, rho_left + p_right_begin)
            and _criterion(sharp_left_end, sharp_right_end, rho_right + p_left_end))


class NUTS:
    """The No-U-Turn sampler for one chain, written as generators.

    Every call of the potential is a ``yield`` of the position: the driver evaluates
    the potential (for many chains at once, see :func:`drive_lockstep`) and sends back
    ``(U, dU/dq)``. The tree building is otherwise Stan's.

    Parameters
    ----------
    rng : numpy.random.Generator
        The chain's random numbers.
    max_tree_depth : int
        At most ``2**max_tree_depth`` leapfrog steps per transition.
    """

    def __init__(self, rng: np.random.Generator | None, metric: Metric,
                 max_tree_depth: int = 10):
        self.rng = rng
        self.metric = metric
        self.max_tree_depth = max_tree_depth
        self.step_size = 1.0
        self._uniform: Callable[[], float] = lambda: math.nan

    def request(self, q: np.ndarray, potential: float, grad: np.ndarray) -> TransitionRequest:
        """A transition from ``q`` with a fresh momentum and uniform seed, for a driver."""
        return TransitionRequest(q=q, potential=potential, grad=grad,
                                 p0=self.metric.momentum(self.rng), step_size=self.step_size,
                                 seed=int(self.rng.integers(0, 2**63)), metric=self.metric,
                                 max_tree_depth=self.max_tree_depth)

    def _kinetic(self, p: np.ndarray) -> float:
        return self.metric.kinetic(p)

    def _leapfrog(self, point: _Point, step: float):
        p = point.p - 0.5 * step * point.grad
        q = point.q + step * self.metric.sharp(p)
        potential, grad = yield q
        if not math.isfinite(potential) or not np.all(np.isfinite(grad)):
            return _Point(q, p, math.inf, np.zeros_like(grad))
        return _Point(q, p - 0.5 * step * grad, potential, grad)

    def transition(self, request: TransitionRequest):
        """Build a trajectory from the request's point and momentum; sample a point on it.

        A generator returning a :class:`Transition`; its uniforms come from the request's
        :class:`~ppl_notes.native.trajectory.SplitMix64` stream, as the C
        transition's do.
        """
        self._uniform = SplitMix64(request.seed).random
        q, potential, grad, p0 = request.q, request.potential, request.grad, request.p0
        start = _Point(q, p0, potential, grad)
        h0 = potential + self._kinetic(p0)
        forward_end = backward_end = start
        sample = start
        p_sharp0 = self.metric.sharp(p0)
        p_sharp_fwd_bck = p_sharp_fwd_fwd = p_sharp_bck_fwd = p_sharp_bck_bck = p_sharp0
        p_fwd_bck = p_fwd_fwd = p_bck_fwd = p_bck_bck = p0
        rho = p0.copy()
        log_sum_weight = 0.0
        depth, num_steps, sum_accept, diverging = 0, 0, 0.0, False
        while depth < self.max_tree_depth:
            if self._uniform() > 0.5:
                # Extend forwards: the old tree becomes the backward subtree.
                rho_bck = rho
                p_bck_fwd, p_sharp_bck_fwd = p_fwd_fwd, p_sharp_fwd_fwd
                tree = yield from self._build(forward_end, depth, +1, h0)
                forward_end = tree.proposal_end
                rho_fwd = tree.rho
                p_sharp_fwd_bck, p_sharp_fwd_fwd = tree.p_sharp_begin, tree.p_sharp_end
                p_fwd_bck, p_fwd_fwd = tree.p_begin, tree.p_end
            else:
                # Extend backwards: the old tree becomes the forward subtree.
                rho_fwd = rho
                p_fwd_bck, p_sharp_fwd_bck = p_bck_bck, p_sharp_bck_bck
                tree = yield from self._build(backward_end, depth, -1, h0)
                backward_end = tree.proposal_end
                rho_bck = tree.rho
                p_sharp_bck_fwd, p_sharp_bck_bck = tree.p_sharp_begin, tree.p_sharp_end
                p_bck_fwd, p_bck_bck = tree.p_begin, tree.p_end
            num_steps += tree.num_steps
            sum_accept += tree.sum_accept
            if tree.diverging:
                diverging = True
            if not tree.valid:
                break
            depth += 1
            if tree.log_sum_weight > log_sum_weight or (
                self._uniform() < math.exp(tree.log_sum_weight - log_sum_weight)
            ):
                sample = tree.proposal
            log_sum_weight = _logaddexp(log_sum_weight, tree.log_sum_weight)
            rho = rho_bck + rho_fwd
            if not _no_u_turn(rho, rho_bck, p_sharp_bck_bck, p_sharp_bck_fwd, p_bck_fwd,
                              rho_fwd, p_sharp_fwd_bck, p_sharp_fwd_fwd, p_fwd_bck):
                break
        return Transition(
            position=sample.q,
            potential=sample.potential,
            grad=sample.grad,
            accept_prob=sum_accept / max(num_steps, 1),
            num_steps=num_steps,
            tree_depth=depth,
            diverging=diverging,
            energy=sample.potential + self._kinetic(sample.p),
        )

    def _build(self, end: _Point, depth: int, direction: int, h0: float):
        if depth == 0:
            point = yield from self._leapfrog(end, direction * self.step_size)
            h = point.potential + self._kinetic(point.p)
            if not math.isfinite(h):
                h = math.inf
            diverging = h - h0 > MAX_ENERGY_ERROR
            log_weight = h0 - h
            p_sharp = self.metric.sharp(point.p)
            tree = _Subtree(
                valid=not diverging,
                proposal=point,
                log_sum_weight=log_weight,
                rho=point.p.copy(),
                p_sharp_begin=p_sharp,
                p_sharp_end=p_sharp,
                p_begin=point.p,
                p_end=point.p,
                num_steps=1,
                sum_accept=1.0 if log_weight > 0 else math.exp(log_weight),
                diverging=diverging,
            )
            tree.proposal_end = point
            return tree
        init = yield from self._build(end, depth - 1, direction, h0)
        if not init.valid:
            return init
        final = yield from self._build(init.proposal_end, depth - 1, direction, h0)
        merged = _Subtree(
            valid=False,
            proposal=init.proposal,
            log_sum_weight=_logaddexp(init.log_sum_weight, final.log_sum_weight),
            rho=init.rho + final.rho,
            p_sharp_begin=init.p_sharp_begin,
            p_sharp_end=final.p_sharp_end,
            p_begin=init.p_begin,
            p_end=final.p_end,
            num_steps=init.num_steps + final.num_steps,
            sum_accept=init.sum_accept + final.sum_accept,
            diverging=final.diverging,
        )
        merged.proposal_end = final.proposal_end
        if not final.valid:
            return merged
        if final.log_sum_weight > merged.log_sum_weight or (
            self._uniform() < math.exp(final.log_sum_weight - merged.log_sum_weight)
        ):
            merged.proposal = final.proposal
        merged.valid = _no_u_turn(merged.rho, init.rho, init.p_sharp_begin, init.p_sharp_end,
                                  init.p_end, final.rho, final.p_sharp_begin,
                                  final.p_sharp_end, final.p_begin)
        return merged


def find_reasonable_step_size(sampler: NUTS, q, potential, grad, step_size: float):
    """Double or halve the step until one leapfrog's acceptance crosses 0.8 (Stan).

    A generator, like every potential call here.
    """
    direction = 0
    for _ in range(100):
        p = sampler.metric.momentum(sampler.rng)
        h0 = potential + sampler._kinetic(p)
        point = yield from sampler._leapfrog(_Point(q, p, potential, grad), step_size)
        h = point.potential + sampler._kinetic(point.p)
        delta = h0 - h if math.isfinite(h) else -math.inf
        new_direction = 1 if delta > math.log(0.8) else -1
        if direction == 0:
            direction = new_direction
        if new_direction != direction:
            break
        step_size = step_size * 2 if direction == 1 else step_size / 2
        if step_size > 1e7 or step_size < 1e-12:
            break
    return step_size
