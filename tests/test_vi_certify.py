"""VI that certifies itself: restarts as chains, the stopping rule, STL, PSIS, the verdict.

Truth comes from outside the code under test: the conjugate Normal's closed-form
posterior, a posterior with two modes by construction, and the closed-form posterior of
a linear-Gaussian story for the particle defect.
"""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import ppl_notes
from ppl_notes import infer
from ppl_notes.errors import DiagnosticWarning, OptionError
from ppl_notes.models.conjugate import (
    normal_mean,
    normal_mean_log_evidence,
    normal_mean_posterior,
)


def _normal_mean_data():
    data = normal_mean._default_data
    return data() if callable(data) else data


def _normal_mean_truth():
    return normal_mean_posterior(_normal_mean_data()["x"])


def _normal_mean_evidence():
    return normal_mean_log_evidence(_normal_mean_data()["x"])


#: The tests of Adam's loop (optimizer="adam"): its stopping rule, restarts in processes,
#: STL; the default fit on the potential is tested in test_vi_newton.py
ADAM = dict(guide="meanfield", optimizer="adam")


@pytest.fixture(scope="module")
def restarted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        return infer(normal_mean, method="svi", restarts=3, processes=2, steps=6000,
                     progress=False, **ADAM)


def test_restarts_are_chains_and_restart_0_is_the_plain_fit(restarted):
    assert restarted.sample_dims == ["chain", "draw"]
    assert restarted.tree["posterior"].sizes["chain"] == 3
    plain = infer(normal_mean, method="svi", steps=6000, progress=False, **ADAM)
    np.testing.assert_array_equal(restarted["mu"][0], plain["mu"])
    # the others start elsewhere and are seeded apart
    assert not np.array_equal(restarted["mu"][1], restarted["mu"][2])
    table = restarted.summary()
    assert {"r_hat", "ess_bulk"} <= set(table.columns)
    assert restarted.info["modes"] == [[0, 1, 2]] or len(restarted.info["modes"]) == 1
    assert [r["restart"] for r in restarted.info["restarts"]] == [0, 1, 2]
    # the restarts' draws all sit on the closed form, within their Monte Carlo error
    mean, sd = _normal_mean_truth()
    draws = restarted.draws("mu")
    assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(len(draws)) + 0.05 * sd


def test_a_converged_restarted_fit_is_called_reliable(restarted):
    verdict = restarted.check()
    assert verdict.reliable, str(verdict)
    assert any("restarts agree" in reason for reason in verdict.reasons)


def test_one_fit_is_not_certified_and_says_how_to_be():
    fit = infer(normal_mean, method="svi", restarts=1, progress=False)
    verdict = fit.check()
    assert not verdict.reliable
    assert any("restarts=" in reason for reason in verdict.reasons)


def test_a_point_estimate_is_never_a_reliable_posterior():
    fit = infer(normal_mean, method="map", progress=False)
    assert not fit.check().reliable


@ppl_notes.model(observed="x", data={"x": torch.tensor(4.0)})
def two_modes(x=None):
    """theta ~ Normal(0, 3); x ~ Normal(theta^2, 0.5): theta near +2 or -2, equally."""
    theta = pyro.sample("theta", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(theta**2, 0.5), obs=x)


def test_restarts_that_found_different_modes_are_flagged():
    with pytest.warns(DiagnosticWarning, match="different optima"):
        fit = infer(two_modes, method="svi", restarts=6, processes=1, progress=False, **ADAM)
    modes = fit.info["modes"]
    assert len(modes) == 2
    means = [fit["theta"][group].mean() for group in modes]
    assert sorted(np.sign(means)) == [-1, 1]
    verdict = fit.check()
    assert not verdict.reliable
    assert any("R-hat" in reason for reason in verdict.reasons)


