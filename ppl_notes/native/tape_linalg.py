"""Which instruction of ``tape.c`` each linear-algebra operation of a recording becomes.

Products (``I_MATMUL``), Cholesky factors (``I_CHOL``), triangular solves
(``I_TRISOLVE``), and LU factorisations with partial pivoting (``I_LU``) with the solves
made from them (``I_LUSOLVE``): ``slogdet``, ``det``, ``solve`` and ``inv``, whose pivots
depend on the point and are found at every run. Each operand is a batch of matrices:
a base, a stride per batch dimension (0 where it broadcasts) and two matrix strides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ppl_notes.native.arena import (
    I_CHOL,
    I_LU,
    I_LUSOLVE,
    I_MATMUL,
    I_TRISOLVE,
    Address,
    Step,
    Unsupported,
    View,
    rounding,
)
from ppl_notes.native.tape_kernels import argument as _arg
from ppl_notes.native.tape_kernels import output_view as _out
from ppl_notes.native.tape_kernels import registrar

if TYPE_CHECKING:
    from ppl_notes.native.tape import Translator

__all__ = ["HANDLERS"]

#: aten operation (overload packet name) -> its handler: linear algebra
HANDLERS: dict = {}
_handles = registrar(HANDLERS)


def _matrix_operand(view: View, batch_sizes: list[int]) -> list:
    """Base, batch strides (broadcast), then the two matrix strides."""
    lead = view.sizes[:-2]
    lead_strides = view.strides[:-2]
    pad = len(batch_sizes) - len(lead)
    strides = [0] * pad + [s if n != 1 else 0 for n, s in zip(lead, lead_strides, strict=True)]
    return [Address(view.buffer, view.offset), *(strides or [0]), *view.strides[-2:]]


def _batch(*views: View) -> list[int]:
    # numpy's: torch.broadcast_shapes imports its symbolic shapes and sympy (0.5 s)
    return list(np.broadcast_shapes(*(v.sizes[:-2] for v in views))) or [1]


@_handles("mm", "bmm", "mv", "dot")
def _matmul(t: Translator, step: Step) -> None:
    name = step.func.overloadpacket.__name__
    a, b, out = t.view(step.args[0]), t.view(step.args[1]), _out(t, step)
    if name == "mv":  # (M, K) @ (K,) -> (M,)
        b = View(b.buffer, b.offset, (b.sizes[0], 1), (b.strides[0], 0))
        out = View(out.buffer, out.offset, (out.sizes[0], 1), (out.strides[0], 0))
    elif name == "dot":
        a = View(a.buffer, a.offset, (1, a.sizes[0]), (0, a.strides[0]))
        b = View(b.buffer, b.offset, (b.sizes[0], 1), (b.strides[0], 0))
        out = View(out.buffer, out.offset, (1, 1), (0, 0))
    batch = [1] if name in ("mm", "mv", "dot") else _batch(a, b)
    if name in ("mm", "mv", "dot"):
        a = View(a.buffer, a.offset, (1, *a.sizes), (0, *a.strides))
        b = View(b.buffer, b.offset, (1, *b.sizes), (0, *b.strides))
        out = View(out.buffer, out.offset, (1, *out.sizes), (0, *out.strides))
    M, K, N = a.sizes[-2], a.sizes[-1], b.sizes[-1]
    words = [I_MATMUL, len(batch), rounding(step.outputs[0].dtype), *batch, M, K, N,
             *_matrix_operand(out, batch), *_matrix_operand(a, batch),
             *_matrix_operand(b, batch)]
    t.emit(words, [a, b], [out])


def _transposed(view: View) -> View:
    return View(view.buffer, view.offset, (*view.sizes[:-2], view.sizes[-1], view.sizes[-2]),
                 (*view.strides[:-2], view.strides[-1], view.strides[-2]))


@_handles("linalg_cholesky_ex")
def _cholesky(t: Translator, step: Step) -> None:
    source, out = t.view(step.args[0]), _out(t, step)
    if _arg(step, 1, "upper", False):  # U = L^T: read and write transposed
        source, out = _transposed(source), _transposed(out)
    batch = _batch(source)
    words = [I_CHOL, len(batch), *batch, source.sizes[-1], *_matrix_operand(out, batch),
             *_matrix_operand(source, batch)]
    t.emit(words, [source], [out])
    info = _out(t, step, 1)
    t.map("CONST", info, [], params=(0.0,), dtype=step.outputs[1].dtype)


def _trisolve(t: Translator, out: View, a: View, b: View, upper: bool, unit: bool,
              left: bool) -> None:
    if not left:  # X A = B  <=>  A^T X^T = B^T
        a, b, out, upper = _transposed(a), _transposed(b), _transposed(out), not upper
    batch = _batch(a, b)
    words = [I_TRISOLVE, len(batch), int(upper), int(unit), *batch, a.sizes[-1], b.sizes[-1],
             *_matrix_operand(out, batch), *_matrix_operand(a, batch),
             *_matrix_operand(b, batch)]
    t.emit(words, [a, b], [out])


@_handles("linalg_solve_triangular")
def _solve_triangular(t: Translator, step: Step) -> None:
    a, b = t.view(step.args[0]), t.view(step.args[1])
    _trisolve(t, _out(t, step), a, b, bool(step.kwargs.get("upper", _arg(step, 2, "upper"))),
              bool(step.kwargs.get("unitriangular", False)), bool(step.kwargs.get("left", True)))


def _vector_operand(view: View, batch: list[int]) -> list:
    """A batch of vectors ``(..., n)`` as the batched matrix operand ``(..., n, 1)``."""
    return _matrix_operand(View(view.buffer, view.offset, (*view.sizes, 1),
                                (*view.strides, 0)), batch)


def _scalar_operand(view: View, batch: list[int]) -> list:
    """A batch of numbers ``(...)`` as the batched matrix operand ``(..., 1, 1)``."""
    return _matrix_operand(View(view.buffer, view.offset, (*view.sizes, 1, 1),
                                (*view.strides, 0, 0)), batch)


def _lu(t: Translator, source: View, lu: View, pivots: View, *determinant: View) -> None:
    """``source = P L U`` (LAPACK's getrf); ``determinant``: its sign and log|det|, or det."""
    batch = _batch(source)
    words = [I_LU, len(batch), {0: 0, 2: 1, 1: 2}[len(determinant)], *batch,
             source.sizes[-1], *_matrix_operand(lu, batch), *_vector_operand(pivots, batch)]
    for view in determinant:
        words += _scalar_operand(view, batch)
    t.emit(words + _matrix_operand(source, batch), [source], [lu, pivots, *determinant])


def _lu_solve(t: Translator, out: View, lu: View, pivots: View, b: View, left: bool,
              adjoint: bool) -> None:
    """``out`` with ``A out = b`` (``A^T``: ``adjoint``; ``out A = b``: not ``left``)."""
    if not left:  # X A = B  <=>  A^T X^T = B^T
        b, out, adjoint = _transposed(b), _transposed(out), not adjoint
    batch = _batch(lu, b)
    words = [I_LUSOLVE, len(batch), int(adjoint), *batch, lu.sizes[-1], b.sizes[-1],
             *_matrix_operand(out, batch), *_matrix_operand(lu, batch),
             *_vector_operand(pivots, batch), *_matrix_operand(b, batch)]
    t.emit(words, [lu, pivots, b], [out])


def _factored(step: Step, source: View, lu_output: int, rule: bool) -> tuple[View, bool]:
    r"""The matrix torch factored for ``source``: itself, or its transpose.

    torch's (2.14) ``_linalg_slogdet`` and ``_linalg_det`` factor :math:`A^\top` of a
    C-contiguous :math:`A` (LAPACK wants columns; the determinant is the same), and their
    backward solves with that factor as ``adjoint``; ``_linalg_solve_ex`` factors
    :math:`A`. ``rule`` is what that says for this step (transposed or not); the recorded
    factor must agree, else the other is tried. The rule comes first, so that a matrix
    recorded where it happens to be symmetric (the identity at the origin), whose two
    factors are equal there, is factored as torch factors it everywhere else.
    """
    recorded, matrix = step.outputs[lu_output], step.args[0]
    for transposed in (rule, not rule):
        factor = torch.linalg.lu_factor(matrix.mT if transposed else matrix).LU
        if torch.allclose(factor, recorded, rtol=1e-12, atol=0, equal_nan=True):
            return (_transposed(source) if transposed else source), transposed
    raise Unsupported(f"{step.func} factored a matrix the tape does not recognise")


def _transposes(step: Step) -> bool:
    """Whether ``slogdet`` and ``det`` factor the transpose: torch's rule, C-contiguous."""
    return bool(step.args[0].is_contiguous())


@_handles("_linalg_slogdet")
def _slogdet(t: Translator, step: Step) -> None:
    """``torch.linalg.slogdet``: the LU factors and pivots its backward solves with."""
    sign, logdet, lu, pivots = (_out(t, step, i) for i in range(4))
    _lu(t, _factored(step, t.view(step.args[0]), 2, _transposes(step))[0], lu, pivots,
        sign, logdet)


@_handles("_linalg_det")
def _det(t: Translator, step: Step) -> None:
    """``torch.linalg.det``: the LU factors and pivots its backward solves with."""
    det, lu, pivots = (_out(t, step, i) for i in range(3))
    _lu(t, _factored(step, t.view(step.args[0]), 1, _transposes(step))[0], lu, pivots, det)


@_handles("linalg_inv_ex")
def _inverse(t: Translator, step: Step) -> None:
    """``torch.linalg.inv``: the identity solved for, with a factor of its own."""
    a = t.view(step.args[0])
    n, lead = a.sizes[-1], tuple(a.sizes[:-2])
    lu, pivots = t.scratch((*lead, n, n)), t.scratch((*lead, n))
    _lu(t, a, lu, pivots)
    _lu_solve(t, _out(t, step), lu, pivots, t.view(torch.eye(n, dtype=torch.float64)), True,
              False)
    t.map("CONST", _out(t, step, 1), [], params=(0.0,), dtype=step.outputs[1].dtype)


@_handles("linalg_lu_solve")
def _linalg_lu_solve(t: Translator, step: Step) -> None:
    lu, pivots, b = (t.view(step.args[i]) for i in range(3))
    _lu_solve(t, _out(t, step), lu, pivots, b, bool(_arg(step, 3, "left", True)),
              bool(_arg(step, 4, "adjoint", False)))


@_handles("_linalg_solve_ex")
def _solve(t: Translator, step: Step) -> None:
    """``torch.linalg.solve``: factor (kept for its backward), then solve."""
    a, b = t.view(step.args[0]), t.view(step.args[1])
    left = bool(_arg(step, 2, "left", True))
    result, lu, pivots = (_out(t, step, i) for i in range(3))
    factored, transposed = _factored(step, a, 1, False)
    _lu(t, factored, lu, pivots)
    if len(b.sizes) == 1 or (left and b.sizes == a.sizes[:-1]):  # a batch of vectors
        b = View(b.buffer, b.offset, (*b.sizes, 1), (*b.strides, 0))
        result = View(result.buffer, result.offset, (*result.sizes, 1), (*result.strides, 0))
    _lu_solve(t, result, lu, pivots, b, left, transposed)
    t.map("CONST", _out(t, step, 3), [], params=(0.0,), dtype=step.outputs[3].dtype)


@_handles("triangular_solve")
def _triangular_solve(t: Translator, step: Step) -> None:
    b, a = t.view(step.args[0]), t.view(step.args[1])
    upper = bool(_arg(step, 2, "upper", True))
    if _arg(step, 3, "transpose", False):
        a, upper = _transposed(a), not upper
    _trisolve(t, _out(t, step), a, b, upper, bool(_arg(step, 4, "unitriangular", False)), True)
    t.map("COPY", _out(t, step, 1), [t.view(step.args[1])], dtype=step.outputs[1].dtype)
