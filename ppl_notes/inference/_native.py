"""Build a C source shipped with the package into a shared library, once per machine.

The library is compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``)
into ``~/.cache/ppl_notes`` (``$PPL_NOTES_CACHE``), named by the source's hash, so a
changed source builds anew and parallel workers never see half a file. Where no compiler
works, or with ``PPL_NOTES_NATIVE=0``, :func:`build` returns None and the caller runs its
Python fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    root = os.environ.get("PPL_NOTES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ppl_notes")
    return Path(root)


def build(source: Path, what: str, flags: tuple[str, ...] = ("-O2",)) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` and loaded; None where it cannot be.

    ``what`` names the library in log messages. A library built with ``-march=native``
    is keyed by this CPU's model and flags too, for caches shared between machines.
    """
    if os.environ.get("PPL_NOTES_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: %s run in Python", what)
        return None
    text = source.read_bytes()
    identity = text + compiler.encode() + " ".join(flags).encode()
    if "-march=native" in flags:
        identity += _cpu_identity()
    key = hashlib.sha256(identity).hexdigest()[:16]
    target = cache_dir() / f"{source.stem.lstrip('_')}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as workspace:
                built = Path(workspace) / target.name
                subprocess.run([compiler, *flags, "-shared", "-fPIC", "-std=c99", "-o",
                                str(built), str(source), "-lm"],
                               check=True, capture_output=True, timeout=120)
                os.replace(built, target)  # atomic: parallel workers never see half a file
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("compiling %s failed (%s); they run in Python", what, error)
        return None


def _cpu_identity() -> bytes:
    """The CPU's model name and feature flags (Linux), else its architecture."""
    import platform

    try:
        with open("/proc/cpuinfo", "rb") as info:
            lines = [line for line in info.read().splitlines()
                     if line.startswith((b"model name", b"flags"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return platform.machine().encode() + platform.processor().encode()
