"""A tiny template language for config values: ``"/users/{path.id}?page={query.page|1}"``.

A template is compiled once, at config load, into literal text and references; rendering
is a join of the literals with looked-up values, with no ``eval`` and no parsing per
request. ``{{`` and ``}}`` are literal braces.

A reference is ``{ROOT}``, ``{ROOT.KEY}`` or ``{ROOT.KEY|default}``. The roots every
filter can use are the request's (see :data:`REQUEST_ROOTS`):

``{request_id}``, ``{client}``, ``{method}``, ``{route}``, ``{consumer}``
    The request id, the real client address, the request method, the route name, the
    verified consumer (empty when the caller is anonymous).
``{path}``, ``{path.NAME}``
    The request path, or the path capture ``NAME`` of the route pattern.
``{query.NAME}``, ``{header.NAME}``
    The first value of a query parameter or request header.
``{claims.PATH}``
    A verified claim, by dotted path (``claims.sub``, ``claims.realm.roles[0]``).

A filter may allow more roots (the aggregate filter allows its call names, whose KEY is
a dotted path into that call's JSON answer). A value that is not found renders as the
default after ``|`` when one is given; otherwise the caller decides (the transform
filter writes the empty string, the aggregate filter fails the call that lacks it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from engine.exchange import Exchange
from plugins._jsonpath import MISSING, JsonPath, JsonPathError

__all__ = [
    "REQUEST_ROOTS",
    "Lookup",
    "MissingValue",
    "Ref",
    "Template",
    "TemplateError",
    "compile_template",
    "exchange_lookup",
    "to_text",
]

REQUEST_ROOTS: frozenset[str] = frozenset(
    {"request_id", "client", "method", "route", "consumer", "path", "query", "header", "claims"}
)
"""Roots that read the request; available wherever templates are."""

# Roots that take no key, and those that must have one.
_BARE_ROOTS = frozenset({"request_id", "client", "method", "route", "consumer"})
_KEYED_ROOTS = frozenset({"query", "header", "claims"})

_REF_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)(?:\.([^|]+))?(?:\|(.*))?", re.DOTALL)


class TemplateError(ValueError):
    """A template is malformed or names an unknown root."""


class MissingValue(LookupError):
    """Raised by :meth:`Template.render` when a lookup found nothing and has no default."""

    def __init__(self, ref: Ref) -> None:
        super().__init__(f"no value for {{{ref.source}}}")
        self.ref = ref


@dataclass(frozen=True, slots=True)
class Ref:
    """One ``{...}`` reference: ``root``, the ``key`` after the first dot, a default.

    ``json_path`` is ``key`` compiled, for roots whose key is a path into a document
    (claims, and the call names of the aggregate filter).
    """

    root: str
    key: str
    default: str | None
    source: str
    json_path: JsonPath | None = field(default=None, compare=False)


Lookup = Callable[[Ref], Any]
"""Returns the raw value of a reference, or :data:`~plugins._jsonpath.MISSING`."""


def to_text(value: Any) -> str:
    """How a looked-up value is written into text: JSON for anything but a string."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Template:
    """A compiled template; ``parts`` alternate literal strings and :class:`Ref`."""

    __slots__ = ("parts", "refs", "source")

    def __init__(self, source: str, parts: tuple[str | Ref, ...]) -> None:
        self.source = source
        self.parts = parts
        self.refs = tuple(p for p in parts if isinstance(p, Ref))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    @property
    def constant(self) -> str | None:
        """The text when the template has no reference, else ``None``."""
        if self.refs:
            return None
        return "".join(p for p in self.parts if isinstance(p, str))

    def render(
        self,
        lookup: Lookup,
        escape: Callable[[str], str] | None = None,
        missing: Any = MISSING,
    ) -> str:
        """The text with every reference replaced by its value (passed through ``escape``).

        A reference the lookup did not find takes its default, else ``missing``; when
        ``missing`` is not given, raises :class:`MissingValue`.
        """
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            text = to_text(self._value(part, lookup, missing))
            out.append(escape(text) if escape is not None else text)
        return "".join(out)

    def evaluate(self, lookup: Lookup, missing: Any = MISSING) -> Any:
        """Like :meth:`render`, but a template that is one lone reference keeps the
        value's JSON type (``"{claims.age}"`` gives the number, not its text)."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Ref):
            return self._value(self.parts[0], lookup, missing)
        return self.render(lookup, missing=missing)

    @staticmethod
    def _value(ref: Ref, lookup: Lookup, missing: Any) -> Any:
        value = lookup(ref)
        if value is MISSING:
            if ref.default is not None:
                return ref.default
            if missing is MISSING:
                raise MissingValue(ref)
            return missing
        return value


def compile_template(text: str, roots: Collection[str] = REQUEST_ROOTS) -> Template:
    """Compile ``text``, allowing references to ``roots`` only.

    Raises :class:`TemplateError` with a message for the user (unbalanced braces,
    an unknown root, a bad dotted path).
    """
    parts: list[str | Ref] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{" and text.startswith("{{", i):
            literal.append("{")
            i += 2
        elif c == "}" and text.startswith("}}", i):
            literal.append("}")
            i += 2
        elif c == "}":
            raise TemplateError(f'unmatched "}}" in {text!r} (write "}}}}" for a brace)')
        elif c == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(f'unclosed "{{" in {text!r} (write "{{{{" for a brace)')
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_compile_ref(text[i + 1 : end], text, roots))
            i = end + 1
        else:
            literal.append(c)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(text, tuple(parts))


def _compile_ref(inner: str, text: str, roots: Collection[str]) -> Ref:
    m = _REF_RE.fullmatch(inner.strip())
    if m is None:
        raise TemplateError(f"bad reference {{{inner}}} in {text!r}")
    root, key, default = m.group(1), m.group(2) or "", m.group(3)
    if root not in roots:
        known = ", ".join(sorted(roots))
        raise TemplateError(f"unknown name {root!r} in {{{inner}}} of {text!r} (known: {known})")
    if root in _BARE_ROOTS and key:
        raise TemplateError(f"{{{root}}} takes no key, got {{{inner}}} in {text!r}")
    if root in _KEYED_ROOTS and not key:
        raise TemplateError(f"{{{root}}} needs a key, like {{{root}.name}}, in {text!r}")
    json_path = None
    if root == "claims" or root not in REQUEST_ROOTS:
        try:
            json_path = JsonPath.parse(key)
        except JsonPathError as e:
            raise TemplateError(f"in {{{inner}}} of {text!r}: {e}") from None
    return Ref(root, key, default, inner, json_path)


def exchange_lookup(exchange: Exchange) -> Lookup:
    """A lookup for the request roots of ``exchange``; missing values are ``MISSING``.

    Unknown roots are ``MISSING`` too, so a caller can chain its own lookup first.
    """
    request = exchange.request

    def lookup(ref: Ref) -> Any:
        root, key = ref.root, ref.key
        if root == "request_id":
            return exchange.request_id
        if root == "client":
            return request.client
        if root == "method":
            return request.method.decode("latin-1")
        if root == "path":
            if not key:
                return request.path
            return exchange.captures.get(key, MISSING)
        if root == "query":
            values = request.query.get(key)
            return values[0] if values else MISSING
        if root == "header":
            value = request.headers.get(key)
            # UTF-8 as clients send it (what is no UTF-8 kept byte for byte): written
            # into a header again, it is the same bytes, not latin-1 made mojibake.
            return MISSING if value is None else value.decode("utf-8", "surrogateescape")
        if root == "route":
            return exchange.route.name if exchange.route is not None else ""
        if root == "consumer":
            return exchange.identity.consumer if exchange.identity is not None else ""
        if root == "claims":
            if exchange.identity is None or ref.json_path is None:
                return MISSING
            claims = exchange.identity.claims
            return ref.json_path.get(claims if isinstance(claims, dict) else dict(claims))
        return MISSING

    return lookup
