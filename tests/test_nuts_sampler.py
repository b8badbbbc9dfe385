"""The NUTS implementation on targets with known moments."""

import numpy as np
import pytest

from ppl_notes.inference.nuts_sampler import WarmupSchedule, sample_chain

COVARIANCE = np.array([[1.0, 0.9 * 3.0], [0.9 * 3.0, 9.0]])
PRECISION = np.linalg.inv(COVARIANCE)


def gaussian(q):
    return 0.5 * q @ PRECISION @ q, PRECISION @ q


@pytest.mark.parametrize("metric", ["diag", "fisher", "dense"])
def test_moments_of_a_correlated_gaussian(metric):
    dense = metric == "dense"
    result = sample_chain(gaussian, np.array([2.0, -2.0]), num_warmup=1000, num_draws=6000,
                          seed=7, dense_mass=dense,
                          adaptation="fisher" if metric == "fisher" else "welford")
    draws = result.positions
    # Tolerances: 5 standard errors with an effective sample size of at least 1000.
    standard_error = np.sqrt(np.diag(COVARIANCE) / 1000)
    assert np.all(np.abs(draws.mean(0)) < 5 * standard_error)
    assert np.allclose(draws.std(0), np.sqrt(np.diag(COVARIANCE)), rtol=5 / np.sqrt(2 * 1000))
    assert abs(np.corrcoef(draws.T)[0, 1] - 0.9) < 0.03
    assert not result.diverging.any()
    if dense:
        # a dense metric makes the target isotropic: short trajectories
        assert result.num_steps.mean() < 6


def test_divergences_are_flagged_in_a_funnel():
    def funnel(q):
        v, x = q[0], q[1:]
        value = v**2 / 18 + 0.5 * np.sum(x**2) * np.exp(-v) + 0.5 * x.size * v
        grad = np.concatenate([[v / 9 - 0.5 * np.sum(x**2) * np.exp(-v) + 0.5 * x.size],
                               x * np.exp(-v)])
        return value, grad

    result = sample_chain(funnel, np.zeros(10), num_warmup=300, num_draws=500, seed=1)
    assert result.diverging.any()


def test_warmup_windows_follow_stan():
    schedule = WarmupSchedule(1000)
    assert schedule.window_ends == [100, 150, 250, 450, 950]
    short = WarmupSchedule(100)
    assert short.init_buffer == 15 and short.term_buffer == 10
    assert short.window_ends[-1] == 90


SCALES = np.array([0.01, 1.0, 100.0])


def independent_scales(q):
    return 0.5 * np.sum((q / SCALES) ** 2), q / SCALES**2


@pytest.mark.parametrize("adaptation", ["welford", "fisher"])
def test_the_adapted_diagonal_is_the_variance_of_a_gaussian(adaptation):
    """For N(0, diag(s^2)) both estimates are s^2. Welford's is the draws' variance: the
    last slow window holds about 500 draws, and 30% covers its noise on every scale from
    1e-4 to 1e4. The Fisher one is sqrt(Var q / Var dU) with dU = q / s^2 on the same
    draws, so Var dU = Var q / s^4 and the estimate is s^2 exactly, whatever the draws."""
    result = sample_chain(independent_scales, np.ones(3), num_warmup=1000, num_draws=200,
                          seed=3, adaptation=adaptation)
    tolerance = 1e-8 if adaptation == "fisher" else 0.3
    np.testing.assert_allclose(result.inv_mass, SCALES**2, rtol=tolerance)
