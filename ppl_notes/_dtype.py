"""The dtype a story runs in, as torch's default dtype for the duration of a run."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["run_dtype"]


@contextlib.contextmanager
def run_dtype(dtype: torch.dtype):
    """Run with ``dtype`` as torch's default dtype (restored afterwards).

    A story's constants written with the default dtype (``torch.ones(3)``,
    ``dist.Beta(5., 5.)``) then agree with its data.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
