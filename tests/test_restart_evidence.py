"""SVI's restarts are pooled by their evidence: one stalled at a degenerate point is left out.

Restarts 1-3 start at prior draws. On a centred hierarchy L-BFGS can run one down the
funnel to a scale of about 0, where Newton never improves; pooled with equal weight, its
draws moved Pyro's baseball example's ``loc`` to -1.2 +/- 0.5 against NUTS's -1.02 +/-
0.09. Each restart's importance-weighted evidence (log mean p/q over its own draws)
says how much posterior mass the region it found holds: a restart 1e10 nats below the
best holds none, and is left out, as the verdict and ``info`` say.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import infer
from ppl_notes._result import RunResult
from ppl_notes.vi.restarts import (
    LEFT_OUT_BELOW,
    pooled_restarts,
    restart_log_evidence,
    stack_restarts,
)

# Efron and Morris (1975): hits in each of 18 players' first 45 at-bats of 1970, the data
# of Pyro's examples/baseball.py
HITS = [18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7]


def partially_pooled_with_logit(at_bats, hits):
    """Pyro's examples/baseball.py, as it is written there."""
    num_players = at_bats.shape[0]
    loc = pyro.sample("loc", dist.Normal(-1, 1))
    scale = pyro.sample("scale", dist.HalfCauchy(1))
    with pyro.plate("num_players", num_players):
        alpha = pyro.sample("alpha", dist.Normal(loc, scale))
        return pyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def test_the_evidence_is_the_log_mean_of_the_ratios():
    """log mean exp(log p - log q), a draw with a non-finite density weighing nothing."""
    log_p = np.array([-3.0, -1.0, -np.inf, np.nan])
    log_q = np.array([-2.0, -2.0, -1.0, -1.0])
    result = RunResult(method="svi", sample_dims=("draw",), posterior={},
                       sample_stats={"log_p": log_p, "log_q": log_q})
    expected = math.log((math.exp(-1.0) + math.exp(1.0)) / 4)
    assert restart_log_evidence(result) == pytest.approx(expected, abs=1e-12)
    proposals = RunResult(method="svi", sample_dims=("draw",), posterior={},
                          sample_stats={"log_p": log_p, "log_q": log_q},
                          importance={"log_p": np.zeros(3), "log_q": np.zeros(3)})
    assert restart_log_evidence(proposals) == 0.0  # the importance step's proposals


def test_only_restarts_far_below_the_best_are_left_out():
    assert pooled_restarts([-50.0, -50.4, -50.0 - LEFT_OUT_BELOW + 0.1, -1e10]) == [
        True, True, True, False]
    assert pooled_restarts([float("nan")] * 3) == [True] * 3  # nothing known: as before
    assert pooled_restarts([-5.0, float("-inf")]) == [True, False]


def test_stacking_keeps_the_pooled_restarts_draws_and_says_which_it_left_out():
    def result(centre: float, log_ratio: float) -> RunResult:
        draws = centre + np.random.default_rng(0).standard_normal(100)
        return RunResult(method="svi", sample_dims=("draw",), posterior={"mu": draws},
                         sample_stats={"log_p": np.full(100, log_ratio),
                                       "log_q": np.zeros(100)},
                         info={"final_elbo": log_ratio, "stopped": "converged",
                               "steps_done": 3},
                         history=pd.DataFrame({"elbo": [log_ratio - 1.0, log_ratio]}))
    combined = stack_restarts([result(0.0, -10.0), result(0.1, -10.2), result(50.0, -1e9)],
                              [0, 1, 2], {})
    assert combined.posterior["mu"].shape == (2, 100)
    assert combined.info["left_out"] == [2]
    assert [r["pooled"] for r in combined.info["restarts"]] == [True, True, False]
    assert combined.info["restarts"][2]["log_evidence"] == pytest.approx(-1e9)


@pytest.mark.filterwarnings("ignore")
def test_pyros_baseball_example_is_not_pulled_by_a_stalled_restart():
    """The full-rank Gaussian on the centred baseball story, held to NUTS on the same story.

    At seed 0 restart 3 stalls down the funnel (0 Newton steps, ELBO about -1.6e13): it
    is left out, the verdict says so, and the population mean ``loc`` lands within 0.25
    NUTS posterior sds of NUTS's (a Gaussian over a funnel is not exact; it was 2 sds
    off with the stalled restart pooled). NUTS's own Monte Carlo error of the mean is
    0.02 sd at its ESS. Default SVI decentres the story's alpha instead
    (ppl_notes.vi.centring), where no restart stalls, and every mean lands within 0.25
    NUTS sd too (scale's was 0.19 sd off at seed 0: the decentred Gaussian's k-hat is
    0.65, and its importance-resampled draws keep that much of q's bias).
    """
    data = {"at_bats": torch.full((18,), 45.0, dtype=torch.float64),
            "hits": torch.tensor(HITS, dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vi = infer(partially_pooled_with_logit, data, method="svi", guide="fullrank", seed=0,
                   progress=False)
        default = infer(partially_pooled_with_logit, data, method="svi", seed=0,
                        progress=False)
        mc = infer(partially_pooled_with_logit, data, method="nuts", seed=0, chains=4,
                   draws=1000, progress=False)
    assert default.info["centring"]["centredness"] == {"alpha": 0.0}
    for name in ("loc", "scale", "alpha"):
        nuts_draws = mc.draws(name).reshape(len(mc.draws(name)), -1)
        svi_draws = default.draws(name).reshape(len(default.draws(name)), -1)
        shift = np.abs(svi_draws.mean(0) - nuts_draws.mean(0)) / nuts_draws.std(0)
        assert shift.max() < 0.25, (name, shift)
    restarts = vi.info["restarts"]
    left_out = [r["restart"] for r in restarts if not r["pooled"]]
    assert left_out and left_out == vi.info["left_out"]
    assert all(r["log_evidence"] < max(p["log_evidence"] for p in restarts) - 1e6
               for r in restarts if r["restart"] in left_out)
    assert vi.tree["posterior"].sizes["chain"] == len(restarts) - len(left_out)
    assert any("left out of the draws" in reason for reason in vi.check().holds)
    reference, sd = mc.draws("loc").mean(), mc.draws("loc").std()
    assert abs(vi.draws("loc").mean() - reference) < 0.25 * sd
    assert 0.8 < vi.draws("loc").std() / sd < 1.25


def test_fresh_draws_of_a_fit_with_restarts_come_from_its_best_guide():
    """``log_evidence(how="elbo", num_samples=2000)`` after default SVI (4 restarts).

    Before, it raised an OptionError; now the best pooled restart's guide draws afresh,
    and the estimate says so. The posterior is Gaussian and in the family, so the ELBO
    equals the closed-form evidence (the KL is 0) up to its Monte Carlo error.
    """
    from ppl_notes.models.conjugate import normal_mean, normal_mean_log_evidence

    fit = infer(normal_mean, method="svi", progress=False)
    estimate = fit.log_evidence(how="elbo", num_samples=2000)
    assert "restart" in estimate.source and "highest final ELBO" in estimate.source
    truth = normal_mean_log_evidence(normal_mean.default_data()["x"])
    assert abs(estimate.value - truth) < 4 * estimate.standard_error + 1e-6
