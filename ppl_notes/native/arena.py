"""The vocabulary of a potential tape: instruction codes, arena buffers and views.

:mod:`~ppl_notes.native.tape` records and translates a computation,
:mod:`~ppl_notes.native.tape_kernels` says which C instruction each aten operation
becomes; both speak in these terms. The codes are the enums of ``tape.c``, in order.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

# instruction kinds and function codes: the enums of tape.c, in order
(I_MAP, I_REDUCE, I_SCAN, I_MATMUL, I_CHOL, I_TRISOLVE, I_GATHER, I_SCATTER, I_LU,
 I_LUSOLVE, I_SORT, I_INDEXED) = range(1, 13)
_FUNCTIONS = (
    "CONST COPY ADD SUB MUL DIV AFFINE POW POWT RPOW EXP LOG LOG1P EXPM1 SQRT RSQRT ABS "
    "SIGN SIGMOID TANH LGAMMA DIGAMMA ERF ERFC RECIP SIN COS SIGMOID_BW TANH_BW SOFTPLUS "
    "SOFTPLUS_BW LOGSIGMOID LOGSIGMOID_BW XLOGY LT LE GT GE EQ NE AND OR NOT WHERE "
    "MASKED_FILL CLAMP MAXIMUM MINIMUM FLOOR XLOG1PY ATAN LOG2 EXP2 SQUARE CEIL ROUND TRUNC "
    "LOGADDEXP POLYGAMMA BCE_LOGITS"
).split()
F = {name: code for code, name in enumerate(_FUNCTIONS)}
R_SUM, R_PROD, R_MAX, R_MIN, R_LOGSUMEXP, R_ARGMAX, R_ARGMIN, R_ANY, R_ALL = range(9)
S_CUMSUM, S_CUMPROD, S_LOGCUMSUMEXP = range(3)
MAX_DIMS = 12  # MAXDIM of tape.c


class Unsupported(Exception):
    """The tape meets an operation (or a use of one) the C interpreter cannot run."""


class TapeError(Exception):
    """A translator bug: an unknown instruction, or an address outside the arena.

    The C interpreter does not check what it reads: every address it will use is checked
    here, in Python, when the tape is made (:class:`View`, :func:`resolve`), so that a bug
    of the translator is named, not a read or write outside the arena. Not a
    ``RuntimeError``: the potential turns those (a story's own failure at a point) into
    an infinite potential, and this one must not be hidden that way.
    """


@dataclass
class Step:
    """One recorded aten call: the operation, its arguments and the tensors it returned."""

    func: object
    args: tuple
    kwargs: dict
    outputs: list  # the tensors the op returned, flattened


def flatten(value):
    """The leaves of nested lists and tuples, in order."""
    if isinstance(value, list | tuple):
        for item in value:
            yield from flatten(item)
    else:
        yield value


# -- the arena --------------------------------------------------------------------------

@dataclass(eq=False)
class Buffer:
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
class View:
    """A tensor as the arena sees it: a buffer, an offset and strides in elements."""

    buffer: Buffer
    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        """Every element the view reaches lies inside its buffer, or :class:`TapeError`."""
        if any(size == 0 for size in self.sizes):
            return  # no element is ever read or written
        reach = [(size - 1) * stride for size, stride in zip(self.sizes, self.strides,
                                                               strict=True)]
        low = self.offset + sum(r for r in reach if r < 0)
        high = self.offset + sum(r for r in reach if r > 0)
        if low < 0 or high >= self.buffer.size:
            raise TapeError(
                f"a view reaches elements {low}..{high} of a buffer of {self.buffer.size} "
                f"(offset {self.offset}, sizes {self.sizes}, strides {self.strides}): a "
                "translator bug, caught before the interpreter reads outside its arena")

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
class Address:
    """An arena address, resolved once every buffer has its base."""

    buffer: Buffer
    offset: int


@dataclass
class AddressTable:
    """Addresses + 1 of many elements (0: the fill value), resolved in bulk."""

    buffers: list
    offsets: np.ndarray  # (count,) int64, -1 for fill
    owners: np.ndarray  # (count,) int64 index into buffers


@dataclass
class Instruction:
    """One instruction of the C interpreter: its words, and the buffers it reads and writes."""

    words: list
    reads: set = field(default_factory=set)
    writes: set = field(default_factory=set)


def position_tensor(view: View, owner: int) -> torch.Tensor:
    """A tensor shaped like ``view`` whose elements are ``owner << 40 | offset + 1``."""
    offset = torch.full(view.sizes, view.offset, dtype=torch.int64)
    for dim, (size, stride) in enumerate(zip(view.sizes, view.strides, strict=True)):
        shape = [1] * len(view.sizes)
        shape[dim] = size
        offset = offset + (torch.arange(size, dtype=torch.int64) * stride).reshape(shape)
    return (owner << 40) + offset + 1


def rounding(dtype) -> int:
    """How results of ``dtype`` are rounded: 0 float64, 1 float32, 2 integer, 3 bool.

    Other floating dtypes are not supported.
    """
    if dtype == torch.float32 or dtype == torch.bfloat16 or dtype == torch.float16:
        if dtype != torch.float32:
            raise Unsupported(f"{dtype} arithmetic")
        return 1
    if dtype == torch.bool:
        return 3
    if not dtype.is_floating_point:
        return 2
    return 0


def coalesce(sizes, strides_list):
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
    if len(merged_sizes) > MAX_DIMS:
        raise Unsupported("too many dimensions")
    longest = max(range(len(merged_sizes)), key=merged_sizes.__getitem__)
    if merged_sizes[-1] < 16 and longest != len(merged_sizes) - 1:
        # a short inner loop costs its set-up per element: run the longest one innermost
        # (the operands of a tape's maps fit in cache, so the order barely matters there)
        for dims in [merged_sizes, *merged]:
            dims.append(dims.pop(longest))
    return merged_sizes, merged


def addresses(view: View) -> np.ndarray:
    """The arena addresses of a view's elements (its buffer has its base)."""
    return position_tensor(view, 0).numpy() - 1 + view.buffer.base


def allocate(translator, outputs: set) -> int:
    """Give every buffer of a :class:`~ppl_notes.native.tape.Translator` a base.

    Work buffers share space once their last reader ran (best fit); the arena's size.
    """
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


def resolve(instructions: list[Instruction], size: int) -> list[int]:
    """The instructions as the C interpreter reads them: every address made absolute.

    Each address is checked to lie in the arena of ``size`` elements (:class:`TapeError`
    otherwise): with the views' own check, nothing the interpreter is given can reach
    outside it.
    """
    code: list[int] = []
    for instruction in instructions:
        for word in instruction.words:
            if isinstance(word, Address):
                address = word.buffer.base + word.offset
                if not 0 <= address < size:
                    raise TapeError(f"address {address} outside the arena of {size} elements "
                                    "(a translator bug)")
                code.append(address)
            elif isinstance(word, AddressTable):
                bases = np.array([b.base for b in word.buffers], dtype=np.int64)
                addresses = np.where(word.offsets >= 0, bases[word.owners] + word.offsets + 1, 0)
                if addresses.size and (addresses.min() < 0 or addresses.max() > size):
                    raise TapeError(f"a gather or scatter table reaches outside the arena of "
                                    f"{size} elements (a translator bug)")
                if instruction.words[0] == I_SCATTER:
                    addresses = addresses - 1
                code.extend(addresses.tolist())
            else:
                code.append(int(word))
    return code
