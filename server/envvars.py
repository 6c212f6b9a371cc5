"""Settings read from the environment: the declaration beside each field, and the one loader.

A settings group is a frozen dataclass whose every field says, in ``field(metadata=env(...))``,
which variable it is read from and its bounds; `load_group` reads a whole group that way. The
parser follows the field's type (int, float, bool, str, ``str | None``, ``tuple[str, ...]``, a
StrEnum), unless the declaration brings its own.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class SettingsError(ValueError):
    """An environment variable is missing or malformed."""


_DEFAULT: typing.Final = object()
"""Marks "unset means the field's default" (dataclasses.MISSING would mean "no default")."""


@dataclass(frozen=True, slots=True)
class EnvVar:
    """How one settings field is read from the environment: declared beside the field."""

    name: str
    """The variable, e.g. ``CHATSTREAM_MAX_STREAMS``."""
    minimum: float | None = None
    """Smallest accepted value of a number; for a float, None means "greater than zero"."""
    example: str = ""
    """For a required variable (a field without default): the shape of a value, for the error."""
    unset: object = _DEFAULT
    """The value when the variable is unset or empty, where that differs from the field's default."""
    parse: Callable[[str, str], object] | None = None
    """Parses ``(name, raw)`` where the field's type alone does not say how; raises SettingsError."""


_ENV_KEY: typing.Final = "chatstream.env"


def env(
    name: str,
    *,
    minimum: float | None = None,
    example: str = "",
    unset: object = _DEFAULT,
    parse: Callable[[str, str], object] | None = None,
) -> Mapping[str, EnvVar]:
    """A field's ``metadata``: the variable it is read from, and its bounds."""
    return {_ENV_KEY: EnvVar(name=name, minimum=minimum, example=example, unset=unset, parse=parse)}


def env_var(field: dataclasses.Field[object]) -> EnvVar:
    """The declaration of a settings field.

    Raises:
        TypeError: The field declares no variable.
    """
    var = field.metadata.get(_ENV_KEY)
    if not isinstance(var, EnvVar):
        raise TypeError(f"settings field {field.name!r} declares no environment variable")
    return var


_G = typing.TypeVar("_G")


def load_group(group: type[_G], environ: Mapping[str, str]) -> _G:
    """One settings group read from ``environ`` by its fields' declarations.

    An unset or empty variable keeps the field's default (or its declared ``unset`` value).

    Raises:
        SettingsError: A variable is missing or malformed; the message names it.
    """
    hints = typing.get_type_hints(group)
    values: dict[str, object] = {}
    for f in dataclasses.fields(group):  # type: ignore[arg-type]  # every group is a dataclass
        var = env_var(f)
        raw = environ.get(var.name, "")
        if raw != "":
            values[f.name] = _parse(var, hints[f.name], raw)
        elif var.unset is not _DEFAULT:
            values[f.name] = var.unset
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{var.name} is not set ({var.example})")
    return group(**values)


def _parse(var: EnvVar, kind: object, raw: str) -> object:
    if var.parse is not None:
        return var.parse(var.name, raw)
    if kind is int:
        return _int(var.name, raw, minimum=int(var.minimum or 0))
    if kind is float:
        return _float(var.name, raw, minimum=var.minimum)
    if kind is bool:
        return _bool(var.name, raw)
    if kind is str or kind == str | None:
        return raw
    if kind == tuple[str, ...]:
        return split_list(raw)
    if isinstance(kind, type) and issubclass(kind, enum.StrEnum):
        return _choice(var.name, raw, kind)
    raise TypeError(f"{var.name}: no parser for settings of type {kind}")


def _int(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, raw: str, *, minimum: float | None = None) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if minimum is None and value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


_TRUE: frozenset[str] = frozenset({"1", "true", "yes", "on"})
_FALSE: frozenset[str] = frozenset({"0", "false", "no", "off"})


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


_E = typing.TypeVar("_E", bound=enum.StrEnum)


def _choice(name: str, raw: str, kind: type[_E]) -> _E:
    try:
        return kind(raw.lower())
    except ValueError:
        allowed = "|".join(member.value for member in kind)
        raise SettingsError(f"{name} must be one of {allowed}, got {raw!r}") from None


def split_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())
