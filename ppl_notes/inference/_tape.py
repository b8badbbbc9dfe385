r"""A story's potential and gradient as a recorded tape of aten operations, run in C.

Compiling a potential with inductor costs seconds before the first draw, most of it
fixed: importing TorchDynamo, inductor and sympy, tracing with ``make_fx``, generating
and building C++ (eight schools: 8 s on an empty cache; the posteriordb HMM: 100 s),
while sampling the same story takes under a second. This module replaces all of it by
one eager evaluation:

1. **Record.** The potential and its gradient run once, eagerly, under a
   :class:`~torch.utils._python_dispatch.TorchDispatchMode` that notes every aten
   operation (forward and backward) with its real input and output tensors.
2. **Translate.** Every tensor is a place in one float64 *arena*: its storage gets a
   region, and the tensor is an offset and a stride per dimension there, so views
   (``view``, ``expand``, ``permute``, ``select``...) cost nothing. Each remaining
   operation becomes an instruction of ``_tape.c``: an elementwise map, a reduction, a
   scan, a batched matrix product, a Cholesky factorisation, a triangular solve, or a
   gather whose source addresses come from replaying the operation on tensors of
   addresses (indexing, ``cat``, ``flip``, padding: any pure data movement whose
   indices do not depend on the point). Storages no operation derives from the point
   (the data, constants, ``zeros_like``) are filled once. Regions are reused once the
   tape has read them for the last time.
3. **Run.** One C call per batch of points (``tape_run``), with no Python, Pyro or
   autograd in between; the C interpreter is compiled once per machine
   (:mod:`~ppl_notes.inference._native`).

A tape is the computation at the recorded shapes, with every branch the story took
frozen, exactly like a ``make_fx`` graph: :class:`~ppl_notes.inference._potential.
BatchedPotential` checks it against the story at prior draws before using it. An
operation the interpreter does not know raises :class:`Unsupported`, and the caller
compiles with inductor instead.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ppl_notes.inference._native import build

SOURCE = Path(__file__).with_name("_tape.c")

# instruction kinds and function codes: the enums of _tape.c, in order
I_MAP, I_REDUCE, I_SCAN, I_MATMUL, I_CHOL, I_TRISOLVE, I_GATHER, I_SCATTER = range(1, 9)
_FUNCTIONS = (
    "CONST COPY ADD SUB MUL DIV AFFINE POW POWT RPOW EXP LOG LOG1P EXPM1 SQRT RSQRT ABS "
    "SIGN SIGMOID TANH LGAMMA DIGAMMA ERF ERFC RECIP SIN COS SIGMOID_BW TANH_BW SOFTPLUS "
    "SOFTPLUS_BW LOGSIGMOID LOGSIGMOID_BW XLOGY LT LE GT GE EQ NE AND OR NOT WHERE "
    "MASKED_FILL CLAMP MAXIMUM MINIMUM FLOOR XLOG1PY ATAN LOG2 EXP2 ERFINV_UNUSED SQUARE "
    "CEIL ROUND TRUNC DIV_TRUNC_UNUSED LOGADDEXP SIGMOID_BW_X ATAN_BW_UNUSED POLYGAMMA"
).split()
F = {name: code for code, name in enumerate(_FUNCTIONS)}
R_SUM, R_PROD, R_MAX, R_MIN, R_LOGSUMEXP, R_ARGMAX, R_ARGMIN, R_ANY, R_ALL = range(9)
S_CUMSUM, S_CUMPROD, S_LOGCUMSUMEXP = range(3)
_MAXDIM = 12


class Unsupported(Exception):
    """The tape meets an operation (or a use of one) the C interpreter cannot run."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled tape interpreter, built on first use; None where it cannot be."""
    lib = build(SOURCE, "potential tapes")
    if lib is not None:
        lib.tape_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p]
        lib.tape_run.restype = ctypes.c_int
    return lib


# -- recording ----------------------------------------------------------------------------

@dataclass
class _Step:
    func: object
    args: tuple
    kwargs: dict
    outputs: list  # the tensors the op returned, flattened


class _Recorder(TorchDispatchMode):
    """Notes every aten operation with its real tensors (kept alive, so ids stay unique)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # the default wraps the handler with TorchDynamo, imported for it (2 s)

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[_Step] = []
        #: a copy of a storage's content from before the first operation that wrote into
        #: it in place, for storages the tape must restore on every run
        self.before_write: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for argument, value in zip(func._schema.arguments, args, strict=False):
                if (argument.alias_info is not None and argument.alias_info.is_write
                        and isinstance(value, torch.Tensor)):
                    key = _storage_key(value)
                    if key not in self.before_write:
                        self.before_write[key] = _storage_copy(value)
        result = func(*args, **kwargs)
        outputs = [t for t in _flatten(result) if isinstance(t, torch.Tensor)]
        self.steps.append(_Step(func, args, kwargs, outputs))
        return result


def _flatten(value):
    if isinstance(value, list | tuple):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storage_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor``, as a flat tensor of its dtype."""
    storage = tensor.untyped_storage()
    count = storage.nbytes() // tensor.element_size()
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, (count,), (1,)).clone()


# -- translation --------------------------------------------------------------------------

@dataclass(eq=False)
class _Buffer:
    """One storage of the recording: a region of the arena."""

    index: int
    size: int
    dtype: torch.dtype
    kind: str  # "input", "static" (filled once), "pristine" (a static source), "work"
    tensor: torch.Tensor | None = None  # a tensor on the storage, for the static content
    base: int = -1
    first: int = -1  # the first and last instruction that touch it (work buffers)
    last: int = -1


