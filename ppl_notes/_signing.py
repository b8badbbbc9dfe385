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
from pathlib import Path

__all__ = ["KEY_FILE", "cache_root", "signing_key", "sign", "verify"]

KEY_FILE = "signing.key"
_KEY_BYTES = 32


def cache_root() -> Path:
    """``$PPL_NOTES_CACHE``, or ``~/.cache/ppl_notes``."""
    return Path(os.environ.get("PPL_NOTES_CACHE") or Path.home() / ".cache" / "ppl_notes")


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
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole to a private file, then linked into place: two processes making it
        # at once keep the first one's key, and no reader ever sees a partly written one
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
    value = path.read_bytes()
    if len(value) < 16:
        raise ValueError(f"the signing key {str(path)!r} holds {len(value)} bytes; a key "
                         "needs at least 16")
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
