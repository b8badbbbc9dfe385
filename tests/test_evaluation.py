"""The evaluation layer: paths agree with the one-draw story, and are chosen by checking."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to

from ppl_notes import guide, infer, model
from ppl_notes.errors import ModelGuideMismatchError
from ppl_notes.evaluation import check_points, choose_path, evaluate, story_facts
from ppl_notes.models import heights


def branching(x):
    """A story that branches on a value: vmap cannot map it, a captured graph would freeze it."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    scale = 1.0 if bool(mu > -1e9) else 2.0  # always 1.0, decided per draw in Python
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, scale), obs=x)


def triangle():
    """a ~ U(0, 1), b ~ U(0, 1 - a) made flat: the uniform density on a + b < 1."""
    a = pyro.sample("a", dist.Uniform(0.0, 1.0))
    b = pyro.sample("b", dist.Uniform(0.0, 1.0 - a))
    pyro.factor("flat", torch.log1p(-a))
    return b


def matmul(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def _prepared(story, data):
    prepared = story.prepare_data(data)
    story.check_data(prepared)
    return prepared


def test_paths_are_chosen_by_what_the_story_does():
    rng = np.random.default_rng(0)
    cases = {
        "plate": (heights.model, None),
        "vmap": (model(observed="y")(matmul), {"X": rng.normal(size=(20, 3)),
                                                "y": rng.normal(size=20)}),
        "loop": (model(observed="x")(branching), {"x": rng.normal(size=10)}),
    }
    for expected, (story, data) in cases.items():
        prepared = _prepared(story, data)
        facts = story_facts(story, prepared)
        assert choose_path(story, prepared, facts) == expected, facts.path_reason


@pytest.mark.parametrize("path", ["plate", "vmap"])
def test_batched_paths_equal_the_one_draw_story_on_heights(path):
    story = heights.model
    data = _prepared(story, None)
    facts = story_facts(story, data)
    points = check_points(story, data, facts, count=5, seed=3)
    with torch.no_grad():
        one = evaluate(story, data, facts, points, unconstrained=True, path="loop")
        got = evaluate(story, data, facts, points, unconstrained=True, path=path)
    torch.testing.assert_close(got.total, one.total, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.pointwise["height"], one.pointwise["height"])
    for name in facts.continuous:
        torch.testing.assert_close(got.constrained[name], one.constrained[name])


def test_the_one_draw_path_samples_a_story_that_branches_on_values():
    x = np.random.default_rng(1).normal(2.0, 1.0, 30)
    fit = infer(model(observed="x")(branching), {"x": x}, method="nuts", chains=2, warmup=300,
                draws=300, progress=False)
    assert json.loads(fit.to_arviz().attrs["info"])["path"] == "loop"
    precision = 1 / 100 + len(x)
    draws = fit.draws("mu")
    # 600 draws of a 1-D Gaussian (ESS > 150): 4 MCSE < 0.33 sd
    assert abs(draws.mean() - x.sum() / precision) < 0.33 * precision**-0.5


def test_a_support_that_depends_on_another_site_is_mapped_at_each_evaluation():
    """Pyro's autoguides and potential freeze b's support at its first trace; here it moves."""
    fit = infer(model(observed=())(triangle), {}, method="nuts", chains=4, warmup=500,
                draws=1000, progress=False)
    a, b = fit.draws("a"), fit.draws("b")
    assert np.all(a + b < 1)
    # uniform on the triangle: E[a] = E[b] = 1/3, sd sqrt(1/18); 4000 draws, ESS > 800
    for draws in (a, b):
        assert abs(draws.mean() - 1 / 3) < 4 * math.sqrt(1 / 18 / 800)
        assert abs(draws.std() - math.sqrt(1 / 18)) < 0.02


def test_a_guide_written_the_stan_way_is_accepted_and_a_wrong_support_refused():
    @model(observed="x")
    def coin(x):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("flips", len(x)):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    @guide(coin)
    def stan_way(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        scale = pyro.param("scale", torch.tensor(0.3), constraint=constraints.positive)
        pyro.sample("p", dist.TransformedDistribution(dist.Normal(loc, scale),
                                                      biject_to(constraints.unit_interval)))

    @guide(coin)
    def wrong(x):
        pyro.sample("p", dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.1))

    flips = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=float)
    fit = infer(coin, {"x": flips}, guide=stan_way, steps=1500, progress=False)
    # Beta(2 + 8, 2 + 2): mean 10/14, sd 0.117; a logit-normal q is close to it
    assert abs(fit.draws("p").mean() - 10 / 14) < 0.03
    with pytest.raises(ModelGuideMismatchError, match="site 'p'.*support"):
        infer(coin, {"x": flips}, guide=wrong, steps=5, progress=False)


def test_float32_and_float64_stories_run_in_their_own_dtype():
    def story(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(()), torch.ones(()) * 10))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, torch.tensor(1.0)), obs=x)

    x = np.random.default_rng(2).normal(1.0, 1.0, 25)
    for dtype in (torch.float32, torch.float64):
        fit = infer(model(observed="x", dtype=dtype)(story), {"x": x}, method="map",
                    progress=False)
        exact = x.sum() / (1 / 100 + len(x))
        assert abs(float(fit.draws("mu")[0]) - exact) < (1e-4 if dtype == torch.float32
                                                         else 1e-8)
