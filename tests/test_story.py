import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_notes import (
    DataError,
    ModelGuideMismatchError,
    OptionError,
    PPLNotesError,
    StoryError,
    check_pairing,
    guide,
    infer,
    model,
)
from ppl_notes.guides.heights import meanfield
from ppl_notes.models import heights


def test_sites_table_describes_the_heights_story():
    table = heights.model.sites()
    assert list(table["name"]) == ["alpha", "mu", "sigma", "gender", "height"]
    rows = table.set_index("name")
    assert rows.loc["height", "kind"] == "observed"
    assert rows.loc["gender", "discrete"] and not rows.loc["mu", "discrete"]
    assert rows.loc["gender", "plates"] == ("people",)
    assert rows.loc["sigma", "plates"] == ("components",)
    assert rows.loc["alpha", "support"] == "simplex"
    assert rows.loc["sigma", "support"] == "positive"
    assert rows.loc["height", "shape"] == (934,)
    assert rows.loc["gender", "distribution"] == "Categorical"


def test_simulate_runs_the_story_forwards():
    draw = heights.model.simulate(seed=3, num_people=200)
    assert draw["height"].shape == (200,) and draw["gender"].shape == (200,)
    assert torch.all(draw["mu"][1:] >= draw["mu"][:-1])  # ordered: 0 is the shorter
    # each height comes from its gender's Normal: standardised residuals look N(0, 1)
    z = (draw["height"] - draw["mu"][draw["gender"]]) / draw["sigma"][draw["gender"]]
    assert abs(float(z.mean())) < 4 / np.sqrt(200) and abs(float(z.std()) - 1) < 0.2


def test_prior_predictive_has_a_sample_dimension():
    draws = heights.model.prior_predictive(num_samples=30, num_people=10)
    assert draws["height"].shape == (30, 10) and draws["alpha"].shape == (30, 2)
    # the prior of mu is OrderedNormal(170, 20): the mean of its two order statistics is 170
    assert abs(draws["mu"].mean() - 170) < 4 * 20 / np.sqrt(60)


def test_default_data_is_galton_in_cm():
    data = heights.model.default_data()["height"]
    assert data.shape == (934,)
    assert abs(data.mean() - 2.54 * (453 * 64.10 + 481 * 69.23) / 934) < 0.1


def test_configure_changes_priors_and_rejects_unknown_arguments():
    wide = heights.model.configure(mu_scale=50.0, num_groups=3)
    assert wide.sites(None).set_index("name").loc["mu", "shape"] == (3,)
    with pytest.raises(DataError, match="mu_sd"):
        heights.model.configure(mu_sd=1.0)


@model(observed="y")
def scale_story(y=None):
    """y ~ Normal(0, s), s ~ HalfNormal(1)."""
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("obs", 5):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


DATA = {"y": torch.zeros(5)}


def _pairing(fn):
    return check_pairing(scale_story, guide(scale_story)(fn), scale_story.prepare_data(DATA))


def test_pairing_accepts_a_fitting_guide():
    def good(y=None):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))

    _pairing(good)


def test_pairing_names_a_missing_latent_site():
    def missing(y=None):
        pass

    with pytest.raises(ModelGuideMismatchError, match="does not draw latent site 's'"):
        _pairing(missing)


def test_pairing_names_an_extra_site():
    def extra(y=None):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("t", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'t', which is not a site"):
        _pairing(extra)


def test_pairing_names_a_shape_mismatch():
    def wrong_shape(y=None):
        pyro.sample("s", dist.LogNormal(torch.zeros(3), 1.0).to_event(1))

    with pytest.raises(ModelGuideMismatchError, match=r"site 's'.*shape \(3,\).*shape \(\)"):
        _pairing(wrong_shape)


def test_pairing_names_a_support_mismatch():
    def unconstrained(y=None):
        pyro.sample("s", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="site 's'.*support real.*positive"):
        _pairing(unconstrained)


def test_pairing_rejects_a_guide_that_samples_an_observed_site():
    def greedy(y=None):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("obs", 5):
            pyro.sample("y", dist.Normal(0.0, 1.0))

    with pytest.raises(ModelGuideMismatchError, match="'y', which is observed"):
        _pairing(greedy)


def test_pairing_leaves_finite_discrete_sites_to_enumeration():
    data = heights.model.prepare_data(None)
    check_pairing(heights.model, meanfield, data)  # gender is not in the guide: fine


def test_errors_share_one_base_and_builtins():
    assert issubclass(ModelGuideMismatchError, PPLNotesError)
    assert issubclass(ModelGuideMismatchError, ValueError)
    assert issubclass(DataError, ValueError) and issubclass(OptionError, ValueError)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"y": torch.zeros(5), "z": 1.0}, "no site or argument 'z'"),
        ({"y": np.array([0.0, np.nan, 1.0, 2.0, np.inf])}, "2 NaN or infinite"),
        ({"y": np.array(["a", "b"])}, "must be numeric"),
        ({"y": np.array([])}, "'y' is empty"),
        ({}, "observed site 'y' has no data"),
        (pd.DataFrame({"y": []}, dtype=float), "no rows"),
        ([1, 2, 3], "must be a dict or a pandas DataFrame"),
    ],
)
def test_bad_data_is_named_before_inference(data, message):
    with pytest.raises(DataError, match=message):
        infer(scale_story, data, method="svi", steps=5, progress=False)


