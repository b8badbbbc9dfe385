"""Which instruction of ``tape.c`` each arithmetic aten operation of a recording becomes.

Elementwise maps, reductions and scans; linear algebra is in
:mod:`~ppl_notes.native.tape_linalg`, data movement in
:mod:`~ppl_notes.native.tape_movement`. One handler per operation (overload packet): it
reads the operation's arguments and real outputs from the recorded
:class:`~ppl_notes.native.arena.Step` and emits instructions through the translator
(:class:`~ppl_notes.native.tape.Translator`). An operation without a handler, or a use of
one the interpreter cannot run, raises :class:`~ppl_notes.native.arena.Unsupported`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ppl_notes.native.arena import (
    I_SCAN,
    R_ALL,
    R_ANY,
    R_ARGMAX,
    R_ARGMIN,
    R_LOGSUMEXP,
    R_MAX,
    R_MIN,
    R_PROD,
    R_SUM,
    S_CUMPROD,
    S_CUMSUM,
    S_LOGCUMSUMEXP,
    Address,
    Step,
    Unsupported,
    View,
    rounding,
)

if TYPE_CHECKING:
    from ppl_notes.native.tape import Translator


#: aten operation (overload packet name) -> its handler: the arithmetic here
HANDLERS: dict[str, Callable[[Translator, Step], None]] = {}


def registrar(table: dict[str, Callable]) -> Callable[..., Callable]:
    """A decorator that files a handler in ``table`` under each name it is given."""
    def handles(*names: str):
        def register(function):
            for name in names:
                table[name] = function
            return function
        return register
    return handles


_handles = registrar(HANDLERS)


def output_view(t: Translator, step: Step, index: int = 0) -> View:
    """The view of the step's ``index``-th output."""
    return t.view(step.outputs[index])


_out = output_view


def argument(step: Step, index: int, name: str, default=None):
    """The step's argument by position, else by keyword, else ``default``."""
    if len(step.args) > index:
        return step.args[index]
    return step.kwargs.get(name, default)


