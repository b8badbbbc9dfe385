"""What every back end hands to :class:`~ppl_notes.posterior.Posterior`: plain arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class RunResult:
    """The raw output of one inference run, before it becomes a DataTree.

    Every array in ``posterior``, ``sample_stats`` and ``log_likelihood`` starts with the
    sample dims: ``(chain, draw)`` for MCMC, ``(sample,)`` for variational draws.
    """

    method: str
    sample_dims: tuple[str, ...]
    posterior: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray] = field(default_factory=dict)
    log_likelihood: dict[str, np.ndarray] = field(default_factory=dict)
    history: pd.DataFrame | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    #: a variational fit's proposals of the importance step (ppl_notes.vi.importance):
    #: ``log_p`` and ``log_q`` at each draw of q, their last dim ``proposal``
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    partial: bool = False