def test_svi_stops_by_itself_when_the_elbo_settles():
    fit = infer(normal_mean, method="svi", steps=20000, progress=False, **ADAM)
    assert fit.info["stopped"] == "converged"
    assert fit.info["steps_done"] < 20000
    # What the rule promises is about the ELBO: at the stop its windowed mean is within
    # its noise of the optimum, which for this Gaussian family is log p(x) exactly.
    from ppl_notes.vi.convergence import convergence_window

    elbo = fit.history["elbo"].to_numpy()
    window = elbo[-convergence_window(20000):]
    standard_error = np.sqrt(np.diff(window).var(ddof=1) / 2 / len(window))
    assert abs(window.mean() - _normal_mean_evidence()) < 4 * standard_error + 0.02
    # the iterates: constant-rate Adam jitters by a good part of an sd around the optimum
    mean, sd = _normal_mean_truth()
    assert fit.draws("mu").mean() == pytest.approx(mean, abs=0.5 * sd)
    assert fit.draws("mu").std() == pytest.approx(sd, rel=0.2)


def test_the_cap_and_stop_steps_are_honoured():
    capped = infer(normal_mean, method="svi", steps=150, progress=False, **ADAM)
    assert capped.info["stopped"] == "steps" and capped.info["steps_done"] == 150
    exact = infer(normal_mean, method="svi", steps=700, stop="steps", progress=False, **ADAM)
    assert exact.info["stopped"] == "steps" and exact.info["steps_done"] == 700


def test_sticking_the_landing_lands_on_the_closed_form():
    """With q's family holding the posterior, the STL gradient is 0 at the optimum for
    every draw (Roeder et al. 2017): Adam's iterates stop jittering, and the fit equals
    the closed form to optimiser precision, where the standard gradient leaves a few
    percent of an sd of noise."""
    mean, sd = _normal_mean_truth()
    landed = []
    for stl in (True, False):
        fit = infer(normal_mean, method="svi", steps=1500, stop="steps", stl=stl, init="prior",
                    progress=False, **ADAM)
        params = fit.tree["fitted_params"].to_dataset()
        landed.append((float(params["AutoNormal.locs.mu"]),
                       float(params["AutoNormal.scales.mu"])))
    (loc, scale), (plain_loc, plain_scale) = landed
    assert loc == pytest.approx(mean, abs=1e-4 * sd)
    assert scale == pytest.approx(sd, rel=1e-4)
    assert abs(plain_loc - mean) + abs(plain_scale - sd) > 10 * (abs(loc - mean)
                                                                  + abs(scale - sd))


def test_stl_needs_trace_elbo():
    with pytest.raises(OptionError, match="stl"):
        infer(normal_mean, method="svi", stl=True, elbo="TraceMeanField_ELBO", progress=False)


NOISE, PRIOR = 1.0, 1.0
X = torch.tensor([[1.0, 0.5], [0.3, -1.2], [-0.7, 0.4], [1.5, 1.1], [0.2, -0.3]])
Y = torch.tensor([1.2, -0.8, 0.1, 2.4, -0.1])


@ppl_notes.model(observed="y", data={"X": X, "y": Y})
def linear(X, y=None):
    """w ~ Normal(0, 1) (2 weights); y ~ Normal(X @ w, 1), as Pyro's tutorials write it."""
    with pyro.plate("weights", 2):
        w = pyro.sample("w", dist.Normal(0.0, PRIOR))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, NOISE), obs=y)


def joint_guide(X, y=None):
    """One joint Normal over both weights, split into the plate's site (a user's guide)."""
    loc = pyro.param("loc", torch.zeros(2))
    tril = pyro.param("tril", 0.3 * torch.eye(2), constraint=constraints.lower_cholesky)
    u = pyro.sample("u", dist.MultivariateNormal(loc, scale_tril=tril),
                    infer={"is_auxiliary": True})
    with pyro.plate("weights", 2):
        pyro.sample("w", dist.Delta(u))


