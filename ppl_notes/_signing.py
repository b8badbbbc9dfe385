"""Signatures that tell a file this user wrote from one anyone could have written.

A content hash (:mod:`ppl_notes._integrity`) finds damage, not tampering: whoever
changes a value can recompute the hash with the project's own code. The files ppl_notes
writes -- saved results, SVI checkpoints, calibration stores -- are therefore also signed
with HMAC-SHA256 (RFC 2104) under a key only this user holds: 32 random bytes in
``$PPL_NOTES_CACHE/signing.key`` (default ``~/.cache/ppl_notes``), made on first use with
permissions 0600, or a key given explicitly (bytes, or the path of a key file). A file is
read when its signature verifies under that key; an unsigned file, or one signed with
another key (a colleague's, or changed after signing), is refused unless the caller says
``trusted=True``. Nothing read from any file names code that is imported or called: a
trusted file can carry wrong values, never code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import warnings
from pathlib import Path

from ppl_notes.errors import DataError

__all__ = ["KEY_FILE", "cache_root", "signing_key", "sign", "verify"]

KEY_FILE = "signing.key"
_KEY_BYTES = 32


def cache_root() -> Path:
    """``$PPL_NOTES_CACHE``, or ``~/.cache/ppl_notes``: an absolute folder, or a DataError.

    A relative one would make a key (and a cache) per working directory, and an empty
    ``HOME`` one relative to wherever the process runs.
    """
    chosen = os.environ.get("PPL_NOTES_CACHE")
    if chosen:
        root = Path(chosen).expanduser()
        if not root.is_absolute():
            raise DataError(f"PPL_NOTES_CACHE={chosen!r} is a relative path: each working "
                            "directory would get its own signing key; give an absolute one")
        return root
    home = os.environ.get("HOME", None)
    if home is not None and not Path(home).is_absolute():
        raise DataError(f"HOME={home!r} is not an absolute path, so ~/.cache/ppl_notes (where "
                        "the signing key lives) has no place; set HOME, or PPL_NOTES_CACHE "
                        "to an absolute folder")
    return Path.home() / ".cache" / "ppl_notes"


def signing_key(key: bytes | str | os.PathLike | None = None) -> bytes:
    """The key to sign and verify with.

    ``key`` itself (bytes), read from ``key`` (a path), or this user's key, created (0600)
    on first use.
    """
    if isinstance(key, bytes):
        if len(key) < 16:
            raise ValueError("a signing key needs at least 16 bytes")
        return key
    path = Path(key) if key is not None else cache_root() / KEY_FILE
    if key is None and not path.exists():
        try:
            _make_key(path)
        except OSError as error:  # a read-only cache folder
            raise DataError(f"no signing key could be made at {str(path)!r}: "
                            f"{error.strerror or error}; set PPL_NOTES_CACHE to a folder "
                            "you can write, or give key=") from error
    try:
        mode = path.stat().st_mode
        value = path.read_bytes()
    except OSError as error:  # a dangling link, a folder, no permission to read
        raise DataError(f"the signing key {str(path)!r} cannot be read: "
                        f"{error.strerror or error}. Remove it to have a new key made (files "
                        "signed with the old one then need trusted=True), or give key=") from error
    if len(value) < 16:
        raise DataError(f"the signing key {str(path)!r} holds {len(value)} bytes; a key "
                        "needs at least 16. Remove it to have a new key made, or give key=")
    if key is None and mode & 0o077:  # this user's own key: as ssh warns of a private key
        warnings.warn(f"the signing key {str(path)!r} can be read or changed by others "
                      f"(permissions {stat.filemode(mode)}): anyone who reads it can sign as "
                      f"you. chmod 600 {str(path)!r}", UserWarning, stacklevel=2)
    return value


def sign(message: bytes | str, key: bytes) -> str:
    """HMAC-SHA256 of ``message`` under ``key``, in hex."""
    if isinstance(message, str):
        message = message.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(message: bytes | str, signature: str | None, key: bytes) -> bool:
    """Whether ``signature`` is ``message``'s under ``key`` (compared in constant time)."""
    if not isinstance(signature, str):
        return False
    # as bytes: a damaged signature may hold characters compare_digest refuses in str
    return hmac.compare_digest(sign(message, key).encode(),
                               signature.encode("utf-8", "surrogateescape"))


def _make_key(path: Path) -> None:
    """A new random key at ``path``, 0600.

    Written whole to a private file, then linked into place: two processes making it at
    once keep the first one's key, and no reader ever sees a partly written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as written:
        written.write(secrets.token_bytes(_KEY_BYTES))
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
