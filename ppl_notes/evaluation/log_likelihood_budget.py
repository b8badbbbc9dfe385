"""Whether a fit stores the pointwise log-likelihood: a budget, or the user's say.

The pointwise log-likelihood (one value per draw and observed value, the ``log_likelihood``
group that LOO, WAIC and ``compare`` read) grows with the data: 4000 draws of a story
with a million observed values are 32 GB of float64, and a fit that stores them is
killed where the parameters are three numbers. It is stored where it fits
:data:`POINTWISE_BUDGET` elements, or always or never where ``infer(...,
log_likelihood=)`` says so. PyMC and NumPyro store it only when asked
(``idata_kwargs={"log_likelihood": True}``, ``numpyro.infer.log_likelihood``); ppl_notes
keeps it by default where it is cheap, so that ``loo()`` works on every small fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ppl_notes.errors import OptionTypeError
from ppl_notes.evaluation.facts import StoryFacts

__all__ = ["POINTWISE_BUDGET", "expected_draws", "keep_pointwise"]

#: The most elements (draws x observed values) of a pointwise log-likelihood stored
#: unasked: 800 MB of float64, e.g. 4000 draws of 25,000 observed values.
POINTWISE_BUDGET = 100_000_000
#: Restarts counted where ``restarts=None`` leaves them to the method: the most default
#: SVI fits (``ppl_notes.inference.svi.DEFAULT_RESTARTS``), each with its own draws
UNRESOLVED_RESTARTS = 4


def expected_draws(options: Mapping[str, Any]) -> int:
    """The draws a fit with these (validated) options returns, at most.

    NUTS: ``chains x draws / thin``; the variational methods: ``num_draws`` per restart,
    times ``restarts`` (:data:`UNRESOLVED_RESTARTS` where the method chooses them);
    point estimates: one.
    """
    if "chains" in options and "draws" in options:
        return int(options["chains"]) * -(-int(options["draws"]) // int(options.get("thin", 1)))
    draws = int(options.get("num_draws") or 1)
    if "restarts" not in options:
        return draws
    return draws * int(options["restarts"] or UNRESOLVED_RESTARTS)


def keep_pointwise(facts: StoryFacts, options: Mapping[str, Any],
                   asked: bool | None) -> None:
    """Set ``facts.pointwise_skipped`` where the pointwise log-likelihood is not to be stored.

    Parameters
    ----------
    facts : StoryFacts
        The story's facts; its observed sites' sizes are read from them.
    options : mapping
        The method's validated options (:func:`expected_draws`).
    asked : bool or None
        ``infer(..., log_likelihood=)``: True stores it whatever its size, False never,
        None within :data:`POINTWISE_BUDGET`.
    """
    if asked is not None and not isinstance(asked, bool | np.bool_):
        raise OptionTypeError(f"log_likelihood must be True, False or None, got {asked!r}")
    if facts.pointwise_note is not None or not facts.likelihood or asked:
        return
    if asked is not None:  # False
        facts.pointwise_skipped = ("not stored: infer(..., log_likelihood=False); LOO, WAIC "
                                   "and compare() need it (log_likelihood=True)")
        return
    values = sum(int(np.prod(facts.batch_shapes[name], dtype=np.int64))
                 for name in facts.likelihood)
    draws = expected_draws(options)
    if values * draws > POINTWISE_BUDGET:
        facts.pointwise_skipped = (
            f"not stored: {draws:,} draws x {values:,} observed values = "
            f"{values * draws * 8 / 1e9:.1f} GB, over the budget of {POINTWISE_BUDGET:,} "
            "elements (ppl_notes.evaluation.log_likelihood_budget); LOO, WAIC and compare() "
            "need it: infer(..., log_likelihood=True) stores it")
