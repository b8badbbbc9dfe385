"""The exceptions ppl_notes raises for user mistakes.

Every error subclasses :class:`PPLNotesError` *and* the matching built-in, so both
``except PPLNotesError`` and ``except ValueError`` catch a bad option.
"""

from __future__ import annotations

__all__ = [
    "PPLNotesError",
    "DataError",
    "OptionError",
    "OptionTypeError",
    "ModelGuideMismatchError",
    "StoryError",
    "InferenceError",
    "CheckpointError",
    "UntrustedFileError",
    "DiagnosticWarning",
    "PartialResultWarning",
]


class PPLNotesError(Exception):
    """Base class of every error raised by ppl_notes for a user mistake or a failed run."""


class DataError(PPLNotesError, ValueError):
    """Observed data that the story cannot use (wrong shape, NaN, unknown site, empty)."""


class OptionError(PPLNotesError, ValueError):
    """An inference option that is unknown or out of range."""


class OptionTypeError(PPLNotesError, TypeError):
    """An inference option of the wrong type."""


class ModelGuideMismatchError(PPLNotesError, ValueError):
    """A guide that does not fit its model: a missing or extra site, a shape or support."""


class StoryError(PPLNotesError, ValueError):
    """A story (model) that cannot be run by the requested method, and why."""


class InferenceError(PPLNotesError, RuntimeError):
    """A run that failed numerically (non-finite ELBO, failed initialisation)."""


class CheckpointError(PPLNotesError, ValueError):
    """A checkpoint that is missing, damaged, foreign, or from another run's settings."""


class UntrustedFileError(DataError):
    """A file not signed with this user's key: unsigned, a colleague's, or changed since.

    Pass ``trusted=True`` (``--trusted`` on the command line) to read it anyway; nothing
    in it can run code, but its values are then only as good as its author.
    """


class PartialResultWarning(UserWarning):
    """A run was interrupted (Ctrl-C); its result holds what was done so far."""


class DiagnosticWarning(UserWarning):
    """A diagnostic crossed its threshold (R-hat, ESS, divergences, BFMI, k-hat, ELBO).

    Issued when a run ends; see :mod:`ppl_notes.diagnostics`. Silence it with
    ``warnings.filterwarnings("ignore", category=DiagnosticWarning)``.
    """
