"""The cyclic garbage collector leaves the objects that exist when a fit starts alone.

Python's collector scans every tracked object in a full (generation 2) collection, and
after ``import ppl_notes`` that is about 330 thousand of them: torch's, Pyro's, ArviZ's
modules, classes and functions, which live as long as the interpreter. A fit allocates
enough to set off such a collection about every other run, and each took 0.17 s here
(the HMM of posteriordb: 1.4 s of SVI, 4.5 s of NUTS; measured with ``gc.callbacks``).
:func:`gc.freeze` moves the objects that exist now into a permanent generation that no
collection scans (as Instagram's servers do; the Python documentation's own use), and
:func:`gc.unfreeze` gives them back to the oldest generation when the fit ends. What the
fit makes is collected as before; garbage cycles that existed before it are collected
after it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["existing_objects_frozen"]

#: Objects the interpreter itself froze at start-up (375 in CPython 3.12): more than these
#: in the permanent generation when a fit starts were frozen by the caller
_FROZEN_AT_START = gc.get_freeze_count()
_lock = threading.Lock()
_depth = 0
_frozen_here = False


@contextmanager
def existing_objects_frozen() -> Iterator[None]:
    """Within: the collector scans only objects made since the outermost entry.

    Re-entrant and shared by threads: the outermost entry freezes, and the last exit
    unfreezes. Nothing is done where the caller has frozen objects of their own (more
    than the interpreter froze at start-up: unfreezing would undo their choice) or has
    turned the collector off.
    """
    global _depth, _frozen_here
    with _lock:
        if _depth == 0:
            _frozen_here = gc.isenabled() and gc.get_freeze_count() <= _FROZEN_AT_START
            if _frozen_here:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _frozen_here:
                gc.unfreeze()
                _frozen_here = False
