"""Stories that branch on a value of their parameters, as users write them.

``if 0.7 < mu < 1.1: pyro.factor(...)`` takes its branch from the point. A batched run
takes one branch for a whole batch of draws, and a recorded or traced potential freezes
the branch it saw; the story's first run may also lack a factor that later runs add (or
the reverse). Every such story must be evaluated per draw, each draw taking its own
branch, and the log density must be the story's own at every point: held here to eager
Pyro's log joint at random points (a hypothesis test over generated stories) and, end to
end, to the posterior by quadrature on a grid, in both directions (a factor the first
run lacks, and one it has).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.distributions.transforms import biject_to

from ppl_notes import infer, model
from ppl_notes.errors import StoryError
from ppl_notes.evaluation import story_facts
from ppl_notes.evaluation.potential import BatchedPotential

Y = torch.tensor([0.31, 1.52, 0.47, 1.18, 0.96, 0.05, 1.71, 0.88, 0.62, 1.10],
                 dtype=torch.float64)
Y = Y - Y.mean() + 0.88  # ten observations with mean 0.88


def _grid_posterior(log_density, lo=-3.0, hi=5.0, num=400_001):
    """Posterior mean, sd and the probability of ``region`` by quadrature on a fine grid."""
    grid = np.linspace(lo, hi, num)
    log_p = log_density(grid)
    weights = np.exp(log_p - log_p.max())
    weights /= weights.sum()
    mean = float((weights * grid).sum())
    return grid, weights, mean, float(np.sqrt((weights * (grid - mean) ** 2).sum()))


def _step_story(direction: str, threshold: float, bonus: float):
    """``mu ~ Normal(0, 3)``, ten ``y ~ Normal(mu, 1)``, and a factor on one side of a cut."""

    @model(observed="y", data={"y": Y})
    def stepped(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        taken = mu > threshold if direction == "above" else mu < threshold
        if taken:
            pyro.factor("bonus", torch.tensor(bonus))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    return stepped


def _step_truth(direction: str, threshold: float, bonus: float):
    def log_density(grid):
        y = Y.double().numpy()
        taken = grid > threshold if direction == "above" else grid < threshold
        return (-grid ** 2 / 18 - ((y[:, None] - grid) ** 2).sum(0) / 2 + bonus * taken)
    return _grid_posterior(log_density)


@pytest.mark.parametrize("direction", ["above", "below"])
def test_nuts_follows_a_factor_the_first_run_lacks_or_has(direction):
    """NUTS on a factor behind ``if mu > 0.88`` (or ``<``) equals quadrature.

    The story's first run takes one side of the cut, so one of the two directions adds a
    factor the first run lacked and the other drops one it had (before: the first was
    never counted, the second raised ``KeyError``). The means agree within 5 Monte Carlo
    standard errors (sd / sqrt(ESS), ArviZ's bulk ESS), and so does the share of draws
    past the cut (binomial standard error at the same ESS).
    """
    threshold, bonus = 0.88, 1.5
    story = _step_story(direction, threshold, bonus)
    first_run = story_facts(story, story.prepare_data({"y": Y})).trace
    fit = infer(story, method="nuts", chains=2, warmup=300, draws=500, seed=1,
                progress=False)
    assert fit.info["path"] == "loop"
    assert "if taken:" in fit.info["value_branch"]
    grid, weights, mean, sd = _step_truth(direction, threshold, bonus)
    draws = fit.draws("mu")
    ess = float(fit.summary().loc["mu", "ess_bulk"])
    assert abs(draws.mean() - mean) < 5 * sd / math.sqrt(ess), (draws.mean(), mean, sd, ess)
    past = grid > threshold
    share_truth = float(weights[past].sum())
    share = float((draws > threshold).mean())
    assert abs(share - share_truth) < 5 * math.sqrt(share_truth * (1 - share_truth) / ess)
    # without the factor the share past the cut is 0.5: the bonus moves it far from there
    assert abs(share_truth - 0.5) > 0.25
    assert abs(share - 0.5) > 0.2
    first_mu = float(first_run.nodes["mu"]["value"])
    taken_first = first_mu > threshold if direction == "above" else first_mu < threshold
    assert ("bonus" in first_run.nodes) == taken_first


def test_the_two_directions_are_both_met():
    """Of the two stories above, exactly one has the factor at its first run."""
    firsts = [story_facts(s, s.prepare_data({"y": Y})).trace
              for s in (_step_story("above", 0.88, 1.5), _step_story("below", 0.88, 1.5))]
    assert sorted("bonus" in trace.nodes for trace in firsts) == [False, True]


def test_a_narrow_penalised_band_is_avoided():
    """The issue's story: ``if 0.7 < mu < 1.1: pyro.factor(-8)``; the truth puts 0.1% there.

    Before, NUTS put 71% of its draws in the band and MAP landed in it silently. MAP's
    gradient steps cannot see the band's edges: it now says so (a finding).
    """

    @model(observed="y", data={"y": Y})
    def band(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        if 0.7 < mu < 1.1:
            pyro.factor("penalty", torch.tensor(-8.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def log_density(grid):
        y = Y.double().numpy()
        return -grid ** 2 / 18 - ((y[:, None] - grid) ** 2).sum(0) / 2 - 8.0 * (
            (grid > 0.7) & (grid < 1.1))

    grid, weights, _, _ = _grid_posterior(log_density)
    in_band = float(weights[(grid > 0.7) & (grid < 1.1)].sum())
    assert in_band < 0.01
    facts = story_facts(band, band.prepare_data({"y": Y}))
    potential = BatchedPotential(band, band.prepare_data({"y": Y}), 2, compiler="tape",
                                 facts=facts)
    assert potential.path == "loop" and potential.compiler == "none"
    value, _ = potential(np.array([[0.5], [0.9]]))
    # the band costs 8 nats at 0.9 and nothing at 0.5: the two potentials differ by it
    expected = -(log_density(np.array([0.5])) - log_density(np.array([0.9])))
    assert value[0] - value[1] == pytest.approx(float(expected[0]), abs=1e-9)
    with pytest.warns(UserWarning, match="branches on a value"):
        point = infer(band, method="map", progress=False)
    assert any(f.check == "value_branch" for f in point.findings())


def test_a_latent_site_under_a_branch_is_refused():
    """A latent site that only some values sample is a changing space: a StoryError."""

    @model(observed="y", data={"y": Y})
    def appearing(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0)) if mu > 2.0 else 0.0
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    with pytest.raises(StoryError, match="latent sites change"):
        infer(appearing, method="nuts", chains=1, warmup=50, draws=50, progress=False)


def test_a_branch_on_a_whole_batch_is_not_batched():
    """A story written batch-aware whose branch reads a reduction (``(mu > 2).any()``).

    On the plate path one batch of draws would take one branch for all; with a single
    check draw on one side it would pass the path's check. The branch is found, and the
    story is evaluated draw by draw.
    """

    @model(observed="y", data={"y": Y})
    def reduced(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        if (mu > 2.0).any():
            pyro.factor("far", torch.tensor(-3.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu[..., None], 1.0), obs=y)

    data = reduced.prepare_data({"y": Y})
    potential = BatchedPotential(reduced, data, 2, compiler="tape")
    assert potential.path == "loop"
    assert "(mu > 2.0).any()" in potential.facts.value_branch
    value, _ = potential(np.array([[1.0], [3.0]]))
    near, far = (-value).tolist()
    y = Y.double()

    def plain(mu):
        at = torch.tensor(mu, dtype=torch.float64)
        one = torch.ones((), dtype=torch.float64)
        return float(dist.Normal(0 * one, 3 * one).log_prob(at)
                     + dist.Normal(at, one).log_prob(y).sum())

    assert near == pytest.approx(plain(1.0), abs=1e-9)
    assert far == pytest.approx(plain(3.0) - 3.0, abs=1e-9)


def test_a_smooth_where_stays_batched():
    """``torch.where`` reads nothing into Python: the story keeps its batched path."""

    @model(observed="y", data={"y": Y})
    def smooth(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
        pyro.factor("bonus", torch.where(mu > 0.88, 1.5, 0.0))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu[..., None], 1.0), obs=y)

    facts = story_facts(smooth, smooth.prepare_data({"y": Y}))
    potential = BatchedPotential(smooth, smooth.prepare_data({"y": Y}), 2, compiler="tape",
                                 facts=facts)
    assert potential.path in ("plate", "vmap") and facts.value_branch is None


# -- generated stories, held to eager Pyro's log joint ---------------------------------

BRANCHES = ("factor_above", "factor_band", "item_scale", "likelihood_switch", "float_loc",
            "where")


def _generated_story(kind: str, cut: float, size: float):
    """A story with ``mu`` (real) and ``sigma`` (positive) and one branch of ``kind``."""

    def story(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 0.5))
        scale = sigma
        likelihood = dist.Normal
        if kind == "factor_above" and mu > cut:
            pyro.factor("extra", torch.tensor(size))
        if kind == "factor_band" and cut < mu < cut + 1.0:
            pyro.factor("extra", torch.tensor(-size))
        if kind == "item_scale" and sigma.item() > math.exp(cut / 4):
            scale = sigma * (1.0 + abs(size))
        if kind == "likelihood_switch" and not mu <= cut:
            likelihood = dist.Cauchy
        loc = mu
        if kind == "float_loc":
            loc = mu + (size if float(mu) > cut else 0.0)
        if kind == "where":
            pyro.factor("extra", torch.where(mu > cut, torch.tensor(size), torch.tensor(0.0)))
        with pyro.plate("n", len(y)):
            pyro.sample("y", likelihood(loc, scale), obs=y)

    return story


def _eager_log_joint(story, data, point: np.ndarray) -> tuple[float, np.ndarray]:
    """``log p(y, T(u)) + log|J_T(u)|`` and its gradient in ``u``, by Pyro and autograd.

    In float64 throughout, the story's constants too, as the story's own dtype is.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _log_joint_float64(story, data, point)
    finally:
        torch.set_default_dtype(previous)


def _log_joint_float64(story, data, point: np.ndarray) -> tuple[float, np.ndarray]:
    u = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    priors = {"mu": dist.Normal(0.0, 2.0), "sigma": dist.LogNormal(0.0, 0.5)}
    values, log_jacobian = {}, 0.0
    for index, (name, prior) in enumerate(priors.items()):
        transform = biject_to(prior.support)
        values[name] = transform(u[index])
        log_jacobian = log_jacobian + transform.log_abs_det_jacobian(u[index], values[name])
    with pyro.validation_enabled(False):
        trace = poutine.trace(poutine.condition(story, data=values)).get_trace(**data)
    total = trace.log_prob_sum() + log_jacobian
    (gradient,) = torch.autograd.grad(total, u)
    return float(total.detach()), gradient.numpy()


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # float(mu)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(BRANCHES), cut=st.floats(-1.0, 1.5), size=st.floats(-4.0, 4.0),
       points=st.lists(st.tuples(st.floats(-3.0, 3.0), st.floats(-1.5, 1.5)), min_size=1,
                       max_size=4))
