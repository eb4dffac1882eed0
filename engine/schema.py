"""Typed, frozen configuration from plain TOML data.

Both the engine's own config and every plugin's section are dataclasses; :func:`build`
turns the dict that ``tomllib`` produced into one, checking every value against the
field's type and naming the full key path in the error::

    routes[2].plugins.rate-limit.window: expected a duration like "1m", got "fast"

Beyond the builtin types it understands :data:`Duration` (seconds, written ``"250ms"``,
``"5s"``, ``"1m"``, ``"1h"``, ``"1d"`` or a number of seconds) and :data:`ByteSize`
(bytes, written ``"16KiB"``, ``"8MiB"``, ``"1GiB"`` or an integer). A dataclass may
validate further in ``__post_init__`` by raising :class:`Invalid`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, NewType, TypeVar, Union, get_args, get_origin

__all__ = [
    "ByteSize",
    "ConfigError",
    "Duration",
    "Invalid",
    "build",
    "describe_fields",
    "parse_byte_size",
    "parse_duration",
]

T = TypeVar("T")

Duration = NewType("Duration", float)
"""Seconds. Config values: a number of seconds or a string such as ``"250ms"``, ``"1m"``."""

ByteSize = NewType("ByteSize", int)
"""Bytes. Config values: an integer or a string such as ``"16KiB"``, ``"8MiB"``."""


class ConfigError(Exception):
    """A config value is wrong. ``path`` is the key path, e.g. ``routes[1].upstream``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class Invalid(ValueError):
    """Raised by a config dataclass's ``__post_init__``; ``key`` is relative to it."""

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(message)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``value``; raises ``ValueError`` with a message for the user."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "1m", got {value!r}')
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:  # TOML has nan and inf: no durations
            raise ValueError(f"expected a non-negative duration, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if value.strip().startswith("-"):
            raise ValueError(f"expected a non-negative duration, got {value!r}")
        raise ValueError(
            'expected a duration like "1m" (seconds, or a number with ms, s, m, h or d), '
            f"got {value!r}"
        )
    raise ValueError(f'expected a duration like "1m", got {value!r}')


def parse_byte_size(value: object) -> int:
    """Bytes from ``value``; raises ``ValueError`` with a message for the user."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
        if value.strip().startswith("-"):
            raise ValueError(f"expected a non-negative size, got {value!r}")
        raise ValueError(
            'expected a size like "16KiB" (bytes, or a whole number with B, KiB, MiB, GiB, '
            f"or KB, MB, GB for powers of 1000), got {value!r}"
        )
    raise ValueError(f'expected a size like "16KiB", got {value!r}')


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return 'a duration like "1m"'
    if tp is ByteSize:
        return 'a size like "16KiB"'
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "an array"
    if origin is dict or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any or tp is object:
        return value
    if tp is Duration:
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(path, str(e)) from None
    if tp is ByteSize:
        try:
            return parse_byte_size(value)
        except ValueError as e:
            raise ConfigError(path, str(e)) from None
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"expected an array, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or origin is Mapping:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a table, got {value!r}")
        _key_tp, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        if isinstance(tp, type) and isinstance(value, tp):
            return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


def unsupported_field(cls: type) -> str | None:
    """The first field of config dataclass ``cls`` (nested ones included) whose type
    no TOML value can be read into (``set[str]``, a class of the plugin's own...), as
    ``"name: type"``; None when every field can be read. Checked when a plugin is
    discovered, so that the mistake is the plugin's, not a user's config error."""
    try:
        hints = _hints(cls)
    except Exception as e:  # a forward reference that does not resolve
        return f"(type hints): {e}"
    for f in dataclasses.fields(cls):
        if f.init and not _readable(hints[f.name]):
            return f"{f.name}: {hints[f.name]!r}"
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            inner = unsupported_field(tp)
            if inner is not None:
                return f"{f.name}.{inner}"
    return None


def _readable(tp: Any) -> bool:
    if tp in (Any, object, Duration, ByteSize, bool, int, float, str, type(None)):
        return True
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, list, tuple, dict, Mapping):
        args = get_args(tp)
        if origin in (dict, Mapping):
            args = args[1:]  # keys are strings in TOML
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        return all(_readable(a) for a in args)
    if origin is Literal:
        return True
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def build(cls: type[T], data: object, path: str = "") -> T:
    """An instance of dataclass ``cls`` from ``data``, a table read from TOML.

    TOML keys are the field names (``snake_case``). Raises :class:`ConfigError` naming
    the path of the first unknown key, missing required key or bad value.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a table, got {data!r}")
    kwargs = _convert_keys(cls, data, path)
    for name, f in _init_fields(cls).items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except Invalid as e:
        raise ConfigError(_join(path, e.key) if e.key else path, e.message) from None


def check_keys(cls: type, data: object, path: str = "") -> None:
    """What :func:`build` checks of the keys ``data`` has: unknown keys and bad values,
    for a table that may be partial (a plugin table with ``enabled = false``, which
    routes may complete). No required key is asked for, and the dataclass's own checks
    do not run."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a table, got {data!r}")
    _convert_keys(cls, data, path)


def _init_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    assert dataclasses.is_dataclass(cls)
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _convert_keys(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    fields = _init_fields(cls)
    for key in data:
        # A field marked internal (set by the loader, like Config.source) is no key.
        if key not in fields or fields[key].metadata.get("internal"):
            keys = [n for n, f in fields.items() if not f.metadata.get("internal")]
            known = ", ".join(sorted(keys)) or "none"
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(_join(path, key), f"unknown key ({hint}known keys: {known})")
    hints = _hints(cls)
    return {name: _convert(hints[name], data[name], _join(path, name)) for name in data}


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` for each field of config dataclass ``cls``.

    The doc is the field's ``metadata["doc"]``; used by ``filtergate plugins``.
    """
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            value: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            out.append((f.name, _type_name(tp), "(required)", f.metadata.get("doc", "")))
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            # A table with defaults of its own: its keys, as `redis.url`.
            out.append((f.name, "a table", "(below)", f.metadata.get("doc", "")))
            for key, typ, default, doc in describe_fields(type(value)):
                out.append((f"{f.name}.{key}", typ, default, doc))
            continue
        out.append((f.name, _type_name(tp), _toml(tp, value), f.metadata.get("doc", "")))
    return out


def _toml(tp: Any, value: Any) -> str:
    """``value`` as it would be written in gateway.toml (``(none)`` for no value)."""
    if value is None:
        return "(none)"
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else Any
        origin = get_origin(tp)
    if tp is Duration:
        ms = value * 1000
        if value < 1 and ms == int(ms):
            return f'"{int(ms)}ms"'
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= size and value % size == 0:
                return f'"{int(value // size)}{unit}"'
        return f'"{value:g}s"'
    if tp is ByteSize:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f'"{value // size}{unit}"'
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        args = get_args(tp)
        item = args[0] if args else Any
        return "[" + ", ".join(_toml(item, v) for v in value) + "]"
    if isinstance(value, dict):
        args = get_args(tp)
        item = args[1] if len(args) == 2 else Any
        if not value:
            return "{}"
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml(item, v)}" for k, v in value.items()) + " }"
        )
    return str(value)
