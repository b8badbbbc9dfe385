r"""Gaussian VI on a potential: a Newton-type natural-gradient optimiser, and DADVI.

The ELBO of a Gaussian :math:`q = \mathcal N(\mu, LL^\top)` over the unconstrained
space needs only the potential :math:`U(z) = -\log p(x, T(z)) - \log|J_T(z)|` and its
gradient at draws :math:`z_m = \mu + L\varepsilon_m`:

.. math:: -\mathrm{ELBO}(\mu, L) = F(\mu, L) - \tfrac d2 \log(2\pi e), \qquad
          F(\mu, L) = \tfrac1M \textstyle\sum_m U(\mu + L\varepsilon_m) - \log|L|.

Both optimisers here hold the draws :math:`\varepsilon_m` fixed for the whole fit
(:mod:`~ppl_notes.vi.fixed_draws`: antithetic, with exact first and second
moments), so :math:`F` is a deterministic function that can be driven to convergence,
and its optimum is exact where the posterior is Gaussian. They evaluate the potential of
all the fits' draws in one batched call (the tape NUTS uses), with no Pyro trace per step.

``newton`` (the default)
    The Bayesian learning rule for a Gaussian (Khan & Rue 2023, JMLR 24(281); Opper &
    Archambeau 2009's fixed point), a natural-gradient step that is Newton's method on
    the smoothed density:

    .. math:: S' = (1-\rho)\,S + \rho\,\hat P, \qquad \mu' = \mu + \rho\,S'^{-1}\,\bar g,

    with :math:`S = \Sigma^{-1}`, :math:`\bar g = \tfrac1M\sum_m \nabla\log p(z_m)` and
    the precision estimated from gradients alone by Stein's lemma,
    :math:`\mathbb E_q[\nabla^2\log p]
    = \mathbb E[\nabla\log p(z)\,\varepsilon^\top]L^{-1}`:
    :math:`\hat P = -\operatorname{sym}(\tfrac1M\sum_m g_m\varepsilon_m^\top L^{-1})`
    (its diagonal for the mean-field family, which starts from the full-rank fit where
    :math:`d \le` :data:`FULL_PRECONDITIONER`: :func:`_meanfield_from_fullrank`). On a
    Gaussian posterior the moment-matched draws make :math:`\hat P` and :math:`\bar g`
    exact, so one step with :math:`\rho = 1` lands on the posterior from any start: the
    method is invariant to linear reparameterisation and conditioning cannot slow it.
    Where :math:`S'` would not be positive definite (a region that is not log-concave, or
    an estimate whose smallest curvature is below its round-off: kilpisjarvi's posterior has a
    condition number near :math:`10^{11}`), :math:`\hat P` is replaced by :math:`|\hat P|`, its
    eigenvalues taken in absolute value, as saddle-free Newton does (Dauphin et al.
    2014, NeurIPS). Lin, Schmidt & Khan's (2020, ICML) improved rule
    :math:`S + \rho\hat G + \tfrac{\rho^2}2\hat G S^{-1}\hat G` keeps :math:`S'`
    positive definite too, but measured here it shrank the steps along such a direction
    to a fifth of the distance each (kilpisjarvi's mean-field fit ran out of steps). A step
    is kept when it lowers :math:`F` by at least a tenth of the decrease it promises were
    the density the Gaussian the step assumes (a trust-region ratio test: on a Gaussian
    posterior the two are equal; a fixed-point iteration that swings, as gp_pois_regr's
    mean-field scales did, makes far less); otherwise :math:`\rho` is halved, and it
    doubles again (up to 1) after a kept step. Where a rejected step promised less than
    the tolerance, the fit has converged.
``dadvi``
    The same fixed-draw objective minimised over :math:`(\mu, \log s, L \text{ or } W)`
    by L-BFGS with a strong-Wolfe line search (Giordano, Ingram & Broderick 2024, who use
    a trust-region Newton-CG; L-BFGS needs no Hessian-vector products). It serves every
    family, the low-rank one included.

Both stop when one step moved the Gaussian by at most ``tolerance**2`` nats of KL
divergence (closed form, :func:`~ppl_notes.vi.gaussian_family.kl_divergence`):
:math:`10^{-4}` by default, a move of the mean by 0.014 sd. A Newton step shortened to
:math:`\rho` counts as its move over :math:`\rho^2`, the move of the full step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ppl_notes.vi.gaussian_family import Gaussian, kl_divergence

__all__ = ["FitTrace", "Potential", "fit_gaussians", "OPTIMIZERS", "FULL_PRECONDITIONER"]

#: ``points (N, d) -> (U (N,), grad U (N, d))``, NumPy float64
Potential = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

OPTIMIZERS = ("newton", "dadvi")
#: The mean-field family's mean moves with the full Stein precision up to this dimension
FULL_PRECONDITIONER = 200
#: Halvings of the step before a fit is declared stalled
_MAX_HALVINGS = 12
#: A kept step lowers F by at least this share of what it promised
_SUFFICIENT = 0.1


@dataclass
class FitTrace:
    """One fit's result: its Gaussian and how it got there.

    Attributes
    ----------
    q : Gaussian
        The fitted Gaussian.
    elbo : list of float
        The fixed-draw ELBO after every kept step (the first: at the start).
    evaluations : int
        Gradient evaluations (points at which the potential was evaluated).
    stopped : str
        ``converged`` (a step moved q by at most the tolerance), ``steps`` (the cap),
        ``stalled`` (no step lowered F: the fixed draws' noise floor, or a region where
        the density is not log-concave) or ``interrupted`` (Ctrl-C).
    moves : list of float
        KL(q_new || q_old) of every kept step.
    """

    q: Gaussian
    elbo: list[float] = field(default_factory=list)
    evaluations: int = 0
    stopped: str = "steps"
    moves: list[float] = field(default_factory=list)


def _elbo(objective: float, dim: int) -> float:
    return -objective + 0.5 * dim * (1 + math.log(2 * math.pi))


class _Evaluator:
    """The fixed-draw objective of many fits at once, one potential call for them all."""

    def __init__(self, potential: Potential, draws: list[torch.Tensor]):
        self.potential, self.draws = potential, draws
        self.evaluations = 0

    def __call__(self, fits: list[tuple[int, Gaussian]]):
        """``[(F, U (M,), scores (M, d))]`` for each ``(fit index, q)``.

        F is inf where any draw's potential is not finite.
        """
        points = [q.draw(self.draws[k]) for k, q in fits]
        flat = torch.cat(points).numpy()
        values, grads = self.potential(np.ascontiguousarray(flat))
        self.evaluations += flat.shape[0]
        out, at = [], 0
        for (_, q), block in zip(fits, points, strict=True):
            u = torch.from_numpy(np.asarray(values[at:at + len(block)], dtype=np.float64))
            g = -torch.from_numpy(np.asarray(grads[at:at + len(block)], dtype=np.float64))
            at += len(block)
            finite = bool(torch.isfinite(u).all()) and bool(torch.isfinite(g).all())
            objective = float(u.mean() - q.log_det_factor()) if finite else math.inf
            out.append((objective, u, g))
        return out


def _spd_factor(matrix: torch.Tensor) -> torch.Tensor | None:
    factor, info = torch.linalg.cholesky_ex((matrix + matrix.T) / 2)
    return factor if int(info) == 0 and bool(torch.isfinite(factor).all()) else None


def _precision_step(precision: torch.Tensor, estimate: torch.Tensor, rho: float):
    r""":math:`S' = (1-\rho)S + \rho\hat P` and its Cholesky factor.

    :math:`|\hat P|` replaces :math:`\hat P` where that is not positive definite (module
    docstring).
    """
    plain = (1 - rho) * precision + rho * estimate
    factor = _spd_factor(plain)
    if factor is not None:
        return plain, factor
    return _floored((1 - rho) * precision + rho * _absolute(estimate))


def _absolute(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix with its eigenvalues replaced by their absolute values."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.abs()) @ vectors.T


def _floored(matrix: torch.Tensor, floor: float = 1e-12):
    """A symmetric matrix and its Cholesky factor, eigenvalues raised where needed.

    Eigenvalues below ``floor`` times the largest are raised to it; a matrix that already
    has a Cholesky factor is returned as it is.
    """
    matrix = (matrix + matrix.T) / 2
    factor = _spd_factor(matrix)
    if factor is not None:
        return matrix, factor
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp(min=floor * float(values.abs().max()))
    matrix = (vectors * values) @ vectors.T
    matrix = (matrix + matrix.T) / 2
    return matrix, torch.linalg.cholesky(matrix)


class _NewtonState:
    """One fit's Newton iterate: q, the mean's preconditioner, the step size."""

    def __init__(self, q: Gaussian, preconditioner: torch.Tensor | None = None):
        self.q, self.rho, self.halvings = q, 1.0, 0
        self.mean_precision = None
        if q.family == "fullrank":
            self.mean_precision = torch.cholesky_inverse(q.cholesky())
        elif preconditioner is not None:
            try:
                self.mean_factor = torch.linalg.cholesky(preconditioner)
                self.mean_precision = preconditioner
            except torch.linalg.LinAlgError:  # singular along a flat direction: q's own
                self.mean_precision = None

    def propose(self, draws: torch.Tensor, scores: torch.Tensor):
        r"""The step with the current ``rho``: ``(q', mean preconditioner', promised)``.

        ``promised`` is the decrease of :math:`F` the step would make if the density were
        the Gaussian the step assumes (precision :math:`E`, the estimate it used):
        :math:`(\rho - \rho^2/2)\,\bar g^\top S'^{-1}\bar g` for the mean, and
        :math:`\tfrac12[\log|\Sigma'|/|\Sigma| - \operatorname{tr}(E(\Sigma'-\Sigma))]`
        for the covariance (exact for a quadratic potential).
        """
        q, rho = self.q, self.rho
        mean_score = scores.mean(0)
        cross = scores.T @ draws / draws.shape[0]  # E[g eps^T]
        if q.family == "fullrank":
            stein = torch.linalg.solve_triangular(q.tril.T, cross.T, upper=True).T
            estimate = -(stein + stein.T) / 2
            precision, factor = _precision_step(self.mean_precision, estimate, rho)
            covariance = torch.cholesky_inverse(factor)
            tril = torch.linalg.cholesky(covariance)
            direction = torch.cholesky_solve(mean_score[:, None], factor)[:, 0]
            used = (precision - (1 - rho) * self.mean_precision) / rho
            old_covariance = q.tril @ q.tril.T
            log_ratio = 2 * (tril.diagonal().log().sum() - q.tril.diagonal().abs().log().sum())
            promised = float((rho - rho**2 / 2) * (mean_score @ direction) + 0.5 * (
                log_ratio - torch.sum(used * (covariance - old_covariance))))
            return Gaussian("fullrank", q.mean + rho * direction, tril=tril), precision, \
                promised
        diagonal = -cross.diagonal() / q.scale
        inverse_variance = q.scale.pow(-2)
        new = (1 - rho) * inverse_variance + rho * diagonal
        if not bool((new > 0).all()):
            new = (1 - rho) * inverse_variance + rho * diagonal.abs()
        if self.mean_precision is None:
            direction = mean_score / new
        else:  # the full-rank fit's precision, held fixed (_meanfield_from_fullrank)
            direction = torch.cholesky_solve(mean_score[:, None], self.mean_factor)[:, 0]
        used = (new - (1 - rho) * inverse_variance) / rho
        promised = float((rho - rho**2 / 2) * (mean_score @ direction) + 0.5 * torch.sum(
            (inverse_variance / new).log() - used * (1 / new - 1 / inverse_variance)))
        return (Gaussian("meanfield", q.mean + rho * direction, scale=new.rsqrt()),
                self.mean_precision, promised)


def _proposal(state: _NewtonState, draws: torch.Tensor, scores: torch.Tensor):
    """``state.propose(...)``, or None where its covariance is not positive definite.

    Along a direction the data do not identify (an improper posterior: flat priors on
    ``a`` and ``b`` and data on ``a + b``) the full step's covariance grows without bound
    until its Cholesky factor fails: a shorter step, nearer the last positive definite
    matrix, is tried instead, as for a step that does not decrease the objective.
    """
    try:
        return state.propose(draws, scores)
    except torch.linalg.LinAlgError:
        return None


def _shorten(state: _NewtonState) -> bool:
    """Halve the step; True where it has been halved too often (the fit stalls)."""
    state.rho /= 2
    state.halvings += 1
    return state.halvings > _MAX_HALVINGS


def _newton(evaluate: _Evaluator, starts: list[Gaussian], max_steps: int, kl_tolerance: float,
            preconditioners: list | None = None) -> list[FitTrace]:
    """Lockstep Newton-type steps for every fit (module docstring).

    ``preconditioners``: a fixed precision per fit that moves a mean-field mean.
    """
    preconditioners = preconditioners or [None] * len(starts)
    states = [_NewtonState(q, p) for q, p in zip(starts, preconditioners, strict=True)]
    traces = [FitTrace(q) for q in starts]
    current = evaluate(list(enumerate(starts)))
    for trace, (objective, _, _) in zip(traces, current, strict=True):
        trace.elbo.append(_elbo(objective, trace.q.dim))
    active = [k for k in range(len(starts)) if math.isfinite(current[k][0])]
    for k in set(range(len(starts))) - set(active):
        traces[k].stopped = "stalled"
    steps = 0
    try:
        while active and steps < max_steps:
            steps += 1
            proposals = {k: _proposal(states[k], evaluate.draws[k], current[k][2])
                         for k in active}
            for k in [k for k in active if proposals[k] is None]:  # no Gaussian at this rho
                if _shorten(states[k]):
                    traces[k].stopped = "stalled"
                    active.remove(k)
            stepping = [k for k in active if proposals[k] is not None]
            evaluated = evaluate([(k, proposals[k][0]) for k in stepping]) if stepping else []
            for k, result in zip(stepping, evaluated, strict=True):
                state, trace = states[k], traces[k]
                proposal, precision, promised = proposals[k]
                old_objective = current[k][0]
                # a kept step makes a share of the decrease it promised: an overshooting
                # step (a fixed-point iteration that swings) makes far less
                wanted = old_objective - _SUFFICIENT * max(promised, 0.0)
                if result[0] <= wanted + 1e-10 * (1 + abs(old_objective)):
                    move = kl_divergence(proposal, state.q)
                    # a step shortened to rho moves about rho**2 the KL of the full one
                    full_move = move / state.rho**2
                    state.q, state.mean_precision = proposal, precision
                    current[k] = result
                    trace.q, state.halvings = state.q, 0
                    trace.elbo.append(_elbo(result[0], state.q.dim))
                    trace.moves.append(move)
                    state.rho = min(1.0, 2 * state.rho)
                    if full_move <= kl_tolerance:
                        trace.stopped = "converged"
                        active.remove(k)
                    continue
                if promised <= kl_tolerance:  # the step would not move F measurably
                    trace.stopped = "converged"
                    active.remove(k)
                    continue
                if _shorten(state):
                    trace.stopped = "stalled"
                    active.remove(k)
    except KeyboardInterrupt:
        for k in active:
            traces[k].stopped = "interrupted"
        active = []
    for trace in traces:
        trace.evaluations = evaluate.evaluations // len(traces)
    return traces


class _PotentialFunction(torch.autograd.Function):
    """U(z) for a batch of points, with the potential's own gradient as its backward."""

    @staticmethod
    def forward(ctx, points, potential):
        values, grads = potential(np.ascontiguousarray(points.detach().numpy()))
        ctx.save_for_backward(torch.from_numpy(np.asarray(grads, dtype=np.float64)))
        return torch.from_numpy(np.asarray(values, dtype=np.float64))

    @staticmethod
    def backward(ctx, upstream):
        (grads,) = ctx.saved_tensors
        return upstream[:, None] * grads, None


