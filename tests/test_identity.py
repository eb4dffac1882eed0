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
from tests.upstreams import open_counting_upstream

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


def _either_config(echo: str, secret: str, key: str, either: bool) -> dict[str, object]:
    """jwt-auth (anonymous allowed) then key-auth on one route; ``either``: a caller
    jwt-auth identified needs no key, else both credentials are required."""
    return {
        "upstreams": {"echo": {"targets": [echo]}},
        "routes": [
            {
                "name": "api",
                "prefix": "/",
                "upstream": "echo",
                "plugins": {
                    "jwt-auth": {
                        "allow_anonymous": True,
                        "claims_to_headers": {"sub": "X-User-Id"},
                        "issuers": [{"algorithms": ["HS256"], "secret": secret}],
                    },
                    "key-auth": {
                        "skip_if_authenticated": either,
                        "consumers": [{"id": "billing-app", "key_sha256": hash_key(key)}],
                    },
                },
            }
        ],
    }


async def test_either_a_token_or_a_key_is_enough(stubs: Stubs) -> None:
    secret = "0123456789abcdef0123456789abcdef"
    key = "billing-key-0123456789abcdef0123456789"
    token = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    forged = pyjwt.encode({"sub": "admin", "exp": 2**40}, "another secret " * 3, algorithm="HS256")
    bearer = ("Authorization", f"Bearer {token}")
    with trio.fail_after(20):
        async with open_gateway(_either_config(stubs.target("echo"), secret, key, True)) as gw:

            async def call(*headers: tuple[str, str]) -> tuple[int, dict[str, str]]:
                r = await http_request(gw.port, "GET", "/x", list(headers))
                return r.status, dict(r.json()["headers"]) if r.status == 200 else {}

            status, seen = await call(bearer)  # a token alone
            assert status == 200
            assert seen["x-user-id"] == "carol"
            assert "x-consumer-id" not in seen
            status, seen = await call(("X-API-Key", key))  # a key alone
            assert status == 200
            assert seen["x-consumer-id"] == "billing-app"
            assert seen["x-api-key"] == key  # checked: forwarded (no hide_credentials)
            status, seen = await call(bearer, ("X-API-Key", "not the key"))
            assert status == 200  # identified by the token: the key is not looked at
            assert seen["x-user-id"] == "carol"
            assert "x-api-key" not in seen  # nor forwarded unchecked
            neither = await http_request(gw.port, "GET", "/x")
            assert neither.status == 401
            # every scheme the route accepts is offered, the anonymous one's first
            offered = [v for n, v in neither.headers if n.lower() == b"www-authenticate"]
            assert offered == [b'Bearer realm="filtergate"', b'Key realm="filtergate"']
            assert (await call(("Authorization", f"Bearer {forged}"), ("X-API-Key", key)))[0] == 401
            assert (await call(("X-User-Id", "admin"), ("X-API-Key", key)))[1].get(
                "x-user-id"
            ) is None  # a forged identity header is still stripped

        # Without skip_if_authenticated, both are required.
        async with open_gateway(_either_config(stubs.target("echo"), secret, key, False)) as gw:
            assert (await http_request(gw.port, "GET", "/x", [bearer])).status == 401
            both = [bearer, ("X-API-Key", key)]
            assert (await http_request(gw.port, "GET", "/x", both)).status == 200


async def test_either_a_key_or_a_token_the_other_way_round(stubs: Stubs) -> None:
    """key-auth first (anonymous allowed), jwt-auth second with skip_if_authenticated."""
    secret = "0123456789abcdef0123456789abcdef"
    key = "billing-key-0123456789abcdef0123456789"
    token = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {
                "name": "api",
                "prefix": "/",
                "upstream": "echo",
                "plugins": {
                    "key-auth": {
                        "allow_anonymous": True,
                        "consumers": [{"id": "billing-app", "key_sha256": hash_key(key)}],
                    },
                    "jwt-auth": {
                        "skip_if_authenticated": True,
                        "issuers": [{"algorithms": ["HS256"], "secret": secret}],
                    },
                },
            }
        ],
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            forged = pyjwt.encode({"sub": "admin"}, "not the secret " * 3, algorithm="HS256")
            with_key = [("X-API-Key", key), ("Authorization", f"Bearer {forged}")]
            r = await http_request(gw.port, "GET", "/x", with_key)
            assert r.status == 200
            # never forwarded unchecked, even without hide_credentials: the upstream
            # would read "admin" from a token nobody verified
            assert "authorization" not in dict(r.json()["headers"])
            # Basic credentials meant for the upstream are no token: they stay
            basic = [("X-API-Key", key), ("Authorization", "Basic dXNlcjpwYXNz")]
            r = await http_request(gw.port, "GET", "/x", basic)
            assert dict(r.json()["headers"])["authorization"] == "Basic dXNlcjpwYXNz"
            bearer = [("Authorization", f"Bearer {token}")]
            assert (await http_request(gw.port, "GET", "/x", bearer)).status == 200
            assert (await http_request(gw.port, "GET", "/x")).status == 401