def test_generated_branching_stories_equal_eager_pyro(kind, cut, size, points):
    """Over generated stories with value branches (a factor that appears above a cut or
    in a band, a scale chosen by ``.item()``, a likelihood switched by a comparison,
    ``float(mu)`` in a location, and ``torch.where`` as the smooth control), the
    potential and gradient every method uses equal eager Pyro's log joint at random
    points and at points on both sides of the cut, to 1e-9."""
    fn = _generated_story(kind, cut, size)
    story = model(observed="y", data={"y": Y})(fn)
    data = story.prepare_data({"y": Y})
    at = np.array([*points, (cut - 0.05, 0.1), (cut + 0.05, -0.1), (cut + 0.5, 1.0)],
                  dtype=np.float64)
    potential = BatchedPotential(story, data, len(at), compiler="tape")
    value, gradient = potential(at)
    for row, (mine, my_gradient) in enumerate(zip(-value, -gradient, strict=True)):
        truth, true_gradient = _eager_log_joint(fn, data, at[row])
        assert mine == pytest.approx(truth, rel=1e-9, abs=1e-9), (kind, at[row])
        np.testing.assert_allclose(my_gradient, true_gradient, rtol=1e-9, atol=1e-9)
    if kind == "where":
        assert potential.facts.value_branch is None
    else:
        assert potential.path == "loop" and potential.facts.value_branch
