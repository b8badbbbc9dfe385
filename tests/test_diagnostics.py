"""Each diagnostic fires on draws built to fail it, names the parameter, and stays quiet
on draws built to pass it. The draws come from numpy, not from the code under test."""

import json
import warnings

import numpy as np
import pytest

from ppl_notes import DiagnosticWarning, Posterior, infer
from ppl_notes.diagnostics import diagnostics, elbo_trend, findings, warn_about
from ppl_notes.models.conjugate import normal_mean


def _checks(posterior):
    return {f.check: f for f in findings(posterior)}


def _ar1(rng, phi, shape):
    """AR(1) chains with unit marginal variance: ESS per draw = (1 - phi) / (1 + phi)."""
    noise = rng.normal(size=shape) * np.sqrt(1 - phi**2)
    out = np.empty(shape)
    out[..., 0] = rng.normal(size=shape[:-1])
    for t in range(1, shape[-1]):
        out[..., t] = phi * out[..., t - 1] + noise[..., t]
    return out


def test_well_mixed_independent_chains_raise_nothing():
    rng = np.random.default_rng(1)
    posterior = Posterior.from_draws(
        {"x": rng.normal(size=(4, 1000)), "y": rng.normal(size=(4, 1000, 3))},
        sample_stats={"diverging": np.zeros((4, 1000), bool),
                      "energy": rng.normal(size=(4, 1000))},
        method="nuts")
    numbers = diagnostics(posterior)
    assert numbers["max_r_hat"][1] < 1.01 and numbers["min_ess_bulk"][1] > 2000
    assert numbers["min_bfmi"][1] > 1.5  # white-noise energy: E-BFMI = 2
    assert findings(posterior) == []


def test_chains_that_disagree_fire_r_hat_naming_the_element():
    """Chain means 0, 0, 0, 0.5 in element y[1]: split R-hat well above 1.01."""
    rng = np.random.default_rng(2)
    y = rng.normal(size=(4, 1000, 3))
    y[3, :, 1] += 0.5
    posterior = Posterior.from_draws({"y": y}, method="nuts")
    found = _checks(posterior)
    assert found["r_hat"].parameter == "y[1]" and found["r_hat"].value > 1.01
    assert "warmup" in found["r_hat"].message


def test_autocorrelated_chains_fire_ess():
    """AR(1) with phi = 0.98: ESS ~ 4000 * 0.02 / 1.98 ~ 40, far below 400."""
    rng = np.random.default_rng(3)
    posterior = Posterior.from_draws({"x": _ar1(rng, 0.98, (4, 1000))}, method="nuts")
    found = _checks(posterior)
    assert found["ess_bulk"].parameter == "x" and found["ess_bulk"].value < 150
    assert "ess_tail" in found


def test_divergences_are_located_and_bfmi_fires_for_a_random_walk_energy():
    """Divergent draws where x < -1.5 are reported as 'where x is small'; an energy that
    is a random walk has E-BFMI = sum(dE^2) / sum((E - mean E)^2) near 0."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 1000))
    energy = rng.normal(size=(4, 1000))
    energy[2] = np.cumsum(rng.normal(size=1000))
    posterior = Posterior.from_draws(
        {"x": x, "z": rng.normal(size=(4, 1000))},
        sample_stats={"diverging": x < -1.5, "energy": energy}, method="nuts")
    found = _checks(posterior)
    assert found["divergences"].value == (x < -1.5).sum()
    assert "where x is small" in found["divergences"].message
    assert found["bfmi"].parameter == "chain 2" and found["bfmi"].value < 0.3
    assert "mass_matrix='diag'" not in found["divergences"].message  # no metric named


def test_divergences_under_a_gradient_based_metric_suggest_stans_diagonal():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 1000))
    posterior = Posterior.from_draws({"x": x}, sample_stats={"diverging": x < -2.5},
                                     method="nuts")
    posterior.tree.attrs["options"] = json.dumps({"mass_matrix": "lowrank"})
    assert "mass_matrix='diag'" in _checks(posterior)["divergences"].message


def test_elbo_trend_reads_a_rising_and_a_flat_history():
    rng = np.random.default_rng(5)
    flat = rng.normal(-100.0, 1.0, size=2000)
    change, standard_error = elbo_trend(flat)
    assert abs(change) < 4 * standard_error
    assert standard_error == pytest.approx(np.sqrt(2 / 200), rel=0.15)
    rising = flat + np.linspace(0.0, 5.0, 2000)
    change, standard_error = elbo_trend(rising)
    assert change == pytest.approx(0.5, abs=4 * standard_error)


def test_svi_stopped_early_warns_that_the_elbo_is_still_rising():
    with pytest.warns(DiagnosticWarning, match="still rising"):
        # from the prior's origin (a MAP start would leave nothing to rise)
        infer(normal_mean, method="svi", steps=100, learning_rate=0.01, jit=True, init="prior",
              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticWarning)
        converged = infer(normal_mean, method="svi", steps=3000, learning_rate=0.01,
                          progress=False)
    assert "elbo" not in _checks(converged)


def test_warn_about_issues_one_warning_per_finding():
    rng = np.random.default_rng(6)
    posterior = Posterior.from_draws({"x": _ar1(rng, 0.98, (4, 500))}, method="nuts",
                                     model_name="toy")
    with pytest.warns(DiagnosticWarning) as caught:
        found = warn_about(posterior)
    assert len(caught) == len(found) >= 2
    assert all(str(w.message).startswith("toy by nuts:") for w in caught)


def _normal_ratios(rng, q_sd, draws=4000):
    """log p - log q for draws from q = N(0, q_sd^2) against p = N(0, 1)."""
    x = rng.normal(0.0, q_sd, draws)
    log_p = -0.5 * x**2
    log_q = -0.5 * (x / q_sd) ** 2 - np.log(q_sd)
    return x, log_p, log_q


def test_importance_khat_tracks_the_tail_of_p_over_q():
    """For q = N(0, s^2) and p = N(0, 1), P(p/q > t) ~ t^(-1/(1 - s^2)): k = 1 - s^2 when
    q is narrower, and the ratios are bounded (k < 0) when q is wider. Averaged over 20
    replicates of 4000 draws; PSIS's estimate is biased low for heavy tails at this size
    (measured: 0.76 for a true 0.91), hence the tolerance of 0.2."""
    from ppl_notes.psis import importance_khat

    rng = np.random.default_rng(7)
    for q_sd, truth in ((0.3, 0.91), (0.8, 0.36)):
        mean = np.mean([importance_khat(*_normal_ratios(rng, q_sd)[1:]) for _ in range(20)])
        assert mean == pytest.approx(truth, abs=0.2)
    assert np.mean([importance_khat(*_normal_ratios(rng, 1.5)[1:]) for _ in range(5)]) < 0


def test_a_too_narrow_approximation_fires_khat():
    rng = np.random.default_rng(0)
    x, log_p, log_q = _normal_ratios(rng, 0.1)  # theory k = 0.99
    posterior = Posterior.from_draws({"x": x}, sample_dims=("sample",), method="svi",
                                     sample_stats={"log_p": log_p, "log_q": log_q})
    found = _checks(posterior)
    assert found["khat"].value > 0.7
    assert "can't be trusted for this posterior" in found["khat"].message
