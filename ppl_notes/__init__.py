"""ppl_notes: generative stories as Pyro models, inferred by SVI or NUTS, as ArviZ results.

The public API::

    from ppl_notes import model, guide, infer, load
    from ppl_notes import compare, loo, compare_models, write_report
    from ppl_notes import decide, exact_posterior, gradient_variance
"""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"

from ppl_notes.comparison import compare, diagnostics_table
from ppl_notes.cross_validation import compare_models, loo
from ppl_notes.decisions import Decision, decide
from ppl_notes.errors import (
    CheckpointError,
    DataError,
    DiagnosticWarning,
    InferenceError,
    ModelGuideMismatchError,
    OptionError,
    OptionTypeError,
    PartialResultWarning,
    PPLNotesError,
    StoryError,
)
from ppl_notes.evidence import Estimate
from ppl_notes.exact import exact_posterior
from ppl_notes.gradients import gradient_variance
from ppl_notes.inference import infer
from ppl_notes.posterior import Posterior, load
from ppl_notes.report import write_report
from ppl_notes.story import Guide, Model, check_pairing, guide, model

# torch's C++-extension module logs "No CUDA runtime is found" when it is imported (by
# inductor, on every compile) on a machine without a GPU; nothing here needs CUDA.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

__all__ = [
    "__version__",
    "model",
    "guide",
    "Model",
    "Guide",
    "check_pairing",
    "infer",
    "compare",
    "diagnostics_table",
    "loo",
    "compare_models",
    "write_report",
    "decide",
    "Decision",
    "exact_posterior",
    "gradient_variance",
    "Estimate",
    "Posterior",
    "load",
    "PPLNotesError",
    "DataError",
    "OptionError",
    "OptionTypeError",
    "ModelGuideMismatchError",
    "StoryError",
    "InferenceError",
    "DiagnosticWarning",
    "CheckpointError",
    "PartialResultWarning",
]
