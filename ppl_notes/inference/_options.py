"""Declared inference options, checked before anything runs.

Each back end lists its options; unknown names, wrong types and values out of range are
errors that name the option.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppl_notes._cluster import check_scheduler
from ppl_notes.errors import OptionError, OptionTypeError


@dataclass(frozen=True)
class Option:
    """One option of a back end: its name, type(s), default, valid range and meaning."""

    name: str
    types: tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    valid: str = ""
    choices: tuple[Any, ...] | None = None


def positive_int(name: str, default: int, doc: str, minimum: int = 1) -> Option:
    """An integer option that must be at least ``minimum``."""
    return Option(name, (int,), default, doc, lambda v: v >= minimum, f"an integer >= {minimum}")


def positive_float(name: str, default: float, doc: str) -> Option:
    """A real option that must be > 0."""
    return Option(name, (int, float), default, doc, lambda v: v > 0, "a number > 0")


def open_unit(name: str, default: float, doc: str) -> Option:
    """A real option in the open interval (0, 1)."""
    return Option(name, (int, float), default, doc, lambda v: 0 < v < 1, "a number in (0, 1)")


def choice(name: str, default: Any, doc: str, choices: tuple[Any, ...]) -> Option:
    """An option with a fixed set of values."""
    return Option(name, (str, type(None)), default, doc, choices=choices)


def validate(method: str, spec: tuple[Option, ...], given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``given`` against ``spec`` and fill in defaults.

    Raises
    ------
    OptionError
        For an unknown option (listing the valid ones) or a value out of range.
    OptionTypeError
        For a value of the wrong type.
    """
    by_name = {option.name: option for option in spec}
    for name in given:
        if name not in by_name:
            close = difflib.get_close_matches(name, by_name, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(
                f"method {method!r} has no option {name!r}{hint}; its options are "
                f"{sorted(by_name)}"
            )
    values = {}
    for option in spec:
        value = given.get(option.name, option.default)
        if option.name in given:
            value = _as_builtin(value, option.types)
            _check(method, option, value)
        values[option.name] = value
    return values


def _as_builtin(value: Any, types: tuple[type, ...]) -> Any:
    """Numpy's integers and floats as Python's (``steps=np.int64(500)`` is an int)."""
    if isinstance(value, bool | np.bool_):
        return value
    if int in types and isinstance(value, numbers.Integral):
        return int(value)
    if float in types and isinstance(value, numbers.Real) and not isinstance(value, int):
        return float(value)
    return value


def _check(method: str, option: Option, value: Any) -> None:
    if option.choices is not None:
        if value not in option.choices:
            raise OptionError(
                f"method {method!r}: option {option.name!r} must be one of "
                f"{list(option.choices)}, got {value!r}"
            )
        return
    if isinstance(value, bool) and bool not in option.types or not isinstance(value, option.types):
        names = " or ".join(t.__name__ for t in option.types)
        raise OptionTypeError(
            f"method {method!r}: option {option.name!r} must be {names}, got "
            f"{type(value).__name__} {value!r}"
        )
    if option.check is not None and not option.check(value):
        raise OptionError(
            f"method {method!r}: option {option.name!r} must be {option.valid}, got {value!r}"
        )


def scheduler_option(where: str) -> Option:
    """The ``scheduler`` option: where independent fits run (``where`` says what runs)."""
    def is_scheduler(value) -> bool:

        try:
            check_scheduler(value, "")
        except OptionError:
            return False
        return True

    return Option("scheduler", (object,), None, f"where {where}; ppl_notes._cluster",
                  is_scheduler, "None, an address 'tcp://host:port' or a distributed.Client")
