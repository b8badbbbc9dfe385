"""Find where a story reads a number computed from its parameters back into Python.

``if 0.7 < mu < 1.1:``, ``if sigma.item() > 1:``, ``float(scale)``: each reads a value
that depends on the point (``aten._local_scalar_dense``, ``aten.is_nonzero``,
``aten.equal``) into Python, where it can choose a branch. A batched run (the ``plate``
path) then takes *one* branch for every draw of the batch, and a recorded or traced
potential freezes the branch it saw: both are silently wrong wherever another branch
is taken. :class:`PointDependence` watches one run of the story: it follows every tensor
derived from the point through each aten operation (views, in-place writes and the
backward included) and notes the first read of such a tensor into Python, with the
story's line. The path choice (:func:`~ppl_notes.evaluation.paths.choose_path`) rules
the batched path out there, so such a story is evaluated one draw at a time, each draw
taking its own branch, as its author wrote it. This is what TorchDynamo's guards on
data-dependent control flow do for ``torch.compile``; here the guard is that no batched
or recorded potential is ever used for such a story.
"""

from __future__ import annotations

import linecache
import sysconfig
import traceback
from pathlib import Path

import pyro
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PointDependence", "READS_INTO_PYTHON"]

#: aten operations that hand a tensor's value to Python (``bool()``, ``.item()``,
#: ``float()``, ``int()``, ``.tolist()``, ``torch.equal``)
READS_INTO_PYTHON = frozenset({"_local_scalar_dense", "is_nonzero", "equal"})

_LIBRARIES = tuple(str(Path(m.__file__).parent) for m in (torch, pyro)) + (
    sysconfig.get_paths()["stdlib"],)
_OWN = str(Path(__file__).parents[1])
_OWN_STORIES = tuple(str(Path(_OWN, folder)) for folder in ("models", "guides"))


def story_line(stack: list[traceback.FrameSummary] | None = None) -> str:
    """``file:line (code)`` of the innermost frame of the story's own code.

    Frames of torch, Pyro, the standard library and ppl_notes (but its shipped stories)
    are skipped; an empty string where every frame is theirs.
    """
    for frame in reversed(stack if stack is not None else traceback.extract_stack()):
        name = frame.filename
        ours = name.startswith(_OWN) and not name.startswith(_OWN_STORIES)
        if ours or name.startswith(_LIBRARIES) or name.startswith("<frozen"):
            continue
        code = (frame.line or linecache.getline(name, frame.lineno)).strip()
        return f"{name}:{frame.lineno} ({code})" if code else f"{name}:{frame.lineno}"
    return ""


class PointDependence(TorchDispatchMode):
    """Note the first read into Python of a value computed from ``leaves``.

    Parameters
    ----------
    leaves : iterable of Tensor
        The point: every tensor computed from one of these (through any aten operation,
        or written in place by one) depends on it.

    Attributes
    ----------
    found : str or None
        After the run: the operation and the story's line of the first such read
        (``"bool() at story.py:12 (if 0.7 < mu < 1.1:)"``), or None where there was none.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # the default wraps the handler with TorchDynamo, imported for it (1-2 s)

    def __init__(self, leaves) -> None:
        super().__init__()
        self._dependent: dict[int, torch.UntypedStorage] = {}
        self.found: str | None = None
        for leaf in leaves:
            self._mark(leaf)

    def _mark(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        # the storage is held, so that its address is not reused by an unrelated tensor
        self._dependent[storage.data_ptr()] = storage

    def _depends(self, tensor: torch.Tensor) -> bool:
        try:
            return tensor.untyped_storage().data_ptr() in self._dependent
        except (RuntimeError, NotImplementedError):  # a tensor without storage
            return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors(args) + (_tensors(kwargs.values()) if kwargs else [])
        if not any(self._depends(t) for t in inputs):
            return out
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        if name in READS_INTO_PYTHON and self.found is None:
            what = {"_local_scalar_dense": "a value read into Python (bool(), .item(), "
                    "float(), a comparison in an if)", "is_nonzero": "bool()",
                    "equal": "torch.equal"}[name]
            line = story_line()
            self.found = f"{what} at {line}" if line else what
        for tensor in _tensors((out,)):
            self._mark(tensor)
        for tensor in _written(func, args, kwargs):  # written in place from the point
            self._mark(tensor)
        return out


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among ``values`` and in the lists and tuples among them (aten's args)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found += _tensors(value)
    return found


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments an aten operation writes in place (``out=`` included)."""
    if not func._schema.is_mutable:
        return []
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written += _tensors((value,))
    return written
