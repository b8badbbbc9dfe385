"""Stories and guides as callables: their names, their arguments, how they are pickled.

A story may be a function, a lambda, a ``functools.partial``, a callable object or a
``PyroModule``; these helpers read its name and signature the same way for each.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["argument_holding", "callable_name", "reduce_by_reference", "story_signature"]


def argument_holding(value, data: Mapping[str, Any]) -> str | None:
    """The data argument that ``value`` is: the same tensor, or the same numbers."""
    if not torch.is_tensor(value):
        return None
    for key, candidate in data.items():
        if candidate is value:
            return key
    for key, candidate in data.items():
        if (torch.is_tensor(candidate) and candidate.numel() == value.numel()
                and torch.equal(candidate.reshape(-1).to(value.dtype), value.reshape(-1))):
            return key
    return None


def story_signature(fn: Callable) -> inspect.Signature:
    """The arguments a story takes: a ``PyroModule``'s are those of its ``forward``."""
    if isinstance(fn, torch.nn.Module):
        return inspect.signature(fn.forward)
    return inspect.signature(fn)


def callable_name(fn: Callable) -> str:
    """A story's or guide's name from its callable.

    A function's name (``lambda`` for a lambda), the wrapped function's for a
    ``functools.partial``, and the class's for a ``PyroModule`` or any other callable
    object (``BayesianRegression``), as Pyro's tutorials write them.
    """
    if isinstance(fn, functools.partial):
        return callable_name(fn.func)
    name = None if isinstance(fn, torch.nn.Module) else getattr(fn, "__name__", None)
    if isinstance(name, str):
        return "lambda" if name == "<lambda>" else name
    return type(fn).__name__


def reduce_by_reference(obj):
    """Pickle a module-level story or guide by its import path, any other by value.

    Worker processes then import it rather than receive a copy. A story defined in
    ``__main__`` (a script, a notebook) or in no importable module travels by value:
    cloudpickle copies its function.
    """
    module = inspect.getmodule(obj.fn)
    importable = module is not None and module.__name__ != "__main__" and getattr(
        module, "__spec__", None) is not None
    if importable and getattr(module, obj.name, None) is obj:
        return (_import_attribute, (module.__name__, obj.name))
    return object.__reduce__(obj)


def _import_attribute(module_name: str, attribute: str):
    import importlib

    return getattr(importlib.import_module(module_name), attribute)
