"""The evaluation layer: a story's facts (read once per run, passed down), its log density.

Every back end evaluates stories through this package: the NUTS potential, the point
estimates and EM, the evaluation of posterior draws after any method, the ArviZ
converter. It decides once per story and data how a batch of draws is evaluated
(Pyro's plates, ``torch.func.vmap``, or one draw at a time), by checking that the
batched numbers equal the one-draw story's, so that a story is run with the meaning its
author gave it.
"""

from ppl_notes.evaluation.context import RunContext
from ppl_notes.evaluation.density import PATHS, Evaluation, evaluate
from ppl_notes.evaluation.facts import StoryFacts, story_dtype, story_facts
from ppl_notes.evaluation.handlers import run_dtype
from ppl_notes.evaluation.paths import check_points, choose_path

__all__ = ["PATHS", "Evaluation", "RunContext", "StoryFacts", "check_points", "choose_path",
           "evaluate", "run_dtype", "story_dtype", "story_facts"]
