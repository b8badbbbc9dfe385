"""The collector leaves the objects that exist when a fit starts alone, and only then."""

import gc
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_notes import infer
from ppl_notes._collector import existing_objects_frozen
from ppl_notes.errors import DiagnosticWarning
from ppl_notes.models.conjugate import normal_mean


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_within_and_given_back_after(unfrozen):
    with existing_objects_frozen():
        frozen = gc.get_freeze_count()
        with existing_objects_frozen():  # re-entered: the outer entry's freeze stands
            pass
        inner_exit = gc.get_freeze_count()
    assert frozen > 1000 and inner_exit == frozen
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_alone(unfrozen):
    gc.freeze()
    theirs = gc.get_freeze_count()
    with existing_objects_frozen():
        assert gc.get_freeze_count() == theirs
    assert gc.get_freeze_count() == theirs


def test_infer_runs_the_story_frozen_and_unfreezes(unfrozen):
    seen = []

    def story(x):  # a user's story: records the collector's state while it runs
        seen.append(gc.get_freeze_count())
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    infer(story, {"x": torch.randn(20, dtype=torch.float64)}, method="map", progress=False)
    assert seen and min(seen) > 1000
    assert gc.get_freeze_count() == 0


def test_a_fits_warning_still_points_at_the_callers_line(unfrozen):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infer(normal_mean, method="nuts", chains=1, warmup=30,
              draws=30, progress=False)
    ours = [w for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert ours and all(w.filename == __file__ for w in ours)
