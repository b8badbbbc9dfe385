r"""The No-U-Turn sampler on a flat vector, with Stan's and nutpie's warmup.

The potential (and its gradient) is the only call into torch. The algorithm follows
Stan's ``base_nuts``: multinomial sampling with biased progressive sampling at the top of
the tree, the generalised no-U-turn criterion with the extra checks across merged
subtrees, a divergence when the energy error exceeds 1000. The tree building is written
twice: here in Python (:class:`NUTS`, generators), and in C
(:mod:`~ppl_notes.native.trajectory`), which the driver uses where a C compiler
exists; both take the same uniforms and make the same decisions. Warmup adapts the step
size by dual averaging and the metric either as Stan does (the draws' variance, diagonal
or dense, in doubling windows: :class:`_StanWindows`) or as nutpie does (from draws and
gradients, a Fisher diagonal or a diagonal plus low-rank correction, in windows that
follow every draw: :class:`_SwitchingWindows`).

References
----------
Hoffman, M. D. & Gelman, A. (2014). The No-U-Turn Sampler. JMLR 15.
Betancourt, M. (2017). A Conceptual Introduction to Hamiltonian Monte Carlo. arXiv:1701.02434.
Stan Development Team. Stan Reference Manual, "MCMC Sampling" (windowed adaptation).
Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Preconditioning Hamiltonian Monte Carlo
by minimizing Fisher divergence (nutpie).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from ppl_notes.native.trajectory import (
    NativeTransitions,
    SplitMix64,
    Transition,
    TransitionRequest,
    library,
)

MAX_ENERGY_ERROR = 1000.0

Potential = Callable[[np.ndarray], tuple[float, np.ndarray]]
#: A chain is a generator: it yields positions whose potential and gradient it needs,
#: receives ``(U, dU/dq)`` for each, and returns its :class:`ChainResult`.
ChainProcess = Generator[np.ndarray, tuple[float, np.ndarray], "ChainResult"]


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


class Metric:
    r"""The kinetic energy's metric: a diagonal or dense inverse mass matrix.

    ``inverse`` is the covariance estimate of the posterior (unconstrained); momenta are
    drawn from :math:`\mathcal N(0, M)` with :math:`M = \text{inverse}^{-1}`.
    """

    def __init__(self, inverse: np.ndarray) -> None:
        self.inverse = inverse
        self.dense = inverse.ndim == 2
        if self.dense:
            self._chol_mass = np.linalg.cholesky(np.linalg.inv(inverse))
        else:
            self._sqrt_mass = 1.0 / np.sqrt(inverse)

    def sharp(self, p: np.ndarray) -> np.ndarray:
        """:math:`M^{-1} p`, the velocity."""
        return self.inverse @ p if self.dense else self.inverse * p

    def kinetic(self, p: np.ndarray) -> float:
        r""":math:`\tfrac12 p^\top M^{-1} p`."""
        with np.errstate(over="ignore", invalid="ignore"):
            return 0.5 * float(p @ self.sharp(p))

    def momentum(self, rng: np.random.Generator) -> np.ndarray:
        r"""A draw from :math:`\mathcal N(0, M)`."""
        z = rng.standard_normal(self.inverse.shape[0])
        return self._chol_mass @ z if self.dense else self._sqrt_mass * z


class LowRankMetric:
    r"""A diagonal metric with a low-rank correction (nutpie's ``low_rank`` mass matrix).

    The inverse mass matrix is :math:`S (I + U(\Lambda - I)U^\top) S`: ``stds`` on the
    diagonal of :math:`S`, and in the scaled space the orthonormal columns of :math:`U`
    (``vectors``, ``dim x k``) with their eigenvalues :math:`\Lambda` (``values``); every
    other direction keeps variance 1. Its cost per leapfrog is :math:`O(dk)`, against
    :math:`O(d^2)` for a dense metric.
    """

    dense = False

    def __init__(self, stds: np.ndarray, vectors: np.ndarray, values: np.ndarray) -> None:
        self.stds, self.vectors, self.values = stds, vectors, values
        self._momentum_scale = 1.0 / np.sqrt(values) - 1.0

    @property
    def inverse(self) -> np.ndarray:
        """The inverse mass matrix as a dense ``dim x dim`` array (for reports)."""
        inner = np.eye(self.stds.size) + (self.vectors * (self.values - 1.0)) @ self.vectors.T
        return self.stds[:, None] * inner * self.stds[None, :]

    def sharp(self, p: np.ndarray) -> np.ndarray:
        """:math:`M^{-1} p`, the velocity."""
        v = self.stds * p
        return self.stds * (v + self.vectors @ ((self.values - 1.0) * (self.vectors.T @ v)))

    def kinetic(self, p: np.ndarray) -> float:
        r""":math:`\tfrac12 p^\top M^{-1} p`."""
        with np.errstate(over="ignore", invalid="ignore"):
            return 0.5 * float(p @ self.sharp(p))

    def momentum(self, rng: np.random.Generator) -> np.ndarray:
        r"""A draw from :math:`\mathcal N(0, M)`.

        :math:`p = S^{-1}(I + U(\Lambda^{-1/2} - I)U^\top) z` with :math:`z` standard normal.
        """
        z = rng.standard_normal(self.stds.size)
        return (z + self.vectors @ (self._momentum_scale * (self.vectors.T @ z))) / self.stds


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


class _Welford:
    """Running (co)variance of warmup draws, regularised towards the identity as Stan."""

    def __init__(self, dim: int, dense: bool) -> None:
        self.n, self.dense, self.mean = 0, dense, np.zeros(dim)
        self.m2 = np.zeros((dim, dim)) if dense else np.zeros(dim)

    def add(self, x: np.ndarray, grad: np.ndarray | None = None) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        after = x - self.mean
        self.m2 += np.outer(after, delta) if self.dense else delta * after

    def regularized(self) -> np.ndarray:
        covariance = self.m2 / max(self.n - 1, 1)
        shrink = 1e-3 * (5.0 / (self.n + 5.0))
        covariance = (self.n / (self.n + 5.0)) * covariance
        if self.dense:
            covariance = 0.5 * (covariance + covariance.T) + shrink * np.eye(self.mean.size)
            return covariance
        return covariance + shrink

    def metric(self) -> Metric:
        """The metric whose inverse mass matrix is :meth:`regularized`."""
        return Metric(self.regularized())


class _FisherDiagonal:
    r"""A diagonal inverse mass matrix from draws *and* gradients (nutpie's adaptation).

    Minimising the Fisher divergence between the posterior and a Gaussian whose
    covariance is diagonal gives :math:`M^{-1}_{ii} = \sqrt{\operatorname{Var}[q_i] /
    \operatorname{Var}[\partial_i U]}` (Seyboldt, Carlson & Carpenter 2026; nutpie). For a
    Gaussian posterior it is the variance, as Welford's estimate; elsewhere the gradients
    carry the local scale too, which a few hundred correlated warmup draws estimate badly.
    """

    def __init__(self, dim: int) -> None:
        self.draws, self.grads = _Welford(dim, False), _Welford(dim, False)

    @property
    def n(self) -> int:
        return self.draws.n

    def add(self, x: np.ndarray, grad: np.ndarray) -> None:
        self.draws.add(x)
        self.grads.add(grad)

    def regularized(self) -> np.ndarray:
        n = max(self.n - 1, 1)
        return _fisher_inverse(self.draws.m2 / n, self.grads.m2 / n, self.draws.regularized)

    def metric(self) -> Metric:
        """The diagonal metric whose inverse mass matrix is :meth:`regularized`."""
        return Metric(self.regularized())


def _fisher_inverse(draw_variance: np.ndarray, grad_variance: np.ndarray,
                    fallback: Callable[[], np.ndarray]) -> np.ndarray:
    r""":math:`\sqrt{\operatorname{Var} q / \operatorname{Var} \partial U}` per coordinate.

    A coordinate with no gradient variance (flat or unvisited) takes ``fallback()``'s
    value (Welford's regularised variance).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.sqrt(draw_variance / grad_variance)
    valid = np.isfinite(inverse) & (inverse > 0)
    if not valid.all():
        inverse = np.where(valid, inverse, fallback())
    return np.clip(inverse, 1e-10, 1e10)


def spd_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""The geometric mean of ``a`` and :math:`b^{-1}` (both symmetric positive definite).

    :math:`\Sigma = b^{-1/2} (b^{1/2} a b^{1/2})^{1/2} b^{-1/2}`, the unique SPD solution of
    :math:`\Sigma b \Sigma = a`. With ``a`` the draws' and ``b`` the gradients'
    covariance it is the Gaussian covariance closest to the posterior in Fisher
    divergence; for diagonal inputs it is :math:`\sqrt{a / b}`.
    """
    values, vectors = np.linalg.eigh(b)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    middle_values, middle_vectors = np.linalg.eigh(root @ a @ root)
    middle_root = (middle_vectors * np.sqrt(np.clip(middle_values, 0.0, None))) @ middle_vectors.T
    return inverse_root @ middle_root @ inverse_root


class _LowRankFisher:
    r"""A diagonal plus low-rank metric from draws and gradients (nutpie's ``low_rank``).

    Each coordinate is first scaled by the Fisher diagonal
    :math:`s_i = \sqrt{\operatorname{sd}(q_i) / \operatorname{sd}(\partial_i U)}`.
    The scaled, centred draws and gradients span a subspace (an orthonormal basis of both
    sets of left singular vectors); there the Fisher-optimal covariance is the SPD mean
    (:func:`spd_mean`) of the draws' covariance and the inverse of the gradients', each
    regularised as :math:`C / (n\gamma) + I`. Its eigenvectors whose eigenvalue lies
    outside :math:`[1/c, c]` form the correction; every other direction keeps the
    diagonal. ``gamma = 1e-5`` and ``c = 2`` are what nutpie 0.16 runs with (its
    docstring says ``c = 100``; its settings hold 2). The cutoff matters: on posteriordb's
    diamonds, ``c = 100`` took 36 leapfrog steps a draw for a bulk ESS of 750 in 4000
    draws, ``c = 2`` 7 steps for 6900. Dense covariance
    estimates need :math:`n \gg d` draws; this one needs only as many as the
    correlations it corrects, and its cost per leapfrog stays :math:`O(dk)`.

    References
    ----------
    Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Preconditioning Hamiltonian Monte
    Carlo by minimizing Fisher divergence (nutpie's ``low_rank`` adaptation).
    """

    #: Re-estimated every this many warmup draws (and at each window switch).
    update_every = 10

    def __init__(self, dim: int, gamma: float = 1e-5, cutoff: float = 2.0) -> None:
        self.dim, self.gamma, self.cutoff = dim, gamma, cutoff
        self.draws: list[np.ndarray] = []
        self.grads: list[np.ndarray] = []

    @property
    def n(self) -> int:
        return len(self.draws)

    def add(self, x: np.ndarray, grad: np.ndarray) -> None:
        self.draws.append(np.array(x, dtype=float))
        self.grads.append(np.array(grad, dtype=float))

    def metric(self) -> Metric | LowRankMetric:
        """The adapted metric; the Fisher diagonal alone when the window is too short."""
        n = self.n
        draws, grads = np.stack(self.draws), np.stack(self.grads)

        def welford():
            window = _Welford(self.dim, False)
            for x in draws:
                window.add(x)
            return window.regularized()

        stds = np.sqrt(_fisher_inverse(draws.var(0, ddof=1) if n > 1 else np.zeros(self.dim),
                                       grads.var(0, ddof=1) if n > 1 else np.zeros(self.dim),
                                       welford))
        if n < 3:
            return Metric(stds**2)
        draws = (draws - draws.mean(0)) / (stds * n)
        grads = (grads - grads.mean(0)) * (stds / n)
        with np.errstate(all="ignore"):
            try:
                vectors, values = self._correction(draws.T, grads.T)
            except np.linalg.LinAlgError:
                return Metric(stds**2)
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(vectors))):
            return Metric(stds**2)
        return LowRankMetric(stds, vectors, values)

    def _correction(self, draws: np.ndarray, grads: np.ndarray):
        """Eigenvectors (``dim x k``) and eigenvalues of the correction, scaled space."""
        left_draws = np.linalg.svd(draws, full_matrices=False)[0]
        left_grads = np.linalg.svd(grads, full_matrices=False)[0]
        basis = np.linalg.qr(np.hstack([left_draws, left_grads]))[0]
        projected_draws, projected_grads = basis.T @ draws, basis.T @ grads
        identity = np.eye(basis.shape[1])
        covariance = spd_mean(projected_draws @ projected_draws.T / self.gamma + identity,
                              projected_grads @ projected_grads.T / self.gamma + identity)
        values, vectors = np.linalg.eigh(covariance)
        keep = (values > self.cutoff) | (values < 1.0 / self.cutoff)
        return basis @ vectors[:, keep], values[keep]


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


@dataclass
class ChainResult:
    """Draws and statistics of one chain (warmup excluded), unconstrained positions."""

    positions: np.ndarray
    potential: np.ndarray
    accept_prob: np.ndarray
    num_steps: np.ndarray
    tree_depth: np.ndarray
    diverging: np.ndarray
    energy: np.ndarray
    step_size: float
    inv_mass: np.ndarray
    num_completed: int
    interrupted: bool = False
    #: how the potential ran: "tape", "inductor", "torchscript" or "none"
    compiler: str = "none"
    #: leapfrog steps (gradient evaluations) of the warmup's transitions
    warmup_steps: int = 0


class ChainInterrupted(Exception):
    """Thrown into a chain to stop it early; it then returns the draws it has."""


def chain_process(
    initial: np.ndarray,
    *,
    num_warmup: int,
    num_draws: int,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    adaptation: str = "welford",
    seed: int | tuple = 0,
    on_iteration: Callable[[int], None] | None = None,
) -> ChainProcess:
    """One chain's warmup and sampling, as a generator of potential requests.

    Parameters
    ----------
    initial : numpy.ndarray
        Starting point (unconstrained).
    num_warmup, num_draws : int
        Iterations of adaptation (discarded) and of sampling (kept).
    target_accept : float
        The dual-averaging target for the mean acceptance statistic.
    max_tree_depth : int
        Largest tree depth.
    dense_mass : bool
        Adapt a dense inverse mass matrix (the posterior covariance) instead of a diagonal.
    adaptation : {"welford", "fisher", "lowrank"}
        How the metric is estimated in each slow window: the draws' (co)variance (Stan),
        a diagonal from draws and gradients (:class:`_FisherDiagonal`, nutpie's), or that
        diagonal with a low-rank correction (:class:`_LowRankFisher`, nutpie's
        ``low_rank``); ``"fisher"`` and ``"lowrank"`` ignore ``dense_mass``.
    seed : int or tuple
        Seed of the chain's generator.
    on_iteration : callable, optional
        Called with the iteration number after each transition (progress bars).
    """
    rng = np.random.default_rng(seed)
    q = np.asarray(initial, dtype=float).copy()
    dim = q.size
    if adaptation not in ("welford", *_GRADIENT_WINDOWS):
        raise ValueError(f"adaptation must be 'welford', 'fisher' or 'lowrank', not "
                         f"{adaptation!r}")
    dense_mass = dense_mass and adaptation == "welford"
    sampler = NUTS(rng, Metric(np.eye(dim) if dense_mass else np.ones(dim)), max_tree_depth)
    stats = {k: np.zeros(num_draws) for k in ("potential", "accept_prob", "energy")}
    ints = {k: np.zeros(num_draws, dtype=np.int64) for k in ("num_steps", "tree_depth")}
    diverging = np.zeros(num_draws, dtype=bool)
    positions = np.zeros((num_draws, dim))
    completed, warmup_steps = 0, 0
    try:
        value, grad = yield q
        if not math.isfinite(value) or not np.all(np.isfinite(grad)):
            raise FloatingPointError("the potential energy is not finite at the initial point")
        sampler.step_size = yield from find_reasonable_step_size(sampler, q, value, grad, 1.0)
        adapt = DualAveraging(target=target_accept)
        adapt.restart(sampler.step_size)
        if adaptation == "welford":
            warmup = _StanWindows(num_warmup, lambda: _Welford(dim, dense_mass))
        else:
            warmup = _SwitchingWindows(num_warmup, lambda: _GRADIENT_WINDOWS[adaptation](dim))
        for iteration in range(num_warmup + num_draws):
            step = yield sampler.request(q, value, grad)
            q, value, grad = step.position, step.potential, step.grad
            if iteration < num_warmup:
                warmup_steps += step.num_steps
                sampler.step_size = adapt.update(step.accept_prob)
                metric, restart = warmup.update(iteration, q, grad)
                if metric is not None:
                    sampler.metric = metric
                if restart:
                    sampler.step_size = yield from find_reasonable_step_size(
                        sampler, q, value, grad, sampler.step_size)
                    adapt.restart(sampler.step_size)
                if iteration + 1 == num_warmup:
                    sampler.step_size = adapt.final()
            else:
                i = iteration - num_warmup
                positions[i] = q
                stats["potential"][i], stats["accept_prob"][i] = value, step.accept_prob
                stats["energy"][i] = step.energy
                ints["num_steps"][i], ints["tree_depth"][i] = step.num_steps, step.tree_depth
                diverging[i] = step.diverging
                completed = i + 1
            if on_iteration is not None:
                on_iteration(iteration)
    except (KeyboardInterrupt, ChainInterrupted):  # Ctrl-C: keep the draws made so far
        keep = slice(0, completed)
        return ChainResult(
            positions=positions[keep], diverging=diverging[keep], step_size=sampler.step_size,
            inv_mass=sampler.metric.inverse, num_completed=completed, interrupted=True,
            warmup_steps=warmup_steps,
            **{k: v[keep] for k, v in stats.items()}, **{k: v[keep] for k, v in ints.items()})
    return ChainResult(positions=positions, diverging=diverging, step_size=sampler.step_size,
                       inv_mass=sampler.metric.inverse, num_completed=num_draws,
                       warmup_steps=warmup_steps, **stats, **ints)


BatchPotential = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _python_transition(request: TransitionRequest):
    """The Python transition of ``request``: a generator of positions, as :class:`NUTS`."""
    sampler = NUTS(None, request.metric, request.max_tree_depth)
    sampler.step_size = request.step_size
    return sampler.transition(request)


def drive_lockstep(processes: list[ChainProcess], potential: BatchPotential,
                   native: bool = True) -> list[ChainResult]:
    """Run chains side by side: one batched potential call serves every chain's request.

    A chain asks either for the potential at a position (an array) or for a whole NUTS
    transition (a :class:`~ppl_notes.native.trajectory.TransitionRequest`). The
    transitions run in compiled C (:mod:`~ppl_notes.native.trajectory`: one call
    advances every chain by a leapfrog step) where it could be built and ``native`` is
    true, else as Python generators; both make the same draws. The chains' trees differ,
    so each asks for its own next position; a chain that has finished keeps its last
    position in the batch (its result is ignored). The cost per call is nearly that of
    one chain where per-operation overhead dominates. A potential whose ``native()``
    gives a C function (a :class:`~ppl_notes.native.tape.Tape`'s) is called by the C
    transitions themselves: Python then sees only finished transitions, not each
    leapfrog step.

    Parameters
    ----------
    processes : list of generators
        From :func:`chain_process`.
    potential : callable
        ``potential(Q) -> (U, dU/dQ)`` for a ``(chains, dim)`` batch; optionally with a
        ``native()`` method returning ``(function, context)`` addresses or None.
    native : bool
        Use the C transitions where they are available.
    """
    count = len(processes)
    lib = library() if native else None
    engine: NativeTransitions | None = None
    subtransitions: list = [None] * count  # Python transitions under way, per chain
    results: list[ChainResult | None] = [None] * count
    first = [next(process) for process in processes]
    dim = np.asarray(first[0].q if isinstance(first[0], TransitionRequest) else first[0]).size
    positions = np.zeros((count, dim))
    waiting: set[int] = set()  # chains waiting on a plain potential or a Python transition

    def take(chain: int, request) -> None:
        nonlocal engine, positions
        waiting.add(chain)
        if not isinstance(request, TransitionRequest):
            positions[chain] = request
        elif lib is not None:
            if engine is None:
                engine = NativeTransitions(lib, count, dim, request.max_tree_depth)
                engine.requests[:] = positions
                positions = engine.requests  # C writes the running chains' rows
            engine.begin(chain, request)
            waiting.discard(chain)
        else:
            subtransitions[chain] = _python_transition(request)
            positions[chain] = next(subtransitions[chain])

    for chain, request in enumerate(first):
        take(chain, request)
    active = set(range(count))
    # a potential that C can call itself (a tape): whole trajectories without Python
    native_potential = getattr(potential, "native", lambda: None)()
    try:
        while active:
            ready = None
            if native_potential is not None and not waiting and engine is not None \
                    and engine.running:
                ready = engine.run(native_potential)
            if ready is None:
                values, grads = potential(positions)
                ready = list(waiting)
                if engine is not None and engine.running:
                    ready.extend(engine.resume(values, grads))
            for chain in ready:
                if chain not in waiting:
                    reply = engine.result(chain)
                elif subtransitions[chain] is not None:
                    try:
                        positions[chain] = subtransitions[chain].send(
                            (float(values[chain]), grads[chain]))
                        continue
                    except StopIteration as done:
                        subtransitions[chain], reply = None, done.value
                else:
                    reply = (float(values[chain]), grads[chain])
                try:
                    take(chain, processes[chain].send(reply))
                except StopIteration as done:
                    results[chain] = done.value
                    active.discard(chain)
                    waiting.discard(chain)
                    if done.value.interrupted:  # Ctrl-C arrived inside this chain
                        raise KeyboardInterrupt from None
    except KeyboardInterrupt:
        # Stop every other chain where it is; each returns the draws it has made.
        for chain in sorted(active):
            try:
                processes[chain].throw(ChainInterrupted())
            except StopIteration as done:
                results[chain] = done.value
    finally:
        if engine is not None:
            engine.close()
    return results


def sample_chain(potential: Potential, initial: np.ndarray, native: bool = True,
                 **options) -> ChainResult:
    """Run one chain against a single-point potential ``potential(q) -> (U, dU/dq)``.

    Takes the keyword options of :func:`chain_process`; ``native`` as
    :func:`drive_lockstep`.
    """
    def batched(positions):
        value, grad = potential(positions[0])
        return np.array([value]), grad[None]

    return drive_lockstep([chain_process(initial, **options)], batched, native=native)[0]
