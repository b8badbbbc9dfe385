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


def _compiler() -> str | None:
    if os.environ.get("PPL_NOTES_NATIVE", "1") == "0":
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


#: Portable optimisation only (no ``-march=native``: a cache directory may be shared by
#: machines with other CPUs); ``-std=c99`` keeps ``a * b + c`` unfused, as torch rounds it.
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")


def _target(source: Path, compiler: str) -> Path:
    key = hashlib.sha256(source.read_bytes() + compiler.encode()
                         + " ".join(FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem.lstrip('_')}-{key}.so"


class _Build:
    """One compiler run into a private directory, then an atomic move into the cache."""

    def __init__(self, source: Path, compiler: str) -> None:
        self.target = _target(source, compiler)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.workspace = tempfile.TemporaryDirectory(dir=self.target.parent)
        self.built = Path(self.workspace.name) / self.target.name
        self.process = subprocess.Popen(
            [compiler, *FLAGS, "-o", str(self.built),
             str(source), "-lm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(self) -> None:
        """Wait; raise ``CalledProcessError`` where the compiler failed."""
        try:
            _, errors = self.process.communicate(timeout=120)
            if self.process.returncode:
                raise subprocess.CalledProcessError(self.process.returncode,
                                                    self.process.args, stderr=errors)
            os.replace(self.built, self.target)  # parallel workers never see half a file
        finally:
            self.workspace.cleanup()


def prebuild(*sources: Path) -> None:
    """Compile the sources not in the cache yet, all at once (one compiler each).

    A failure is left for :func:`build` to report.
    """
    compiler = _compiler()
    if compiler is None:
        return
    builds = []
    for source in sources:
        try:
            if not _target(source, compiler).exists():
                builds.append(_Build(source, compiler))
        except OSError:
            continue
    for started in builds:
        try:
            started.finish()
        except (OSError, subprocess.SubprocessError):
            continue


def build(source: Path, what: str) -> ctypes.CDLL | None:
    """``source`` compiled (``cc -O3``) and loaded; None where it cannot be.

    ``what`` names the library in log messages.
    """
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler (or PPL_NOTES_NATIVE=0): %s run in Python", what)
        return None
    try:
        target = _target(source, compiler)
        if not target.exists():
            _Build(source, compiler).finish()
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("compiling %s failed (%s); they run in Python", what, error)
        return None
