"""The key-auth filter: hashed keys, header and query sources, identity hygiene, config
errors, and end to end through a running gateway.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest
import trio

from engine.errors import BadRequest, GatewayError, Unauthorized
from engine.exchange import Exchange, Headers, Identity, Response, UpstreamCall
from engine.schema import ConfigError, build
from engine.testing import build_filter, make_exchange, run_chain
from plugins._identity import inject_header
from plugins.jwt_auth import JwtAuth
from plugins.key_auth import KeyAuth, KeyAuthConfig, hash_key, new_key

ALICE_KEY = "alice-key-0123456789abcdef0123456789"
ALICE_OLD_KEY = "alice-old-key-0123456789abcdef01234"
BOB_KEY = "bob-key-0123456789abcdef0123456789ab"


def _config(**over: Any) -> dict[str, Any]:
    return {
        "consumers": [
            {
                "id": "alice",
                "key_sha256": [hash_key(ALICE_KEY), hash_key(ALICE_OLD_KEY).upper()],
                "groups": ["gold", "beta"],
            },
            {"id": "bob", "key_sha256": hash_key(BOB_KEY)},
        ],
        **over,
    }


def _filter(**over: Any) -> KeyAuth:
    f: KeyAuth = build_filter(KeyAuth, _config(**over))
    return f


def _run(f: KeyAuth, headers: list[tuple[str, str]] | None = None, query: str = "") -> Exchange:
    ex = make_exchange("GET", "/things", headers or [], query=query)
    f.on_request(ex)
    return ex


def _www(err: GatewayError) -> str:
    return dict(err.headers)[b"www-authenticate"].decode()


def test_hash_key_and_new_key() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    a, b = new_key(), new_key()
    assert a != b
    assert len(a) >= 43
    assert len(hash_key(a)) == 64


@pytest.mark.parametrize(
    ("headers", "query", "consumer"),
    [
        ([("X-API-Key", ALICE_KEY)], "", "alice"),
        ([("x-api-key", f"  {BOB_KEY} ")], "", "bob"),
        ([("X-API-Key", ALICE_OLD_KEY)], "", "alice"),  # a second key, during rotation
        ([], f"apikey={BOB_KEY}&page=2", "bob"),
        ([("X-API-Key", BOB_KEY)], f"apikey={ALICE_KEY}", "bob"),  # the header wins
    ],
)
def test_known_keys(headers: list[tuple[str, str]], query: str, consumer: str) -> None:
    ex = _run(_filter(query_param="apikey"), headers, query)
    assert ex.identity is not None
    assert ex.identity.consumer == consumer
    assert ex.identity.source == "key-auth"
    assert ex.request.headers.get_all("x-consumer-id") == [consumer.encode()]


@pytest.mark.parametrize(
    ("headers", "query", "error"),
    [
        ([], "", None),
        ([("X-API-Key", "")], "", None),
        ([("Authorization", f"Bearer {ALICE_KEY}")], "", None),
        ([("X-API-Key", "wrong")], "", "invalid_key"),
        ([("X-API-Key", ALICE_KEY + "x")], "", "invalid_key"),
        ([("X-API-Key", ALICE_KEY[:-1])], "", "invalid_key"),
        ([("X-API-Key", hash_key(ALICE_KEY))], "", "invalid_key"),  # the hash is not the key
        ([("X-API-Key", "x" * 5000)], "", "invalid_key"),
        ([("X-API-Key", "\xe9\xff")], "", "invalid_key"),
        ([], "apikey=nope", "invalid_key"),
    ],
)
def test_refused_keys(headers: list[tuple[str, str]], query: str, error: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        _run(_filter(query_param="apikey"), headers, query)
    www = _www(info.value)
    assert www.startswith('Key realm="filtergate"')
    if error is None:
        assert "error=" not in www
    else:
        assert f'error="{error}"' in www
    assert ALICE_KEY not in info.value.message


def test_ambiguous_keys_are_a_bad_request() -> None:
    f = _filter(query_param="apikey")
    with pytest.raises(BadRequest):
        _run(f, [("X-API-Key", ALICE_KEY), ("X-API-Key", BOB_KEY)])
    with pytest.raises(BadRequest):
        _run(f, [], f"apikey={ALICE_KEY}&apikey={BOB_KEY}")


def test_spoofed_identity_headers_are_replaced() -> None:
    spoof = [
        ("X-Consumer-Id", "admin"),
        ("X-Consumer-Groups", "root"),
        ("X-User-Id", "admin"),
        ("X-Auth-Role", "admin"),
        ("X-Tenant", "t1"),
    ]
    ex = _run(_filter(strip_headers=["X-Tenant"]), [*spoof, ("X-API-Key", ALICE_KEY)])
    h = ex.request.headers
    assert h.get_all("x-consumer-id") == [b"alice"]
    assert h.get_all("x-consumer-groups") == [b"gold,beta"]
    assert "x-user-id" not in h
    assert "x-auth-role" not in h
    assert "x-tenant" not in h
    assert h.get("x-api-key") == ALICE_KEY.encode()  # hide_credentials is off by default
    assert ex.identity == Identity(consumer="alice", groups=("gold", "beta"), source="key-auth")
    ex = _run(_filter(), [*spoof, ("X-API-Key", BOB_KEY)])
    assert "x-consumer-groups" not in ex.request.headers  # bob has no groups


def test_custom_headers_and_anonymous() -> None:
    f = _filter(
        header="Api-Token",
        consumer_header="X-Client",
        groups_header="",
        allow_anonymous=True,
    )
    ex = _run(f, [("Api-Token", ALICE_KEY), ("X-Client", "admin")])
    assert ex.request.headers.get_all("x-client") == [b"alice"]
    assert "x-consumer-groups" not in ex.request.headers
    ex = _run(f, [("X-Client", "admin"), ("X-Consumer-Id", "admin")])
    assert ex.identity is None
    assert "x-client" not in ex.request.headers
    assert "x-consumer-id" not in ex.request.headers
    with pytest.raises(Unauthorized):
        _run(f, [("Api-Token", "wrong")])  # a wrong key is refused even for anonymous routes


def test_hide_credentials() -> None:
    f = _filter(query_param="api key", hide_credentials=True)
    ex = _run(f, [("X-API-Key", ALICE_KEY)], "a=1")
    assert "x-api-key" not in ex.request.headers
    ex = _run(f, [], f"a=1&api+key={ALICE_KEY}&b=2")
    assert ex.request.raw_query == b"a=1&b=2"
    assert ex.request.query == {"a": ["1"], "b": ["2"]}


def test_a_credential_header_in_the_strip_list_is_still_read() -> None:
    # "X-Auth-*" is in the default strip list; the filter's own key header is exempt.
    ex = _run(_filter(header="X-Auth-Key"), [("X-Auth-Key", ALICE_KEY)])
    assert ex.identity is not None


async def test_jwt_and_key_auth_on_one_route_both_hold() -> None:
    import jwt as pyjwt

    secret = "0123456789abcdef0123456789abcdef"
    token = pyjwt.encode({"sub": "carol", "exp": 2**40}, secret, algorithm="HS256")
    jwt_auth = build_filter(JwtAuth, {"issuers": [{"algorithms": ["HS256"], "secret": secret}]})
    key_auth = build_filter(KeyAuth, _config(header="X-Auth-Key"))
    seen: list[Headers] = []

    async def upstream(call: UpstreamCall) -> Response:
        seen.append(call.headers)
        return Response(200)

    headers = [
        ("Authorization", f"Bearer {token}"),
        ("X-Auth-Key", ALICE_KEY),
        ("X-User-Id", "admin"),
        ("X-Consumer-Id", "admin"),
    ]
    with trio.fail_after(5):
        ex = make_exchange("GET", "/", headers)
        resp = await run_chain([jwt_auth, key_auth], ex, upstream)
        assert resp.status == 200
        assert seen[0].get_all("x-user-id") == [b"carol"]
        assert seen[0].get_all("x-consumer-id") == [b"alice"]
        ex = make_exchange("GET", "/", headers[1:])
        assert (await run_chain([jwt_auth, key_auth], ex, upstream)).status == 401
        ex = make_exchange("GET", "/", [headers[0]])
        assert (await run_chain([key_auth, jwt_auth], ex, upstream)).status == 401


def test_keys_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthorized):
        _run(_filter(), [("X-API-Key", "guess-" + ALICE_KEY)])
    assert caplog.records
    assert ALICE_KEY not in caplog.text
    assert "sha256:" in caplog.text


def test_with_jwt_auth_on_the_same_route_neither_strips_the_other() -> None:
    # Both required: key-auth running after jwt-auth keeps the X-User-Id jwt-auth set.
    ex = make_exchange("GET", "/", [("X-API-Key", ALICE_KEY)])
    inject_header(ex, "X-User-Id", b"carol")  # as jwt-auth would have
    _filter().on_request(ex)
    assert ex.request.headers.get_all("x-user-id") == [b"carol"]


@pytest.mark.parametrize(
    ("config", "path", "message"),
    [
        ({"consumers": [{"id": "a"}]}, "plugins.key-auth.consumers[0].key_sha256", "missing"),
        (
            {"consumers": [{"id": "a", "key_sha256": ALICE_KEY}]},
            "plugins.key-auth.consumers[0].key_sha256",
            "hash-key",
        ),
        (
            {"consumers": [{"id": "a", "key_sha256": [hash_key("x"), "zz"]}]},
            "plugins.key-auth.consumers[0].key_sha256[1]",
            "64 hex digits",
        ),
        (
            {"consumers": [{"id": "a b", "key_sha256": hash_key("x")}]},
            "plugins.key-auth.consumers[0].id",
            "characters",
        ),
        (
            {
                "consumers": [
                    {"id": "a", "key_sha256": hash_key("x")},
                    {"id": "a", "key_sha256": hash_key("y")},
                ]
            },
            "plugins.key-auth.consumers[1].id",
            "already declared",
        ),
        (
            {
                "consumers": [
                    {"id": "a", "key_sha256": hash_key("x")},
                    {"id": "b", "key_sha256": hash_key("x")},
                ]
            },
            "plugins.key-auth.consumers[1].key_sha256",
            "already given",
        ),
        (
            {"consumers": [{"id": "a", "key_sha256": hash_key("x"), "groups": ["a,b"]}]},
            "plugins.key-auth.consumers[0].groups[0]",
            "group name",
        ),
        ({"header": "", "query_param": None}, "plugins.key-auth.header", "set a header"),
        ({"header": "X Key"}, "plugins.key-auth.header", "header name"),
        ({"consumer_header": "a:b"}, "plugins.key-auth.consumer_header", "header name"),
        ({"keys": []}, "plugins.key-auth.keys", "unknown key"),
    ],
)
def test_config_errors(config: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(KeyAuthConfig, config, "plugins.key-auth")
    assert info.value.path == path
    assert message in info.value.message


async def test_end_to_end_through_the_gateway() -> None:
    from engine.testing import http_request, open_gateway, open_stubs

    with trio.fail_after(20):
        async with open_stubs() as stubs:
            config = {
                "upstreams": {"echo": {"targets": [f"127.0.0.1:{stubs.ports['echo']}"]}},
                "plugins": {"key-auth": _config(hide_credentials=True)},
                "routes": [
                    {"name": "things", "prefix": "/things", "upstream": "echo"},
                    {
                        "name": "open",
                        "prefix": "/open",
                        "upstream": "echo",
                        "plugins": {"key-auth": {"enabled": False}},
                    },
                ],
            }
            async with open_gateway(config) as gw:
                headers = [("x-api-key", ALICE_KEY), ("x-consumer-id", "admin")]
                resp = await http_request(gw.port, "GET", "/things", headers=headers)
                assert resp.status == 200
                seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
                assert seen["x-consumer-id"] == "alice"
                assert seen["x-consumer-groups"] == "gold,beta"
                assert "x-api-key" not in seen

                resp = await http_request(gw.port, "GET", "/things")
                assert resp.status == 401
                assert resp.header("www-authenticate") == 'Key realm="filtergate"'

                bad = [("x-api-key", "guess")]
                resp = await http_request(gw.port, "GET", "/things", headers=bad)
                assert resp.status == 401
                assert resp.json()["error"]["code"] == "unauthorized"

                resp = await http_request(gw.port, "GET", "/open")
                assert resp.status == 200
