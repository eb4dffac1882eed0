"""Route matching: host, then path (a segment trie), then method, headers and query.

The most specific route wins, by these rules in order:

1. Host: an exact host beats a wildcard (``*.example.com``; longer suffix first),
   which beats a route without ``hosts``.
2. Path: an exact ``path`` beats a ``prefix``; a literal segment beats a ``{capture}``
   at the same position; a longer prefix beats a shorter one.
3. Conditions: among routes with the same host and pattern, the one with more
   conditions (``methods``, ``headers``, ``query``) is tried first; then config order.

A request whose path matches but whose method no candidate takes gets 405 with
``Allow``; no match at all is 404. Matching walks one trie per host bucket, so its cost
grows with the path depth, not with the number of routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote, unquote_plus

from engine.config import RouteConfig
from engine.errors import BadRequest, MethodNotAllowed, NotFound
from engine.exchange import MAX_QUERY_FIELDS

__all__ = ["ANY_METHOD_ALLOW", "Match", "Router", "allowed_methods"]

R = TypeVar("R")


@dataclass(slots=True)
class _Entry(Generic[R]):
    route: RouteConfig
    value: R
    captures: list[tuple[int, str]]  # (segment index, capture name)
    methods: frozenset[bytes] | None
    headers: list[tuple[bytes, bytes | None]]
    query: list[tuple[str, str | None]]
    prefix_len: int  # number of pattern segments (for strip_prefix)
    order: int
    conditional: bool = False  # has header or query conditions


@dataclass(slots=True)
class _Node(Generic[R]):
    literal: dict[str, _Node[R]] = field(default_factory=dict)
    param: _Node[R] | None = None
    exact: list[_Entry[R]] = field(default_factory=list)
    prefix: list[_Entry[R]] = field(default_factory=list)


@dataclass(slots=True)
class Match(Generic[R]):
    route: RouteConfig
    value: R
    captures: dict[str, str]
    prefix_len: int


def _segments(path: str) -> list[str]:
    # "/" -> [], "/a/b" -> ["a", "b"], "/a/" -> ["a", ""]
    return path.split("/")[1:] if path != "/" else []


def _specificity(e: _Entry[R]) -> tuple[int, int]:
    conditions = (e.methods is not None) + len(e.headers) + len(e.query)
    return (-conditions, e.order)


class Router(Generic[R]):
    """Routes compiled into tries; ``value`` is whatever the caller attaches to a route."""

    def __init__(self, routes: Sequence[tuple[RouteConfig, R]]) -> None:
        self._exact_hosts: dict[str, _Node[R]] = {}
        self._wildcards: list[tuple[str, _Node[R]]] = []
        self._any: _Node[R] = _Node()
        self._query_values = any(v != "*" for r, _ in routes for v in r.query.values())
        wild: dict[str, _Node[R]] = {}
        for order, (route, value) in enumerate(routes):
            entry = self._entry(route, value, order)
            roots: list[_Node[R]] = []
            if not route.hosts:
                roots.append(self._any)
            for host in route.hosts:
                host = host.lower()
                if host.startswith("*."):
                    roots.append(wild.setdefault(host[1:], _Node()))
                else:
                    roots.append(self._exact_hosts.setdefault(host, _Node()))
            for root in roots:
                self._insert(root, route, entry)
        self._wildcards = sorted(wild.items(), key=lambda kv: -len(kv[0]))
        self._any_only = [self._any]
        for root in [self._any, *self._exact_hosts.values(), *(n for _, n in self._wildcards)]:
            self._sort(root)

    @staticmethod
    def _entry(route: RouteConfig, value: R, order: int) -> _Entry[R]:
        segs = _segments(route.pattern)
        if route.is_prefix and segs and segs[-1] == "":
            segs = segs[:-1]  # prefix "/users/" is prefix "/users"
        captures = [(i, s[1:-1]) for i, s in enumerate(segs) if s.startswith("{")]
        return _Entry(
            route=route,
            value=value,
            captures=captures,
            methods=_methods(route.methods) if route.methods else None,
            headers=[
                (k.lower().encode(), None if v == "*" else v.encode())
                for k, v in route.headers.items()
            ],
            query=[(k, None if v == "*" else v) for k, v in route.query.items()],
            prefix_len=len(segs),
            order=order,
            conditional=bool(route.headers or route.query),
        )

    @staticmethod
    def _insert(root: _Node[R], route: RouteConfig, entry: _Entry[R]) -> None:
        segs = _segments(route.pattern)
        if route.is_prefix and segs and segs[-1] == "":
            segs = segs[:-1]
        node = root
        for seg in segs:
            if seg.startswith("{"):
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.literal.setdefault(seg, _Node())
        (node.prefix if route.is_prefix else node.exact).append(entry)

    def _sort(self, node: _Node[R]) -> None:
        node.exact.sort(key=_specificity)
        node.prefix.sort(key=_specificity)
        for child in node.literal.values():
            self._sort(child)
        if node.param is not None:
            self._sort(node.param)

    def _roots(self, host: str) -> list[_Node[R]]:
        exact = self._exact_hosts.get(host)
        if not self._wildcards:
            return self._any_only if exact is None else [exact, self._any]
        roots = []
        if exact is not None:
            roots.append(exact)
        for suffix, node in self._wildcards:
            if host.endswith(suffix) and len(host) > len(suffix):
                roots.append(node)
        roots.append(self._any)
        return roots

    def match(
        self,
        host: str,
        path: str,
        method: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        query: dict[str, list[str]] | None = None,
        raw_query: bytes = b"",
    ) -> Match[R]:
        """The most specific route for a request. Raises ``NotFound``/``MethodNotAllowed``.

        ``host`` is lowercase without port; ``path`` is canonical. ``query`` is only
        consulted by routes with query conditions (pass the parsed query, or ``None``
        to have routes with query conditions not match).
        """
        segs = _segments(path)
        # (Split again only when a route has a value condition on the query, and asks.)
        readings = _Readings(raw_query) if self._query_values and raw_query else _NO_READINGS
        allowed: set[bytes] = set()
        for root in self._roots(host):
            exact: list[tuple[list[_Entry[R]], list[str]]] = []
            prefixes: list[tuple[int, list[_Entry[R]], list[str]]] = []
            self._walk(root, segs, 0, [], exact, prefixes)
            if len(prefixes) > 1:
                prefixes.sort(key=_depth, reverse=True)  # stable: the walk's order on ties
            for entries, values in [*exact, *((es, vals) for _, es, vals in prefixes)]:
                for e in entries:
                    if e.methods is not None and method not in e.methods:
                        # Another method's route: its conditions may say 405, never 400.
                        if not e.conditional or _conditions_hold(
                            e, headers, query, readings, False
                        ):
                            allowed |= e.methods
                        continue
                    if e.conditional and not _conditions_hold(e, headers, query, readings):
                        continue
                    return Match(
                        route=e.route,
                        value=e.value,
                        captures={name: unquote(values[i]) for i, name in e.captures}
                        if e.captures
                        else {},
                        prefix_len=e.prefix_len,
                    )
        if allowed:
            raise MethodNotAllowed(sorted(m.decode() for m in allowed))
        raise NotFound(f"no route for {path}")

    def _walk(
        self,
        node: _Node[R],
        segs: list[str],
        i: int,
        values: list[str],
        exact: list[tuple[list[_Entry[R]], list[str]]],
        prefixes: list[tuple[int, list[_Entry[R]], list[str]]],
    ) -> None:
        # Literal children before the capture child: a literal segment is more specific.
        if node.prefix:
            prefixes.append((i, node.prefix, values))
        if i == len(segs):
            if node.exact:
                exact.append((node.exact, values))
            return
        seg = segs[i]
        child = node.literal.get(seg)
        if child is None and ";" in seg:
            # Path parameters ("admin;x", "admin;jsessionid=1"): Tomcat, Jetty and Spring
            # drop them and serve "admin". Matched the same way here, so that they cannot
            # take a request past "admin"'s route to a catch-all (and its upstream's
            # "admin"); forwarded as they came.
            child = node.literal.get(seg.partition(";")[0])
        if child is not None:
            self._walk(child, segs, i + 1, [*values, seg], exact, prefixes)
        if node.param is not None and seg != "":
            self._walk(node.param, segs, i + 1, [*values, seg], exact, prefixes)


def _depth(t: tuple[int, list[_Entry[R]], list[str]]) -> int:
    return t[0]


def _methods(methods: Sequence[str]) -> frozenset[bytes]:
    """A route's methods; GET brings HEAD (RFC 9110 9.3.2: HEAD is GET without the body,
    and frameworks answer HEAD with their GET handler), as nginx's ``limit_except``."""
    out = {m.encode() for m in methods}
    if b"GET" in out:
        out.add(b"HEAD")
    return frozenset(out)


