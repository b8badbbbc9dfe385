"""Reading a result file: the file is data, and nothing named in it is imported or called.

:meth:`~ppl_notes.posterior.Posterior.save` writes a result with a content hash and an
HMAC signature under the user's key (:mod:`ppl_notes._signing`); :func:`load` checks
both before it trusts a byte, and finds the story among ppl_notes' own shipped stories by
comparing strings, or takes it from the caller.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from ppl_notes._integrity import DIGEST_ATTR, SIGNATURE_ATTR, tree_digest
from ppl_notes._signing import signing_key, verify
from ppl_notes.errors import DataError, UntrustedFileError
from ppl_notes.models import STORIES
from ppl_notes.posterior import Posterior

__all__ = ["load", "shipped_story"]


def load(path: str | os.PathLike, model=None, guide=None, *, trusted: bool = False,
         key: bytes | str | os.PathLike | None = None) -> Posterior:
    """Read a result written by :meth:`Posterior.save`; nothing in the file is run.

    A result file is data: it names its story and guide, but nothing named in it is
    imported or called. The story is ``model``, or, for a story ppl_notes ships, the one
    its own registry (:data:`ppl_notes.models.STORIES`) holds under the stored name and
    reference (a comparison of strings, never an import path taken from the file). A
    guide function is ``guide``; an autoguide is rebuilt from the story when fresh draws
    are asked for.

    Parameters
    ----------
    path : path
        The file.
    model : Model, optional
        The story, for predictions and fresh draws (a story of the user's own).
    guide : callable, optional
        The guide function of an SVI fit, for fresh draws (autoguides need none).
    trusted : bool
        Read a file that is not signed with this user's key (a colleague's result). Its
        values are then only as good as its author; it still cannot run code.
    key : bytes or path, optional
        The signing key (default: this user's, ``$PPL_NOTES_CACHE/signing.key``).

    Raises
    ------
    DataError
        For a missing file, one that is not a ppl_notes result, or one whose content no
        longer matches the hash written with it (damage).
    UntrustedFileError
        For a file whose signature does not verify under the key: unsigned, signed by
        someone else, or changed and re-hashed since (unless ``trusted=True``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no saved result at {str(path)!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # xarray's remarks on undecodable attributes
            with xr.open_datatree(path, engine="h5netcdf") as opened:
                _check_structure(opened, path)  # before any value is read
                tree = opened.load()
                stored = tree.attrs.get(DIGEST_ATTR)
                signature = tree.attrs.get(SIGNATURE_ATTR)
                digest = tree_digest(tree)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - h5py and xarray raise many kinds on damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{str(path)!r} is not a ppl_notes result, or it is damaged: "
                        f"{reason}") from error
    if "method" not in tree.attrs:
        raise DataError(f"{str(path)!r} is not a ppl_notes result (no 'method' attribute)")
    if stored is None:
        raise DataError(f"{str(path)!r} has no content hash ({DIGEST_ATTR}): it was not "
                        "written by Posterior.save, or its hash was removed")
    if str(stored) != digest:
        raise DataError(f"{str(path)!r} is damaged: its content no longer matches the hash "
                        "written with it (a byte changed after saving); refit or restore it")
    if not trusted and not verify(digest, _text(signature), signing_key(key)):
        why = ("is not signed" if signature is None else
               "is signed with another key than yours (a colleague's result, or one "
               "changed and re-hashed after it was signed)")
        raise UntrustedFileError(
            f"{str(path)!r} {why}. A result file holds only values and cannot run code; "
            "if you trust whoever wrote it, read it with ppl_notes.load(path, "
            "trusted=True) (ppl-notes ... --trusted), and save it again to sign it "
            "with your key")
    for node in tree.subtree:
        if node is tree:
            continue
        # netCDF stores a one-element list attribute as a scalar: restore ArviZ's lists.
        if "sample_dims" in node.attrs:
            node.attrs["sample_dims"] = [str(d) for d in np.atleast_1d(node.attrs["sample_dims"])]
    del tree.attrs[DIGEST_ATTR]
    tree.attrs.pop(SIGNATURE_ATTR, None)
    story = model if model is not None else shipped_story(tree.attrs)
    return Posterior(tree, model=story, guide=guide)


#: A file may declare this many times its own size in values (compression), plus
#: ``_DECLARED_FLOOR`` bytes, before it is refused unread
_DECLARED_PER_BYTE = 64
_DECLARED_FLOOR = 256 * 2**20


def _check_structure(tree: xr.DataTree, path: Path) -> None:
    """Refuse, before reading a value, what a result file written by ppl_notes never holds.

    * **More declared values than the file could hold**: a netCDF variable can declare
      any shape and leave its values to a fill value, so a 220 KB file declared 1e8
      elements (0.8 GB read, 2.3 GB at peak before the hash refused it). Declared bytes
      beyond :data:`_DECLARED_PER_BYTE` times the file's size, plus
      :data:`_DECLARED_FLOOR`, are refused.
    * **A coordinate that is not a dimension's index**: ArviZ's groups have none, and a
      ``coordinates`` attribute added to a variable turns the variables it names into
      coordinates when xarray decodes the file, which the content hash, taken of the
      decoded tree, does not see: ``mu`` and ``sigma`` vanished from ``summary()``, and
      ``diverging`` from eight schools' sample stats hid its 110 divergences.
    """
    declared, promoted = 0, []
    for node in tree.subtree:
        dataset = node.to_dataset(inherit=False)
        for variable in dataset.variables.values():
            declared += int(np.prod(variable.shape, dtype=np.float64)) * variable.dtype.itemsize
        promoted += [f"{node.path.rstrip('/')}/{name}" for name in dataset.coords
                     if name not in dataset.dims]
    size = path.stat().st_size
    if declared > _DECLARED_PER_BYTE * size + _DECLARED_FLOOR:
        raise DataError(f"{str(path)!r} declares {declared / 2**20:.0f} MiB of values in a file "
                        f"of {size / 2**20:.2f} MiB: it is not a result ppl_notes wrote (values "
                        "left to a fill value); refused before reading them")
    if promoted:
        raise DataError(f"{str(path)!r} makes {sorted(promoted)} coordinates through a "
                        "'coordinates' attribute; a result ppl_notes wrote has no coordinate "
                        "but its dimensions' indexes, and this would hide those variables "
                        "from the posterior's summary and diagnostics: refused")


def _text(value) -> str | None:
    """An attribute as text (netCDF may hand back bytes), or None."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


def shipped_story(attrs: dict):
    """The shipped story a result names, from ppl_notes' own registry, or None.

    The stored name and ``module:attribute`` are compared, as strings, with the registry's
    entries; only an entry's own module, written in ppl_notes, is ever imported.
    """
    reference, name = str(attrs.get("model_path", "")), str(attrs.get("model", ""))
    for entry in STORIES.values():
        if f"{entry.module}:{entry.model}" == reference:
            story = entry.load_model()
            if story.name == name:
                return story
    return None