def test_num_particles_with_a_joint_guide_keeps_the_posterior_sd():
    """The defect: under Pyro's vectorised particle plate this guide's values gain a dim,
    so the story's log densities broadcast across particles (P x P terms) and the sds
    came out near 1/P of the truth. Particles now run one by one for such a guide."""
    precision = X.T.double() @ X.double() / NOISE**2 + torch.eye(2, dtype=torch.float64) / PRIOR**2
    covariance = torch.linalg.inv(precision)
    truth_sd = covariance.diagonal().sqrt().numpy()
    # STL: the guide's family holds the exact posterior, so the fit lands on it (see
    # above) and only the draws' own error is left
    fit = infer(linear, method="svi", guide=joint_guide, num_particles=4, steps=3000,
                learning_rate=0.02, num_draws=4000, stl=True, progress=False)
    assert fit.info["particles_vectorized"] is False
    sd = fit.draws("w").std(0)
    # 4000 draws: an sd's relative error is 1/sqrt(2 * 4000) = 1.1%; 5% is 4.5 of them
    np.testing.assert_allclose(sd, truth_sd, rtol=0.05)


def test_psis_resampling_corrects_an_underfit_q():
    mean, sd = _normal_mean_truth()
    rough = infer(normal_mean, method="svi", steps=40, stop="steps", num_draws=4000,
                  progress=False, **ADAM)
    fixed = rough.importance_resampled()
    assert fixed.info["psis"]["khat"] < 0.7
    raw_error = abs(rough.draws("mu").std() - sd) + abs(rough.draws("mu").mean() - mean)
    new_error = abs(fixed.draws("mu").std() - sd) + abs(fixed.draws("mu").mean() - mean)
    assert new_error < raw_error
    assert fixed.summary().loc["mu", "sd"] == pytest.approx(sd, rel=0.1)


def test_psis_resampling_of_restarts_keeps_a_vector_site_draws_first():
    """Restarts are stacked into one sample dimension; a vector site's draws stay (S, 2)."""
    precision = X.T.double() @ X.double() / NOISE**2 + torch.eye(2, dtype=torch.float64) / PRIOR**2
    truth_sd = torch.linalg.inv(precision).diagonal().sqrt().numpy()
    fit = infer(linear, method="svi", restarts=3, progress=False)  # Gaussian: q is exact
    fixed = fit.importance_resampled()
    assert fixed.draws("w").shape == (fit.num_draws, 2)
    # PSIS weights of an exact q are flat: the resampled sd keeps the truth within the
    # draws' own error (an sd's relative error with 3 x 1000 draws: about 1.3%)
    np.testing.assert_allclose(fixed.draws("w").std(0), truth_sd, rtol=0.08)


def test_restarts_stack_without_copying_one_arrays_blocks_of_rows():
    """stack_rows equals np.stack, and shares memory where the restarts' arrays are
    consecutive row blocks of one array (C- or F-ordered, as the evaluation returns them)."""
    from ppl_notes.vi.restarts import stack_rows

    rng = np.random.default_rng(0)
    for joined in (rng.normal(size=(40, 7)), np.asfortranarray(rng.normal(size=(40, 7)))):
        blocks = [joined[r * 10:(r + 1) * 10] for r in range(4)]
        out = stack_rows(blocks)
        np.testing.assert_array_equal(out, np.stack(blocks))
        assert np.shares_memory(out, joined)
        shuffled = [blocks[1], blocks[0], blocks[2], blocks[3]]  # not in order: a copy
        out = stack_rows(shuffled)
        np.testing.assert_array_equal(out, np.stack(shuffled))
        assert not np.shares_memory(out, joined)
    apart = [rng.normal(size=(10, 7)) for _ in range(4)]
    np.testing.assert_array_equal(stack_rows(apart), np.stack(apart))
    gapped = [joined[r * 10:r * 10 + 5] for r in range(4)]  # rows missing between blocks
    np.testing.assert_array_equal(stack_rows(gapped), np.stack(gapped))
