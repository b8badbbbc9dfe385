"""From the data a user passes to the keyword arguments a story takes.

A dict or a pandas data frame (``None``: the story's default data) becomes tensors in the
story's dtype, once per ``infer()``: every key is checked to be an argument of the
story, every array to be numeric, non-empty and finite (rows with NaN or infinite values
dropped on request), and every observed site to have its data. Each mistake is a
:class:`~ppl_notes.errors.DataError` naming the story and the argument.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from ppl_notes._callables import argument_holding
from ppl_notes._sites import is_deterministic, sample_sites, trace_with_index_covariates
from ppl_notes.errors import DataError, StoryError

__all__ = ["drop_incomplete_rows", "observed_from_data", "prepare_data", "to_tensor"]

logger = logging.getLogger("ppl_notes.story")


def prepare_data(model, data: Mapping | pd.DataFrame | None = None,
                 drop_incomplete: bool = False) -> dict[str, Any]:
    """:meth:`ppl_notes.story.Model.prepare_data`: see there."""
    raw = model.default_data() if data is None else data
    if isinstance(raw, pd.DataFrame):
        if raw.empty:
            raise DataError(f"story {model.name!r}: the data frame has no rows")
        raw = {column: raw[column].to_numpy() for column in raw.columns}
    elif not isinstance(raw, Mapping):
        raise DataError(
            f"story {model.name!r}: data must be a dict or a pandas DataFrame, "
            f"not {type(raw).__name__}"
        )
    if drop_incomplete:
        raw = drop_incomplete_rows(model, raw)
    prepared = {}
    for key, value in raw.items():
        if key not in model.parameters:
            raise DataError(
                f"story {model.name!r} has no site or argument {key!r} to take data; "
                f"its keyword arguments are {list(model.parameters)} "
                f"(observed sites: {list(model.observed)})"
            )
        prepared[key] = to_tensor(model, key, value)
    for site, argument in model.observed_arguments.items():
        if argument is not None and prepared.get(argument) is None:
            raise DataError(
                f"story {model.name!r}: observed site {site!r} has no data; pass "
                f"data={{{argument!r}: ...}} or leave data=None for the default data"
            )
    return prepared


def drop_incomplete_rows(model, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` without the rows (along the first axis) where a value is NaN or infinite."""
    arrays = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
              for k, v in raw.items() if v is not None and not np.isscalar(v)}
    numeric = {k: a for k, a in arrays.items()
               if a.ndim >= 1 and (np.issubdtype(a.dtype, np.number) or a.dtype == bool)}
    lengths = {len(numeric[k]) for k in model.observed_arguments.values() if k in numeric}
    if len(lengths) != 1:
        raise DataError(
            f"story {model.name!r}: drop_incomplete needs observed data with one shared "
            f"number of rows; got lengths {sorted(lengths) or 'none'}")
    rows = lengths.pop()
    keep = np.ones(rows, dtype=bool)
    for array in numeric.values():
        if len(array) == rows:
            keep &= np.isfinite(array.astype(float).reshape(rows, -1)).all(axis=1)
    if not keep.any():
        raise DataError(f"story {model.name!r}: every one of the {rows} rows has a NaN "
                        "or infinite value; nothing is left after dropping them")
    if not keep.all():
        logger.info("story %r: dropped %d of %d rows with NaN or infinite values",
                    model.name, rows - int(keep.sum()), rows)
    return {k: (np.asarray(v)[keep] if k in numeric and len(numeric[k]) == rows else v)
            for k, v in raw.items()}


def to_tensor(model, key: str, value: Any) -> Any:
    """One data argument as the story takes it: a tensor in its dtype, checked."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    masked = 0
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    elif isinstance(value, np.ma.MaskedArray):  # a masked value is a missing one, not data
        masked = int(np.ma.count_masked(value))
        array = value.astype(float).filled(np.nan) if masked else value.data
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as error:
            raise DataError(
                f"story {model.name!r}: data for {key!r} is not a rectangular array of "
                f"numbers ({error})") from error
    if np.iscomplexobj(array):
        raise DataError(
            f"story {model.name!r}: data for {key!r} are complex numbers ({array.dtype}); a "
            "story's data are real: give the real and imaginary parts as two arguments")
    numeric = np.issubdtype(array.dtype, np.number) or array.dtype == bool
    if array.dtype == object or not numeric:
        raise DataError(
            f"story {model.name!r}: data for {key!r} must be numeric, got dtype "
            f"{array.dtype}"
        )
    if array.size == 0:
        raise DataError(f"story {model.name!r}: data for {key!r} is empty")
    bad = ~np.isfinite(array.astype(float))
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise DataError(
            f"story {model.name!r}: data for {key!r} has {int(bad.sum())} NaN or "
            f"infinite value(s), first at index {where}"
            + (f" ({masked} masked value(s) of a masked array count as missing)"
               if masked else "") + "; remove or impute them"
        )
    if array.dtype == bool and key not in model.observed_arguments.values():
        return torch.as_tensor(array)  # a mask (poutine.mask takes booleans)
    return torch.as_tensor(array.astype(float), dtype=model.dtype)


def observed_from_data(model, prepared: dict[str, Any]) -> dict[str, str]:
    """``{site: argument}``: the sites whose ``obs=`` is one of the data arguments.

    The story runs once on ``prepared``; a site observed with a data argument (the
    tensor itself, or its values) is observed data, as NumPyro's ``MCMC.run(key,
    **data)`` reads it, and one observed with a constant is left as it is. A story that
    takes no data at all and observes values it holds (``GPRegression(X, y,
    kernel).model``) observes those: ``{site: site}``.
    """
    try:
        trace = trace_with_index_covariates(model, prepared)
    except (ValueError, RuntimeError, IndexError, TypeError) as error:
        raise DataError(f"story {model.name!r} cannot run on this data: {error}") from error
    observed, held = {}, {}
    for name, site in sample_sites(trace).items():
        if site["is_observed"] and not is_deterministic(site):
            argument = argument_holding(site["value"], prepared)
            if argument is not None:
                observed[name] = argument
            else:
                held[name] = name
    if not observed and held and not prepared:
        # a story that holds its own data and takes no argument (Pyro's contrib.gp
        # models: GPRegression(X, y, kernel).model observes self.y)
        return held
    if not observed:
        raise StoryError(
            f"story {model.name!r}: no sample site takes obs= from the data arguments "
            f"{list(prepared)}; pass the observations as an argument (obs=y), or "
            "declare them with @ppl_notes.model(observed=...)")
    return observed
