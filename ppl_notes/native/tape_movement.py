"""Data movement on the tape: indexing, gathers, scatters, concatenation, padding.

These operations move values without arithmetic. Where their indices are constants of
the recording (never of the point), each is replayed once on a tensor of addresses: the
positions it reads become a gather table of ``tape.c`` (``I_GATHER``), or, where
repeats accumulate, pairs of a scatter-add (``I_SCATTER``). An index that depends on
the point runs instead as an instruction that reads it at every run (``I_INDEXED``:
``gather``, ``scatter`` and ``scatter_add``), as does a sort (``I_SORT``: ``sort`` and
``topk``), whose backward scatters the gradient back by the permutation it found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ppl_notes.native.arena import (
    I_INDEXED,
    I_SCATTER,
    I_SORT,
    MAX_DIMS,
    Address,
    AddressTable,
    Step,
    Unsupported,
    View,
    position_tensor,
)
from ppl_notes.native.tape_kernels import argument as _arg
from ppl_notes.native.tape_kernels import output_view as _out
from ppl_notes.native.tape_kernels import registrar

if TYPE_CHECKING:
    from ppl_notes.native.tape import Translator

__all__ = ["HANDLERS"]

#: aten operation (overload packet name) -> its handler: data movement
HANDLERS: dict[str, Callable[[Translator, Step], None]] = {}
_handles = registrar(HANDLERS)


# data movement: which flattened tensor arguments carry the values that move
_MOVES = {
    "index": [0], "index_select": [0], "gather": [0], "flip": [0], "roll": [0],
    "constant_pad_nd": [0], "select_backward": [0], "slice_backward": [0], "repeat": [0],
    "tril": [0], "triu": [0], "diag_embed": [0], "diagonal_backward": [0], "take": [0],
    "narrow_copy": [0], "expand_copy": [0], "permute_copy": [0], "unfold_backward": [0],
    "as_strided_scatter": [0, 1], "slice_scatter": [0, 1], "select_scatter": [0, 1],
    "diagonal_scatter": [0, 1],
}


@_handles(*_MOVES)
def _moves(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__
    fill = 0.0
    if name == "constant_pad_nd" and len(step.args) > 2:
        # replayed with pad value 0, so padded elements read as "fill", then given it
        fill = step.args[2]
        step = dataclasses.replace(step, args=(*step.args[:2], 0))
    t.gather_replay(step, _MOVES[name], fill)


@_handles("cat", "stack")
def _cat(t: Translator, step: Step) -> None:
    t.gather_replay(step, list(range(len(step.args[0]))))


@_handles("index_put", "index_put_", "_index_put_impl_")
def _index_put(t: Translator, step: Step) -> None:
    source, indices, values = step.args[:3]
    accumulate = bool(_arg(step, 3, "accumulate", False))
    if any(i is not None and t.is_variable(i) for i in indices):
        raise Unsupported("index_put with indices that depend on the point")
    out_tensor = step.outputs[0]
    if not accumulate:
        if step.func._schema.is_mutable:
            raise Unsupported("in-place index_put")
        positions = [0, len([i for i in indices if i is not None]) + 1]
        t.gather_replay(step, positions)
        return
    out = t.view(out_tensor)
    if not step.func._schema.is_mutable:  # out starts as a copy of source
        t.map("COPY", out, [t.view(source)], dtype=out_tensor.dtype)
    targets = position_tensor(out, 0)[tuple(slice(None) if i is None else i for i in indices)]
    _scatter_add(t, out, targets, values)


@_handles("scatter")
def _scatter(t: Translator, step: Step) -> None:
    """``scatter`` without a reduction: data movement, replayed on addresses.

    The value overload (``scatter(dim, index, value)``) is replayed with 0, which reads
    as ``fill``, and the scattered elements then get the value. An index that depends on
    the point (a sort's backward) is read at every run instead.
    """
    if "reduce" in step.kwargs or len(step.args) > 4:
        raise Unsupported(f"{step.func} with a reduction")
    source = step.args[3] if len(step.args) > 3 else step.kwargs.get(
        "src", step.kwargs.get("value"))
    if t.is_variable(step.args[2]):
        _scatter_at_run(t, step, source, accumulate=False)
        return
    if isinstance(source, torch.Tensor):
        t.gather_replay(step, [0, 2])
        return
    replay = dataclasses.replace(step, args=(*step.args[:3], 0), kwargs={})
    t.gather_replay(replay, [0], float(source))


@_handles("scatter_add")
def _scatter_add_op(t: Translator, step: Step) -> None:
    """``out = self``, then ``out[index[i]] += src[i]`` along ``dim``; repeats accumulate."""
    source, dim, index, values = step.args[:4]
    if t.is_variable(index):
        _scatter_at_run(t, step, values, accumulate=True)
        return
    if values.shape != index.shape:
        raise Unsupported(f"{step.func} with a src larger than its index")
    out = _out(t, step)
    t.map("COPY", out, [t.view(source)], dtype=step.outputs[0].dtype)
    _scatter_add(t, out, position_tensor(out, 0).gather(dim, index), values)


@_handles("index_add")
def _index_add(t: Translator, step: Step) -> None:
    source, dim, index, values = step.args[:4]
    if step.kwargs.get("alpha", 1) != 1 or t.is_variable(index):
        raise Unsupported(f"{step.func} with alpha or indices that depend on the point")
    out = _out(t, step)
    t.map("COPY", out, [t.view(source)], dtype=step.outputs[0].dtype)
    _scatter_add(t, out, position_tensor(out, 0).index_select(dim, index), values)


def _scatter_add(t: Translator, out: View, targets: torch.Tensor, values) -> None:
    """Add ``values`` into ``out`` at positions ``targets``; repeats accumulate.

    ``targets`` come from :func:`position_tensor` (owner 0); ``values`` are broadcast to
    their shape.
    """
    value_view = t.view(values) if isinstance(values, torch.Tensor) else t.scalar(values)
    sources = position_tensor(value_view, 0).expand(targets.shape)
    zeros = np.zeros(targets.numel(), dtype=np.int64)
    pairs = [AddressTable([value_view.buffer], sources.reshape(-1).numpy() - 1, zeros),
             AddressTable([out.buffer], targets.reshape(-1).numpy() - 1, zeros)]
    t.emit([I_SCATTER, int(targets.numel()), *pairs], [value_view, out], [out])


# -- indices found at run time ----------------------------------------------------------

def _descriptor(view: View) -> list:
    return [Address(view.buffer, view.offset), *view.strides]


def _fits(index: torch.Tensor, tensors: list[torch.Tensor], dim: int | None) -> None:
    """Torch's rule: the index no larger than each tensor, except along ``dim``."""
    if index.dim() == 0 or index.dim() > MAX_DIMS:
        raise Unsupported("an index of no or too many dimensions")
    for tensor in tensors:
        if tensor.dim() != index.dim() or any(
                i > s for d, (i, s) in enumerate(zip(index.shape, tensor.shape, strict=True))
                if d != dim):
            raise Unsupported("an index larger than the tensor it indexes")


def _indexed(t: Translator, mode: int, dim: int, out: View, index: View, source: View,
             size: int) -> None:
    """``I_INDEXED`` over ``index``'s elements: gather (0), scatter (1) or scatter-add (2)."""
    words = [I_INDEXED, len(index.sizes), dim, mode, size, *index.sizes, *_descriptor(out),
             *_descriptor(index), *_descriptor(source)]
    t.emit(words, [index, source] + ([out] if mode else []), [out])


@_handles("gather")
def _gather(t: Translator, step: Step) -> None:
    """``gather``: replayed on addresses, or with an index of the point's read at each run."""
    source, dim, index = step.args[:3]
    if not t.is_variable(index):
        t.gather_replay(step, _MOVES["gather"])
        return
    if _arg(step, 3, "sparse_grad", False):
        raise Unsupported("gather with sparse_grad")
    dim %= source.dim()
    _fits(index, [source], dim)
    _indexed(t, 0, dim, _out(t, step), t.view(index), t.view(source), source.shape[dim])


def _scatter_at_run(t: Translator, step: Step, values, accumulate: bool) -> None:
    """``out = self``, then ``out[index[i]] = values[i]`` (or ``+=``) along ``dim``."""
    source, dim, index = step.args[:3]
    dim %= source.dim()
    out = _out(t, step)
    if step.func._schema.is_mutable:
        raise Unsupported(f"in-place {step.func}")
    _fits(index, [source], dim)
    if isinstance(values, torch.Tensor):
        _fits(index, [values], None)
        value_view = t.view(values)
    else:
        scalar = t.scalar(values)
        value_view = View(scalar.buffer, scalar.offset, tuple(index.shape), (0,) * index.dim())
    t.map("COPY", out, [t.view(source)], dtype=step.outputs[0].dtype)
    _indexed(t, 2 if accumulate else 1, dim, out, t.view(index), value_view,
             source.shape[dim])


def _sort_rows(t: Translator, step: Step, dim: int, descending: bool, count: int) -> None:
    source = step.args[0]
    if source.dim() == 0 or source.dim() > MAX_DIMS:
        raise Unsupported(f"{step.func} of a tensor of no or too many dimensions")
    source_view = t.view(source)
    values, indices = _out(t, step, 0), _out(t, step, 1)
    words = [I_SORT, source.dim(), dim % source.dim(), int(bool(descending)), count,
             *source.shape, *_descriptor(values), *_descriptor(indices),
             *_descriptor(source_view)]
    t.emit(words, [source_view], [values, indices])


@_handles("sort")
def _sort(t: Translator, step: Step) -> None:
    """``torch.sort`` (stable, NaN last): the values and the permutation, found each run.

    Its backward scatters the gradient by that permutation (``scatter`` with an index of
    the point's, above).
    """
    if step.func._overloadname == "stable":  # sort.stable(self, *, stable, dim, descending)
        dim, descending = step.kwargs.get("dim", -1), step.kwargs.get("descending", False)
    else:
        dim, descending = _arg(step, 1, "dim", -1), _arg(step, 2, "descending", False)
    _sort_rows(t, step, dim, descending, step.args[0].shape[dim] if step.args[0].dim() else 1)


@_handles("topk")
def _topk(t: Translator, step: Step) -> None:
    """``torch.topk``: the first ``k`` of a sort, largest first by default."""
    if not _arg(step, 4, "sorted", True):
        raise Unsupported("topk(sorted=False): torch leaves the order open")
    _sort_rows(t, step, _arg(step, 2, "dim", -1), _arg(step, 3, "largest", True),
               int(step.args[1]))
