"""Every corpus story (written as Pyro users write them) runs on every method and is right.

The truth never comes from ppl_notes: closed forms and numpy quadrature for the
user-style stories, posteriordb's Stan reference for its eight programs
(``tests/corpus``). Tolerances:

* NUTS means: |mean - truth| < 4 combined MCSE (ours from ArviZ, the reference's from
  posteriordb; closed forms and quadrature have none);
* NUTS sds: |sd / sd_truth - 1| < 4 sqrt(1 / (2 ESS) + 1 / (2 ESS_ref)), the Monte Carlo
  error of an sd estimate from ESS effective draws of a near-Gaussian posterior;
* MAP: the known mode to 1e-3 sd (closed forms, L-BFGS converged to 1e-9 gradients), to
  0.06 sd for quadrature (the grid's spacing is 18 sd / 400 = 0.045 sd); where the mode is
  not known (posteriordb), within 3 reference sds of the posterior mean;
* SVI with a family containing the posterior, or a Gaussian posterior (whose mean a
  mean-field Gaussian recovers exactly): means within 0.2 sd plus 4 MCSE of the 1000
  independent draws (Adam's jitter at the end of the run is ~0.05 sd here).
"""

from __future__ import annotations

import json
import math

import arviz_stats
import numpy as np
import pytest

from ppl_notes import infer
from ppl_notes.errors import StoryError
from tests.corpus.cases import CASES

#: 1000 draws: the tolerances below come from their own MCSE and ESS, so they stay honest;
#: benchmarks/bench_corpus.py runs 4 chains x (500 + 500).
NUTS = {"chains": 2, "warmup": 400, "draws": 500}
SVI = {"steps": 1500, "num_draws": 1000, "learning_rate": 0.02}
#: Hundreds of sites (a loop over time, a Markov chain) or a deep-tree posterior (the GP):
#: NUTS compiles for a minute and takes ~100 leapfrog steps an iteration, so 600 draws (the
#: tolerances follow their ESS); Pyro's own SVI loop takes 0.4-0.7 s a step, so SVI is a
#: smoke test of it, its accuracy not asserted.
HEAVY = ("arK-arK", "hmm_example-hmm_example", "gp_pois_regr-gp_pois_regr", "hmm_markov")
HEAVY_NUTS = {"warmup": 300, "draws": 300}
HEAVY_SVI = {"steps": 30, "num_draws": 100}

_fits: dict[tuple[str, str], object] = {}


def fit_of(name: str, method: str):
    """One fit per (story, method), shared by every test that reads it."""
    key = (name, method)
    if key not in _fits:
        case = CASES[name]
        nuts = {**NUTS, **(HEAVY_NUTS if name in HEAVY else {}), **case.nuts}
        options = {"nuts": nuts, "map": {}, "em": {}}.get(method)
        if method == "svi":
            options = {**(HEAVY_SVI if name in HEAVY else SVI), **case.svi}
        _fits[key] = infer(case.story, case.data, method=method, progress=False,
                           guide=case.guide if method == "svi" else None, **options)
    return _fits[key]


def names_for(method: str) -> list[str]:
    return [name for name, case in CASES.items() if method in case.methods]


def test_the_corpus_has_twenty_user_stories_and_the_eight_posteriordb_programs():
    user = [c for c in CASES.values() if c.source != "posteriordb"]
    assert len(user) >= 20
    assert sum(c.source == "posteriordb" for c in CASES.values()) == 8


@pytest.mark.parametrize("name", names_for("nuts"))
def test_nuts_matches_the_truth(name):
    _assert_matches_the_truth(name, fit_of(name, "nuts"))


