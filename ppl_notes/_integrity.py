"""Content hashes that make a damaged file an error instead of a changed result.

A saved result (netCDF) carries, as a root attribute, the SHA-256 of its *content*: the
path, attributes and every variable (name, dims, dtype, shape, bytes) of every node, as
they read back from the file. :func:`tree_digest` computes it; a load that finds another
digest refuses the file. The hash finds damage; anyone can recompute it, so tampering is
found by the HMAC signature beside it (:mod:`ppl_notes._signing`). A checkpoint hashes its
serialised payload whole (see :mod:`ppl_notes.vi.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import xarray as xr

__all__ = ["DIGEST_ATTR", "SIGNATURE_ATTR", "tree_digest", "bytes_digest"]

DIGEST_ATTR = "ppl_notes_content_sha256"
#: The root attribute that holds the HMAC-SHA256 of the content digest
#: (:mod:`ppl_notes._signing`)
SIGNATURE_ATTR = "ppl_notes_signature_hmac_sha256"


def bytes_digest(payload: bytes) -> str:
    """SHA-256 of ``payload``, in hex."""
    return hashlib.sha256(payload).hexdigest()


def tree_digest(tree: xr.DataTree) -> str:
    """SHA-256 of a DataTree's content, independent of how the file lays it out.

    Nodes are visited by path, attributes and variables by name; the digest and signature
    attributes themselves are left out. Two trees with equal digests hold the same values
    bit for bit.
    """
    digest = hashlib.sha256()
    for node in sorted(tree.subtree, key=lambda n: n.path):
        digest.update(f"node {node.path}\n".encode())
        attrs = {k: _plain(v) for k, v in node.attrs.items()
                 if k not in (DIGEST_ATTR, SIGNATURE_ATTR)}
        digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
        dataset = node.to_dataset(inherit=False)
        for name in sorted(dataset.variables, key=str):
            variable = dataset.variables[name]
            values = np.asarray(variable.values)
            digest.update(f"\nvar {name} {variable.dims} {values.dtype.str} {values.shape}\n"
                          .encode())
            digest.update(json.dumps({k: _plain(v) for k, v in variable.attrs.items()},
                                     sort_keys=True, default=str).encode())
            if values.dtype.kind in "OUS":
                digest.update(json.dumps([str(v) for v in values.ravel()]).encode())
            else:
                digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _plain(value):
    """An attribute as JSON can write it (netCDF hands back numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
