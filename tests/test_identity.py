"""Identity hygiene shared by the auth plugins (plugins/_identity.py): what is stripped,
what is kept, and what is remembered as injected."""

from __future__ import annotations

import jwt as pyjwt
import pytest
import trio

from engine.exchange import checked_field
from engine.testing import Stubs, http_request, make_exchange, open_gateway
from plugins._identity import (
    INJECTED_HEADERS,
    HeaderPatterns,
    inject_checked_headers,
    inject_header,
    inject_headers,
    strip_identity_headers,
)
from plugins.key_auth import hash_key

PATTERNS = HeaderPatterns(["X-User-Id", "X-Auth-*", "X-Strip-Test-Key"])


@pytest.mark.parametrize(
    ("patterns", "matching", "other"),
    [
        (["X-User-Id", "X-Auth-*"], ["x-user-id", "x-auth-", "x-auth-user"], ["x-auth", "x-authx"]),
        # Prefixes of different lengths: the short one must not hide the long one.
        (["X-*", "Remote-User-Long-*"], ["x-", "x-a", "remote-user-long-1"], ["remote-user", "y"]),
        (["X-Ab-*", "X-Abcdef-*"], ["x-ab-1", "x-abcdef-", "x-abcdef-2"], ["x-abc", "x-abcdef"]),
        (["Only-Exact"], ["only-exact"], ["only-exact-no", "only-exac", ""]),
        ([], [], ["x-user-id", ""]),
    ],
)
def test_header_patterns(patterns: list[str], matching: list[str], other: list[str]) -> None:
    compiled = HeaderPatterns(patterns)
    for name in matching:
        assert compiled(name.encode())
        assert compiled.any_of([(b"accept", b"v"), (name.encode(), b"v")])
    for name in other:
        assert not compiled(name.encode())
    assert not compiled.any_of([(n.encode(), b"v") for n in other])


@pytest.mark.parametrize(
    ("headers", "kept", "removed"),
    [
        ([], [], 0),
        ([("accept", "*/*"), ("x-other", "1")], ["accept", "x-other"], 0),
        ([("x-user-id", "a"), ("accept", "*/*"), ("x-user-id", "b")], ["accept"], 2),
        ([("x-auth-user", "a"), ("x-auth", "b"), ("x-authx", "c")], ["x-auth", "x-authx"], 1),
        # A credential header a filter on the route reads is never stripped.
        ([("x-strip-test-key", "k"), ("x-user-id", "a")], ["x-strip-test-key"], 1),
    ],
)
def test_strip_identity_headers(
    headers: list[tuple[str, str]], kept: list[str], removed: int
) -> None:
    ex = make_exchange(headers=headers)
    ex.credential_headers = frozenset({b"x-strip-test-key"})
    assert strip_identity_headers(ex, PATTERNS) == removed
    assert [n.decode() for n, _ in ex.request.headers] == kept


def test_a_credential_header_is_kept_only_where_a_filter_reads_it() -> None:
    headers = [("x-strip-test-key", "k")]
    elsewhere = make_exchange(headers=headers)  # a route where no filter reads it
    assert strip_identity_headers(elsewhere, PATTERNS) == 1
    own = make_exchange(headers=headers)  # the calling filter's own credential
    assert strip_identity_headers(own, PATTERNS, frozenset({b"x-strip-test-key"})) == 0


async def test_a_header_read_on_one_route_is_stripped_on_another(stubs: Stubs) -> None:
    # Route "jwt" reads its token from X-Auth-Token; route "key" has key-auth only,
    # whose default strip list has X-Auth-*: a forged X-Auth-Token must not reach it.
    secret = "0123456789abcdef0123456789abcdef"
    key = "alice-key-0123456789abcdef0123456789"
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {
                "name": "jwt",
                "prefix": "/jwt",
                "upstream": "echo",
                "plugins": {
                    "jwt-auth": {
                        "header": "X-Auth-Token",
                        "issuers": [{"algorithms": ["HS256"], "secret": secret}],
                    }
                },
            },
            {
                "name": "key",
                "prefix": "/key",
                "upstream": "echo",
                "plugins": {
                    "key-auth": {"consumers": [{"id": "alice", "key_sha256": hash_key(key)}]}
                },
            },
        ],
    }
    token = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            on_jwt = await http_request(
                gw.port, "GET", "/jwt/x", [("X-Auth-Token", f"Bearer {token}")]
            )
            forged = [("X-API-Key", key), ("X-Auth-Token", "forged")]
            on_key = await http_request(gw.port, "GET", "/key/x", forged)
    assert on_jwt.status == 200
    assert dict(on_jwt.json()["headers"]).get("x-auth-token") == f"Bearer {token}"  # kept
    assert on_key.status == 200
    assert "x-auth-token" not in dict(on_key.json()["headers"])


def test_what_an_earlier_auth_filter_injected_is_kept() -> None:
    ex = make_exchange(headers=[("X-User-Id", "spoofed"), ("X-Auth-Scope", "all")])
    assert strip_identity_headers(ex, PATTERNS) == 2
    inject_header(ex, "X-User-Id", b"alice")
    assert strip_identity_headers(ex, PATTERNS) == 0  # a second auth filter's strip
    assert ex.request.headers.items == [(b"x-user-id", b"alice")]


def test_inject_headers_sets_and_remembers() -> None:
    ex = make_exchange(headers=[("x-user-id", "old"), ("x-user-id", "older"), ("accept", "*/*")])
    inject_headers(ex, [])
    assert INJECTED_HEADERS not in ex.stash  # nothing injected, nothing remembered
    inject_headers(ex, [(b"x-user-id", b"alice"), (b"x-user-groups", b"a,b")])
    inject_header(ex, "X-Tenant", b"acme")
    assert ex.request.headers.items == [
        (b"accept", b"*/*"),
        (b"x-user-id", b"alice"),
        (b"x-user-groups", b"a,b"),
        (b"x-tenant", b"acme"),
    ]
    assert ex.stash[INJECTED_HEADERS] == {b"x-user-id", b"x-user-groups", b"x-tenant"}


def test_inject_checked_headers_sets_and_remembers_like_inject_headers() -> None:
    ex = make_exchange(headers=[("x-user-id", "old"), ("accept", "*/*")])
    inject_checked_headers(ex, [])
    assert INJECTED_HEADERS not in ex.stash
    inject_checked_headers(ex, [checked_field(b"x-user-id", b"alice")])
    inject_header(ex, "X-Tenant", b"acme")
    assert ex.request.headers.items == [
        (b"accept", b"*/*"),
        (b"x-user-id", b"alice"),
        (b"x-tenant", b"acme"),
    ]
    assert ex.stash[INJECTED_HEADERS] == {b"x-user-id", b"x-tenant"}
