"""Load the package's C libraries; build one at first use where the install did not.

``pip install`` builds the libraries into the package (``setup.py``; the file name holds
the source's hash and the platform tag: :func:`~ppl_notes.native.build_recipe.
packaged_name`), and :func:`build` loads that one where it is there. Otherwise the
library is compiled with the system's C compiler (``$CC``, else ``cc`` or ``gcc``)
into ``~/.cache/ppl_notes`` (``$PPL_NOTES_CACHE``), named by a hash of everything the
library depends on: the source, the flags, the compiler (its path and its own
``--version``), the operating system and CPU architecture, and the torch version whose
operations the tape reproduces. A changed source, compiler or machine builds anew, so a
cache directory shared between machines never loads a library built for another, and
parallel workers never see half a file. Where no compiler
works, or with ``PPL_NOTES_NATIVE=0``, :func:`build` returns None and the caller runs its
Python fallback.

Nothing is loaded unverified (issue 41): a library built into the cache is sealed with
an HMAC of its name and SHA-256 under the user's signing key (:mod:`ppl_notes._signing`),
written beside it (``.sig``), and one whose seal does not verify (cut short, planted
under the expected name, or built by another user in a shared cache) is built again; the
installed ones are checked against the SHA-256 the install wrote beside them
(``.sha256``), and built into the cache where they do not match.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ppl_notes.native.build_recipe import FLAGS, VECTORISE, command, packaged_name

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    root = os.environ.get("PPL_NOTES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ppl_notes")
    return Path(root)


def enabled() -> bool:
    """Whether the C libraries may be used at all (``PPL_NOTES_NATIVE=0`` says no)."""
    return os.environ.get("PPL_NOTES_NATIVE", "1") != "0"


def compiler() -> str | None:
    """The C compiler builds use; None where there is none or ``PPL_NOTES_NATIVE=0``."""
    if not enabled():
        return None
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def packaged(source: Path) -> Path | None:
    """The library of ``source`` that ``pip install`` built into the package, if any.

    Only one built from this very source, for this platform, matches the name. A
    compiler named by ``$CC`` asks for a build by that compiler instead.
    """
    if not enabled() or os.environ.get("CC"):
        return None
    path = source.with_name(packaged_name(source))
    return path if path.exists() else None


def available(source: Path) -> bool:
    """Whether :func:`build` can give ``source``'s library: installed, or a compiler."""
    return packaged(source) is not None or compiler() is not None


@functools.cache
def compiler_identity(compiler: str) -> str:
    """The compiler's first line of ``--version`` (``gcc (Debian 12.2.0-14) 12.2.0``).

    Two compilers behind one path (an upgrade, a container) build different code; where
    the compiler does not answer, its path alone stands for it.
    """
    try:
        answer = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return compiler
    lines = answer.stdout.strip().splitlines()
    return f"{compiler}: {lines[0] if lines else answer.returncode}"


def build_key(source: Path, compiler: str) -> str:
    """What a built library depends on, hashed: see the module docstring."""
    parts = [compiler_identity(compiler), " ".join(FLAGS + VECTORISE), sys.platform,
             platform.machine(), platform.architecture()[0], torch.__version__]
    return hashlib.sha256(source.read_bytes() + "\0".join(parts).encode()).hexdigest()[:16]


def _target(source: Path, compiler: str) -> Path:
    return cache_dir() / f"{source.stem.lstrip('_')}-{build_key(source, compiler)}.so"


