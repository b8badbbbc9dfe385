"""One ``infer()`` call as every layer below it sees it: the run context.

``infer()`` checks the options, prepares the data and runs the story once on them to check
them; the facts of the story (:class:`~ppl_notes.evaluation.facts.StoryFacts`) are read
from that run. A :class:`RunContext` carries all of it down to the back end, and the back
end hands the facts on, by argument, to whatever evaluates the story: its potential, the
evaluation of its draws, the ArviZ converter. Nothing is looked up in a cache keyed by
the story's or the data's identity, so a function's answer depends only on what it is
given.

A context pickled for a worker process (SVI's restarts, NUTS's chains in processes, Dask)
leaves its facts behind: they hold a Pyro trace, which does not travel, and the worker
reads them again from its own copy of the data, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ppl_notes.evaluation.facts import StoryFacts, story_dtype, story_facts

__all__ = ["RunContext"]


@dataclass(frozen=True)
class RunContext:
    """A story, its prepared data and facts, and one method's checked options.

    Attributes
    ----------
    model : Model
        The story.
    data : dict
        Its prepared keyword arguments (tensors).
    guide : callable, str or None
        A guide function, an autoguide family's name, or None.
    seed : int
        The run's seed.
    progress : bool
        Whether progress bars are shown.
    options : dict
        Every option of the method, checked and defaulted.
    restart : int
        Which restart of a fit this is (0 for the first, or the only one).
    known_facts : StoryFacts or None
        The facts, where already read (``infer()`` reads them from the run that checked
        the data); :attr:`facts` reads them once otherwise.
    pointwise_skipped : str or None
        Why the pointwise log-likelihood is not stored (``StoryFacts.pointwise_skipped``),
        kept here so that facts read again (a worker process's, the hand-marginalised
        story's) say the same.
    """

    model: Any
    data: Mapping[str, Any]
    guide: Any = None
    seed: int = 0
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    restart: int = 0
    known_facts: StoryFacts | None = field(default=None, repr=False, compare=False)
    known_marginal: tuple | None = field(default=None, repr=False, compare=False)
    pointwise_skipped: str | None = None

    @property
    def facts(self) -> StoryFacts:
        """The story's facts on the data, read at most once per context."""
        if self.known_facts is None:  # written once: a frozen field filled on first use
            facts = story_facts(self.model, self.data)
            facts.pointwise_skipped = self.pointwise_skipped
            object.__setattr__(self, "known_facts", facts)
        return self.known_facts

    @property
    def dtype(self):
        """The dtype the story runs in."""
        return story_dtype(self.model)

    def marginal(self) -> tuple[Any, StoryFacts]:
        """The story with its discrete sites summed out by hand (or itself), and its facts.

        NUTS and VI's potential run a story's hand-marginalised form where it has one
        (``@model(marginal=...)``): the same density, without enumeration.
        """
        marginal = getattr(self.model, "marginal", self.model)
        if marginal is self.model:
            return self.model, self.facts
        if self.known_marginal is None:
            facts = story_facts(marginal, self.data)
            facts.pointwise_skipped = self.pointwise_skipped
            object.__setattr__(self, "known_marginal", (marginal, facts))
        return self.known_marginal

    def replace(self, **changes: Any) -> RunContext:
        """A copy with ``changes`` (options, seed, restart...).

        The facts go with it, unless the story or the data change.
        """
        if "model" in changes or "data" in changes:
            changes = {"known_facts": None, "known_marginal": None, **changes}
        return dataclasses.replace(self, **changes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["known_facts"] = state["known_marginal"] = None  # a Pyro trace: read again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