def _unconstrained(q: Gaussian) -> list[torch.Tensor]:
    """The parameters L-BFGS moves: the mean, log-scales, and L's or W's free entries."""
    mean = q.mean.clone().requires_grad_(True)
    if q.family == "fullrank":
        raw = torch.tril(q.tril, -1) + torch.diag(q.tril.diagonal().abs().log())
        return [mean, raw.clone().requires_grad_(True)]
    out = [mean, q.scale.abs().log().clone().requires_grad_(True)]
    if q.family == "lowrank":
        out.append(q.factor.clone().requires_grad_(True))
    return out


def _constrained(family: str, parameters: list[torch.Tensor]) -> Gaussian:
    if family == "fullrank":
        raw = parameters[1]
        tril = torch.tril(raw, -1) + torch.diag(raw.diagonal().exp())
        return Gaussian("fullrank", parameters[0], tril=tril)
    factor = parameters[2] if family == "lowrank" else None
    return Gaussian(family, parameters[0], scale=parameters[1].exp(), factor=factor)


def _dadvi_fit(potential: Potential, q: Gaussian, epsilon: torch.Tensor, max_steps: int,
               kl_tolerance: float, chunk: int) -> FitTrace:
    """L-BFGS on one fit's fixed-draw objective, ``chunk`` iterations between checks."""
    trace = FitTrace(q)
    parameters = _unconstrained(q)
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=chunk, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    counted = [0]

    def value():
        current = _constrained(q.family, parameters)
        counted[0] += len(epsilon)
        return _PotentialFunction.apply(current.draw(epsilon), potential).mean() \
            - current.log_det_factor()

    def closure():
        optimizer.zero_grad()
        objective = value()
        if not bool(torch.isfinite(objective)):
            return torch.tensor(math.inf, dtype=torch.float64)
        objective.backward()
        return objective.detach()

    with torch.no_grad():
        trace.elbo.append(_elbo(float(value()), q.dim))
    done = 0
    try:
        while done < max_steps:
            before = _constrained(q.family, parameters).detached()
            objective = optimizer.step(closure)
            done += chunk
            after = _constrained(q.family, parameters).detached()
            if not math.isfinite(float(objective)):
                trace.stopped = "stalled"
                break
            trace.q = after
            move = kl_divergence(after, before)
            trace.moves.append(move)
            with torch.no_grad():
                trace.elbo.append(_elbo(float(value()), q.dim))
            if move <= kl_tolerance:
                trace.stopped = "converged"
                break
    except KeyboardInterrupt:
        trace.stopped = "interrupted"
    trace.evaluations = counted[0]
    return trace