class _Build:
    """One compiler run into a private directory, then an atomic move into the cache."""

    def __init__(self, source: Path, compiler: str) -> None:
        self.source, self.compiler = source, compiler
        self.target = _target(source, compiler)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.workspace = tempfile.TemporaryDirectory(dir=self.target.parent)
        self.built = Path(self.workspace.name) / self.target.name
        self.process = self._start()

    def _start(self, vectorise: bool = True) -> subprocess.Popen:
        return subprocess.Popen(command(self.compiler, self.source, self.built, vectorise),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(self) -> None:
        """Wait; raise ``CalledProcessError`` where the compiler failed."""
        try:
            _, errors = self.process.communicate(timeout=120)
            if self.process.returncode:  # perhaps the flag: once more without it
                self.process = self._start(vectorise=False)
                _, errors = self.process.communicate(timeout=120)
            if self.process.returncode:
                raise subprocess.CalledProcessError(self.process.returncode,
                                                    self.process.args, stderr=errors)
            seal = _seal(self.built, self.target.name)
            os.replace(self.built, self.target)  # parallel workers never see half a file
            _write_atomically(_seal_path(self.target), seal)
        finally:
            self.workspace.cleanup()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _seal_path(target: Path) -> Path:
    return target.with_name(target.name + ".sig")


def _seal(library: Path, name: str) -> str:
    """The HMAC, under this user's signing key, of a built library's name and SHA-256."""
    from ppl_notes._signing import sign, signing_key

    return sign(f"{name} {_file_digest(library)}", signing_key())


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def _sealed(target: Path) -> bool:
    """Whether a cached library is the one this user built: its seal verifies.

    A library cut short (a full disk, a copy interrupted) crashed every NUTS run with
    SIGBUS once loaded, and one planted under the expected name ran its constructor at
    load; neither is loaded. Where the signing key cannot be had, nothing verifies.
    """
    from ppl_notes._signing import signing_key, verify
    from ppl_notes.errors import DataError

    seal = _seal_path(target)
    try:
        return seal.exists() and verify(f"{target.name} {_file_digest(target)}",
                                        seal.read_text().strip(), signing_key())
    except (OSError, DataError):
        return False


def _installed_intact(path: Path) -> bool:
    """Whether the library ``pip install`` built matches the SHA-256 written beside it."""
    manifest = path.with_name(path.name + ".sha256")
    try:
        return manifest.exists() and manifest.read_text().strip() == _file_digest(path)
    except OSError:
        return False


#: Builds started by :func:`prebuild` and not yet waited for, by target path.
_PENDING: dict[Path, _Build] = {}


def prebuild(*sources: Path) -> None:
    """Start compiling the sources not in the cache yet, all at once (one compiler each).

    Returns at once: the compilers run while the caller records its potential, and
    :func:`build` (or :func:`wait_for_builds`) waits for the one it needs. A failure
    is left for :func:`build` to report.
    """
    cc = compiler()
    if cc is None:
        return
    for source in (s for s in sources if packaged(s) is None):
        try:
            target = _target(source, cc)
            if not (target.exists() and _sealed(target)) and target not in _PENDING:
                _PENDING[target] = _Build(source, cc)
        except OSError:
            continue


def wait_for_builds() -> None:
    """Wait for every build :func:`prebuild` started (before worker processes start)."""
    for target in list(_PENDING):
        try:
            _PENDING.pop(target).finish()
        except (OSError, subprocess.SubprocessError):
            continue


def build(source: Path, what: str) -> ctypes.CDLL | None:
    """``source`` compiled (``cc -O2``) and loaded; None where it cannot be.

    ``what`` names the library in log messages. The library the install built is loaded
    where there is one (:func:`packaged`).
    """
    installed = packaged(source)
    if installed is not None and not _installed_intact(installed):
        logger.warning("the installed %s (%s) do not match the SHA-256 written when they "
                       "were built (cut short, or replaced): building them instead", what,
                       installed.name)
        installed = None
    if installed is not None:
        try:
            return ctypes.CDLL(str(installed))
        except OSError as error:
            logger.warning("loading the installed %s failed (%s); building them", what, error)
    cc = compiler()
    if cc is None:
        logger.info("no C compiler (or PPL_NOTES_NATIVE=0): %s run in Python", what)
        return None
    try:
        target = _target(source, cc)
        if target in _PENDING:
            _PENDING.pop(target).finish()
        elif not target.exists():
            _Build(source, cc).finish()
        elif not _sealed(target):
            logger.warning("the cached %s (%s) are not the library this user built (cut "
                           "short, replaced, or built without a seal): building them again",
                           what, target)
            _Build(source, cc).finish()
        if not _sealed(target):  # replaced again while we built, or no signing key
            logger.warning("the %s built in %s cannot be verified (no signing key, or the "
                           "file changed as it was built): they run in Python", what, target)
            return None
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("compiling %s failed (%s); they run in Python", what, error)
        return None