@dataclass(frozen=True)
class _View:
    """A tensor as the arena sees it: a buffer, an offset and strides in elements."""

    buffer: _Buffer
    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    def broadcast(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Strides that read this tensor broadcast to ``sizes``."""
        lead = len(sizes) - len(self.sizes)
        if lead < 0:
            raise Unsupported("an operand has more dimensions than the result")
        strides = [0] * lead
        for size, own, stride in zip(sizes[lead:], self.sizes, self.strides, strict=True):
            if own not in (size, 1):
                raise Unsupported("operand shapes do not broadcast")
            strides.append(stride if own == size else 0)
        return tuple(strides)


@dataclass(frozen=True)
class _Address:
    """An arena address, resolved once every buffer has its base."""

    buffer: _Buffer
    offset: int


@dataclass
class _AddressTable:
    """Addresses + 1 of many elements (0: the fill value), resolved in bulk."""

    buffers: list
    offsets: np.ndarray  # (count,) int64, -1 for fill
    owners: np.ndarray  # (count,) int64 index into buffers


@dataclass
class _Instruction:
    words: list
    reads: set = field(default_factory=set)
    writes: set = field(default_factory=set)


_VIEW_FREE_FACTORIES = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_empty_strided", "scalar_tensor", "zeros", "ones", "full", "empty",
    "empty_strided", "arange", "eye", "linspace", "lift_fresh_copy", "lift_fresh",
}
_NO_OUTPUT = {"_linalg_check_errors", "record_stream", "_assert_async", "sym_constrain_range"}
_SHAPE_ONLY = {"is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
               "size", "stride", "dim", "is_contiguous", "_has_compatible_shallow_copy_type"}


class _Translator:
    """Turns a recording into instructions over arena buffers."""

    def __init__(self, recorder: _Recorder, example: torch.Tensor) -> None:
        self.recorder = recorder
        self.buffers: dict[int, _Buffer] = {}
        self.variable: set[int] = set()  # buffer indices whose content depends on the point
        self.instructions: list[_Instruction] = []
        self.params: list[float] = [0.0]
        self.pristine: dict[int, _Buffer] = {}
        self.empty = _Buffer(-1, 0, torch.float64, "static")
        self.input = self._new_buffer(example, "input")
        self.variable.add(self.input.index)
        self.writes_in_place = set(recorder.before_write)

    # buffers and views
    def _new_buffer(self, tensor: torch.Tensor, kind: str) -> _Buffer:
        storage = tensor.untyped_storage()
        buffer = _Buffer(len(self.buffers), storage.nbytes() // tensor.element_size(),
                         tensor.dtype, kind, tensor)
        self.buffers[storage.data_ptr()] = buffer
        return buffer

    def view(self, tensor: torch.Tensor) -> _View:
        """The arena view of a tensor the recording has met before, or data it has not."""
        if not isinstance(tensor, torch.Tensor):
            raise Unsupported(f"expected a tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_complex or tensor.device.type != "cpu" or tensor.is_sparse:
            raise Unsupported(f"a {tensor.dtype} tensor on {tensor.device}")
        if tensor.untyped_storage().nbytes() == 0:
            return _View(self.empty, 0, tuple(tensor.shape), tuple(tensor.stride()))
        key = _storage_key(tensor)
        buffer = self.buffers.get(key)
        if buffer is None:  # data or a constant made outside the recording
            buffer = self._new_buffer(tensor, "static")
            if key in self.recorder.before_write:  # written in place later: restore it
                self._restore(buffer, self.recorder.before_write[key])
        elif buffer.dtype != tensor.dtype:
            raise Unsupported("a storage viewed as two dtypes")
        return _View(buffer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))

    def scalar(self, value, dtype=torch.float64) -> _View:
        """A Python number as a one-element static buffer."""
        return self.view(torch.tensor(float(value), dtype=torch.float64))

    def operand(self, value) -> _View:
        if isinstance(value, torch.Tensor):
            return self.view(value)
        if isinstance(value, bool | numbers.Real):
            return self.scalar(value)
        raise Unsupported(f"operand of type {type(value).__name__}")

    def param(self, *values: float) -> int:
        index = len(self.params)
        self.params.extend(float(v) for v in values)
        return index

    def is_variable(self, value) -> bool:
        return any(isinstance(t, torch.Tensor) and self.buffers.get(_storage_key(t)) is not None
                   and self.buffers[_storage_key(t)].index in self.variable
                   for t in _flatten(value))

    def emit(self, words: list, reads=(), writes=()) -> None:
        self.instructions.append(_Instruction(words, {v.buffer for v in reads},
                                              {v.buffer for v in writes}))

    # the steps
    def translate(self) -> None:
        for step in self.recorder.steps:
            self._step(step)

    def _step(self, step: _Step) -> None:
        name = step.func.overloadpacket.__name__ if hasattr(step.func, "overloadpacket") \
            else str(step.func)
        variable_in = self.is_variable((step.args, list(step.kwargs.values())))
        if not step.outputs:
            if name in _NO_OUTPUT or name in _SHAPE_ONLY or not variable_in:
                return
            raise Unsupported(f"{step.func} returns a value computed from the point "
                              "(a branch on it would be frozen)")
        mutable = step.func._schema.is_mutable
        new_outputs = [t for t in step.outputs
                       if t.untyped_storage().nbytes() and _storage_key(t) not in self.buffers]
        if not mutable and not new_outputs:
            for out in step.outputs:  # a view: outputs alias an input's storage
                self.view(out)
            return
        if mutable and new_outputs:
            raise Unsupported(f"{step.func} both writes in place and allocates")
        if mutable:
            # every storage written in place was restored to its content before the first
            # write when it was first met, so its buffer is a work buffer already
            if variable_in:
                self.variable.update(self.view(out).buffer.index for out in step.outputs)
        else:
            static = not variable_in or name in _VIEW_FREE_FACTORIES
            for out in new_outputs:
                buffer = self._new_buffer(out, "static" if static else "work")
                if static and _storage_key(out) in self.writes_in_place:
                    self._restore(buffer, self.recorder.before_write[_storage_key(out)])
                elif not static:
                    self.variable.add(buffer.index)
            if static:
                return
        handler = _HANDLERS.get(name)
        if handler is None:
            raise Unsupported(f"no C kernel for {step.func}")
        handler(self, step)

    def _restore(self, buffer: _Buffer, content: torch.Tensor) -> None:
        """Make a static buffer written in place a work buffer that starts as ``content``."""
        source = _Buffer(-1, buffer.size, buffer.dtype, "pristine", content)
        source.index = len(self.buffers) + len(self.pristine) + 1_000_000
        self.pristine[source.index] = source
        buffer.kind = "work"
        self.variable.add(buffer.index)
        flat_out = _View(buffer, 0, (buffer.size,), (1,))
        flat_in = _View(source, 0, (buffer.size,), (1,))
        self.map("COPY", flat_out, [flat_in], dtype=buffer.dtype)

    # instruction builders
    def map(self, function: str, out: _View, inputs: list[_View], params=(),
            dtype=torch.float64) -> None:
        """``out = function(*inputs)`` elementwise, the inputs broadcast to ``out``."""
        sizes = out.sizes
        if 0 in sizes:
            return
        strides = [out.strides] + [v.broadcast(sizes) for v in inputs]
        sizes, strides = _coalesce(sizes, strides)
        words = [I_MAP, F[function], len(inputs), len(sizes), _rounding(dtype),
                 self.param(*params) if params else 0, *sizes]
        for view, view_strides in zip([out, *inputs], strides, strict=True):
            words += [_Address(view.buffer, view.offset), *view_strides]
        self.emit(words, inputs, [out])

    def reduce(self, kind: int, out: _View, source: _View, dims: list[int], keepdim: bool,
               dtype, scale: float = 1.0) -> None:
        ndim = len(source.sizes)
        dims = sorted({d % ndim for d in dims}) if ndim else []
        kept = [d for d in range(ndim) if d not in dims]
        osizes = [source.sizes[d] for d in kept] or [1]
        rsizes = [source.sizes[d] for d in dims] or [1]
        out_strides = list(out.strides)
        if keepdim:
            out_strides = [out.strides[d] for d in kept]
        out_strides = out_strides or [0]
        in_out = [source.strides[d] for d in kept] or [0]
        in_red = [source.strides[d] for d in dims] or [0]
        osizes, (out_strides, in_out) = _coalesce(osizes, [out_strides, in_out])
        rsizes, (in_red,) = _coalesce(rsizes, [in_red])
        if 0 in osizes:
            return
        if len(osizes) > _MAXDIM or len(rsizes) > _MAXDIM:
            raise Unsupported("too many dimensions")
        words = [I_REDUCE, kind, len(osizes), len(rsizes), _rounding(dtype), self.param(scale),
                 *osizes, *rsizes, _Address(out.buffer, out.offset), *out_strides,
                 _Address(source.buffer, source.offset), *in_out, *in_red]
        self.emit(words, [source], [out])

    def gather_replay(self, step: _Step, data_positions: list[int], fill: float = 0.0) -> None:
        """A data-movement op as a gather, replayed on tensors of addresses.

        Each output's source is found by running the op on tensors whose elements are
        their own addresses. ``data_positions`` are the indices of the flattened tensor
        arguments whose values move; every other tensor argument must not depend on the
        point.
        """
        tensors = [a for a in _flatten(step.args) if isinstance(a, torch.Tensor)]
        tensors += [a for a in _flatten(list(step.kwargs.values())) if isinstance(a, torch.Tensor)]
        for i, tensor in enumerate(tensors):
            if i not in data_positions and self.is_variable(tensor):
                raise Unsupported(f"{step.func} with indices that depend on the point")
        table: list[_Buffer] = []
        replacements = {}
        for i in data_positions:
            view = self.view(tensors[i])
            if view.buffer not in table:
                table.append(view.buffer)
            owner = table.index(view.buffer)
            replacements[id(tensors[i])] = _position_tensor(view, owner)
        args = _replace(step.args, replacements)
        kwargs = _replace(step.kwargs, replacements)
        if "dtype" in kwargs:
            kwargs.pop("dtype")
        if step.func.overloadpacket.__name__ == "constant_pad_nd":
            args = (*args[:2], 0) if len(args) > 2 else args
        positions = step.func(*args, **kwargs)
        out = step.outputs[0]
        if not isinstance(positions, torch.Tensor) or positions.shape != out.shape:
            raise Unsupported(f"replaying {step.func} on addresses failed")
        encoded = positions.reshape(-1).to(torch.int64).numpy()
        self.gather(self.view(out), table, encoded, fill, out.dtype)

    def gather(self, out: _View, table: list[_Buffer], encoded: np.ndarray, fill: float,
               dtype) -> None:
        """``out`` (logical order) from encoded positions: ``owner << 40 | offset + 1``."""
        if len(out.sizes) > _MAXDIM:
            raise Unsupported("too many dimensions")
        owners = np.where(encoded > 0, (encoded - 1) >> 40, 0)
        offsets = np.where(encoded > 0, (encoded - 1) & ((1 << 40) - 1), -1)
        sizes = list(out.sizes) or [1]
        strides = list(out.strides) or [0]
        words = [I_GATHER, len(sizes), _rounding(dtype), self.param(fill), *sizes,
                 _Address(out.buffer, out.offset), *strides, int(encoded.size),
                 _AddressTable(table, offsets, owners)]
        reads = [_View(b, 0, (1,), (1,)) for b in table]
        self.emit(words, reads, [out])


def _position_tensor(view: _View, owner: int) -> torch.Tensor:
    """A tensor shaped like ``view`` whose elements are ``owner << 40 | offset + 1``."""
    offset = torch.full(view.sizes, view.offset, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(view.sizes, view.strides, strict=True)):
        shape = [1] * len(view.sizes)
        shape[dim] = size
        offset = offset + (torch.arange(size, dtype=torch.int64) * stride).reshape(shape)
    return (owner << 40) + offset + 1


def _replace(value, replacements: dict):
    if isinstance(value, torch.Tensor):
        return replacements.get(id(value), value)
    if isinstance(value, list):
        return [_replace(v, replacements) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v, replacements) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, replacements) for k, v in value.items()}
    return value


def _rounding(dtype) -> int:
    if dtype == torch.float32 or dtype == torch.bfloat16 or dtype == torch.float16:
        if dtype != torch.float32:
            raise Unsupported(f"{dtype} arithmetic")
        return 1
    if dtype == torch.bool:
        return 3
    if not dtype.is_floating_point:
        return 2
    return 0


def _coalesce(sizes, strides_list):
    """Loop dimensions for strided operands: as few, as long and as contiguous as can be.

    Size-1 dimensions go; the rest are put in the first operand's memory order (largest
    stride first: a vmapped batch dimension is innermost in memory), and adjacent ones
    every operand walks contiguously are merged.
    """
    order = sorted(range(len(sizes)), key=lambda d: -abs(strides_list[0][d]))
    sizes = [sizes[d] for d in order]
    strides_list = [[st[d] for d in order] for st in strides_list]
    keep = [d for d, s in enumerate(sizes) if s != 1]
    sizes = [sizes[d] for d in keep]
    strides_list = [[st[d] for d in keep] for st in strides_list]
    if not sizes:
        return [1], [[0] for _ in strides_list]
    merged_sizes = [sizes[0]]
    merged = [[st[0]] for st in strides_list]
    for d in range(1, len(sizes)):
        if all(m[-1] == st[d] * sizes[d] for m, st in zip(merged, strides_list, strict=True)):
            merged_sizes[-1] *= sizes[d]
            for m, st in zip(merged, strides_list, strict=True):
                m[-1] = st[d]
        else:
            merged_sizes.append(sizes[d])
            for m, st in zip(merged, strides_list, strict=True):
                m.append(st[d])
    if len(merged_sizes) > _MAXDIM:
        raise Unsupported("too many dimensions")
    longest = max(range(len(merged_sizes)), key=merged_sizes.__getitem__)
    if merged_sizes[-1] < 16 and longest != len(merged_sizes) - 1:
        # a short inner loop costs its set-up per element: run the longest one innermost
        # (the operands of a tape's maps fit in cache, so the order barely matters there)
        for dims in [merged_sizes, *merged]:
            dims.append(dims.pop(longest))
    return merged_sizes, merged


# -- handlers: one per aten op (overload packet) ------------------------------------------

_HANDLERS: dict[str, Callable[[_Translator, _Step], None]] = {}


def _handles(*names: str):
    def register(function):
        for name in names:
            _HANDLERS[name] = function
        return function
    return register


def _out(t: _Translator, step: _Step, index: int = 0) -> _View:
    return t.view(step.outputs[index])


def _arg(step: _Step, index: int, name: str, default=None):
    if len(step.args) > index:
        return step.args[index]
    return step.kwargs.get(name, default)


_UNARY = {
    "exp": "EXP", "log": "LOG", "log1p": "LOG1P", "expm1": "EXPM1", "sqrt": "SQRT",
    "rsqrt": "RSQRT", "abs": "ABS", "sign": "SIGN", "sgn": "SIGN", "sigmoid": "SIGMOID",
    "tanh": "TANH", "lgamma": "LGAMMA", "digamma": "DIGAMMA", "erf": "ERF", "erfc": "ERFC",
    "reciprocal": "RECIP", "sin": "SIN", "cos": "COS", "floor": "FLOOR", "ceil": "CEIL",
    "round": "ROUND", "trunc": "TRUNC", "atan": "ATAN", "log2": "LOG2", "exp2": "EXP2",
    "logical_not": "NOT", "clone": "COPY", "_to_copy": "COPY", "lift_fresh_copy": "COPY",
    "square": "SQUARE", "log_sigmoid": "LOGSIGMOID", "alias_copy": "COPY",
}
_BINARY = {
    "mul": "MUL", "div": "DIV", "pow": "POWT", "xlogy": "XLOGY", "special_xlog1py": "XLOG1PY",
    "lt": "LT", "le": "LE", "gt": "GT", "ge": "GE", "eq": "EQ", "ne": "NE",
    "logical_and": "AND", "logical_or": "OR", "bitwise_and": "AND", "bitwise_or": "OR",
    "maximum": "MAXIMUM", "minimum": "MINIMUM", "logaddexp": "LOGADDEXP",
    "sigmoid_backward": "SIGMOID_BW", "tanh_backward": "TANH_BW",
    "log_sigmoid_backward": "LOGSIGMOID_BW",
}


@_handles(*_UNARY)
def _unary(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    out = _out(t, step)
    if name in ("round",) and step.kwargs.get("decimals"):
        raise Unsupported("round with decimals")
    t.map(_UNARY[name], out, [t.operand(step.args[0])], dtype=step.outputs[0].dtype)


@_handles(*(name + "_" for name in _UNARY if name not in ("clone", "_to_copy")))
def _unary_in_place(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__[:-1]
    t.map(_UNARY[name], t.view(step.args[0]), [t.operand(step.args[0])],
          dtype=step.args[0].dtype)


@_handles(*_BINARY, *(name + "_" for name in _BINARY))
def _binary(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    in_place = name.endswith("_") and name.rstrip("_") in _BINARY
    base = name[:-1] if in_place else name
    overload = step.func._overloadname
    if base == "div" and step.kwargs.get("rounding_mode") is not None:
        raise Unsupported("div with a rounding mode")
    out = t.view(step.args[0]) if in_place else _out(t, step)
    if base == "pow" and overload == "Tensor_Scalar":
        exponent = step.args[1]
        function = {2: "SQUARE", 1: "COPY", 0.5: "SQRT", -1: "RECIP"}.get(exponent, "POW")
        t.map(function, out, [t.operand(step.args[0])], params=(exponent,),
              dtype=step.outputs[0].dtype)
        return
    if base == "pow" and overload == "Scalar":
        t.map("RPOW", out, [t.operand(step.args[1])], params=(step.args[0],),
              dtype=step.outputs[0].dtype)
        return
    if base == "log_sigmoid_backward":
        t.map("LOGSIGMOID_BW", out, [t.operand(step.args[0]), t.operand(step.args[1])],
              dtype=step.outputs[0].dtype)
        return
    t.map(_BINARY[base], out, [t.operand(step.args[0]), t.operand(step.args[1])],
          dtype=step.outputs[0].dtype)


@_handles("add", "sub", "add_", "sub_")
def _add(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    out = t.view(step.args[0]) if name.endswith("_") else _out(t, step)
    alpha = step.kwargs.get("alpha", step.args[2] if len(step.args) > 2 else 1)
    t.map("ADD" if name.startswith("add") else "SUB", out,
          [t.operand(step.args[0]), t.operand(step.args[1])], params=(alpha,),
          dtype=step.outputs[0].dtype)


@_handles("rsub")
def _rsub(t: _Translator, step: _Step) -> None:
    alpha = step.kwargs.get("alpha", step.args[2] if len(step.args) > 2 else 1)
    t.map("SUB", _out(t, step), [t.operand(step.args[1]), t.operand(step.args[0])],
          params=(alpha,), dtype=step.outputs[0].dtype)


@_handles("bitwise_not")
def _bitwise_not(t: _Translator, step: _Step) -> None:
    dtype = step.outputs[0].dtype
    if dtype == torch.bool:
        t.map("NOT", _out(t, step), [t.operand(step.args[0])], dtype=dtype)
    else:  # two's complement: ~v = -v - 1
        t.map("AFFINE", _out(t, step), [t.operand(step.args[0])], params=(-1.0, -1.0),
              dtype=dtype)


@_handles("neg", "neg_")
def _neg(t: _Translator, step: _Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    t.map("AFFINE", out, [t.operand(step.args[0])], params=(0.0, -1.0),
          dtype=step.outputs[0].dtype)


@_handles("copy_")
def _copy(t: _Translator, step: _Step) -> None:
    t.map("COPY", t.view(step.args[0]), [t.operand(step.args[1])], dtype=step.args[0].dtype)


@_handles("fill_", "zero_", "fill")
def _fill(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    value = 0.0 if name == "zero_" else step.args[1]
    if isinstance(value, torch.Tensor):
        t.map("COPY", _out(t, step), [t.view(value)], dtype=step.outputs[0].dtype)
        return
    t.map("CONST", _out(t, step), [], params=(value,), dtype=step.outputs[0].dtype)


@_handles("where")
def _where(t: _Translator, step: _Step) -> None:
    condition, a, b = step.args[:3]
    t.map("WHERE", _out(t, step), [t.operand(condition), t.operand(a), t.operand(b)],
          dtype=step.outputs[0].dtype)


@_handles("masked_fill", "masked_fill_")
def _masked_fill(t: _Translator, step: _Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    source, mask, value = step.args[:3]
    if isinstance(value, torch.Tensor):
        t.map("WHERE", out, [t.operand(mask), t.operand(value), t.operand(source)],
              dtype=step.outputs[0].dtype)
    else:
        t.map("MASKED_FILL", out, [t.operand(source), t.operand(mask)], params=(value,),
              dtype=step.outputs[0].dtype)


@_handles("clamp", "clamp_min", "clamp_max", "clamp_")
def _clamp(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    if step.func._overloadname not in ("default", ""):
        raise Unsupported(f"{step.func}")
    low, high = -math.inf, math.inf
    if name == "clamp_min":
        low = step.args[1]
    elif name == "clamp_max":
        high = step.args[1]
    else:
        low = _arg(step, 1, "min")
        high = _arg(step, 2, "max")
        low = -math.inf if low is None else low
        high = math.inf if high is None else high
    out = t.view(step.args[0]) if name.endswith("_") else _out(t, step)
    t.map("CLAMP", out, [t.operand(step.args[0])], params=(low, high),
          dtype=step.outputs[0].dtype)


@_handles("relu", "relu_")
def _relu(t: _Translator, step: _Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    t.map("CLAMP", out, [t.operand(step.args[0])], params=(0.0, math.inf),
          dtype=step.outputs[0].dtype)


@_handles("softplus")
def _softplus(t: _Translator, step: _Step) -> None:
    beta, threshold = _arg(step, 1, "beta", 1.0), _arg(step, 2, "threshold", 20.0)
    t.map("SOFTPLUS", _out(t, step), [t.operand(step.args[0])], params=(beta, threshold),
          dtype=step.outputs[0].dtype)


@_handles("softplus_backward")
def _softplus_backward(t: _Translator, step: _Step) -> None:
    grad, x, beta, threshold = step.args[:4]
    t.map("SOFTPLUS_BW", _out(t, step), [t.operand(grad), t.operand(x)],
          params=(beta, threshold), dtype=step.outputs[0].dtype)


@_handles("log_sigmoid_forward")
def _log_sigmoid_forward(t: _Translator, step: _Step) -> None:
    t.map("LOGSIGMOID", _out(t, step), [t.operand(step.args[0])], dtype=step.outputs[0].dtype)
    if step.outputs[1].numel():  # the backward of this interpreter does not read it
        t.map("CONST", _out(t, step, 1), [], params=(0.0,), dtype=step.outputs[1].dtype)


@_handles("polygamma")
def _polygamma(t: _Translator, step: _Step) -> None:
    order, source = step.args[:2]
    t.map("DIGAMMA" if order == 0 else "POLYGAMMA", _out(t, step), [t.operand(source)],
          params=(order,), dtype=step.outputs[0].dtype)


def _dims(value, ndim: int) -> list[int]:
    if value is None or value == [] or value == ():
        return list(range(ndim))
    if isinstance(value, int):
        return [value]
    return list(value)


@_handles("sum", "mean", "prod", "amax", "amin", "logsumexp", "any", "all")
def _reduce(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    source = t.view(step.args[0])
    ndim = len(source.sizes)
    overload = step.func._overloadname
    if overload in ("default", "") and name != "logsumexp" and name not in ("amax", "amin"):
        dims, keepdim = list(range(ndim)), False
    else:
        dims = _dims(_arg(step, 1, "dim"), ndim)
        keepdim = bool(_arg(step, 2, "keepdim", False))
    kind = {"sum": R_SUM, "mean": R_SUM, "prod": R_PROD, "amax": R_MAX, "amin": R_MIN,
            "logsumexp": R_LOGSUMEXP, "any": R_ANY, "all": R_ALL}[name]
    count = math.prod(source.sizes[d % ndim] for d in dims) if ndim else 1
    scale = 1.0 / count if name == "mean" else 1.0
    t.reduce(kind, _out(t, step), source, dims, keepdim, step.outputs[0].dtype, scale)


@_handles("max", "min")
def _max(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    source = t.view(step.args[0])
    overload = step.func._overloadname
    if overload == "default":
        t.reduce(R_MAX if name == "max" else R_MIN, _out(t, step), source,
                 list(range(len(source.sizes))), False, step.outputs[0].dtype)
        return
    if overload != "dim":
        raise Unsupported(f"{step.func}")
    dim, keepdim = step.args[1], bool(_arg(step, 2, "keepdim", False))
    t.reduce(R_MAX if name == "max" else R_MIN, _out(t, step, 0), source, [dim], keepdim,
             step.outputs[0].dtype)
    t.reduce(R_ARGMAX if name == "max" else R_ARGMIN, _out(t, step, 1), source, [dim],
             keepdim, step.outputs[1].dtype)


@_handles("argmax", "argmin")
def _argmax(t: _Translator, step: _Step) -> None:
    source = t.view(step.args[0])
    dim = _arg(step, 1, "dim")
    if dim is None:
        raise Unsupported("argmax over all dimensions")
    kind = R_ARGMAX if step.func.overloadpacket.__name__ == "argmax" else R_ARGMIN
    t.reduce(kind, _out(t, step), source, [dim], bool(_arg(step, 2, "keepdim", False)),
             step.outputs[0].dtype)


@_handles("cumsum", "cumprod", "logcumsumexp")
def _scan(t: _Translator, step: _Step) -> None:
    kind = {"cumsum": S_CUMSUM, "cumprod": S_CUMPROD, "logcumsumexp": S_LOGCUMSUMEXP}[
        step.func.overloadpacket.__name__]
    source, out = t.view(step.args[0]), _out(t, step)
    ndim = len(source.sizes)
    if ndim == 0:
        t.map("COPY", out, [source], dtype=step.outputs[0].dtype)
        return
    dim = step.args[1] % ndim
    kept = [d for d in range(ndim) if d != dim] or None
    osizes = [source.sizes[d] for d in kept] if kept else [1]
    ostr = [out.strides[d] for d in kept] if kept else [0]
    istr = [source.strides[d] for d in kept] if kept else [0]
    words = [I_SCAN, kind, len(osizes), _rounding(step.outputs[0].dtype), 0, *osizes,
             source.sizes[dim], _Address(out.buffer, out.offset), *ostr, out.strides[dim],
             _Address(source.buffer, source.offset), *istr, source.strides[dim]]
    t.emit(words, [source], [out])


def _matrix_operand(view: _View, batch_sizes: list[int]) -> list:
    """Base, batch strides (broadcast), then the two matrix strides."""
    lead = view.sizes[:-2]
    lead_strides = view.strides[:-2]
    pad = len(batch_sizes) - len(lead)
    strides = [0] * pad + [s if n != 1 else 0 for n, s in zip(lead, lead_strides, strict=True)]
    return [_Address(view.buffer, view.offset), *(strides or [0]), *view.strides[-2:]]


def _batch(*views: _View) -> list[int]:
    # numpy's: torch.broadcast_shapes imports its symbolic shapes and sympy (0.5 s)
    return list(np.broadcast_shapes(*(v.sizes[:-2] for v in views))) or [1]


@_handles("mm", "bmm", "mv", "dot")
def _matmul(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    a, b, out = t.view(step.args[0]), t.view(step.args[1]), _out(t, step)
    if name == "mv":  # (M, K) @ (K,) -> (M,)
        b = _View(b.buffer, b.offset, (b.sizes[0], 1), (b.strides[0], 0))
        out = _View(out.buffer, out.offset, (out.sizes[0], 1), (out.strides[0], 0))
    elif name == "dot":
        a = _View(a.buffer, a.offset, (1, a.sizes[0]), (0, a.strides[0]))
        b = _View(b.buffer, b.offset, (b.sizes[0], 1), (b.strides[0], 0))
        out = _View(out.buffer, out.offset, (1, 1), (0, 0))
    batch = [1] if name in ("mm", "mv", "dot") else _batch(a, b)
    if name in ("mm", "mv", "dot"):
        a = _View(a.buffer, a.offset, (1, *a.sizes), (0, *a.strides))
        b = _View(b.buffer, b.offset, (1, *b.sizes), (0, *b.strides))
        out = _View(out.buffer, out.offset, (1, *out.sizes), (0, *out.strides))
    M, K, N = a.sizes[-2], a.sizes[-1], b.sizes[-1]
    words = [I_MATMUL, len(batch), _rounding(step.outputs[0].dtype), *batch, M, K, N,
             *_matrix_operand(out, batch), *_matrix_operand(a, batch),
             *_matrix_operand(b, batch)]
    t.emit(words, [a, b], [out])


def _transposed(view: _View) -> _View:
    return _View(view.buffer, view.offset, (*view.sizes[:-2], view.sizes[-1], view.sizes[-2]),
                 (*view.strides[:-2], view.strides[-1], view.strides[-2]))


@_handles("linalg_cholesky_ex")
def _cholesky(t: _Translator, step: _Step) -> None:
    source, out = t.view(step.args[0]), _out(t, step)
    if _arg(step, 1, "upper", False):  # U = L^T: read and write transposed
        source, out = _transposed(source), _transposed(out)
    batch = _batch(source)
    words = [I_CHOL, len(batch), *batch, source.sizes[-1], *_matrix_operand(out, batch),
             *_matrix_operand(source, batch)]
    t.emit(words, [source], [out])
    info = _out(t, step, 1)
    t.map("CONST", info, [], params=(0.0,), dtype=step.outputs[1].dtype)


def _trisolve(t: _Translator, out: _View, a: _View, b: _View, upper: bool, unit: bool,
              left: bool) -> None:
    if not left:  # X A = B  <=>  A^T X^T = B^T
        a, b, out, upper = _transposed(a), _transposed(b), _transposed(out), not upper
    batch = _batch(a, b)
    words = [I_TRISOLVE, len(batch), int(upper), int(unit), *batch, a.sizes[-1], b.sizes[-1],
             *_matrix_operand(out, batch), *_matrix_operand(a, batch),
             *_matrix_operand(b, batch)]
    t.emit(words, [a, b], [out])


@_handles("linalg_solve_triangular")
def _solve_triangular(t: _Translator, step: _Step) -> None:
    a, b = t.view(step.args[0]), t.view(step.args[1])
    _trisolve(t, _out(t, step), a, b, bool(step.kwargs.get("upper", _arg(step, 2, "upper"))),
              bool(step.kwargs.get("unitriangular", False)), bool(step.kwargs.get("left", True)))


@_handles("triangular_solve")
def _triangular_solve(t: _Translator, step: _Step) -> None:
    b, a = t.view(step.args[0]), t.view(step.args[1])
    upper = bool(_arg(step, 2, "upper", True))
    if _arg(step, 3, "transpose", False):
        a, upper = _transposed(a), not upper
    _trisolve(t, _out(t, step), a, b, upper, bool(_arg(step, 4, "unitriangular", False)), True)
    t.map("COPY", _out(t, step, 1), [t.view(step.args[1])], dtype=step.outputs[1].dtype)


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
def _moves(t: _Translator, step: _Step) -> None:
    name = step.func.overloadpacket.__name__
    fill = step.args[2] if name == "constant_pad_nd" and len(step.args) > 2 else 0.0
    t.gather_replay(step, _MOVES[name], fill)


@_handles("cat", "stack")
def _cat(t: _Translator, step: _Step) -> None:
    t.gather_replay(step, list(range(len(step.args[0]))))


@_handles("index_put", "index_put_", "_index_put_impl_")
def _index_put(t: _Translator, step: _Step) -> None:
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
    targets = _position_tensor(out, 0)[tuple(slice(None) if i is None else i for i in indices)]
    _scatter_add(t, out, targets, values)


@_handles("index_add")
def _index_add(t: _Translator, step: _Step) -> None:
    source, dim, index, values = step.args[:4]
    if step.kwargs.get("alpha", 1) != 1 or t.is_variable(index):
        raise Unsupported(f"{step.func} with alpha or indices that depend on the point")
    out = _out(t, step)
    t.map("COPY", out, [t.view(source)], dtype=step.outputs[0].dtype)
    _scatter_add(t, out, _position_tensor(out, 0).index_select(dim, index), values)


def _scatter_add(t: _Translator, out: _View, targets: torch.Tensor, values) -> None:
    """Add ``values`` into ``out`` at positions ``targets``; repeats accumulate.

    ``targets`` come from :func:`_position_tensor` (owner 0); ``values`` are broadcast to
    their shape.
    """
    value_view = t.view(values) if isinstance(values, torch.Tensor) else t.scalar(values)
    sources = _position_tensor(value_view, 0).expand(targets.shape)
    zeros = np.zeros(targets.numel(), dtype=np.int64)
    pairs = [_AddressTable([value_view.buffer], sources.reshape(-1).numpy() - 1, zeros),
             _AddressTable([out.buffer], targets.reshape(-1).numpy() - 1, zeros)]
    t.emit([I_SCATTER, int(targets.numel()), *pairs], [value_view, out], [out])


# -- assembling ---------------------------------------------------------------------------

class Tape:
    """A recorded potential: ``tape(points) -> (values, grads)`` in one C call.

    Parameters
    ----------
    value_and_grad : callable
        ``x -> (value, grad)`` for a ``(batch, dim)`` float64 tensor ``x``; run once, now.
    example : torch.Tensor
        The point to record at; every later call must have its shape.

    Raises
    ------
    Unsupported
        Where the computation uses an operation the interpreter cannot run; no C
        compiler also raises it.
    """

    def __init__(self, value_and_grad: Callable, example: torch.Tensor) -> None:
        lib = library()
        if lib is None:
            raise Unsupported("no C compiler for the tape interpreter")
        self.lib = lib
        example = example.detach().clone().contiguous()
        recorder = _Recorder()
        with recorder:
            value, grad = value_and_grad(example)
        translator = _Translator(recorder, example)
        translator.translate()
        self.shape = tuple(example.shape)
        self._assemble(translator, value, grad)
        self.steps = len(recorder.steps)
        self.instructions = len(translator.instructions)

    def _assemble(self, translator: _Translator, value: torch.Tensor,
                  grad: torch.Tensor) -> None:
        outputs = [translator.view(value), translator.view(grad)]
        size = _allocate(translator, {v.buffer for v in outputs})
        arena = np.zeros(size)
        for buffer in [*translator.buffers.values(), *translator.pristine.values()]:
            if buffer.kind in ("static", "pristine") and buffer.tensor is not None:
                content = _storage_copy(buffer.tensor) if buffer.kind == "static" \
                    else buffer.tensor
                arena[buffer.base:buffer.base + buffer.size] = \
                    content.detach().double().numpy()[:buffer.size]
        self.arena = arena
        self.code = np.array(_resolve(translator.instructions), dtype=np.int64)
        self.params = np.array([*translator.params, 0.0, 0.0], dtype=np.float64)
        self._input = slice(translator.input.base, translator.input.base + translator.input.size)
        self._value_index = _indices(outputs[0])
        self._grad_index = _indices(outputs[1])
        self._args = (self.arena.ctypes.data, self.code.ctypes.data, int(self.code.size),
                      self.params.ctypes.data)
        self._value_flat = np.ascontiguousarray(self._value_index.reshape(-1))
        self._grad_flat = np.ascontiguousarray(self._grad_index.reshape(-1))
        self._context = _TapePotential(
            self.arena.ctypes.data, self.code.ctypes.data, int(self.code.size),
            self.params.ctypes.data, self._input.start, self._input.stop - self._input.start,
            self._value_flat.ctypes.data, self._grad_flat.ctypes.data,
            int(self._value_flat.size), int(self._grad_flat.size))

    def native(self) -> tuple[int, int]:
        """The tape as a C batched potential: ``(function, context)`` addresses.

        ``int f(void *context, const double *positions, double *potentials, double
        *grads)``, which the C NUTS transitions call without Python; valid while this
        tape lives.
        """
        function = ctypes.cast(self.lib.tape_potential, ctypes.c_void_p).value
        return function, ctypes.addressof(self._context)

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Potentials and gradients at ``points``, a ``(batch, dim)`` float64 tensor."""
        value, grad = self.evaluate(points.detach().numpy())
        return torch.from_numpy(value), torch.from_numpy(grad)

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`__call__` on and to NumPy arrays (float64, ``(batch, dim)``)."""
        if points.shape != self.shape:
            raise ValueError(f"the tape was recorded for shape {self.shape}, "
                             f"got {points.shape}")
        self.arena[self._input] = points.reshape(-1)
        status = self.lib.tape_run(*self._args)
        if status != 0:
            raise RuntimeError("linalg.cholesky: the input is not positive-definite "
                               "(in the potential's tape)")
        return self.arena[self._value_index], self.arena[self._grad_index]


class _TapePotential(ctypes.Structure):
    """``tape_potential_t`` of ``_tape.c``."""

    _fields_ = [("arena", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("length", ctypes.c_int64), ("params", ctypes.c_void_p),
                ("input", ctypes.c_int64), ("size", ctypes.c_int64),
                ("value_index", ctypes.c_void_p), ("grad_index", ctypes.c_void_p),
                ("values", ctypes.c_int64), ("grads", ctypes.c_int64)]


def _indices(view: _View) -> np.ndarray:
    index = np.full(view.sizes, view.buffer.base + view.offset, dtype=np.int64)
    for dim, (size, stride) in enumerate(zip(view.sizes, view.strides, strict=True)):
        shape = [1] * len(view.sizes)
        shape[dim] = size
        index = index + (np.arange(size, dtype=np.int64) * stride).reshape(shape)
    return index


def _allocate(translator: _Translator, outputs: set) -> int:
    """Give every buffer a base; work buffers share space once their last reader ran."""
    end = 0
    translator.empty.base = 0
    permanent = [b for b in [*translator.buffers.values(), *translator.pristine.values()]
                 if b.kind != "work" or b in outputs]
    for buffer in permanent:
        buffer.base, end = end, end + buffer.size
    for i, instruction in enumerate(translator.instructions):
        for buffer in instruction.reads | instruction.writes:
            if buffer.kind == "work" and buffer not in outputs:
                if buffer.first < 0:
                    buffer.first = i
                buffer.last = i
    starts: dict[int, list] = {}
    ends: dict[int, list] = {}
    for buffer in translator.buffers.values():
        if buffer.kind == "work" and buffer not in outputs:
            if buffer.first < 0:  # written by nobody the tape runs: never read either
                buffer.base = 0
                continue
            starts.setdefault(buffer.first, []).append(buffer)
            ends.setdefault(buffer.last, []).append(buffer)
    free: list[tuple[int, int]] = []  # (size, base), sorted: the best fit by bisection
    for i in range(len(translator.instructions)):
        for buffer in starts.get(i, []):
            k = bisect.bisect_left(free, (buffer.size, -1))
            if k < len(free):
                size, base = free.pop(k)
                buffer.base = base
                if size > buffer.size:
                    bisect.insort(free, (size - buffer.size, base + buffer.size))
            else:
                buffer.base, end = end, end + buffer.size
        for buffer in ends.get(i, []):
            bisect.insort(free, (buffer.size, buffer.base))
    return max(end, 1)


def _resolve(instructions: list[_Instruction]) -> list[int]:
    code: list[int] = []
    for instruction in instructions:
        for word in instruction.words:
            if isinstance(word, _Address):
                code.append(word.buffer.base + word.offset)
            elif isinstance(word, _AddressTable):
                bases = np.array([b.base for b in word.buffers], dtype=np.int64)
                addresses = np.where(word.offsets >= 0, bases[word.owners] + word.offsets + 1, 0)
                if instruction.words[0] == I_SCATTER:
                    addresses = addresses - 1
                code.extend(addresses.tolist())
            else:
                code.append(int(word))
    return code