def _dadvi(potential: Potential, draws: list[torch.Tensor], starts: list[Gaussian],
           max_steps: int, kl_tolerance: float, chunk: int = 10) -> list[FitTrace]:
    """L-BFGS on each fit's fixed-draw objective, one fit after another."""
    return [_dadvi_fit(potential, q, epsilon, max_steps, kl_tolerance, chunk)
            for q, epsilon in zip(starts, draws, strict=True)]


def fit_gaussians(potential: Potential, starts: list[Gaussian], draws: list[torch.Tensor],
                  optimizer: str = "newton", max_steps: int = 200,
                  tolerance: float = 0.01) -> list[FitTrace]:
    """Fit one Gaussian per start to the density ``exp(-potential)``.

    Parameters
    ----------
    potential : callable
        ``points (N, d) -> (U (N,), grad U (N, d))``.
    starts : list of Gaussian
        Each fit's starting Gaussian (its family is the fit's).
    draws : list of Tensor
        Each fit's fixed standard-normal draws, ``(M, d)`` (``(M, d + r)`` low-rank).
    optimizer : {"newton", "dadvi"}
        Module docstring. ``newton`` takes the mean-field and full-rank families.
    max_steps : int
        The most steps (Newton) or L-BFGS iterations (DADVI) per fit.
    tolerance : float
        A fit stops when a step moved it by at most ``tolerance**2`` nats of KL.

    Returns
    -------
    list of FitTrace
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "newton":
        if any(q.family == "lowrank" for q in starts):
            raise ValueError("optimizer='newton' fits the meanfield and fullrank families; "
                             "the lowrank family is fitted by 'dadvi'")
        evaluate = _Evaluator(potential, draws)
        preconditioners = None
        if starts and starts[0].family == "meanfield" and starts[0].dim <= FULL_PRECONDITIONER:
            starts, preconditioners = _meanfield_from_fullrank(evaluate, starts, max_steps,
                                                               tolerance**2)
        return _newton(evaluate, starts, max_steps, tolerance**2, preconditioners)
    return _dadvi(potential, draws, starts, max_steps, tolerance**2)


def _meanfield_from_fullrank(evaluate: _Evaluator, starts: list[Gaussian], max_steps: int,
                             kl_tolerance: float) -> tuple[list[Gaussian], list]:
    r"""Mean-field starts at the full-rank fit, and its precision as their preconditioner.

    Each start is the full-rank fit's mean with scales :math:`1/\sqrt{S_{ii}}`; its
    precision :math:`S` then moves the mean-field mean (a fixed preconditioner changes the
    steps, not the fixed point :math:`\bar g = 0`).

    The mean-field Newton step moves the mean with the diagonal precision only, a Jacobi
    iteration that crawls along a correlated direction, and its off-diagonal Stein
    estimates divide by a coordinate's own small scale (kilpisjarvi: they ran out of
    steps). The full-rank fit on the same draws crosses such a ridge in a few steps, and
    where the posterior is Gaussian its mean and diagonal precision are the mean-field
    optimum itself (the mean, and :math:`\sigma_i = 1/\sqrt{P_{ii}}`).
    """
    full = [Gaussian("fullrank", q.mean, tril=torch.diag(q.scale)) for q in starts]
    fitted = _newton(evaluate, full, max_steps, kl_tolerance)
    out, preconditioners = [], []
    for start, trace in zip(starts, fitted, strict=True):
        if trace.stopped == "stalled" and len(trace.elbo) < 2:
            out.append(start)
            preconditioners.append(None)
            continue
        precision = torch.cholesky_inverse(trace.q.tril)
        out.append(Gaussian("meanfield", trace.q.mean, scale=precision.diagonal().rsqrt()))
        preconditioners.append(precision)
    return out, preconditioners
