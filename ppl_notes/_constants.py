"""The dtype of the constants a story carries: its closure, its globals, its module.

A story runs with its data in one floating dtype (:func:`~ppl_notes._dtype.run_dtype`,
float64 unless it says otherwise). Tensors made *before* it runs keep the dtype they were
made in: a covariance built at module level in torch's default float32, a
``PyroModule``'s ``nn.Linear`` weights and its ``PyroSample`` priors. A float64 run then
meets them in ``x @ w`` and torch refuses ("mat1 and mat2 must have the same dtype").
This module finds those tensors. A ``PyroModule`` is copied into float64 for the run
(:func:`module_as_float64`: its weights and its priors; the user's module is left as it
is); a function that closes over float32 constants runs in float32 instead.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator

import torch

__all__ = ["constant_tensors", "constants_dtype", "module_as_float64"]

#: How deep the search looks into a distribution (``Independent(Normal(...))``)
_DEPTH = 4


def _tensors_in(value, depth: int = _DEPTH) -> Iterator[torch.Tensor]:
    """Floating tensors in ``value``: itself, a module's, a distribution's attributes."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
        return
    if depth == 0:
        return
    if isinstance(value, torch.nn.Module):
        yield from (t for t in value.parameters() if t.is_floating_point())
        yield from (t for t in value.buffers() if t.is_floating_point())
        for submodule in value.modules():
            for prior in getattr(submodule, "_pyro_samples", {}).values():
                yield from _tensors_in(prior, depth - 1)
        return
    if isinstance(value, torch.distributions.Distribution):
        for attribute in vars(value).values():
            yield from _tensors_in(attribute, depth - 1)


def constant_tensors(fn: Callable) -> dict[str, torch.Tensor]:
    """The floating tensors a story's callable carries, by where they are.

    A ``PyroModule`` (or any ``nn.Module``): its parameters, buffers and ``PyroSample``
    priors. A function: the tensors (and modules) in its closure and the globals its
    code names. A ``functools.partial``: its bound arguments and its function's.
    """
    found: dict[str, torch.Tensor] = {}
    if isinstance(fn, functools.partial):
        for i, value in enumerate([*fn.args, *fn.keywords.values()]):
            for j, tensor in enumerate(_tensors_in(value)):
                found[f"partial argument {i}.{j}"] = tensor
        return {**found, **constant_tensors(fn.func)}
    if isinstance(fn, torch.nn.Module):
        return {f"{type(fn).__name__} tensor {i}": t for i, t in enumerate(_tensors_in(fn))}
    code = getattr(fn, "__code__", None)
    if code is None:
        return found
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (),
                          strict=False):
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for j, tensor in enumerate(_tensors_in(contents)):
            found[f"closure {name!r}" + (f" ({j})" if j else "")] = tensor
    scope = getattr(fn, "__globals__", {})
    for name in code.co_names:
        if name in scope:
            for j, tensor in enumerate(_tensors_in(scope[name])):
                found[f"global {name!r}" + (f" ({j})" if j else "")] = tensor
    return found


def constants_dtype(fn: Callable) -> tuple[torch.dtype, str]:
    """The dtype a story runs in, from its constants, and why.

    float64 unless every floating constant the story carries is float32 (then the run
    is float32 too, so that they meet data of their own dtype): a story that carries
    float64 constants, or none, runs in float64.
    """
    tensors = constant_tensors(fn)
    dtypes = {t.dtype for t in tensors.values()}
    if dtypes == {torch.float32}:
        names = ", ".join(list(tensors)[:3]) + (" ..." if len(tensors) > 3 else "")
        return torch.float32, f"the story's constants are float32 ({names})"
    return torch.float64, "float64 (the default)"


def _distribution_as_float64(distribution, depth: int = _DEPTH):
    """A copy of ``distribution`` whose floating tensors are float64 (nested ones too)."""
    if depth == 0 or not isinstance(distribution, torch.distributions.Distribution):
        return distribution
    copied = copy.copy(distribution)
    for name, value in vars(distribution).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(copied, name, value.double())
        elif isinstance(value, torch.distributions.Distribution):
            setattr(copied, name, _distribution_as_float64(value, depth - 1))
    return copied


def module_as_float64(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a (Pyro) module: its parameters, buffers and ``PyroSample`` priors.

    A prior given as a function (``PyroSample(lambda self: ...)``) makes its
    distribution when the story runs, in the run's dtype already.
    """
    copied = copy.deepcopy(module).double()
    for submodule in copied.modules():
        priors = getattr(submodule, "_pyro_samples", None)
        for name, prior in list((priors or {}).items()):
            priors[name] = _distribution_as_float64(prior)
    return copied
