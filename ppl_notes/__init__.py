"""ppl_notes: generative stories as Pyro models, inferred by SVI or NUTS, as ArviZ results.

The public API::

    from ppl_notes import model, guide, infer, load
    from ppl_notes import compare, loo, compare_models, write_report
    from ppl_notes import decide, exact_posterior, gradient_variance
"""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"

from typing import TYPE_CHECKING

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
    UntrustedFileError,
)

#: Where each public name lives. They are imported on first use (PEP 562), so that
#: ``import ppl_notes`` does not pay for ArviZ, xarray, matplotlib or scikit-learn.
_LAZY = {
    "Calibration": "calibration", "calibrate": "calibration",
    "compare": "comparison", "diagnostics_table": "comparison",
    "compare_models": "cross_validation", "loo": "cross_validation",
    "Decision": "decisions", "decide": "decisions",
    "Estimate": "evidence", "exact_posterior": "exact", "gradient_variance": "gradients",
    "infer": "inference", "Posterior": "posterior", "load": "result_files",
    "write_report": "report", "Verdict": "verdict",
    "Guide": "story", "Model": "story", "check_pairing": "story", "guide": "story",
    "model": "story",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from ppl_notes.calibration import Calibration, calibrate
    from ppl_notes.comparison import compare, diagnostics_table
    from ppl_notes.cross_validation import compare_models, loo
    from ppl_notes.decisions import Decision, decide
    from ppl_notes.evidence import Estimate
    from ppl_notes.exact import exact_posterior
    from ppl_notes.gradients import gradient_variance
    from ppl_notes.inference import infer
    from ppl_notes.posterior import Posterior
    from ppl_notes.report import write_report
    from ppl_notes.result_files import load
    from ppl_notes.story import Guide, Model, check_pairing, guide, model
    from ppl_notes.verdict import Verdict


def __getattr__(name: str):
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ppl_notes' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"ppl_notes.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "calibrate",
    "Calibration",
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
    "Verdict",
    "PPLNotesError",
    "DataError",
    "OptionError",
    "OptionTypeError",
    "ModelGuideMismatchError",
    "StoryError",
    "InferenceError",
    "DiagnosticWarning",
    "CheckpointError",
    "UntrustedFileError",
    "PartialResultWarning",
]