def test_data_frames_are_accepted():
    frame = pd.DataFrame({"y": np.zeros(5)})
    prepared = scale_story.prepare_data(frame)
    assert prepared["y"].dtype == torch.float64 and prepared["y"].shape == (5,)


def test_observed_site_data_argument_must_exist():
    with pytest.raises(StoryError, match="observed site 'x' takes its data from 'z'"):
        model(observed={"x": "z"})(lambda y=None: None)


def test_observed_site_never_observed_is_named():
    @model(observed="x")
    def story(y=None):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(StoryError, match="declares 'x' observed but never calls"):
        infer(story, {"y": [1.0, 2.0]}, steps=5, progress=False)


def test_guide_written_for_another_story_is_rejected():
    from ppl_notes.guides.conjugate import normal_mean_guide

    with pytest.raises(StoryError, match="written for story 'normal_mean'"):
        infer(scale_story, DATA, guide=normal_mean_guide, steps=5, progress=False)


def test_support_names_cover_common_constraints():
    from ppl_notes._sites import support_name, supports_compatible

    assert support_name(constraints.independent(constraints.real, 1)) == "real"
    assert supports_compatible(constraints.nonnegative, constraints.positive)
    assert not supports_compatible(constraints.simplex, constraints.real)


def test_a_story_is_frozen_and_a_fit_never_changes_it():
    """A Model's fields are written once. The data argument of a site declared observed
    by its name alone is found by the fit's first run, on a new story the fit keeps:
    the user's story is the same after the fit as before it (issue 29)."""
    import dataclasses

    @model(observed="x")
    def story(y=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(dataclasses.FrozenInstanceError):
        story.name = "another"
    assert story.observed_arguments == {"x": None}
    fit = infer(story, {"y": [1.0, 2.0, 3.0]}, method="map", progress=False)
    assert story.observed_arguments == {"x": None}
    assert fit.model.observed_arguments == {"x": "y"} and fit.model.fn is story.fn
    assert "constant_data" not in fit.tree.children  # y is the observed data
    assert fit.draws("mu")[0] == pytest.approx(6.0 / 3.01, rel=1e-4)  # sum y / (n + 1/10^2)
    assert heights.model.marginal is heights.model.marginal  # recorded once per story


def test_a_fit_of_a_shipped_story_pickles_with_plain_pickle():
    """A fit holds a copy of its story (``Model.observing``); the story's function is
    ``heights.model``'s own, whose name in its module is the decorated story. Plain
    ``pickle`` (joblib, multiprocessing) finds it by reference, and the copy comes back
    with the very function."""
    import pickle

    story = heights.model
    fit = infer(story, method="svi", progress=False, restarts=1, num_draws=50)
    assert pickle.loads(pickle.dumps(story)) is story
    again = pickle.loads(pickle.dumps(fit))
    assert again.model.fn is story.fn and again.model.name == "heights"
    np.testing.assert_array_equal(again.draws("mu"), fit.draws("mu"))


def test_a_plain_pyro_function_that_indexes_with_a_group_runs():
    """``locs[group]`` with integer groups, given to infer() as a plain function.

    The data are prepared as floats before the first run; the run that finds the
    observed sites now makes integer covariates used as indices integers again, as the
    data checks do (it raised "tensors used as indices must be long").
    """
    import pyro
    import pyro.distributions as dist
    import torch

    from ppl_notes import infer

    def grouped(group, y):
        locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(locs[group], 1.0), obs=y)

    group = torch.tensor([0, 1, 2, 0, 1, 2])
    y = torch.tensor([1.0, 2.0, 3.0, 1.2, 2.2, 3.2])
    fit = infer(grouped, {"group": group, "y": y}, method="map", progress=False)
    # MAP of a Normal(0, 5) prior and two unit-variance observations per group
    expected = [(1.0 + 1.2) / (2 + 1 / 25), (2.0 + 2.2) / (2 + 1 / 25), (3.0 + 3.2) / (2 + 1 / 25)]
    assert fit.draws("locs")[0].tolist() == pytest.approx(expected, abs=1e-4)
