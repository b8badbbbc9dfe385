"""What a run is a run *of*: digests of its story, guide and data, for checkpoints.

A checkpoint records these; resuming with another story, guide or data set is refused
by name instead of continuing the old fit. Code is digested by its compiled form
(bytecode, constants, names, recursively through nested functions), so a story typed
at the prompt has a fingerprint as well as one in a module; data by its bytes.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ppl_notes._integrity import bytes_digest

__all__ = ["code_digest", "data_digests", "run_fingerprint"]


def code_digest(fn: Any) -> str:
    """SHA-256 of a callable's code; of its class's methods for a module or object."""
    digest = hashlib.sha256()
    fn = getattr(fn, "fn", fn)  # ppl_notes' Model and Guide wrap the user's function
    code = getattr(fn, "__code__", None)
    if code is not None:
        _update(digest, code)
        for value in fn.__defaults__ or ():
            digest.update(repr(value).encode())
    else:
        kind = type(fn)
        digest.update(f"{kind.__module__}.{kind.__qualname__}".encode())
        for name in sorted(vars(kind)):
            member = vars(kind)[name]
            if isinstance(member, types.FunctionType):
                _update(digest, member.__code__)
        if isinstance(fn, torch.nn.Module):  # a PyroModule: its layers, priors and weights
            _update_module(digest, fn)
    return digest.hexdigest()


def _update_module(digest, module: torch.nn.Module) -> None:
    """A module's structure and its ``PyroSample`` priors (their tensors included).

    Not its parameters: SVI learns them (an autoguide's, a story's ``PyroParam``), and a
    run resumed from a checkpoint is the same run.
    """
    digest.update(repr(module).encode())
    for name, submodule in module.named_modules():
        for site, prior in sorted(getattr(submodule, "_pyro_samples", {}).items()):
            digest.update(f"{name}.{site}: {prior!r}".encode())
            for value in vars(prior).values() if hasattr(prior, "__dict__") else ():
                if isinstance(value, torch.Tensor):
                    digest.update(value.detach().cpu().numpy().tobytes())


def _update(digest, code: types.CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _update(digest, constant)
        else:
            digest.update(repr(constant).encode())


def data_digests(data: Mapping[str, Any]) -> dict[str, str]:
    """One SHA-256 per data argument: dtype, shape and bytes of arrays; repr of the rest."""
    digests = {}
    for name, value in data.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            header = f"{value.dtype.str} {value.shape}".encode()
            digests[name] = bytes_digest(header + np.ascontiguousarray(value).tobytes())
        else:
            digests[name] = bytes_digest(repr(value).encode())
    return digests


def run_fingerprint(model, guide, guide_name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The story, guide and data of a run, as a checkpoint records them."""
    return {"story": f"{model.name} {code_digest(model)}",
            "guide": f"{guide_name} {code_digest(guide)}",
            "data": data_digests(data)}