async def test_a_skipping_plugin_leaves_the_credential_another_one_verified(
    stubs: Stubs,
) -> None:
    """jwt-auth and key-auth both read Authorization (a bearer token or a raw key): a
    token jwt-auth verified is forwarded (no hide_credentials), not taken for a key."""
    secret = "0123456789abcdef0123456789abcdef"
    key = "billing-key-0123456789abcdef0123456789"
    token = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    config = _either_config(stubs.target("echo"), secret, key, True)
    config["routes"][0]["plugins"]["key-auth"]["header"] = "Authorization"  # type: ignore[index]
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            r = await http_request(gw.port, "GET", "/x", [("Authorization", f"Bearer {token}")])
            assert r.status == 200
            assert dict(r.json()["headers"])["authorization"] == f"Bearer {token}"
            r = await http_request(gw.port, "GET", "/x", [("Authorization", key)])
            assert r.status == 200
            assert dict(r.json()["headers"])["x-consumer-id"] == "billing-app"


@pytest.mark.parametrize(
    ("plugin", "table", "path"),
    [
        (
            "jwt-auth",
            {"claims_to_headers": {"te": "Transfer-Encoding"}},
            "plugins.jwt-auth.claims_to_headers.te",
        ),
        (
            "jwt-auth",
            {"claims_to_headers": {"aud": "Host"}},
            "plugins.jwt-auth.claims_to_headers.aud",
        ),
        ("key-auth", {"consumer_header": "Content-Length"}, "plugins.key-auth.consumer_header"),
        ("key-auth", {"groups_header": "connection"}, "plugins.key-auth.groups_header"),
    ],
)
def test_identity_headers_never_frame_the_request(
    plugin: str, table: dict[str, object], path: str
) -> None:
    """A claim injected as Transfer-Encoding (or a second Content-Length) would smuggle
    a request to the upstream: the framing headers and Host are refused at load."""
    from engine.schema import ConfigError, build
    from plugins.jwt_auth.config import JwtAuthConfig
    from plugins.key_auth import KeyAuthConfig

    base: dict[str, object] = (
        {"issuers": [{"algorithms": ["HS256"], "secret": "0123456789abcdef" * 2}]}
        if plugin == "jwt-auth"
        else {"consumers": [{"id": "app", "key_sha256": "0" * 64}]}
    )
    schema = JwtAuthConfig if plugin == "jwt-auth" else KeyAuthConfig
    with pytest.raises(ConfigError, match="managed by the gateway") as info:
        build(schema, {**base, **table}, f"plugins.{plugin}")
    assert info.value.path == path