@pytest.mark.parametrize(("metric", "name"), [
    ("fisher", "eight_schools-eight_schools_noncentered"),
    ("fisher", "earnings-logearn_interaction"),
    ("lowrank", "kilpisjarvi_mod-kilpisjarvi"),
    ("lowrank", "earnings-logearn_interaction"),
])
def test_the_gradient_based_metrics_match_the_reference(metric, name):
    """nutpie's adaptations (the Fisher diagonal, and it with a low-rank correction) give
    posteriordb's posterior too: kilpisjarvi (correlation 0.99999) and earnings (an
    interaction model with correlated coefficients) are where the correction acts."""
    case = CASES[name]
    fit = infer(case.story, case.data, method="nuts", progress=False,
                **{**NUTS, **case.nuts, "mass_matrix": metric})
    _assert_matches_the_truth(name, fit)


def _assert_matches_the_truth(name, fit):
    """Every mean within 4 combined MCSE of the truth, every sd within 4 of its standard
    errors (from the ESS of both runs: of the draws for the mean, of their squared
    deviations for the sd)."""
    case = CASES[name]
    info = json.loads(fit.to_arviz().attrs["info"])
    assert info["path"] in ("plate", "vmap", "loop")
    for element, moments in case.truth.items():
        draws = case.draws(fit, element)
        mean, sd = float(draws.mean()), float(draws.std())
        mcse = float(arviz_stats.mcse(draws, method="mean"))
        reference_mcse = case.reference_mcse.get(element, 0.0)
        bound = 4 * math.hypot(mcse, reference_mcse)
        assert abs(mean - moments.mean[0]) < bound, (
            f"{name} {element}: mean {mean:.5g} vs {moments.mean[0]:.5g} ({case.source}), "
            f"4 MCSE = {bound:.3g}, path {info['path']}")
        reference_ess = 10_000 if case.source == "posteriordb" else math.inf
        # the sd's precision follows the ESS of the squared deviations, not the mean's:
        # an antithetic sampler (ESS above the number of draws, as the low-rank metric
        # gives on diamonds) estimates the mean better than independent draws would, the
        # variance not
        variance_ess = float(arviz_stats.ess((draws - mean) ** 2, method="mean"))
        sd_bound = 4 * math.sqrt(1 / (2 * variance_ess) + 1 / (2 * reference_ess))
        assert abs(sd / moments.sd[0] - 1) < sd_bound, (
            f"{name} {element}: sd {sd:.5g} vs {moments.sd[0]:.5g}, bound {sd_bound:.3f}")


@pytest.mark.parametrize("name", names_for("map"))
def test_map_finds_the_mode(name):
    case, fit = CASES[name], fit_of(name, "map")
    for element, moments in case.truth.items():
        value = float(case.draws(fit, element).reshape(-1)[0])
        if case.mode_known and moments.mode is not None:
            tolerance = (1e-3 if case.source.startswith("closed form") else 0.06) * moments.sd[0]
            assert abs(value - moments.mode[0]) < tolerance, (
                f"{name} {element}: MAP {value:.6g} vs mode {moments.mode[0]:.6g}")
        else:
            assert abs(value - moments.mean[0]) < 3 * moments.sd[0], (
                f"{name} {element}: MAP {value:.6g} far from the posterior "
                f"({moments.mean[0]:.4g} +- {moments.sd[0]:.3g})")


