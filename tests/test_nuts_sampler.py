"""The NUTS implementation on targets with known moments."""

import numpy as np
import pytest

from ppl_notes.mcmc.adaptation import WarmupSchedule
from ppl_notes.mcmc.driver import sample_chain
from ppl_notes.mcmc.metrics import spd_mean

COVARIANCE = np.array([[1.0, 0.9 * 3.0], [0.9 * 3.0, 9.0]])
PRECISION = np.linalg.inv(COVARIANCE)


def gaussian(q):
    return 0.5 * q @ PRECISION @ q, PRECISION @ q


ADAPTATION = {"diag": "welford", "dense": "welford", "fisher": "fisher", "lowrank": "lowrank"}


@pytest.mark.parametrize("metric", ["diag", "fisher", "dense", "lowrank"])
def test_moments_of_a_correlated_gaussian(metric):
    dense = metric == "dense"
    result = sample_chain(gaussian, np.array([2.0, -2.0]), num_warmup=1000, num_draws=6000,
                          seed=7, dense_mass=dense, adaptation=ADAPTATION[metric])
    draws = result.positions
    # Tolerances: 5 standard errors with an effective sample size of at least 1000.
    standard_error = np.sqrt(np.diag(COVARIANCE) / 1000)
    assert np.all(np.abs(draws.mean(0)) < 5 * standard_error)
    assert np.allclose(draws.std(0), np.sqrt(np.diag(COVARIANCE)), rtol=5 / np.sqrt(2 * 1000))
    assert abs(np.corrcoef(draws.T)[0, 1] - 0.9) < 0.03
    assert not result.diverging.any()
    if metric in ("dense", "lowrank"):
        # the metric takes out the correlation: short trajectories
        assert result.num_steps.mean() < 6


def test_divergences_are_flagged_in_a_funnel():
    def funnel(q):
        v, x = q[0], q[1:]
        value = v**2 / 18 + 0.5 * np.sum(x**2) * np.exp(-v) + 0.5 * x.size * v
        grad = np.concatenate([[v / 9 - 0.5 * np.sum(x**2) * np.exp(-v) + 0.5 * x.size],
                               x * np.exp(-v)])
        return value, grad

    # The neck is entered at random: over four short chains some trajectories diverge.
    divergences = [sample_chain(funnel, np.zeros(10), num_warmup=300, num_draws=500,
                                seed=seed).diverging.sum() for seed in range(1, 5)]
    assert sum(divergences) > 0


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


def test_the_spd_mean_solves_its_equation():
    """spd_mean(a, b) is the SPD solution of S b S = a; for diagonals it is sqrt(a / b)."""
    np.testing.assert_allclose(spd_mean(np.diag([1.0, 4.0, 8.0]), np.diag([1.0, 1.0, 0.5])),
                               np.diag([1.0, 2.0, 4.0]), atol=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 5, 5))
    a, b = x @ x.T + np.eye(5), y @ y.T + np.eye(5)
    mean = spd_mean(a, b)
    np.testing.assert_allclose(mean @ b @ mean, a, rtol=1e-8, atol=1e-8)
    assert np.all(np.linalg.eigvalsh(mean) > 0)


def _nearly_singular(rho: float, scales: np.ndarray):
    """N(0, S R S) in ``scales.size`` dims; coordinates 0 and 1 correlated at ``rho``."""
    correlation = np.eye(scales.size)
    correlation[0, 1] = correlation[1, 0] = rho
    covariance = scales[:, None] * correlation * scales[None, :]
    precision = np.linalg.inv(covariance)
    return covariance, (lambda q: (0.5 * q @ precision @ q, precision @ q))


