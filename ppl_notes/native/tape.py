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
   operation becomes an instruction of ``tape.c``: an elementwise map, a reduction, a
   scan, a batched matrix product, a Cholesky factorisation, a triangular solve, or a
   gather whose source addresses come from replaying the operation on tensors of
   addresses (indexing, ``cat``, ``flip``, padding: any pure data movement whose
   indices do not depend on the point). :mod:`~ppl_notes.native.tape_kernels` (the
   arithmetic) and :mod:`~ppl_notes.native.tape_movement` (data movement) say
   which operation becomes which instruction, in the terms of
   :mod:`~ppl_notes.native.arena`. Storages no operation derives from the
   point (the data, constants, ``zeros_like``) are filled once. Regions are reused once
   the tape has read them for the last time.
3. **Run.** One C call per batch of points (``tape_run``), with no Python, Pyro or
   autograd in between; the C interpreter is compiled once per machine
   (:mod:`~ppl_notes.native.loader`).

A tape is the computation at the recorded shapes, with every branch the story took
frozen, exactly like a ``make_fx`` graph: :class:`~ppl_notes.evaluation.potential.
BatchedPotential` checks it against the story at prior draws before using it. An
operation the interpreter does not know raises :class:`Unsupported`, and the caller
compiles with inductor instead.
"""

from __future__ import annotations

import ctypes
import functools
import numbers
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ppl_notes.native.arena import (
    I_GATHER,
    I_MAP,
    I_REDUCE,
    MAX_DIMS,
    Address,
    AddressTable,
    Buffer,
    F,
    Instruction,
    Step,
    TapeError,
    Unsupported,
    View,
    addresses,
    allocate,
    coalesce,
    flatten,
    position_tensor,
    resolve,
    rounding,
)
from ppl_notes.native.decompositions import DECOMPOSITIONS
from ppl_notes.native.loader import available, build
from ppl_notes.native.tape_kernels import HANDLERS as ARITHMETIC
from ppl_notes.native.tape_linalg import HANDLERS as LINEAR_ALGEBRA
from ppl_notes.native.tape_movement import HANDLERS as MOVEMENT

__all__ = ["SOURCE", "Tape", "TapeError", "Unsupported", "library"]

SOURCE = Path(__file__).with_name("tape.c")
#: aten operation -> the handler that translates it (arithmetic, linear algebra, then data
#: movement)
HANDLERS = {**ARITHMETIC, **LINEAR_ALGEBRA, **MOVEMENT}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled tape interpreter, built on first use; None where it cannot be."""
    lib = build(SOURCE, "potential tapes")
    if lib is not None:
        lib.tape_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p]
        lib.tape_run.restype = ctypes.c_int
    return lib


class _Recorder(TorchDispatchMode):
    """Notes every aten operation with its real tensors (kept alive, so ids stay unique)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # the default wraps the handler with TorchDynamo, imported for it (2 s)

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Step] = []
        #: a copy of a storage's content from before the first operation that wrote into
        #: it in place, for storages the tape must restore on every run
        self.before_write: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        decomposition = DECOMPOSITIONS.get(func)
        if decomposition is not None:  # recorded as the operations it is made of
            with self:
                return decomposition(*args, **kwargs)
        if func._schema.is_mutable:
            for argument, value in zip(func._schema.arguments, args, strict=False):
                if (argument.alias_info is not None and argument.alias_info.is_write
                        and isinstance(value, torch.Tensor)):
                    key = _storage_key(value)
                    if key not in self.before_write:
                        self.before_write[key] = _storage_copy(value)
        result = func(*args, **kwargs)
        outputs = [t for t in flatten(result) if isinstance(t, torch.Tensor)]
        self.steps.append(Step(func, args, kwargs, outputs))
        return result


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _storage_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor``, as a flat tensor of its dtype."""
    storage = tensor.untyped_storage()
    count = storage.nbytes() // tensor.element_size()
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, (count,), (1,)).clone()


