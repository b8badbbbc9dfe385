"""Generative stories, one module per story; each module's ``model`` is the story."""

from __future__ import annotations

import importlib

__all__ = ["STORIES", "get_story"]

#: story name -> module path; the CLI lists and runs these.
STORIES = {
    "heights": "ppl_notes.models.heights",
    "normal_mean": "ppl_notes.models.conjugate",
    "beta_bernoulli": "ppl_notes.models.conjugate",
}


def get_story(name: str):
    """The :class:`~ppl_notes.story.Model` registered under ``name``."""
    from ppl_notes.errors import StoryError

    if name not in STORIES:
        raise StoryError(f"unknown story {name!r}; the stories are {sorted(STORIES)}")
    module = importlib.import_module(STORIES[name])
    return getattr(module, name) if hasattr(module, name) else module.model
