"""Load, once per process, the libraries that a first fit would load halfway through.

Two imports happen at the first use of an ordinary call, not at ``import ppl_notes``:

* ``torch.broadcast_shapes`` (Pyro's autoguides and initialisation call it) imports
  ``torch._refs``, and through torch's symbolic shapes, SymPy: 0.45-0.65 s here;
* the first ``xarray.DataArray`` probes for duck arrays and imports ``dask.array``
  where Dask is installed (it is: ``ppl_notes``' distributed NUTS): 0.26-0.34 s.

Whichever method runs first in a process pays them, so that ``ppl-notes compare``,
which runs SVI first, used to charge SVI about a second that NUTS then did not pay.
:func:`load_libraries` pays them before either is timed, and says how long it took.
"""

from __future__ import annotations

import time

__all__ = ["load_libraries"]


def load_libraries() -> float:
    """Import what a first fit imports lazily; returns the seconds it took."""
    import numpy as np
    import torch
    import xarray as xr

    started = time.perf_counter()
    torch.broadcast_shapes((1,), (1,))
    xr.DataArray(np.zeros(1))
    return time.perf_counter() - started