@pytest.mark.parametrize("name", names_for("svi"))
def test_svi_runs_and_is_right_where_its_family_allows(name):
    case, fit = CASES[name], fit_of(name, "svi")
    elbo = fit.history["elbo"].to_numpy()
    assert np.all(np.isfinite(elbo))
    tenth = max(2, len(elbo) // 10)
    first, last = elbo[:tenth], elbo[-tenth:]
    # The autoguide starts at a quick MAP, so the ELBO may have little left to gain: it
    # must not end lower than it began beyond four standard errors of the two means.
    noise = math.sqrt(first.var(ddof=1) / tenth + last.var(ddof=1) / tenth)
    assert last.mean() > first.mean() - 4 * noise
    for element in case.truth:
        assert np.all(np.isfinite(case.draws(fit, element)))
    if not case.svi_means_exact:
        return
    for element, moments in case.truth.items():
        draws = case.draws(fit, element)
        bound = 0.2 * moments.sd[0] + 4 * draws.std() / math.sqrt(draws.size)
        assert abs(draws.mean() - moments.mean[0]) < bound, (
            f"{name} {element}: SVI mean {draws.mean():.5g} vs {moments.mean[0]:.5g}")


@pytest.mark.parametrize("name", names_for("em"))
def test_em_reaches_the_maximum_likelihood(name):
    from scipy import optimize
    from scipy.special import logsumexp

    x = np.asarray(CASES[name].data["data"])

    def negative(locs):
        return -np.sum(logsumexp(-0.5 * (x[:, None] - locs) ** 2, axis=1))

    best = np.sort(optimize.minimize(negative, [-1.0, 1.0], method="BFGS", tol=1e-12).x)
    fit = fit_of(name, "em")
    np.testing.assert_allclose(np.sort(fit.draws("locs")[0]), best, atol=1e-4)


def test_em_names_why_a_global_discrete_site_is_not_its_case():
    case = CASES["change_point_global_discrete"]
    with pytest.raises(StoryError, match=r"'tau'.*couples every observation"):
        infer(case.story, case.data, method="em", progress=False)


def test_a_global_discrete_site_is_recovered_and_its_loglik_left_out_with_a_note():
    from tests.corpus.truth import change_point

    case = CASES["change_point_global_discrete"]
    fit = fit_of(case.name, "nuts")
    tree = fit.to_arviz()
    assert "log_likelihood" not in tree.children
    assert "couples every observation" in tree.attrs["log_likelihood_note"]
    _, p_tau = change_point(np.asarray(case.data["y"]), 2.0, 0.5)
    tau = fit.draws("tau").astype(int)
    empirical = np.bincount(tau, minlength=len(p_tau)) / tau.size
    # total variation between the exact p(tau | y) and 2000 draws: ~0.5 sqrt(K / n) by chance
    assert 0.5 * np.abs(empirical - p_tau).sum() < 0.1


def test_deterministic_sites_are_their_functions_of_the_draws():
    fit = fit_of("factor_and_deterministic", "nuts")
    np.testing.assert_allclose(fit["mu_squared"], fit["mu"] ** 2, rtol=1e-12)


def test_each_story_is_evaluated_as_its_author_wrote_it():
    """Batch-aware stories keep Pyro's plates; the rest get vmap, never a wrong batch."""
    from ppl_notes.evaluation import choose_path, story_facts

    paths = {}
    for name in ("linear_regression_matmul", "gmm_locs_assignment", "normal_mean_float32",
                 "change_point_global_discrete"):
        story = CASES[name].story
        data = story.prepare_data(CASES[name].data)
        story.check_data(data)
        paths[name] = choose_path(story, data, story_facts(story, data))
    assert paths == {"linear_regression_matmul": "vmap", "gmm_locs_assignment": "vmap",
                     "normal_mean_float32": "plate", "change_point_global_discrete": "vmap"}


SCRIPT = '''
import json
import numpy as np
import pyro
import pyro.distributions as dist
from ppl_notes import infer, model


def story(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("people", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


y = np.random.default_rng(0).normal(1.0, 1.0, 600)
fit = infer(model(observed="y")(story), {"y": y}, method="nuts", chains=2, warmup=300,
            draws=300, progress=False, processes=2)
print(json.dumps({"mean": float(fit.draws("mu").mean()), "sum": float(y.sum())}))
'''


def test_a_story_defined_in_a_script_runs_in_worker_processes(tmp_path):
    """A script without a __main__ guard: its story travels to the workers by value."""
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    precision = 1 / 100 + 600
    exact_mean, exact_sd = result["sum"] / precision, precision**-0.5
    # 1200 draws of a 1-D Gaussian: ESS > 300, so 4 MCSE < 0.25 sd
    assert abs(result["mean"] - exact_mean) < 0.25 * exact_sd
