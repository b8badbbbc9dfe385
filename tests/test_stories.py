"""Every registered story and its guide run end to end (as Pyro's test_examples does)."""

import numpy as np
import pytest

from ppl_notes import infer
from ppl_notes.models import STORIES


@pytest.mark.parametrize("name", sorted(STORIES))
def test_every_story_runs_with_its_guide_and_autoguide(name):
    entry = STORIES[name]
    story, guide = entry.load_model(), entry.load_guide()
    assert story.story, f"story {name!r} has no docstring telling its story"
    for chosen in (guide, None):
        fit = infer(story, method="svi", guide=chosen, steps=30, num_draws=20, progress=False)
        for site in fit.tree["posterior"].data_vars:
            assert np.isfinite(fit[site]).all()
    simulated = story.simulate(seed=1)
    assert set(story.observed) <= set(simulated)
