r"""Operations the tape records as the primitive operations they are made of.

The C interpreter has no kernel for a softmax, and needs none: while the tape records
(:class:`~ppl_notes.native.tape._Recorder`), these aten operations are replaced by their
definitions in operations it does run, and the recording notes those instead. The
replacement happens below autograd, so the backward pass still asks for each operation's
own derivative (``_softmax_backward_data``...), which is replaced in turn. Each is the
textbook identity, as ``torch._decomp`` writes it (whose import costs more than these):

* ``_softmax``: :math:`e^{x - m} / \sum e^{x - m}`, :math:`m = \max x` along the dim
  (the max only stabilises: it cancels, and no gradient flows through it);
* ``_log_softmax``: :math:`(x - m) - \log\sum e^{x - m}`;
* ``_softmax_backward_data``: :math:`y \odot (g - \sum g \odot y)` for output :math:`y`;
* ``_log_softmax_backward_data``: :math:`g - e^{y} \sum g`;
* ``cholesky_solve``: :math:`A^{-1}B = L^{-\top}(L^{-1}B)` for :math:`A = LL^\top`, two
  triangular solves (its backward is made of ``cholesky_solve`` and products, so it is
  replaced in turn).

The tape is still checked against the story at prior draws before it is used
(:class:`~ppl_notes.evaluation.potential.BatchedPotential`), and ``tests/test_tape.py``
holds each replacement, value and gradient, to eager torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DECOMPOSITIONS"]

aten = torch.ops.aten


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    shifted = x - torch.amax(x, dim, keepdim=True)
    exponentials = torch.exp(shifted)
    return exponentials / torch.sum(exponentials, dim, keepdim=True)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool = False) -> torch.Tensor:
    shifted = x - torch.amax(x, dim, keepdim=True)
    return shifted - torch.log(torch.sum(torch.exp(shifted), dim, keepdim=True))


def _softmax_backward(grad: torch.Tensor, output: torch.Tensor, dim: int,
                      input_dtype: torch.dtype) -> torch.Tensor:
    weighted = grad * output
    return weighted - output * torch.sum(weighted, dim, keepdim=True)


def _log_softmax_backward(grad: torch.Tensor, output: torch.Tensor, dim: int,
                          input_dtype: torch.dtype) -> torch.Tensor:
    return grad - torch.exp(output) * torch.sum(grad, dim, keepdim=True)


def _cholesky_solve(b: torch.Tensor, factor: torch.Tensor, upper: bool = False
                    ) -> torch.Tensor:
    lower = factor.mT if upper else factor
    inner = torch.linalg.solve_triangular(lower, b, upper=False)
    return torch.linalg.solve_triangular(lower.mT, inner, upper=True)


#: aten overload -> its definition in operations the interpreter runs
DECOMPOSITIONS: dict[object, Callable[..., torch.Tensor]] = {
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
    aten._softmax_backward_data.default: _softmax_backward,
    aten._log_softmax_backward_data.default: _log_softmax_backward,
    aten.cholesky_solve.default: _cholesky_solve,
}
