"""Data sets bundled with ppl_notes, and their loaders (see PROVENANCE.md beside this file)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

__all__ = ["load_galton_frame", "load_galton_heights", "CM_PER_INCH"]

CM_PER_INCH = 2.54


def load_galton_frame() -> pd.DataFrame:
    """Galton's 1886 family heights: 934 adult children of 205 families.

    Returns
    -------
    pandas.DataFrame
        The bundled columns (``family``, ``father_in``, ``mother_in``, ``child_num``,
        ``gender``, ``height_in``) plus ``height_cm`` (1 in = 2.54 cm).

    References
    ----------
    Galton, F. (1886). Regression towards mediocrity in hereditary stature. As
    tabulated in ``GaltonFamilies`` of the R package HistData (Friendly, 2021).
    """
    path = resources.files(__name__) / "galton_heights.csv"
    with resources.as_file(path) as csv:
        frame = pd.read_csv(csv, dtype={"family": str})
    frame["height_cm"] = frame["height_in"] * CM_PER_INCH
    return frame


def load_galton_heights() -> dict[str, np.ndarray]:
    """The heights story's default data: ``{"height": heights in cm}`` (no gender)."""
    return {"height": load_galton_frame()["height_cm"].to_numpy()}
