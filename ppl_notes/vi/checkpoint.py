"""SVI checkpoints: written atomically, hashed, signed, read without unpickling objects.

A checkpoint file is a header line, the SHA-256 of the payload, its HMAC under this
user's signing key (:mod:`ppl_notes._signing`), then the payload: a ``torch.save`` of
only tensors, numbers, strings, lists and dicts (parameters, optimizer state,
random-number-generator states, the ELBO so far, the run's fingerprint), so
``torch.load(weights_only=True)`` reads it: a tampered file cannot run code, a truncated,
damaged or foreign one is a :class:`~ppl_notes.errors.CheckpointError`, and one not
signed with this user's key is refused unless the caller trusts it.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_notes._integrity import bytes_digest
from ppl_notes._signing import sign, signing_key, verify
from ppl_notes.errors import CheckpointError

__all__ = ["FORMAT", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint"]

FORMAT = "ppl_notes-svi-checkpoint-3"
_HEADER = FORMAT.encode() + b"\n"
_DIGEST_LENGTH = 64  # hex characters of a SHA-256


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's generator states, in types a safe load accepts."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [version, list(internal), gauss],
            "numpy": [name, torch.as_tensor(keys.astype(np.int64)), int(position),
                      int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: to a temporary file, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    payload = buffer.getvalue()
    digest = bytes_digest(payload)
    signature = sign(digest, signing_key())
    temporary.write_bytes(_HEADER + digest.encode() + b"\n" + signature.encode() + b"\n"
                          + payload)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``), signed with this user's key.

    ``trusted=True`` reads one signed with another key, or unsigned (it still cannot run
    code).

    Raises
    ------
    CheckpointError
        For a missing, truncated, damaged, tampered or foreign file, saying which.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    raw = path.read_bytes()
    if not raw.startswith(_HEADER):
        raise CheckpointError(f"{str(path)!r} is not a ppl_notes SVI checkpoint "
                              f"(expected format {FORMAT!r})")
    at = len(_HEADER)
    stored = raw[at:at + _DIGEST_LENGTH + 1]
    signature = raw[at + _DIGEST_LENGTH + 1:at + 2 * (_DIGEST_LENGTH + 1)]
    payload = raw[at + 2 * (_DIGEST_LENGTH + 1):]
    digest = bytes_digest(payload)
    if stored != digest.encode() + b"\n":
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged or truncated: its payload no longer "
            "matches the SHA-256 written with it")
    if not trusted and not verify(digest, signature[:-1].decode("ascii", "replace"),
                                  signing_key()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not signed with your key (someone else's, or "
            "changed and re-hashed after it was written); resume from it only if you "
            "trust its author: resume_trusted=True")
    try:
        with warnings.catch_warnings():  # torch's own remarks on foreign pickle protocols
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError, AttributeError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read safely (truncated, tampered with, or "
            f"not a ppl_notes checkpoint): {reason}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ppl_notes SVI checkpoint "
                              f"(expected format {FORMAT!r})")
    return state