async def test_no_unverified_token_gets_past_in_another_spelling(stubs: Stubs) -> None:
    """What an upstream would read as a token is what jwt-auth verifies or removes: a
    cookie name with a space before "=" (servers trim it), a TAB after the scheme, every
    field of a custom token header on the skipping path."""
    secret = "0123456789abcdef0123456789abcdef"
    key = "billing-key-0123456789abcdef0123456789"
    valid = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    forged = pyjwt.encode({"sub": "admin", "exp": 2**40}, "not the secret " * 3, algorithm="HS256")
    jwt = {
        "header": "X-Access-Token",
        "cookie": "token",
        "issuers": [{"algorithms": ["HS256"], "secret": secret}],
    }
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {
                "name": "either",
                "prefix": "/either",
                "upstream": "echo",
                "plugins": {
                    "key-auth": {
                        "allow_anonymous": True,
                        "consumers": [{"id": "billing-app", "key_sha256": hash_key(key)}],
                    },
                    "jwt-auth": {**jwt, "skip_if_authenticated": True},
                },
            },
            {
                "name": "open",
                "prefix": "/open",
                "upstream": "echo",
                "plugins": {"jwt-auth": {**jwt, "allow_anonymous": True}},
            },
        ],
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:

            async def call(path: str, *headers: tuple[str, str]) -> tuple[int, list[list[str]]]:
                r = await http_request(gw.port, "GET", path, list(headers))
                return r.status, r.json()["header_list"] if r.status == 200 else []

            status, seen = await call(
                "/either",
                ("X-API-Key", key),
                ("X-Access-Token", "Basic dXNlcjpwYXNz"),
                ("X-Access-Token", f"Bearer {forged}"),
                ("Cookie", f"token ={forged}; theme=dark"),
            )
            assert status == 200
            assert [v for n, v in seen if n == "x-access-token"] == ["Basic dXNlcjpwYXNz"]
            assert [v for n, v in seen if n == "cookie"] == ["theme=dark"]

            # Where the token is read: a TAB is a separator, a spaced name the cookie.
            assert (await call("/open", ("X-Access-Token", f"Bearer\t{forged}")))[0] == 401
            assert (await call("/open", ("X-Access-Token", f"Bearer\t{valid}")))[0] == 200
            two = ("Cookie", f"token ={forged}; token={valid}")
            assert (await call("/open", two))[0] == 400  # two token cookies: ambiguous
            assert (await call("/open", ("Cookie", f"token ={valid}")))[0] == 200


async def test_an_open_route_to_a_guarded_upstream_strips_identity_headers(
    stubs: Stubs,
) -> None:
    """The service trusts the X-User-Id its guarded route injects: a client sent its own
    through an open route beside it (by the same upstream, another name for it, or an
    aggregate call), and the service believed it."""
    key = "k-0123456789abcdef0123456789abcdef"
    async with open_counting_upstream() as elsewhere:
        config = {
            "upstreams": {
                "app": {"targets": [stubs.target("echo")]},
                "alias": {"targets": [stubs.target("echo")]},  # the same service
                "other": {"targets": [elsewhere.target]},  # another one
            },
            "routes": [
                {
                    "name": "guarded",
                    "prefix": "/admin",
                    "upstream": "app",
                    "plugins": {
                        "key-auth": {
                            "consumers": [{"id": "alice", "key_sha256": hash_key(key)}],
                            "consumer_header": "X-Tenant-User",
                        }
                    },
                },
                {"name": "open", "prefix": "/", "upstream": "app"},
                {"name": "by-alias", "prefix": "/alias", "upstream": "alias"},
                {
                    "name": "bff",
                    "prefix": "/bff",
                    "plugins": {
                        "aggregate": {
                            "calls": [
                                {
                                    "name": "me",
                                    "upstream": "app",
                                    "path": "/me",
                                    "forward_headers": ["x-user-id"],
                                }
                            ]
                        }
                    },
                },
                {"name": "elsewhere", "prefix": "/other", "upstream": "other"},
            ],
        }
        spoofed = [("X-User-Id", "admin"), ("X-Tenant-User", "alice"), ("X-Mine", "1")]
        with trio.fail_after(10):
            async with open_gateway(config) as gw:
                opened = await http_request(gw.port, "GET", "/public", spoofed)
                auth = [*spoofed, ("X-API-Key", key)]
                guarded = await http_request(gw.port, "GET", "/admin", auth)
                alias = await http_request(gw.port, "GET", "/alias", spoofed)
                bff = await http_request(gw.port, "GET", "/bff", spoofed)
                other = await http_request(gw.port, "GET", "/other", spoofed)
    seen = opened.json()["headers"]
    assert "x-user-id" not in seen
    assert "x-tenant-user" not in seen  # what the guarded route's key-auth injects
    assert seen["x-mine"] == "1"
    assert guarded.json()["headers"]["x-tenant-user"] == "alice"  # injected, verified
    assert "x-user-id" not in guarded.json()["headers"]
    assert "x-user-id" not in alias.json()["headers"]
    assert "x-user-id" not in bff.json()["me"]["headers"]
    # Another service is no neighbour of the guarded route: as sent.
    assert other.status == 200
    assert elsewhere.requests[-1].header("x-user-id") == "admin"
