"""JSON as RFC 8259 defines it, for every plugin that reads or writes bodies or claims.

:func:`json.loads` accepts ``NaN`` and ``Infinity``, turns ``1e999`` into ``inf`` and
raises ``RecursionError`` on deep nesting; :func:`json.dumps` writes ``NaN``. A gateway
that edits or composes JSON must do none of that: an upstream or a client may read
what it passes on differently, and a ``RecursionError`` would be a 500.

This module starts with ``_`` so the engine does not register it as a plugin.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["NotJson", "dump_json", "load_json"]


class NotJson(ValueError):
    """A text that is not RFC 8259 JSON, or a document that cannot be written as JSON."""


def _reject_constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a double cannot hold it, and inf is not JSON
        raise NotJson(f"{text} is out of range")
    return value


def load_json(data: bytes | str) -> Any:
    """``data`` parsed as RFC 8259 JSON; raises :class:`NotJson` for anything else.

    ``NaN`` and ``Infinity``, numbers that overflow a double, bad UTF-8 and nesting deep
    enough to exhaust the parser's recursion limit are all invalid.
    """
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except NotJson:
        raise
    except RecursionError:
        raise NotJson("nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise NotJson(str(e)) from None


def dump_json(doc: Any) -> bytes:
    """``doc`` as compact UTF-8 JSON; raises :class:`NotJson` when it is not JSON."""
    try:
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise NotJson("nested too deeply") from None
    except ValueError as e:  # a non-finite number
        raise NotJson(str(e)) from None
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" in the source) has no UTF-8 form: keep it escaped.
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
