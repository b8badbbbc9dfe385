"""Generative stories, one module per story.

Each story module exposes its :class:`~ppl_notes.story.Model` objects; a story may also
provide ``report(posterior) -> dict`` with the quantities its readers ask about (the
heights story: how likely is someone of 180 cm to be male?).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ppl_notes.errors import StoryError

__all__ = ["STORIES", "StoryEntry", "get_story"]


@dataclass(frozen=True)
class StoryEntry:
    """Where a story and its default guide live."""

    module: str
    model: str
    guide_module: str | None = None
    guide: str | None = None

    def load_model(self):
        """The story's :class:`~ppl_notes.story.Model`."""
        return getattr(importlib.import_module(self.module), self.model)

    def load_guide(self):
        """The story's hand-written guide, or None (an autoguide is used)."""
        if self.guide_module is None:
            return None
        return getattr(importlib.import_module(self.guide_module), self.guide)

    def report(self, posterior) -> dict[str, float]:
        """The story's own quantities of interest for a posterior (may be empty)."""
        module = importlib.import_module(self.module)
        return module.report(posterior) if hasattr(module, "report") else {}


#: story name -> where it lives; the CLI lists and runs these.
STORIES = {
    "heights": StoryEntry("ppl_notes.models.heights", "model"),
    "normal_mean": StoryEntry("ppl_notes.models.conjugate", "normal_mean",
                              "ppl_notes.guides.conjugate", "normal_mean_guide"),
    "beta_bernoulli": StoryEntry("ppl_notes.models.conjugate", "beta_bernoulli",
                                 "ppl_notes.guides.conjugate", "beta_bernoulli_guide"),
    "eight_schools": StoryEntry("ppl_notes.models.eight_schools", "centered",
                                "ppl_notes.guides.eight_schools", "centered_meanfield"),
    "eight_schools_noncentered": StoryEntry("ppl_notes.models.eight_schools", "noncentered",
                                            "ppl_notes.guides.eight_schools",
                                            "noncentered_meanfield"),
    "correlated_gaussian": StoryEntry("ppl_notes.models.correlated", "gaussian",
                                      "ppl_notes.guides.correlated", "meanfield"),
    "vae": StoryEntry("ppl_notes.models.vae", "vae", "ppl_notes.guides.vae", "encoder"),
    "linear_regression": StoryEntry("ppl_notes.models.regression", "linear"),
    "logistic_regression": StoryEntry("ppl_notes.models.regression", "logistic"),
}


def get_story(name: str) -> StoryEntry:
    """The registry entry of story ``name``."""
    if name not in STORIES:
        raise StoryError(f"unknown story {name!r}; the stories are {sorted(STORIES)}")
    return STORIES[name]
