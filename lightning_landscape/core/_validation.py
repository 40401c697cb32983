"""Argument checks shared by core and callbacks, and the library's warning category.

Every message follows one house format: ``"`{name}` must be {constraint}, got {value!r}."`` so a user can find
the argument at once. These helpers raise built-in ``ValueError``/``TypeError`` (never ``assert``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable
from typing import Any


class LandscapeWarning(UserWarning):
    """Warnings emitted by lightning-landscape (numerical trouble, skipped measurements, configuration notes)."""


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) in ``[minimum, maximum]``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be an int <= {maximum}, got {value!r}.")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """Return ``float(value)`` if it is a finite real number inside the given bounds; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if minimum is not None:
        if strict_minimum and value <= minimum:
            raise ValueError(f"`{name}` must be > {minimum}, got {value!r}.")
        if not strict_minimum and value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value!r}.")
    return value


def check_optional_float(name: str, value: Any, **bounds: Any) -> float | None:
    """``None`` (the option is off) or :func:`check_float` of ``value`` with the same bounds."""
    return None if value is None else check_float(name, value, **bounds)


def check_regex(name: str, value: Any) -> Any:
    """``value`` unchanged; a string must compile as a regular expression (the message names ``name``)."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"`{name}` must be a valid regular expression, got {value!r} ({err}).") from err
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; raise a ``ValueError`` listing them otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; raise a ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_callable(
    name: str, value: Any, num_args: int, expected: str, *, optional: bool = False
) -> Callable[..., Any]:
    """Return ``value`` if it is a callable that accepts ``num_args`` positional arguments; raise otherwise.

    ``expected`` describes the call in the message (e.g. ``"(pl_module, batch) -> Tensor"``). Callables whose
    signature cannot be inspected (some builtins) are accepted as they are. ``optional``: the argument may also be
    ``None`` (the caller handles that case; the message says so).
    """
    what = "None or a callable" if optional else "a callable"
    if not callable(value):
        raise TypeError(f"`{name}` must be {what} {expected}, got {value!r}.")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return value
    try:
        signature.bind(*([None] * num_args))
    except TypeError as err:
        raise TypeError(
            f"`{name}` must be {what} {expected} accepting {num_args} positional argument(s), got {value!r} "
            f"with signature {signature} ({err})."
        ) from None
    return value
