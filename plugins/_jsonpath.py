"""Dotted paths into JSON documents: ``user.name``, ``items[0].id``, ``orders[*].items``.

A path is compiled once (at config load) into segments: object keys, array indexes
(negative ones count from the end) and the ``[*]`` wildcard, which stands for every
element of an array. Operations work in place on the ``dict``/``list`` trees that
:func:`json.loads` makes and report how many places they changed, so a caller knows
whether the document must be serialized again::

    p = JsonPath.parse("user.addresses[*].zip")
    p.find(doc)            # every zip code, in document order
    p.remove(doc)          # -> number of fields removed

Grammar: segments are separated by ``.``; a segment is a key (any characters but
``.``, ``[`` and ``]``) followed by any number of ``[N]`` or ``[*]``; a path may also
begin with ``[N]`` or ``[*]`` when the document is an array. The empty path is the
whole document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["MISSING", "WILDCARD", "JsonPath", "JsonPathError", "TooManyPlaces"]


class _Wildcard:
    __slots__ = ()

    def __repr__(self) -> str:
        return "[*]"


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


WILDCARD: Final = _Wildcard()
MISSING: Final = _Missing()
"""Returned by :meth:`JsonPath.get` when nothing is at the path."""

Segment = str | int | _Wildcard

_SEGMENT_RE = re.compile(r"([^.\[\]]*)((?:\[(?:-?\d+|\*)\])*)")
_INDEX_RE = re.compile(r"\[(-?\d+|\*)\]")


class JsonPathError(ValueError):
    """A path is malformed, or an operation cannot apply to it (set on a wildcard root)."""


class TooManyPlaces(Exception):
    """A :meth:`JsonPath.set` would write more places than its ``limit``."""


class JsonPath:
    """A compiled dotted path; see the module docstring for the grammar."""

    __slots__ = ("segments", "text")

    def __init__(self, text: str, segments: tuple[Segment, ...]) -> None:
        self.text = text
        self.segments = segments

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        """Compile ``text``; raises :class:`JsonPathError` with a message for the user."""
        if text == "":
            return cls(text, ())
        segments: list[Segment] = []
        for i, part in enumerate(text.split(".")):
            m = _SEGMENT_RE.fullmatch(part)
            if m is None:
                raise JsonPathError(f"bad path {text!r}: cannot read segment {part!r}")
            key, indexes = m.group(1), m.group(2)
            if key:
                segments.append(key)
            elif not (i == 0 and indexes):
                # Only the first segment may be a bare index (the document is an array).
                raise JsonPathError(f"bad path {text!r}: empty segment")
            for idx in _INDEX_RE.findall(indexes):
                segments.append(WILDCARD if idx == "*" else int(idx))
        return cls(text, tuple(segments))

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonPath) and other.segments == self.segments

    def __hash__(self) -> int:
        return hash(self.segments)

    @property
    def has_wildcard(self) -> bool:
        return any(s is WILDCARD for s in self.segments)

    @property
    def last_key(self) -> str | None:
        """The final segment when it is an object key, else ``None``."""
        if self.segments and isinstance(self.segments[-1], str):
            return self.segments[-1]
        return None

    # -- reading -------------------------------------------------------------------

    def find(self, doc: Any) -> list[Any]:
        """Every value at the path, in document order (empty when there is none)."""
        return list(_walk(doc, self.segments))

    def get(self, doc: Any, default: Any = MISSING) -> Any:
        """The first value at the path, or ``default``."""
        return next(_walk(doc, self.segments), default)

    # -- writing -------------------------------------------------------------------

    def set(
        self, doc: Any, value: Any, *, only_if_absent: bool = False, limit: int | None = None
    ) -> int:
        """Put ``value`` at every place the path names; returns how many were written.

        Missing objects on the way are created (``a.b.c`` on ``{}`` makes
        ``{"a": {"b": {"c": value}}}``); missing array elements are not. With
        ``only_if_absent`` an existing value is left alone. Each place gets its own copy
        of a ``dict``/``list`` value, so later operations cannot alias them. Raises
        :class:`TooManyPlaces` before writing a place beyond ``limit`` (a wildcard over a
        client's array must not multiply a value without bound).
        """
        if not self.segments:
            raise JsonPathError("cannot set the whole document")
        last = self.segments[-1]
        written = 0
        for parent in _parents(doc, self.segments[:-1], create=True):
            if isinstance(last, str):
                if not isinstance(parent, dict) or (only_if_absent and last in parent):
                    continue
                if limit is not None and written >= limit:
                    raise TooManyPlaces()
                parent[last] = _copy(value)
                written += 1
            elif isinstance(parent, list):
                for i in _indexes(parent, last):
                    if not only_if_absent:
                        if limit is not None and written >= limit:
                            raise TooManyPlaces()
                        parent[i] = _copy(value)
                        written += 1
        return written

    def remove(self, doc: Any) -> int:
        """Delete every value at the path; returns how many were deleted."""
        if not self.segments:
            raise JsonPathError("cannot remove the whole document")
        last = self.segments[-1]
        removed = 0
        for parent in _parents(doc, self.segments[:-1], create=False):
            if isinstance(last, str):
                if isinstance(parent, dict) and last in parent:
                    del parent[last]
                    removed += 1
            elif isinstance(parent, list):
                # Highest index first so earlier deletions do not shift later ones.
                for i in sorted(_indexes(parent, last), reverse=True):
                    del parent[i]
                    removed += 1
        return removed

    def rename(self, doc: Any, target: JsonPath) -> int:
        """Move the value(s) at this path to ``target``; returns how many moved.

        When ``target`` is a single key (``rename = { "user.nm" = "name" }``) the field
        is renamed in place in every object the path reaches, keeping its position;
        wildcards are allowed. Otherwise the value is moved to the ``target`` path,
        which, like this path, must then have no wildcard (see :meth:`check_rename`).
        """
        last = self.last_key
        new_key = target.segments[0] if len(target.segments) == 1 else None
        if last is not None and isinstance(new_key, str):
            moved = 0
            for parent in _parents(doc, self.segments[:-1], create=False):
                if isinstance(parent, dict) and last in parent and last != new_key:
                    _rename_key(parent, last, new_key)
                    moved += 1
            return moved
        value = self.get(doc)
        if value is MISSING:
            return 0
        self.remove(doc)
        target.set(doc, value)
        return 1

    def check_rename(self, target: JsonPath) -> None:
        """Raise :class:`JsonPathError` unless ``rename(doc, target)`` is well defined."""
        if not self.segments or not target.segments:
            raise JsonPathError("cannot rename the whole document")
        single_key = len(target.segments) == 1 and isinstance(target.segments[0], str)
        if single_key and self.last_key is not None:
            return
        if self.has_wildcard or target.has_wildcard:
            raise JsonPathError(
                f"rename {self.text!r} -> {target.text!r}: with a wildcard, the new name "
                "must be a single key (renamed in place)"
            )


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value, without recursion: ``copy.deepcopy`` recurses, and a
    document nested a few hundred deep (which the parser accepts) would exhaust it."""
    if not isinstance(value, dict | list):
        return value
    root = value.copy()
    stack: list[dict[str, Any] | list[Any]] = [root]
    while stack:
        node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in children:
            if isinstance(child, dict | list):
                child = child.copy()
                node[key] = child  # type: ignore[index]  # (a key of its own container)
                stack.append(child)
    return root


def _rename_key(parent: dict[str, Any], old: str, new: str) -> None:
    items = [(new if k == old else k, v) for k, v in parent.items() if k != new]
    parent.clear()
    parent.update(items)


def _indexes(array: list[Any], seg: Segment) -> list[int]:
    if seg is WILDCARD:
        return list(range(len(array)))
    assert isinstance(seg, int)
    i = seg + len(array) if seg < 0 else seg
    return [i] if 0 <= i < len(array) else []


def _walk(node: Any, segments: tuple[Segment, ...]) -> Iterator[Any]:
    if not segments:
        yield node
        return
    seg, rest = segments[0], segments[1:]
    if isinstance(seg, str):
        if isinstance(node, dict) and seg in node:
            yield from _walk(node[seg], rest)
    elif isinstance(node, list):
        for i in _indexes(node, seg):
            yield from _walk(node[i], rest)


def _parents(node: Any, segments: tuple[Segment, ...], *, create: bool) -> Iterator[Any]:
    """The containers that ``segments`` lead to, creating missing objects if asked."""
    if not segments:
        yield node
        return
    seg, rest = segments[0], segments[1:]
    if isinstance(seg, str):
        if not isinstance(node, dict):
            return
        if seg not in node:
            # Objects are created on the way; arrays are not (no index to fill).
            if not create or (rest and not isinstance(rest[0], str)):
                return
            node[seg] = {}
        yield from _parents(node[seg], rest, create=create)
    elif isinstance(node, list):
        for i in _indexes(node, seg):
            yield from _parents(node[i], rest, create=create)