def test_the_low_rank_metric_takes_out_a_near_singular_correlation():
    """kilpisjarvi's shape: correlation 0.9999 on scales from 0.01 to 100. A diagonal
    metric leaves a condition number of 2e4 (trajectories of ~100 steps); nutpie's
    low-rank correction finds the thin direction from the gradients and the trajectories
    stay short, with the right moments (tolerances: 5 standard errors at ESS >= 1000)."""
    scales = np.array([0.01, 1.0, 100.0, 3.0])
    covariance, potential = _nearly_singular(0.9999, scales)
    start = np.ones(scales.size)
    options = {"num_warmup": 1000, "num_draws": 4000, "seed": 11}
    low_rank = sample_chain(potential, start, adaptation="lowrank", **options)
    diagonal = sample_chain(potential, start, adaptation="fisher", **options)
    assert low_rank.num_steps.mean() < 10 < 50 < diagonal.num_steps.mean()
    draws, sds = low_rank.positions, np.sqrt(np.diag(covariance))
    assert np.all(np.abs(draws.mean(0)) < 5 * sds / np.sqrt(1000))
    np.testing.assert_allclose(draws.std(0), sds, rtol=5 / np.sqrt(2 * 1000))
    assert abs(np.corrcoef(draws[:, :2].T)[0, 1] - 0.9999) < 1e-4
    # the adapted inverse metric carries the correlation
    inverse = low_rank.inv_mass
    assert inverse[0, 1] / np.sqrt(inverse[0, 0] * inverse[1, 1]) > 0.99


def test_nutpies_windows_switch_and_restart_the_step_size_where_it_says():
    """Warmup of 1000: the metric follows the draws (a new estimate after every draw for
    the diagonal) until the final 15%; the step size is searched for again at the first
    estimate and at the start of the final window, where dual averaging starts afresh;
    the estimate rests on the last 10-20 draws early (first 30%) and 80-160 after (up to
    240 at the end, where no window starts that could not fill before the final one)."""
    from ppl_notes.mcmc.adaptation import _SwitchingWindows
    from ppl_notes.mcmc.metrics import _FisherDiagonal

    windows = _SwitchingWindows(1000, lambda: _FisherDiagonal(2))
    rng = np.random.default_rng(0)
    updates, restarts, sizes = [], [], {}
    for iteration in range(1000):
        metric, restart = windows.update(iteration, rng.normal(size=2), rng.normal(size=2))
        if metric is not None:
            updates.append(iteration)
            sizes[iteration] = windows.foreground.n
        if restart:
            restarts.append(iteration)
    assert restarts == [2, 849]
    assert updates == list(range(2, 850))
    assert all(10 <= sizes[i] <= 20 for i in range(20, 290))
    assert all(80 <= sizes[i] <= 160 for i in range(460, 700))
    assert all(80 <= sizes[i] <= 240 for i in range(700, 850))


def test_the_warmups_leapfrog_steps_are_counted():
    """Every call of the potential is one gradient evaluation: the warmup's count plus the
    draws' ``num_steps`` is all of them, but for the first point and the step-size
    searches (a few dozen calls at most, one search per metric window)."""
    calls = []

    def counted(q):
        calls.append(1)
        return gaussian(q)

    result = sample_chain(counted, np.array([2.0, -2.0]), num_warmup=300, num_draws=200, seed=3)
    counted_steps = result.warmup_steps + int(result.num_steps.sum())
    assert result.warmup_steps >= 300  # a transition takes at least one leapfrog step
    assert 0 < len(calls) - counted_steps < 100


def test_a_long_run_without_bars_says_how_far_it_is(monkeypatch, capsys):
    """Without progress bars (progress=False, or CI), a run says every HEARTBEAT_SECONDS
    how many iterations are done and how long the rest takes: a NUTS run of a VAE's
    posterior printed nothing for 11 minutes."""
    from ppl_notes.mcmc import chains

    clock = iter([0.0, 61.0, 62.0, 130.0])
    monkeypatch.setattr(chains, "_now", lambda: next(clock))
    bars = chains._Bars(2, 1000, progress=False)
    bars.put((0, "warmup"))  # a phase: no clock read, no line
    bars.put((0, 100))       # 61 s: 100 of 2000 iterations
    bars.put((1, 100))       # 62 s: within a minute of the last line
    bars.put((1, 300))       # 130 s: 400 of 2000
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "ppl_notes NUTS: 100 of 2,000 iterations of 2 chains (starting, warmup) after 1 min; "
        "about 19 min left at the rate so far",
        "ppl_notes NUTS: 400 of 2,000 iterations of 2 chains (starting, warmup) after 2 min; "
        "about 8 min left at the rate so far"]