_arg = argument


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
def _unary(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__
    out = _out(t, step)
    if name in ("round",) and step.kwargs.get("decimals"):
        raise Unsupported("round with decimals")
    t.map(_UNARY[name], out, [t.operand(step.args[0])], dtype=step.outputs[0].dtype)


@_handles(*(name + "_" for name in _UNARY if name not in ("clone", "_to_copy")))
def _unary_in_place(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__[:-1]
    t.map(_UNARY[name], t.view(step.args[0]), [t.operand(step.args[0])],
          dtype=step.args[0].dtype)


@_handles(*_BINARY, *(name + "_" for name in _BINARY))
def _binary(t: Translator, step: Step) -> None:
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
def _add(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__
    out = t.view(step.args[0]) if name.endswith("_") else _out(t, step)
    alpha = step.kwargs.get("alpha", step.args[2] if len(step.args) > 2 else 1)
    t.map("ADD" if name.startswith("add") else "SUB", out,
          [t.operand(step.args[0]), t.operand(step.args[1])], params=(alpha,),
          dtype=step.outputs[0].dtype)


@_handles("rsub")
def _rsub(t: Translator, step: Step) -> None:
    alpha = step.kwargs.get("alpha", step.args[2] if len(step.args) > 2 else 1)
    t.map("SUB", _out(t, step), [t.operand(step.args[1]), t.operand(step.args[0])],
          params=(alpha,), dtype=step.outputs[0].dtype)


@_handles("bitwise_not")
def _bitwise_not(t: Translator, step: Step) -> None:
    dtype = step.outputs[0].dtype
    if dtype == torch.bool:
        t.map("NOT", _out(t, step), [t.operand(step.args[0])], dtype=dtype)
    else:  # two's complement: ~v = -v - 1
        t.map("AFFINE", _out(t, step), [t.operand(step.args[0])], params=(-1.0, -1.0),
              dtype=dtype)


@_handles("neg", "neg_")
def _neg(t: Translator, step: Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    t.map("AFFINE", out, [t.operand(step.args[0])], params=(0.0, -1.0),
          dtype=step.outputs[0].dtype)


@_handles("copy_")
def _copy(t: Translator, step: Step) -> None:
    t.map("COPY", t.view(step.args[0]), [t.operand(step.args[1])], dtype=step.args[0].dtype)


@_handles("fill_", "zero_", "fill")
def _fill(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__
    value = 0.0 if name == "zero_" else step.args[1]
    if isinstance(value, torch.Tensor):
        t.map("COPY", _out(t, step), [t.view(value)], dtype=step.outputs[0].dtype)
        return
    t.map("CONST", _out(t, step), [], params=(value,), dtype=step.outputs[0].dtype)


@_handles("where")
def _where(t: Translator, step: Step) -> None:
    condition, a, b = step.args[:3]
    t.map("WHERE", _out(t, step), [t.operand(condition), t.operand(a), t.operand(b)],
          dtype=step.outputs[0].dtype)


@_handles("masked_fill", "masked_fill_")
def _masked_fill(t: Translator, step: Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    source, mask, value = step.args[:3]
    if isinstance(value, torch.Tensor):
        t.map("WHERE", out, [t.operand(mask), t.operand(value), t.operand(source)],
              dtype=step.outputs[0].dtype)
    else:
        t.map("MASKED_FILL", out, [t.operand(source), t.operand(mask)], params=(value,),
              dtype=step.outputs[0].dtype)


@_handles("clamp", "clamp_min", "clamp_max", "clamp_")
def _clamp(t: Translator, step: Step) -> None:
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
def _relu(t: Translator, step: Step) -> None:
    out = t.view(step.args[0]) if step.func._schema.is_mutable else _out(t, step)
    t.map("CLAMP", out, [t.operand(step.args[0])], params=(0.0, math.inf),
          dtype=step.outputs[0].dtype)


@_handles("softplus")
def _softplus(t: Translator, step: Step) -> None:
    beta, threshold = _arg(step, 1, "beta", 1.0), _arg(step, 2, "threshold", 20.0)
    t.map("SOFTPLUS", _out(t, step), [t.operand(step.args[0])], params=(beta, threshold),
          dtype=step.outputs[0].dtype)


@_handles("softplus_backward")
def _softplus_backward(t: Translator, step: Step) -> None:
    grad, x, beta, threshold = step.args[:4]
    t.map("SOFTPLUS_BW", _out(t, step), [t.operand(grad), t.operand(x)],
          params=(beta, threshold), dtype=step.outputs[0].dtype)


@_handles("log_sigmoid_forward")
def _log_sigmoid_forward(t: Translator, step: Step) -> None:
    t.map("LOGSIGMOID", _out(t, step), [t.operand(step.args[0])], dtype=step.outputs[0].dtype)
    if step.outputs[1].numel():  # the backward of this interpreter does not read it
        t.map("CONST", _out(t, step, 1), [], params=(0.0,), dtype=step.outputs[1].dtype)


@_handles("binary_cross_entropy_with_logits")
def _bce_with_logits(t: Translator, step: Step) -> None:
    """A Bernoulli's -log p(y | logits x), elementwise: (1 - y) x - log sigmoid(x).

    Pyro's ``Bernoulli(logits=...)`` and ``Binomial`` call it without weights or a
    reduction; its gradient reaches the tape as sigmoid, sub and mul.
    """
    weight, pos_weight = _arg(step, 2, "weight"), _arg(step, 3, "pos_weight")
    if weight is not None or pos_weight is not None or _arg(step, 4, "reduction", 1) != 0:
        raise Unsupported("binary_cross_entropy_with_logits with weights or a reduction")
    t.map("BCE_LOGITS", _out(t, step), [t.operand(step.args[0]), t.operand(step.args[1])],
          dtype=step.outputs[0].dtype)


@_handles("polygamma")
def _polygamma(t: Translator, step: Step) -> None:
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
def _reduce(t: Translator, step: Step) -> None:
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
def _max(t: Translator, step: Step) -> None:
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
def _argmax(t: Translator, step: Step) -> None:
    source = t.view(step.args[0])
    dim = _arg(step, 1, "dim")
    if dim is None:
        raise Unsupported("argmax over all dimensions")
    kind = R_ARGMAX if step.func.overloadpacket.__name__ == "argmax" else R_ARGMIN
    t.reduce(kind, _out(t, step), source, [dim], bool(_arg(step, 2, "keepdim", False)),
             step.outputs[0].dtype)


@_handles("cumsum", "cumprod", "logcumsumexp")
def _scan(t: Translator, step: Step) -> None:
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
    words = [I_SCAN, kind, len(osizes), rounding(step.outputs[0].dtype), 0, *osizes,
             source.sizes[dim], Address(out.buffer, out.offset), *ostr, out.strides[dim],
             Address(source.buffer, source.offset), *istr, source.strides[dim]]
    t.emit(words, [source], [out])
