"""The canonical path, byte by byte."""

from __future__ import annotations

import pytest

from engine.canonical import canonical_path, split_target
from engine.errors import BadRequest


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"/", "/"),
        (b"/a/b", "/a/b"),
        (b"/a/b/", "/a/b/"),
        (b"/a//b", "/a/b"),
        (b"//a///b", "/a/b"),
        (b"/a/./b", "/a/b"),
        (b"/a/b/../c", "/a/c"),
        (b"/a/b/..", "/a/"),
        (b"/a/.", "/a/"),
        (b"/..", "/"),
        (b"/../../etc/passwd", "/etc/passwd"),
        (b"/a/%2E%2E/b", "/b"),
        (b"/a/%2e/b", "/a/b"),
        (b"/%41%62c", "/Abc"),
        (b"/%7euser", "/~user"),
        (b"/caf%c3%a9", "/caf%C3%A9"),
        (b"/x%3fy", "/x%3Fy"),
        (b"/a%20b", "/a%20b"),
        (b"/a/...;x/b", "/a/...;x/b"),  # not a dot segment: a name
        (b"/a/.well-known;v=1", "/a/.well-known;v=1"),
        (b"/a/b;..", "/a/b;.."),
        (b"/admin;x/users", "/admin;x/users"),  # forwarded with its parameters
    ],
)
def test_canonical_forms(raw: bytes, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"/a%2fb", "encoded /"),
        (b"/a%2Fb", "encoded /"),
        (b"/a%5cb", "encoded \\"),
        (b"/a%00b", "encoded NUL"),
        (b"/a\\b", "backslash"),
        (b"/a%ff", "UTF-8"),
        (b"/a%c3", "UTF-8"),
        (b"/a%4", "percent-escape"),
        (b"/a%zz", "percent-escape"),
        (b"a/b", "must start with /"),
        (b"/caf\xc3\xa9", "non-ASCII"),
        # ".." to servlet containers, which drop path parameters before resolving
        (b"/api/..;/admin", "dot segment with parameters"),
        (b"/api/..;x=1/admin", "dot segment with parameters"),
        (b"/api/.;/admin", "dot segment with parameters"),
        (b"/api/..%3b/admin", "dot segment with parameters"),
        (b"/api/%2e%2e;/admin", "dot segment with parameters"),
        (b"/api/..;", "dot segment with parameters"),
        # "/admin" to servlet containers, and no segment name for a route to match
        (b"/;x/admin", "parameters alone"),
        (b"/a/;/b", "parameters alone"),
        (b"/;", "parameters alone"),
    ],
)
def test_refused_paths(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason.replace("\\", "\\\\")):
        canonical_path(raw)


def test_same_path_whatever_the_encoding() -> None:
    forms = [b"/admin", b"/x/../admin", b"//admin", b"/%61dmin", b"/./admin", b"/x/%2e%2e/admin"]
    assert {canonical_path(f) for f in forms} == {"/admin"}


def test_split_target() -> None:
    assert split_target(b"/a?b=1&c") == (b"/a", b"b=1&c")
    assert split_target(b"/a") == (b"/a", b"")
    with pytest.raises(BadRequest, match="fragment"):
        split_target(b"/a?x#frag")
    with pytest.raises(BadRequest, match="fragment"):
        canonical_path(b"/a#frag")