# The Allow of a route that takes any method (TRACE only when a route lists it).
ANY_METHOD_ALLOW = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The ``Allow`` of a route that lists ``methods`` (with HEAD when GET is there)."""
    if not methods:
        return ANY_METHOD_ALLOW
    return tuple(sorted(m.decode() for m in _methods(methods)))


def _conditions_hold(
    e: _Entry[R],
    headers: Sequence[tuple[bytes, bytes]],
    query: dict[str, list[str]] | None,
    readings: _Readings | None = None,
    strict: bool = True,
) -> bool:
    """Whether a request meets a route's header and query conditions.

    A name a value condition is on (not ``"*"``), repeated with different values, is
    refused (400): upstreams read one of them (the first, the last, or all joined), so
    whichever way the router chose, a client could pick the route by one value and be
    served by another (``?visibility=private&visibility=public`` past a guarded route,
    or the mirror).
    """
    for name, want in e.headers:
        seen: bytes | None = None
        for n, v in headers:
            if n == name:
                if want is not None and seen is not None and v != seen:
                    if not strict:
                        return False
                    raise BadRequest(f"header {name.decode()} is repeated with different values")
                seen = v
        if seen is None or (want is not None and seen != want):
            return False
    if e.query:
        if query is None:
            return False
        for qname, qwant in e.query:
            got = query.get(qname)
            if qwant is not None and _ambiguous(qname, got, readings or _NO_READINGS):
                if not strict:
                    return False
                raise BadRequest(
                    f"query parameter {qname} can be read more than one way (repeated "
                    "with different values, after a ';', or spelled otherwise)"
                )
            if got is None or (qwant is not None and got[0] != qwant):
                return False
    return True


def _ambiguous(name: str, values: list[str] | None, readings: _Readings) -> bool:
    """Whether some upstream may read another value of query parameter ``name`` than
    the router (``values``, split on ``&`` only): given more than once (ASP.NET joins
    repeats with ","), after a ``;`` (Rack and older Go split on it too), or under
    another spelling of the name (see :func:`_normal_name`)."""
    if values is not None and len(values) > 1:
        return True
    if not readings.may_differ:
        return False  # every reading is the router's
    found = readings.values(name)
    if values is None:
        return bool(found)  # the router saw none: another reading sees one
    return found != [values[0]]


class _Readings:
    """Every way servers may read a query: split on ``&`` (PHP, ASP.NET) and also on
    ``;`` (Rack, older Go), names as they take them. Made at most once per request, and
    only when a value condition asks."""

    __slots__ = ("_by_name", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._by_name: dict[str, list[str]] | None = None

    @property
    def may_differ(self) -> bool:
        return bool(self.raw) and _MAY_DIFFER.search(self.raw) is not None

    def values(self, name: str) -> list[str]:
        """Every value some server may read for ``name``, one per reading: a parameter
        read alike by every server appears once."""
        by_name = self._by_name
        if by_name is None:
            text = self.raw.decode("latin-1")
            if len(_SEPARATORS.findall(text)) >= MAX_QUERY_FIELDS:  # ";" pieces count too
                raise BadRequest(f"more than {MAX_QUERY_FIELDS} query parameters")
            readings: dict[str, set[tuple[int, str]]] = {}
            for split in (_AMPERSAND, _SEPARATORS):
                start = 0
                for m in (*split.finditer(text), None):
                    end = m.start() if m is not None else len(text)
                    key, _, value = text[start:end].partition("=")
                    decoded = unquote_plus(_IIS_ESCAPE.sub(_iis_char, key))
                    for spelling in _normal_names(decoded):
                        # Keyed by where the piece starts too, so that one piece read
                        # alike by both splits counts once, and a repeat twice.
                        readings.setdefault(spelling, set()).add((start, unquote_plus(value)))
                    start = end + 1
            by_name = self._by_name = {
                k: [v for _, v in sorted(pairs)] for k, pairs in readings.items()
            }
        wanted = name.lower() if "[" in name else _normal_names(name)[0]
        return by_name.get(wanted, [])


_NO_READINGS = _Readings(b"")
_SEPARATORS = re.compile(r"[&;]")
_AMPERSAND = re.compile(r"&")
# A query some server may read otherwise than the router: a ";", or a name with a capital,
# a ".", a space ("+"), a "[", an escape, a control byte or a byte over 0x7f.
_MAY_DIFFER = re.compile(rb"[;A-Z.+\[%\x00-\x20\x7f-\xff]")
_IIS_ESCAPE = re.compile(r"%u([0-9A-Fa-f]{4})")


def _iis_char(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 16))


def _normal_names(name: str) -> list[str]:
    """The names the laxest servers take ``name`` (decoded) for: cut at a NUL; leading
    spaces dropped and ``.`` and spaces as ``_`` (PHP); case folded as ASP.NET does,
    ``\u0131`` and ``\u017f`` included; with a ``[``, also the whole name lowered (a
    condition may name ``filter[status]``), and the name before it when a ``]`` closes
    it (PHP, Rack and qs read ``a[]`` and ``a[0]`` as ``a``) or the name with it as
    ``_`` when none does (PHP reads ``user[type`` as ``user_type``)."""
    name = name.partition("\x00")[0].lstrip(" ")
    at = name.find("[")
    if at < 0:
        return [_fold(name)]
    whole = name.upper().lower()
    if "]" in name[at:]:
        return [_fold(name[:at]), whole]
    return [_fold(name[:at] + "_" + name[at + 1 :]), whole]


def _fold(name: str) -> str:
    return name.upper().lower().replace(".", "_").replace(" ", "_")
