r"""Bayes minimum-risk decisions (notes §1.b).

A probabilistic model gives :math:`p(y \mid x)`, not an answer. With a loss table
:math:`L(a, y)` -- the cost of action :math:`a` when the truth is :math:`y` -- the Bayes
decision minimises the expected loss (the conditional risk)

.. math:: a^* = \arg\min_a R(a \mid x), \qquad
          R(a \mid x) = \sum_y L(a, y)\, p(y \mid x).

With the 0-1 loss this is :math:`\arg\max_y p(y \mid x)`; when errors cost differently
-- a missed diagnosis against a false alarm -- the decision can differ from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ppl_notes.errors import DataError
from ppl_notes.posterior import Posterior

__all__ = ["Decision", "decide"]


@dataclass(frozen=True)
class Decision:
    r"""What :func:`decide` returns.

    Attributes
    ----------
    action : label or numpy.ndarray of labels
        The minimum-expected-loss action (one per case when several are decided).
    expected_loss : pandas.Series or pandas.DataFrame
        :math:`R(a \mid x)` for every action (columns), per case (rows) when several.
    probabilities : numpy.ndarray
        The state probabilities used, shape ``(states,)`` or ``(cases, states)``.
    """

    action: Any
    expected_loss: pd.Series | pd.DataFrame
    probabilities: np.ndarray


def decide(probabilities_or_posterior, loss, actions=None, *, site: str | None = None
           ) -> Decision:
    r"""The action with the smallest expected loss under the given state probabilities.

    Parameters
    ----------
    probabilities_or_posterior : array-like, mapping, pandas.Series or Posterior
        :math:`p(y \mid x)` over the states, in the order of the loss table's columns:
        shape ``(states,)`` or ``(cases, states)``; a mapping or Series keyed by the
        state labels; or a :class:`~ppl_notes.Posterior`, whose discrete site ``site``
        (by default its only one) gives one probability vector per element, the share of
        draws in each state.
    loss : pandas.DataFrame or array-like
        ``loss[a, y]``: rows are actions, columns states.
    actions : sequence, optional
        Action labels for an array ``loss`` (default ``0, 1, ...``); a DataFrame's index
        is used otherwise.
    site : str, optional
        The posterior's discrete site (see above).

    Returns
    -------
    Decision

    Examples
    --------
    >>> import pandas as pd
    >>> loss = pd.DataFrame({"healthy": [0, 1], "sick": [100, 0]},
    ...                     index=["send home", "treat"])
    >>> decide({"healthy": 0.85, "sick": 0.15}, loss).action
    'treat'
    """
    table = _loss_table(loss, actions)
    probabilities = _probabilities(probabilities_or_posterior, table, site)
    risks = probabilities @ table.to_numpy().T
    if probabilities.ndim == 1:
        expected = pd.Series(risks, index=table.index, name="expected loss")
        return Decision(table.index[int(np.argmin(risks))], expected, probabilities)
    expected = pd.DataFrame(risks, columns=table.index)
    return Decision(np.asarray(table.index)[np.argmin(risks, axis=-1)], expected, probabilities)


def _loss_table(loss, actions) -> pd.DataFrame:
    if isinstance(loss, pd.DataFrame):
        table = loss.astype(float)
    else:
        array = np.asarray(loss, dtype=float)
        if array.ndim != 2:
            raise DataError(f"loss must be a table (actions x states), got shape {array.shape}")
        index = list(actions) if actions is not None else list(range(array.shape[0]))
        if len(index) != array.shape[0]:
            raise DataError(f"actions has {len(index)} labels but loss has {array.shape[0]} rows")
        table = pd.DataFrame(array, index=index)
    if table.empty or not np.all(np.isfinite(table.to_numpy())):
        raise DataError("loss must be a non-empty table of finite numbers")
    return table


def _probabilities(source, table: pd.DataFrame, site: str | None) -> np.ndarray:

    states = list(table.columns)
    if isinstance(source, Posterior):
        array = _from_posterior(source, site, len(states))
    elif isinstance(source, (Mapping, pd.Series)):
        missing = [s for s in states if s not in source]
        if missing:
            raise DataError(f"probabilities: no probability for states {missing}; the loss "
                            f"table's states are {states}")
        array = np.array([float(source[s]) for s in states])
    else:
        array = np.asarray(source, dtype=float)
    if array.shape[-1] != len(states) or array.ndim not in (1, 2):
        raise DataError(f"probabilities: shape {array.shape} does not fit the loss table's "
                        f"{len(states)} states {states} (need (states,) or (cases, states))")
    if np.any(array < 0) or not np.allclose(array.sum(-1), 1.0, atol=1e-6):
        raise DataError("probabilities must be non-negative and sum to 1 over the states")
    return array


def _from_posterior(posterior, site, num_states) -> np.ndarray:
    sites = posterior.discrete_sites
    if site is None:
        if len(sites) != 1:
            raise DataError(f"name the posterior's discrete site with site=...; it has {sites}")
        site = sites[0]
    if site not in sites:
        raise DataError(f"site {site!r} is not a discrete site of the posterior ({sites})")
    draws = posterior.draws(site).astype(int)
    counts = np.stack([(draws == state).mean(0) for state in range(num_states)], axis=-1)
    return counts.reshape(-1, num_states) if counts.ndim > 1 else counts
