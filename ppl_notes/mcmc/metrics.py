r"""The metric of NUTS (its mass matrix) and the estimators warmup adapts it with.

* :class:`Metric`: a diagonal or dense inverse mass matrix :math:`M^{-1}`;
  :class:`LowRankMetric`: nutpie's diagonal plus low-rank form;
* :class:`_Welford`: Stan's estimate, the draws' variance (diagonal or dense), regularised
  towards the identity;
* :class:`_FisherDiagonal`: nutpie's diagonal,
  :math:`M^{-1}_{ii} = \sqrt{\operatorname{Var}(q_i) / \operatorname{Var}(\nabla_i U)}`,
  which minimises the Fisher divergence between the draws and a Gaussian;
* :class:`_LowRankFisher`: that diagonal with a low-rank correction from the draws' and
  gradients' leading directions.

References
----------
Stan Development Team. Stan Reference Manual, "MCMC Sampling" (windowed adaptation).
Seyboldt, A., Carlson, E. & Carpenter, B. (2026). Preconditioning Hamiltonian Monte Carlo
by minimizing Fisher divergence (nutpie).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


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