_VIEW_FREE_FACTORIES = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_empty_strided", "scalar_tensor", "zeros", "ones", "full", "empty",
    "empty_strided", "arange", "eye", "linspace", "lift_fresh_copy", "lift_fresh",
}
_NO_OUTPUT = {"_linalg_check_errors", "record_stream", "_assert_async", "sym_constrain_range"}
_SHAPE_ONLY = {"is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
               "size", "stride", "dim", "is_contiguous", "_has_compatible_shallow_copy_type"}


class Translator:
    """Turns a recording into instructions over arena buffers."""

    def __init__(self, recorder: _Recorder, example: torch.Tensor) -> None:
        self.recorder = recorder
        self.buffers: dict[int, Buffer] = {}
        self.variable: set[int] = set()  # buffer indices whose content depends on the point
        self.instructions: list[Instruction] = []
        self.params: list[float] = [0.0]
        self.pristine: dict[int, Buffer] = {}
        self.empty = Buffer(-1, 0, torch.float64, "static")
        self.input = self._new_buffer(example, "input")
        self.variable.add(self.input.index)
        self.writes_in_place = set(recorder.before_write)

    # buffers and views
    def _new_buffer(self, tensor: torch.Tensor, kind: str) -> Buffer:
        storage = tensor.untyped_storage()
        buffer = Buffer(len(self.buffers), storage.nbytes() // tensor.element_size(),
                         tensor.dtype, kind, tensor)
        self.buffers[storage.data_ptr()] = buffer
        return buffer

    def view(self, tensor: torch.Tensor) -> View:
        """The arena view of a tensor the recording has met before, or data it has not."""
        if not isinstance(tensor, torch.Tensor):
            raise Unsupported(f"expected a tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_complex or tensor.device.type != "cpu" or tensor.is_sparse:
            raise Unsupported(f"a {tensor.dtype} tensor on {tensor.device}")
        if tensor.untyped_storage().nbytes() == 0:
            return View(self.empty, 0, tuple(tensor.shape), tuple(tensor.stride()))
        key = _storage_key(tensor)
        buffer = self.buffers.get(key)
        if buffer is None:  # data or a constant made outside the recording
            buffer = self._new_buffer(tensor, "static")
            if key in self.recorder.before_write:  # written in place later: restore it
                self._restore(buffer, self.recorder.before_write[key])
        elif buffer.dtype != tensor.dtype:
            raise Unsupported("a storage viewed as two dtypes")
        return View(buffer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))

    def scratch(self, shape: tuple[int, ...]) -> View:
        """A new float64 work buffer of ``shape``, for a result no operation returns."""
        tensor = torch.empty(shape, dtype=torch.float64)
        buffer = self._new_buffer(tensor, "work")
        self.variable.add(buffer.index)
        return View(buffer, 0, tuple(tensor.shape), tuple(tensor.stride()))

    def scalar(self, value) -> View:
        """A Python number as a one-element static float64 buffer."""
        return self.view(torch.tensor(float(value), dtype=torch.float64))

    def operand(self, value) -> View:
        """An operation's argument (a tensor or a number) as an arena view."""
        if isinstance(value, torch.Tensor):
            return self.view(value)
        if isinstance(value, bool | numbers.Real):
            return self.scalar(value)
        raise Unsupported(f"operand of type {type(value).__name__}")

    def param(self, *values: float) -> int:
        """Store an instruction's scalar parameters; the index of the first."""
        index = len(self.params)
        self.params.extend(float(v) for v in values)
        return index

    def is_variable(self, value) -> bool:
        """Whether any tensor in ``value`` (nested lists too) depends on the point."""
        buffers = (self.buffers.get(_storage_key(t)) for t in flatten(value)
                   if isinstance(t, torch.Tensor))
        return any(b is not None and b.index in self.variable for b in buffers)

    def emit(self, words: list, reads=(), writes=()) -> None:
        """Append an instruction, noting the buffers it reads and writes (for liveness)."""
        self.instructions.append(Instruction(words, {v.buffer for v in reads},
                                              {v.buffer for v in writes}))

    # the steps
    def translate(self) -> None:
        """Turn every recorded step into instructions (or into nothing: views, data)."""
        for step in self.recorder.steps:
            self._step(step)

    def _step(self, step: Step) -> None:
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
        handler = HANDLERS.get(name)
        if handler is None:
            raise Unsupported(f"no C kernel for {step.func}")
        handler(self, step)

    def _restore(self, buffer: Buffer, content: torch.Tensor) -> None:
        """Make a static buffer written in place a work buffer that starts as ``content``."""
        source = Buffer(-1, buffer.size, buffer.dtype, "pristine", content)
        source.index = len(self.buffers) + len(self.pristine) + 1_000_000
        self.pristine[source.index] = source
        buffer.kind = "work"
        self.variable.add(buffer.index)
        flat_out = View(buffer, 0, (buffer.size,), (1,))
        flat_in = View(source, 0, (buffer.size,), (1,))
        self.map("COPY", flat_out, [flat_in], dtype=buffer.dtype)

    # instruction builders
    def map(self, function: str, out: View, inputs: list[View], params=(),
            dtype=torch.float64) -> None:
        """``out = function(*inputs)`` elementwise, the inputs broadcast to ``out``."""
        sizes = out.sizes
        if 0 in sizes:
            return
        strides = [out.strides] + [v.broadcast(sizes) for v in inputs]
        sizes, strides = coalesce(sizes, strides)
        words = [I_MAP, F[function], len(inputs), len(sizes), rounding(dtype),
                 self.param(*params) if params else 0, *sizes]
        for view, view_strides in zip([out, *inputs], strides, strict=True):
            words += [Address(view.buffer, view.offset), *view_strides]
        self.emit(words, inputs, [out])

    def reduce(self, kind: int, out: View, source: View, dims: list[int], keepdim: bool,
               dtype, scale: float = 1.0) -> None:
        """``out = kind`` over ``dims`` of ``source`` (a sum scaled by ``scale``)."""
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
        osizes, (out_strides, in_out) = coalesce(osizes, [out_strides, in_out])
        rsizes, (in_red,) = coalesce(rsizes, [in_red])
        if 0 in osizes:
            return
        if len(osizes) > MAX_DIMS or len(rsizes) > MAX_DIMS:
            raise Unsupported("too many dimensions")
        words = [I_REDUCE, kind, len(osizes), len(rsizes), rounding(dtype), self.param(scale),
                 *osizes, *rsizes, Address(out.buffer, out.offset), *out_strides,
                 Address(source.buffer, source.offset), *in_out, *in_red]
        self.emit(words, [source], [out])

    def gather_replay(self, step: Step, data_positions: list[int], fill: float = 0.0) -> None:
        """A data-movement op as a gather, replayed on tensors of addresses.

        Each output's source is found by running the op on tensors whose elements are
        their own addresses. ``data_positions`` are the indices of the flattened tensor
        arguments whose values move; every other tensor argument must not depend on the
        point.
        """
        tensors = [a for a in flatten(step.args) if isinstance(a, torch.Tensor)]
        tensors += [a for a in flatten(list(step.kwargs.values())) if isinstance(a, torch.Tensor)]
        for i, tensor in enumerate(tensors):
            if i not in data_positions and self.is_variable(tensor):
                raise Unsupported(f"{step.func} with indices that depend on the point")
        table: list[Buffer] = []
        replacements = {}
        for i in data_positions:
            view = self.view(tensors[i])
            if view.buffer not in table:
                table.append(view.buffer)
            owner = table.index(view.buffer)
            replacements[id(tensors[i])] = position_tensor(view, owner)
        args = _replace(step.args, replacements)
        kwargs = _replace(step.kwargs, replacements)
        if "dtype" in kwargs:
            kwargs.pop("dtype")
        positions = step.func(*args, **kwargs)
        out = step.outputs[0]
        if not isinstance(positions, torch.Tensor) or positions.shape != out.shape:
            raise Unsupported(f"replaying {step.func} on addresses failed")
        encoded = positions.reshape(-1).to(torch.int64).numpy()
        self.gather(self.view(out), table, encoded, fill, out.dtype)

    def gather(self, out: View, table: list[Buffer], encoded: np.ndarray, fill: float,
               dtype) -> None:
        """``out`` (logical order) from encoded positions: ``owner << 40 | offset + 1``."""
        if len(out.sizes) > MAX_DIMS:
            raise Unsupported("too many dimensions")
        owners = np.where(encoded > 0, (encoded - 1) >> 40, 0)
        offsets = np.where(encoded > 0, (encoded - 1) & ((1 << 40) - 1), -1)
        sizes = list(out.sizes) or [1]
        strides = list(out.strides) or [0]
        words = [I_GATHER, len(sizes), rounding(dtype), self.param(fill), *sizes,
                 Address(out.buffer, out.offset), *strides, int(encoded.size),
                 AddressTable(table, offsets, owners)]
        reads = [View(b, 0, (1,), (1,)) for b in table]
        self.emit(words, reads, [out])


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


