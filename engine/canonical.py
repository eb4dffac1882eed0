"""One canonical path: what is routed, what filters see, and what is forwarded.

``canonical_path(raw)`` removes dot segments, merges duplicate slashes and decodes
percent-encoded unreserved characters (so ``/a/%2E%2E/b`` and ``/b`` are one path); it
refuses, with :class:`~engine.errors.BadRequest`, encoded ``/``, ``\\`` and NUL (which
upstreams decode differently), dot segments with parameters (``..;x``, which servlet
containers read as ``..``), segments of parameters alone (``/;x/``), raw backslashes,
malformed escapes and invalid UTF-8.
Other escapes are kept, with upper-case hex, so the forwarded path means what it meant.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from engine.errors import BadRequest

__all__ = ["canonical_path", "split_target"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_FORBIDDEN_ESCAPES = {0x2F: "/", 0x5C: "\\", 0x00: "NUL"}
# What a path needs more than an ASCII decode for: escapes, fragments, backslashes,
# raw non-ASCII bytes, duplicate slashes, dot segments and nameless path parameters.
_NEEDS_WORK = re.compile(rb"[%#\\\x80-\xff]|//|/\.|/;")
# Path parameters of a segment (";x" or its escape "%3Bx"), as servlet containers strip them.
_PARAMETERS = re.compile(r"(?:;|%3B).*", re.DOTALL)


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """``(path, query)`` of an origin-form request target; the query without ``?``."""
    path, _sep, query = target.partition(b"?")
    if b"#" in query:
        raise BadRequest("a request target cannot carry a fragment")
    return path, query


def canonical_path(raw: bytes) -> str:
    """The canonical form of ``raw``, an origin-form path. Raises ``BadRequest``."""
    if raw[:1] != b"/":
        raise BadRequest("the request path must start with /")
    # Fast path: most paths need no work at all (one scan finds any that may).
    if _NEEDS_WORK.search(raw) is None:
        return raw.decode("ascii")
    if b"#" in raw:
        raise BadRequest("a request target cannot carry a fragment")
    if b"\\" in raw:
        raise BadRequest("the request path contains a backslash")
    decoded = _decode_unreserved(raw)  # refuses raw non-ASCII bytes
    return _remove_dot_segments(decoded)


def _decode_unreserved(raw: bytes) -> str:
    """Escapes of unreserved characters decoded, others kept with upper-case hex; raises
    for malformed escapes, raw non-ASCII bytes, forbidden escapes and invalid UTF-8.

    Done with regexes, a split on ``%`` and a table of the 484 spellings of two hex
    digits, not byte by byte: a path of thousands of escapes took milliseconds in a
    Python loop."""
    if _MALFORMED.search(raw) is not None:
        raise BadRequest("malformed percent-escape in the request path")
    if not raw.isascii():
        raise BadRequest("the request path has raw non-ASCII bytes")
    forbidden = _FORBIDDEN.search(raw)
    if forbidden is not None:
        name = _FORBIDDEN_ESCAPES[int(forbidden.group(1), 16)]
        raise BadRequest(f"an encoded {name} is not allowed in the request path")
    if _HIGH_ESCAPE.search(raw) is not None:  # only escapes of bytes >= 0x80 can break UTF-8
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the request path is not valid UTF-8") from None
    parts = raw.split(b"%")
    kept = _KEPT
    return (parts[0] + b"".join([kept[p[:2]] + p[2:] for p in parts[1:]])).decode("ascii")


_FORBIDDEN = re.compile(rb"%(2[fF]|5[cC]|00)")
_HIGH_ESCAPE = re.compile(rb"%[89A-Fa-f][0-9A-Fa-f]")
_MALFORMED = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_HEX_VALUE = {bytes([a, b]): int(bytes([a, b]), 16) for a in _HEX for b in _HEX}
# What each escape becomes: its character when unreserved, else itself in upper case.
_KEPT = {h: bytes([v]) if v in _UNRESERVED else b"%" + h.upper() for h, v in _HEX_VALUE.items()}


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4 on segments, with empty segments (duplicate slashes) merged.
    segments = path.split("/")
    for seg in segments:
        if seg[:1] == "." and _PARAMETERS.sub("", seg) in (".", "..") and seg not in (".", ".."):
            # "..;x" is a name to the RFC and ".." to Tomcat, Jetty and Spring, which
            # drop path parameters first: forwarded, it would climb out of the route.
            raise BadRequest("a dot segment with parameters (..;) in the request path")
        if seg[:1] == ";":
            # "/;x/admin": a segment with parameters and no name, which servlet
            # containers drop ("/admin" to them), and no route's segment to match.
            raise BadRequest("a path segment of parameters alone (/;) in the request path")
    out: list[str] = []
    for seg in segments[1:-1]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    last = segments[-1] if len(segments) > 1 else ""
    trailing = ""
    if last == "..":
        if out:
            out.pop()
        trailing = "/"
    elif last == ".":
        trailing = "/"
    elif last == "":
        trailing = "/" if out else ""
    else:
        out.append(last)
    return "/" + "/".join(out) + trailing if out else "/"
