"""Stories and guides as callables: their names, their arguments, how they are pickled.

A story may be a function, a lambda, a ``functools.partial``, a callable object or a
``PyroModule``; these helpers read its name and signature the same way for each.
"""

from __future__ import annotations

import copyreg
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
    cloudpickle copies its function. The module attribute may carry the story's own name
    or its function's (``heights.model`` is the story named ``"heights"``). A copy of a
    module-level story (``Model.observing`` makes one for a fit) travels by value with
    its function by reference: the function's own name in its module is the decorated
    story, not the function, so that plain ``pickle`` could not find it.
    """
    module = inspect.getmodule(obj.fn)
    importable = module is not None and module.__name__ != "__main__" and getattr(
        module, "__spec__", None) is not None
    if importable:
        for attribute in dict.fromkeys((obj.name, getattr(obj.fn, "__name__", None))):
            if attribute and getattr(module, attribute, None) is obj:
                return (_import_attribute, (module.__name__, attribute))
    state = dict(vars(obj))
    reference = _decorated_function(state.get("fn"))
    if reference is not None:
        state["fn"] = reference
    return (copyreg.__newobj__, (type(obj),), state)


class _FunctionOf:
    """Pickles as "the ``fn`` of the story at ``module.attribute``" (see below)."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def __reduce__(self):
        return (_function_of, (self.module, self.attribute))


def _decorated_function(fn) -> _FunctionOf | None:
    """A reference to ``fn`` where its name in its module is a story wrapping it."""
    module = inspect.getmodule(fn)
    name = getattr(fn, "__qualname__", "")
    if module is None or module.__name__ == "__main__" or not name or "." in name:
        return None
    holder = getattr(module, name, None)
    if holder is not fn and getattr(holder, "fn", None) is fn:
        return _FunctionOf(module.__name__, name)
    return None


def _function_of(module_name: str, attribute: str):
    return _import_attribute(module_name, attribute).fn


def _import_attribute(module_name: str, attribute: str):
    import importlib

    return getattr(importlib.import_module(module_name), attribute)