# -- assembling ---------------------------------------------------------------------------

#: ``tape_run``'s status where a Cholesky factorisation met a matrix that is not positive
#: definite (the story's own failure: the point gets an infinite potential), and where
#: the interpreter met an instruction it does not know (a bug of this module), an index or
#: pivot outside its tensor (an index the story computed, torch raises there too; or a bug),
#: and where memory ran out.
CHOLESKY_FAILED, UNKNOWN_INSTRUCTION, OUT_OF_RANGE, OUT_OF_MEMORY = -1, -2, -3, -4


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
        if not available(SOURCE):
            raise Unsupported("no C compiler for the tape interpreter")
        example = example.detach().clone().contiguous()
        recorder = _Recorder()
        with recorder:
            value, grad = value_and_grad(example)
        translator = Translator(recorder, example)
        translator.translate()
        lib = library()  # last: a compiler prebuild() started ran while we recorded
        if lib is None:
            raise Unsupported("no C compiler for the tape interpreter")
        self.lib = lib
        self.shape = tuple(example.shape)
        self._assemble(translator, value, grad)
        self.steps = len(recorder.steps)
        self.instructions = len(translator.instructions)

    def _assemble(self, translator: Translator, value: torch.Tensor,
                  grad: torch.Tensor) -> None:
        outputs = [translator.view(value), translator.view(grad)]
        size = allocate(translator, {v.buffer for v in outputs})
        arena = np.zeros(size)
        for buffer in [*translator.buffers.values(), *translator.pristine.values()]:
            if buffer.kind in ("static", "pristine") and buffer.tensor is not None:
                content = _storage_copy(buffer.tensor) if buffer.kind == "static" \
                    else buffer.tensor
                arena[buffer.base:buffer.base + buffer.size] = \
                    content.detach().double().numpy()[:buffer.size]
        self.arena = arena
        self.code = np.array(resolve(translator.instructions, size), dtype=np.int64)
        self.params = np.array([*translator.params, 0.0, 0.0], dtype=np.float64)
        self._input = slice(translator.input.base, translator.input.base + translator.input.size)
        self._value_index = addresses(outputs[0])
        self._grad_index = addresses(outputs[1])
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
        if status == CHOLESKY_FAILED:
            raise RuntimeError("linalg.cholesky: the input is not positive-definite "
                               "(in the potential's tape)")
        if status == OUT_OF_RANGE:
            raise RuntimeError("an index computed from the point lies outside its tensor "
                               "(in the potential's tape), as torch's gather and scatter "
                               "raise")
        if status == OUT_OF_MEMORY:
            raise MemoryError("the potential's tape ran out of memory sorting a row")
        if status != 0:
            raise TapeError(f"the potential's tape holds an instruction the interpreter does "
                            f"not know (status {status}): a bug in ppl_notes' tape "
                            "translator; PPL_NOTES_NATIVE=0 runs the potential without it. "
                            "Please report it with the story")
        return self.arena[self._value_index], self.arena[self._grad_index]


class _TapePotential(ctypes.Structure):
    """``tape_potential_t`` of ``tape.c``."""

    _fields_ = [("arena", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("length", ctypes.c_int64), ("params", ctypes.c_void_p),
                ("input", ctypes.c_int64), ("size", ctypes.c_int64),
                ("value_index", ctypes.c_void_p), ("grad_index", ctypes.c_void_p),
                ("values", ctypes.c_int64), ("grads", ctypes.c_int64)]
