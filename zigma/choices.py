"""User strings to enum members, with one error naming the argument and the allowed values."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["parse_choice"]

_E = TypeVar("_E", bound=Enum)


def parse_choice(choices: type[_E], value: _E | str, *, argument: str) -> _E:
    """Map a user string (case-insensitive enum value or name, ``-`` and ``_`` alike) to a member of ``choices``.

    Args:
        choices: the Enum class that declares the allowed values.
        value: a member of ``choices`` or its spelling, e.g. ``"linear"`` or ``"Linear"`` for ``PathType.LINEAR``.
        argument: the argument name, used in the error message.
    Returns: the matching member.
    Raises:
        ValueError: naming the argument, the value received and the allowed values.
    """
    if isinstance(value, choices):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        for member in choices:
            if key in (member.value.lower(), member.name.lower().replace("_", "-")):
                return member
    allowed = ", ".join(repr(m.value) for m in choices)
    raise ValueError(f"{argument}={value!r} is not a valid {choices.__name__}; allowed values: {allowed}")
