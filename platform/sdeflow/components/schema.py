"""Argument schemas: a component's typed signature (or an attrs class) checked against YAML values.

A schema is derived, never written twice: the factory's own signature says which keyword arguments
it accepts, their types and defaults. Checking coerces only where YAML is known to be ambiguous
(``1e-3`` is a string to PyYAML, an int is a fine float, a list is a fine tuple).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ..core.errors import ConfigError, did_you_mean

REQUIRED = inspect.Parameter.empty


@attrs.frozen
class Argument:
    """One keyword argument of a component: its name, type annotation and default."""

    name: str
    annotation: Any
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        text = f"{self.name}: {type_name(self.annotation)}"
        return text if self.required else f"{text} = {self.default!r}"

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "type": type_name(self.annotation), "required": self.required}
        if not self.required:
            out["default"] = _jsonable(self.default)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def signature_schema(factory: Callable[..., Any], injected: Sequence[str] = ()) -> dict[str, Argument]:
    """The keyword arguments ``factory`` accepts from a config, leaving out kernel-injected ones."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an unresolvable annotation must not hide the component
        hints = {}
    signature = inspect.signature(factory)
    schema = {}
    for p in signature.parameters.values():
        if p.name in injected or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema[p.name] = Argument(p.name, hints.get(p.name, Any), p.default)
    return schema


def type_name(annotation: Any) -> str:
    """A short readable name for a type annotation (``float``, ``tuple[int, ...]``, ``'a' | 'b'``)."""
    if annotation is Any:
        return "any"
    if annotation is MaybeInfinite:
        return "float (inf allowed)"
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


class TypeMismatch(Exception):
    """``value`` does not fit the annotation; ``expected`` says what would."""

    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` as ``annotation`` (lossless coercions only) or raise :class:`TypeMismatch`."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if annotation is MaybeInfinite:
        return _coerce_maybe_infinite(value)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return coerce(value, option)
            except TypeMismatch:
                pass
        raise TypeMismatch(type_name(annotation))
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise TypeMismatch(type_name(annotation))
    if origin in (tuple, list) or annotation in (tuple, list):
        return _coerce_sequence(value, annotation, origin or annotation, args)
    if origin in (dict, Mapping) or annotation is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeMismatch(type_name(annotation))
    return _coerce_scalar(value, annotation)


def _coerce_sequence(value: Any, annotation: Any, origin: type, args: tuple) -> Any:
    if not isinstance(value, (list, tuple)):
        raise TypeMismatch(type_name(annotation))
    if not args:
        items = list(value)
    elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise TypeMismatch(type_name(annotation))
        items = [_item(v, a, annotation) for v, a in zip(value, args)]
    else:
        items = [_item(v, args[0], annotation) for v in value]
    return tuple(items) if origin is tuple else items


def _item(value: Any, annotation: Any, container: Any) -> Any:
    """Coerce one element; a mismatch reports the whole container's type."""
    try:
        return coerce(value, annotation)
    except TypeMismatch:
        raise TypeMismatch(type_name(container)) from None


class MaybeInfinite(float):
    """Annotate an argument ``MaybeInfinite`` (not ``float``) when ±inf is a meaningful value; plain
    ``float`` arguments must be finite, and NaN is refused everywhere."""


def _coerce_maybe_infinite(value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or math.isnan(number):
        raise TypeMismatch("a float (inf allowed)")
    return number


def _coerce_scalar(value: Any, annotation: Any) -> Any:
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and "e" in value.lower():  # PyYAML reads 1e5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # YAML's 1.0e5 for a step count
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise TypeMismatch("a finite float")
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
    else:
        return value
    raise TypeMismatch(type_name(annotation))


def check_arguments(
    given: Mapping[str, Any], schema: Mapping[str, Argument], where: str, what: str
) -> dict[str, Any]:
    """Validate ``given`` keyword arguments against ``schema``; errors name ``where.key``.

    ``where`` is the file and dotted section (``exp.yaml: sde``), ``what`` the component it is for.
    """
    accepted = ", ".join(a.describe() for a in schema.values()) or "no arguments"
    checked = {}
    for key, value in given.items():
        if key not in schema:
            raise ConfigError(
                f"{where}.{key}: unknown argument for {what}{did_you_mean(str(key), schema)}; accepted: {accepted}"
            )
        try:
            checked[key] = coerce(value, schema[key].annotation)
        except TypeMismatch as e:
            raise ConfigError(f"{where}.{key}: expected {e.expected}, got {value!r}") from None
    missing = [a.name for a in schema.values() if a.required and a.name not in given]
    if missing:
        raise ConfigError(f"{where}: {what} needs argument(s) {', '.join(missing)}; accepted: {accepted}")
    return checked
