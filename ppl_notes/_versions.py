"""The versions of Python and the libraries a result depends on (provenance)."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

__all__ = ["library_versions"]

_PACKAGES = ("ppl_notes", "torch", "pyro-ppl", "arviz", "arviz-base", "arviz-stats",
             "arviz-plots", "xarray", "numpy", "pandas", "matplotlib")


@functools.cache
def _installed() -> tuple[tuple[str, str], ...]:
    """Read once per process: every ``infer`` records them."""
    versions = [("python", platform.python_version())]
    for package in _PACKAGES:
        try:
            versions.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            versions.append((package, "not installed"))
    return tuple(versions)


def library_versions() -> dict[str, str]:
    """``{"python": ..., package: version}`` for the stack ppl_notes runs on."""
    return dict(_installed())
