"""Scalar elements of a posterior's variables, labelled as ArviZ labels them (``theta[A]``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xarray as xr

__all__ = ["element_draws", "element_labels"]


#: The interval every table shows: summary() and compare() alike (ArviZ 1.x's 94%).
CI_PROB = 0.94

def element_labels(array: xr.DataArray, sample_dims: Iterable[str]) -> list[str]:
    """``name[c1,c2]`` for every element of ``array`` beyond its sample dims, in C order."""
    name = str(array.name)
    dims = [d for d in array.dims if d not in set(sample_dims)]
    if not dims:
        return [name]
    coords = [array.coords[d].values if d in array.coords else np.arange(array.sizes[d])
              for d in dims]
    grid = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).reshape(-1, len(dims))
    return [f"{name}[{','.join(str(c) for c in row)}]" for row in grid]


def element_draws(dataset: xr.Dataset, var_names: Iterable[str],
                  sample_dims: Iterable[str], flatten: bool = True) -> dict[str, np.ndarray]:
    """Each scalar element's draws, by its label (``b[3]``).

    Flattened over the sample dims (``(draws,)``), or shaped like them (``(chain,
    draw)``) with ``flatten=False``.
    """
    sample_dims = list(sample_dims)
    out = {}
    for name in var_names:
        array = dataset[name]
        other = [d for d in array.dims if d not in sample_dims]
        values = array.transpose(*sample_dims, *other).values
        sample_shape = values.shape[:len(sample_dims)]
        values = values.reshape((int(np.prod(sample_shape)), -1))
        for column, label in enumerate(element_labels(array, sample_dims)):
            column_draws = np.asarray(values[:, column], dtype=float)
            out[label] = column_draws if flatten else column_draws.reshape(sample_shape)
    return out
