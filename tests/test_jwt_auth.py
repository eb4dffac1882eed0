"""The jwt-auth filter: a table of tokens, claims and scopes, identity hygiene, config
errors, a JWKS URL served by a real local HTTP server, and end to end through a gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import socket
import ssl
import subprocess
import sys
import time
import types
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import jwt
import pytest
import tomli_w
import trio
import trio.testing
import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import der_to_raw_signature

from engine.chain import FilterContext, compile_chain, run_request_phases
from engine.errors import BadRequest, Forbidden, GatewayError, ServiceUnavailable, Unauthorized
from engine.exchange import Exchange, Headers, Identity, Request, Timings
from engine.schema import ConfigError, build
from engine.testing import free_port as _free_port
from plugins import jwt_auth as jwt_auth_module
from plugins._fetch import FetchError, fetch
from plugins._identity import (
    DEFAULT_IDENTITY_HEADERS,
    INJECTED_HEADERS,
    HeaderPatterns,
    challenge,
    header_value,
)
from plugins.jwt_auth import JwtAuth, JwtAuthConfig
from plugins.jwt_auth.claims import (
    AuthFailure,
    check_times,
    granted_roles,
    granted_scopes,
    parse_unverified,
)

ISS = "https://idp.example.test/"
AUD = "orders-api"
SECRET = "s3cret-that-is-long-enough-for-hs256!!"  # >= 32 bytes (RFC 7518 §3.2)

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())
EC_P384 = ec.generate_private_key(ec.SECP384R1())
ED_A = ed25519.Ed25519PrivateKey.generate()
# Under the 2048 bits RFC 7518 §3.3 requires of RS*/PS* keys: never to be trusted.
RSA_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _pem(key: Any) -> str:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode()


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**d, "kid": kid, "use": "sig"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "scope": "orders:read orders:write",
        "roles": ["gold"],
    }
    for k, v in over.items():
        if v is None:
            claims.pop(k, None)
        else:
            claims[k] = v
    return claims


def _token(key: Any = RSA_A, alg: str = "RS256", kid: str | None = "k1", **over: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    # PyJWS, not jwt.encode: tests need claims pyjwt would refuse to encode.
    payload = json.dumps(_claims(**over)).encode()
    return jwt.PyJWS().encode(payload, key, algorithm=alg, headers=headers)


def _weak_token(**over: Any) -> str:
    """A token signed by :data:`RSA_1024` (pyjwt warns when it signs with it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _token(key=RSA_1024, **over)


def _raw_token(header: dict[str, Any], payload: Any, sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _hs256_with(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda msg: hmac.new(secret, msg, hashlib.sha256).digest()


def _rsa_config(**over: Any) -> dict[str, Any]:
    issuer = {"issuer": ISS, "algorithms": ["RS256"], "public_keys": [_pem(RSA_A)], "audience": AUD}
    issuer.update(over.pop("issuer_over", {}))
    return {"issuers": [issuer], **over}


def _filter(config: dict[str, Any]) -> JwtAuth:
    cfg = build(JwtAuthConfig, config, "plugins.jwt-auth")
    return JwtAuth(cfg, FilterContext("jwt-auth", "global"))


def _exchange(headers: list[tuple[str, str]] | None = None) -> Exchange:
    request = Request(
        method=b"GET",
        path="/orders",
        raw_query=b"",
        headers=Headers([(k.lower().encode(), v.encode()) for k, v in headers or []]),
        http_version=b"1.1",
        client="127.0.0.1",
        peer=("127.0.0.1", 5555),
    )
    return Exchange(request=request, request_id="test", timings=Timings(start=0.0))


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


async def _request_phase(f: JwtAuth, ex: Exchange) -> None:
    """``f``'s request side as the engine runs it: a plain call for static keys, an
    await with a JWKS URL (the instance decides which at load)."""
    answer, _depth = await run_request_phases(compile_chain([f]), ex)
    assert answer is None


async def _run(f: JwtAuth, headers: list[tuple[str, str]]) -> Exchange:
    ex = _exchange(headers)
    await _request_phase(f, ex)
    return ex


def _www(err: GatewayError) -> str:
    return dict(err.headers)[b"www-authenticate"].decode()


# -- the table of tokens -----------------------------------------------------------------


def _now() -> int:
    """Epoch seconds when a token is made: a constant taken at import would age while
    other tests run first, and a token 5 s past exp would leave the 30 s leeway."""
    return int(time.time())


def _json_array_payload() -> str:
    return _raw_token({"alg": "RS256", "kid": "k1"}, [1, 2, 3], lambda m: b"sig")


def _alg_none(alg: str) -> str:
    return _raw_token({"alg": alg}, _claims(), lambda m: b"")


def _key_confusion() -> str:
    # HS256 "signed" with the RSA public key as the HMAC secret (RFC 8725 §2.1).
    return _raw_token({"alg": "HS256", "kid": "k1"}, _claims(), _hs256_with(_pem(RSA_A).encode()))


def _typed(typ: Any) -> str:
    """A valid token whose header's ``typ`` is ``typ`` (None: no typ at all)."""
    payload = json.dumps(_claims()).encode()
    return jwt.PyJWS().encode(payload, RSA_A, algorithm="RS256", headers={"kid": "k1", "typ": typ})


TOKENS: list[tuple[str, Callable[[], str], str | None]] = [
    ("valid", lambda: _token(), None),
    ("valid, no kid", lambda: _token(kid=None), None),
    ("expired", lambda: _token(exp=_now() - 3600), "the token has expired"),
    ("expired within leeway", lambda: _token(exp=_now() - 5), None),
    ("not yet valid", lambda: _token(nbf=_now() + 3600), "the token is not valid yet"),
    ("issued in the future", lambda: _token(iat=_now() + 3600), "issued in the future"),
    ("wrong issuer", lambda: _token(iss="https://evil.example/"), "untrusted issuer"),
    ("iss not a string", lambda: _token(iss=["x"]), "iss claim is not a string"),
    ("wrong audience", lambda: _token(aud="billing-api"), "invalid audience"),
    ("no audience", lambda: _token(aud=None), "the token has no aud claim"),
    ("missing exp", lambda: _token(exp=None), "the token has no exp claim"),
    ("exp not a number", lambda: _token(exp="tomorrow"), "exp claim is not a number"),
    ("exp is true", lambda: _token(exp=True), "exp claim is not a number"),
    ("missing sub", lambda: _token(sub=None), "the token has no sub claim"),
    ("bad signature", lambda: _token(key=RSA_B), "invalid signature"),
    ("alg none", lambda: _alg_none("none"), "algorithm not allowed"),
    ("alg None", lambda: _alg_none("None"), "algorithm not allowed"),
    ("alg missing", lambda: _raw_token({"typ": "JWT"}, _claims(), lambda m: b""), "malformed"),
    ("HMAC with the RSA public key", _key_confusion, "algorithm not allowed"),
    ("EC token, RS256 issuer", lambda: _token(key=EC_A, alg="ES256"), "algorithm not allowed"),
    ("PS256 not in allow-list", lambda: _token(alg="PS256"), "algorithm not allowed"),
    ("malformed base64", lambda: "eyJhbGciOiJSUzI1NiJ9.!!!not-base64!!!.c2ln", "malformed"),
    ("base64 of junk", lambda: ".".join(_b64(b) for b in (b"\xff\xfe", b"junk", b"x")), "malf"),
    ("one segment", lambda: "abc", "malformed"),
    ("five segments (JWE)", lambda: "a.b.c.d.e", "malformed"),
    ("empty segments", lambda: "..", "malformed"),
    ("non-ascii", lambda: "é.é.é", "malformed"),
    ("json array payload", _json_array_payload, "malformed"),
    ("header is a string", lambda: ".".join((_b64(b'"x"'), _b64(b"{}"), "")), "malformed"),
    ("kid is a number", lambda: _raw_token({"alg": "RS256", "kid": 3}, _claims(), bytes), "malf"),
    ("deeply nested", lambda: ".".join((_b64(b"[" * 5000), _b64(b"{}"), "")), "malformed"),
    ("oversized", lambda: _token(pad="x" * 9000), "the token is too large"),
    # RFC 8725 §3.11: tokens typed for another purpose are not access tokens.
    ("typ JWT", lambda: _typed("JWT"), None),
    ("no typ", lambda: _typed(None), None),
    ("typ at+jwt", lambda: _typed("at+jwt"), None),
    ("typ application/AT+JWT", lambda: _typed("application/AT+JWT"), None),
    ("typ dpop+jwt (a DPoP proof)", lambda: _typed("dpop+jwt"), "unexpected token type"),
    ("typ logout+jwt", lambda: _typed("logout+jwt"), "unexpected token type"),
    ("typ not a string", lambda: _typed(["JWT"]), "unexpected token type"),
]


@pytest.mark.parametrize(("name", "make", "error"), TOKENS, ids=[t[0] for t in TOKENS])
async def test_token_table(name: str, make: Callable[[], str], error: str | None) -> None:
    with trio.fail_after(5):
        ex = await _admitted_unless(error, _filter(_rsa_config()), make())
        if ex is not None:
            assert ex.identity is not None
            assert ex.identity.consumer == "alice"
            assert ex.request.headers.get("x-user-id") == b"alice"


async def _admitted_unless(error: str | None, f: JwtAuth, token: str) -> Exchange | None:
    """The exchange ``f`` admitted with ``token`` when ``error`` is ``None``; else
    ``None``, once ``f`` refused it with a 401 ``invalid_token`` that says ``error``."""
    if error is None:
        return await _run(f, _bearer(token))
    with pytest.raises(Unauthorized) as info:
        await _run(f, _bearer(token))
    www = _www(info.value)
    assert www.startswith('Bearer realm="filtergate", error="invalid_token"'), www
    assert error in www
    assert token not in info.value.message
    return None


async def test_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    f = _filter(_rsa_config())
    tokens = [_token(exp=_now() - 3600), _token(key=RSA_B), _key_confusion()]
    with trio.fail_after(5):
        for token in tokens:
            with pytest.raises(Unauthorized):
                await _run(f, _bearer(token))
    assert caplog.records
    for token in tokens:
        assert token not in caplog.text
        assert token.rsplit(".", 1)[-1] not in caplog.text
    assert "sha256:" in caplog.text


async def test_random_garbage_is_always_a_401() -> None:
    # Whatever the token holds, the answer is a 401 (never a 500 from an escaped exception).
    f = _filter(_rsa_config())
    rng = random.Random(4)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/"
    good = _token()
    with trio.fail_after(10):
        for i in range(400):
            if i % 2:
                token = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
            else:  # a valid token with bytes flipped: always refused
                chars = list(good)
                for _ in range(rng.randint(1, 5)):
                    chars[rng.randrange(len(chars))] = rng.choice(alphabet)
                token = "".join(chars)
                if token == good:
                    continue
            with pytest.raises(Unauthorized):
                await _run(f, _bearer(token))


async def test_every_algorithm_family_verifies() -> None:
    config = {
        "issuers": [
            {"issuer": "https://hs/", "algorithms": ["HS256", "HS512"], "secret": SECRET * 2},
            {
                "issuer": "https://rsa/",
                "algorithms": ["RS256", "PS384"],
                "public_keys": [_pem(RSA_A)],
            },
            {"issuer": "https://ec/", "algorithms": ["ES256"], "public_keys": [_pem(EC_A)]},
            {"issuer": "https://ed/", "algorithms": ["EdDSA"], "public_keys": [_pem(ED_A)]},
        ]
    }
    f = _filter(config)
    cases = [
        ((SECRET * 2).encode(), "HS256", "https://hs/"),
        ((SECRET * 2).encode(), "HS512", "https://hs/"),
        (RSA_A, "RS256", "https://rsa/"),
        (RSA_A, "PS384", "https://rsa/"),
        (EC_A, "ES256", "https://ec/"),
        (ED_A, "EdDSA", "https://ed/"),
    ]
    with trio.fail_after(5):
        for key, alg, iss in cases:
            ex = await _run(f, _bearer(_token(key=key, alg=alg, iss=iss, aud=None)))
            assert ex.identity is not None, alg
            assert ex.identity.claims["iss"] == iss
        # One issuer's key never verifies another issuer's tokens.
        forged = _token(key=(SECRET * 2).encode(), alg="HS256", iss="https://rsa/", aud=None)
        with pytest.raises(Unauthorized, match="algorithm not allowed"):
            await _run(f, _bearer(forged))


async def test_hmac_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FG_TEST_JWT_SECRET", SECRET)
    f = _filter({"issuers": [{"algorithms": ["HS256"], "secret_env": "FG_TEST_JWT_SECRET"}]})
    with trio.fail_after(5):
        # The only issuer has no `issuer`: iss is not checked.
        ex = await _run(f, _bearer(_token(key=SECRET.encode(), alg="HS256", iss="anything")))
        assert ex.identity is not None
        with pytest.raises(Unauthorized, match="invalid signature"):
            await _run(f, _bearer(_token(key=(SECRET + "x").encode(), alg="HS256")))


async def test_jwks_file_and_unknown_kid(tmp_path: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(RSA_A, "k1"), _jwk(EC_A, "e1")]}))
    f = _filter(
        {"issuers": [{"issuer": ISS, "algorithms": ["RS256", "ES256"], "jwks_file": str(path)}]}
    )
    with trio.fail_after(5):
        assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
        ec_token = _token(key=EC_A, alg="ES256", kid="e1", aud=None)
        assert (await _run(f, _bearer(ec_token))).identity is not None
        with pytest.raises(Unauthorized, match="unknown key id"):
            await _run(f, _bearer(_token(kid="nope", aud=None)))
        # The right kid with the wrong key type: the EC key cannot verify RS256.
        with pytest.raises(Unauthorized, match="unknown key id"):
            await _run(f, _bearer(_token(kid="e1", aud=None)))


# -- identity, hygiene, scopes -----------------------------------------------------------


async def test_token_types_are_configurable_per_issuer() -> None:
    only_events = _filter(_rsa_config(issuer_over={"token_types": ["application/secevent+jwt"]}))
    any_type = _filter(_rsa_config(issuer_over={"token_types": []}))
    with trio.fail_after(5):
        await _admitted_unless(None, only_events, _typed("secevent+jwt"))
        await _admitted_unless(None, only_events, _typed(None))
        await _admitted_unless("unexpected token type", only_events, _typed("JWT"))
        await _admitted_unless(None, any_type, _typed("dpop+jwt"))


async def test_consumer_prefix_keeps_two_issuers_consumers_apart() -> None:
    other = "https://partner.example/"
    f = _filter(
        {
            "issuers": [
                {
                    "issuer": ISS,
                    "algorithms": ["RS256"],
                    "public_keys": [_pem(RSA_A)],
                    "consumer_prefix": "idp:",
                },
                {
                    "issuer": other,
                    "algorithms": ["RS256"],
                    "public_keys": [_pem(RSA_B)],
                    "consumer_prefix": "partner:",
                },
            ]
        }
    )
    with trio.fail_after(5):
        ours = await _run(f, _bearer(_token(sub="alice")))
        theirs = await _run(f, _bearer(_token(key=RSA_B, iss=other, sub="alice")))
    assert ours.identity is not None
    assert theirs.identity is not None
    assert (ours.identity.consumer, theirs.identity.consumer) == ("idp:alice", "partner:alice")
    # The claim itself goes upstream as it is: X-User-Id is the sub claim.
    assert theirs.request.headers.get("x-user-id") == b"alice"


async def test_spoofed_identity_headers_are_replaced() -> None:
    f = _filter(_rsa_config(claims_to_headers={"sub": "X-User-Id", "roles": "X-User-Roles"}))
    spoof = [
        ("X-User-Id", "admin"),
        ("x-user-id", "root"),
        ("X-Consumer-Id", "admin"),
        ("X-Authenticated-Userid", "admin"),
        ("X-Forwarded-User", "admin"),
        ("X-Other", "kept"),
    ]
    with trio.fail_after(5):
        ex = await _run(f, [*spoof, *_bearer(_token())])
        h = ex.request.headers
        assert h.get_all("x-user-id") == [b"alice"]
        assert h.get("x-user-roles") == b"gold"
        assert "x-consumer-id" not in h
        assert "x-authenticated-userid" not in h
        assert "x-forwarded-user" not in h
        assert h.get("x-other") == b"kept"
        assert h.get("authorization") is not None  # hide_credentials is off by default
        assert ex.identity == Identity(
            consumer="alice",
            groups=("gold",),
            scopes=("orders:read", "orders:write"),
            claims=ex.identity.claims if ex.identity else {},
            source="jwt-auth",
        )


async def test_a_remembered_token_strips_and_injects_like_a_fresh_one() -> None:
    f = _filter(_rsa_config(claims_to_headers={"sub": "X-User-Id", "roles": "X-User-Roles"}))
    token = _token()
    with trio.fail_after(5):
        for _ in range(3):  # verified, then twice from the cache
            ex = await _run(f, [("X-User-Id", "admin"), ("X-Auth-User", "x"), *_bearer(token)])
            h = ex.request.headers
            assert h.get_all("x-user-id") == [b"alice"]
            assert h.get_all("x-user-roles") == [b"gold"]
            assert "x-auth-user" not in h
            assert ex.stash.get(INJECTED_HEADERS) == {b"x-user-id", b"x-user-roles"}
        assert len(f._verified) == 1
        # No spoofable header at all: nothing stripped, the rest kept in order.
        ex = await _run(f, [("Accept", "*/*"), *_bearer(token), ("X-Other", "1")])
        assert [n for n, _ in ex.request.headers] == [
            b"accept",
            b"authorization",
            b"x-other",
            b"x-user-id",
            b"x-user-roles",
        ]


async def test_missing_token_and_anonymous() -> None:
    strict = _filter(_rsa_config())
    anonymous = _filter(_rsa_config(allow_anonymous=True))
    with trio.fail_after(5):
        for headers in ([], [("Authorization", "Basic YTpi")], [("Authorization", "Bearer ")]):
            with pytest.raises(Unauthorized) as info:
                await _run(strict, headers)
            # RFC 6750 §3.1: no error code when the request had no credentials.
            assert _www(info.value) == 'Bearer realm="filtergate"'
            ex = await _run(anonymous, [*headers, ("X-User-Id", "admin")])
            assert ex.identity is None
            assert "x-user-id" not in ex.request.headers
        # An invalid token is refused even where anonymous access is allowed.
        with pytest.raises(Unauthorized, match="expired"):
            await _run(anonymous, _bearer(_token(exp=_now() - 3600)))


async def test_two_authorization_headers_are_a_bad_request() -> None:
    f = _filter(_rsa_config())
    with trio.fail_after(5), pytest.raises(BadRequest) as info:
        await _run(f, [*_bearer(_token()), *_bearer(_token(sub="bob"))])
    assert 'error="invalid_request"' in _www(info.value)
    assert info.value.close is False


@pytest.mark.parametrize(
    ("required", "match", "claims", "ok"),
    [
        (["orders:read"], "all", {"scope": "orders:read orders:write"}, True),
        (["orders:read", "admin"], "all", {"scope": "orders:read"}, False),
        (["orders:read", "admin"], "any", {"scope": "orders:read"}, True),
        (["admin"], "any", {"scope": "orders:read"}, False),
        (["orders:read"], "all", {"scope": None, "scp": ["orders:read"]}, True),
        (["orders:read"], "all", {"scope": None}, False),
        (["orders:read"], "all", {"scope": 42}, False),
    ],
)
async def test_required_scopes(
    required: list[str], match: str, claims: dict[str, Any], ok: bool
) -> None:
    f = _filter(_rsa_config(required_scopes=required, scope_match=match))
    token = _token(**claims)
    with trio.fail_after(5):
        if ok:
            assert (await _run(f, _bearer(token))).identity is not None
            return
        with pytest.raises(Forbidden) as info:
            await _run(f, _bearer(token))
        www = _www(info.value)
        assert 'error="insufficient_scope"' in www
        assert f'scope="{" ".join(required)}"' in www


async def test_required_roles_from_a_nested_claim() -> None:
    f = _filter(
        _rsa_config(
            required_roles=["admin", "ops"],
            role_match="any",
            issuer_over={"roles_claims": ["realm_access.roles"]},
        )
    )
    with trio.fail_after(5):
        ex = await _run(f, _bearer(_token(realm_access={"roles": ["ops", "dev"]})))
        assert ex.identity is not None
        assert ex.identity.groups == ("ops", "dev")
        with pytest.raises(Forbidden):
            await _run(f, _bearer(_token(realm_access={"roles": ["dev"]})))
        with pytest.raises(Forbidden):
            await _run(f, _bearer(_token()))  # "roles" is not looked at any more


DOTTED_CLAIMS: list[tuple[str, dict[str, Any], str | None]] = [
    ("nested", {"user": {"id": "u-7"}, "org": {"tenant": "acme"}}, None),
    ("named with the dots", {"user.id": "u-7", "org.tenant": "acme"}, None),
    ("no consumer", {"org": {"tenant": "acme"}}, "the token has no user.id claim"),
    ("consumer null", {"user": {"id": None}, "org": {"tenant": "acme"}}, "no user.id claim"),
    ("consumer a number", {"user": {"id": 7}, "org": {"tenant": "acme"}}, "not a string"),
    ("no required claim", {"user": {"id": "u-7"}}, "the token has no org.tenant claim"),
    ("required not nested", {"user": {"id": "u-7"}, "org": "acme"}, "no org.tenant claim"),
    ("no top-level claim", {"user": {"id": "u-7"}, "org": {"tenant": "a"}, "tid": None}, "tid"),
]


@pytest.mark.parametrize(
    ("name", "claims", "error"), DOTTED_CLAIMS, ids=[c[0] for c in DOTTED_CLAIMS]
)
async def test_dotted_consumer_and_required_claims(
    name: str, claims: dict[str, Any], error: str | None
) -> None:
    f = _filter(
        _rsa_config(
            claims_to_headers={"user.id": "X-User-Id", "org.tenant": "X-Tenant"},
            issuer_over={"consumer_claim": "user.id", "required_claims": ["org.tenant", "tid"]},
        )
    )
    with trio.fail_after(5):
        ex = await _admitted_unless(error, f, _token(**{"sub": None, "tid": "t-1", **claims}))
        if ex is not None:
            assert ex.identity is not None
            assert ex.identity.consumer == "u-7"
            assert ex.request.headers.get("x-user-id") == b"u-7"
            assert ex.request.headers.get("x-tenant") == b"acme"


async def test_cookie_token_and_hide_credentials() -> None:
    f = _filter(_rsa_config(header="", cookie="session", hide_credentials=True))
    token = _token()
    with trio.fail_after(5):
        ex = await _run(f, [("Cookie", f"theme=dark; session={token}; lang=en")])
        assert ex.identity is not None
        assert ex.request.headers.get("cookie") == b"theme=dark; lang=en"
        ex = await _run(f, [("Cookie", f"session={token}")])
        assert "cookie" not in ex.request.headers
        with pytest.raises(BadRequest):
            await _run(f, [("Cookie", f"session={token}; session=x")])
    g = _filter(_rsa_config(hide_credentials=True))
    for _ in range(2):  # verified, then remembered: hidden alike
        ex = await _run(g, _bearer(token))
        assert "authorization" not in ex.request.headers
        assert ex.identity is not None
    assert len(g._verified) == 1


async def test_a_claim_that_cannot_be_a_header_fails_closed() -> None:
    f = _filter(_rsa_config(claims_to_headers={"sub": "X-User-Id", "email": "X-User-Email"}))
    with trio.fail_after(5):
        ex = await _run(f, _bearer(_token()))  # absent claim: header skipped
        assert "x-user-email" not in ex.request.headers
        with pytest.raises(Unauthorized, match="cannot be sent as a header"):
            await _run(f, _bearer(_token(email="a@b\r\nX-Admin: yes")))


# -- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "now", "require_exp", "max_age", "reason"),
    [
        ({"exp": 100}, 129.0, True, None, None),  # within the 30 s leeway
        ({"exp": 100}, 130.0, True, None, "expired"),
        ({"nbf": 200}, 170.0, False, None, None),
        ({"nbf": 200}, 169.0, False, None, "not_yet_valid"),
        ({"iat": 200}, 169.0, False, None, "not_yet_valid"),
        ({}, 100.0, True, None, "missing_claim"),
        ({}, 100.0, False, None, None),
        ({"iat": 50}, 100.0, False, 60.0, None),
        ({"iat": 10}, 100.0, False, 60.0, None),  # 90 s old: within max_age + leeway
        ({"iat": 0}, 100.0, False, 60.0, "too_old"),
        ({}, 100.0, False, 60.0, "missing_claim"),  # max_age needs iat
        ({"exp": float("nan")}, 100.0, True, None, "bad_claim"),
        ({"exp": float("inf")}, 100.0, True, None, "bad_claim"),
        ({"nbf": "soon"}, 100.0, False, None, "bad_claim"),
        ({"exp": 10**400}, 100.0, True, None, "bad_claim"),
    ],
)
def test_check_times(
    claims: dict[str, Any], now: float, require_exp: bool, max_age: float | None, reason: str | None
) -> None:
    if reason is None:
        check_times(claims, now, leeway=30.0, require_exp=require_exp, max_age=max_age)
        return
    with pytest.raises(AuthFailure) as info:
        check_times(claims, now, leeway=30.0, require_exp=require_exp, max_age=max_age)
    assert info.value.reason == reason


@pytest.mark.parametrize("payload", [b'{"sub":"a","exp":NaN}', b'{"sub":"a","n":1e999}'])
def test_a_token_with_non_json_numbers_is_malformed(payload: bytes) -> None:
    # json.loads would take NaN and turn 1e999 into inf: neither is JSON (RFC 8259).
    segment = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').rstrip(b"=").decode()
    with pytest.raises(AuthFailure) as info:
        parse_unverified(f"{header}.{segment}.sig")
    assert info.value.reason == "malformed"


def test_parse_scopes_roles_and_headers() -> None:
    assert granted_scopes({"scope": "a b  a", "scp": ["c", 1]}) == ("a", "b", "c")
    assert granted_roles({"roles": "x, y z", "groups": ["g"]}, ["roles", "groups"]) == (
        "x",
        "y",
        "z",
        "g",
    )
    header, payload = parse_unverified(_token())
    assert header["kid"] == "k1"
    assert payload["sub"] == "alice"
    assert header_value(["a", "b"]) == b"a,b"
    assert header_value("é") == "é".encode()
    assert header_value({"a": 1}) is None
    assert header_value([["a"]]) is None
    assert header_value(10**5000) is None
    assert header_value("a\nb") is None
    patterns = HeaderPatterns(DEFAULT_IDENTITY_HEADERS)
    assert patterns(b"x-consumer-custom-id")
    assert not patterns(b"x-request-id")
    assert challenge("Bearer", 'a"b', "invalid_token", "x\\y") == (
        b"www-authenticate",
        b'Bearer realm="ab", error="invalid_token", error_description="xy"',
    )


# -- config errors -------------------------------------------------------------------------

PRIVATE_PEM = RSA_A.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
).decode()


@pytest.mark.parametrize(
    ("config", "path", "message"),
    [
        ({}, "plugins.jwt-auth.issuers", "required key is missing"),
        ({"issuers": []}, "plugins.jwt-auth.issuers", "at least one issuer"),
        (
            {"issuers": [{"algorithms": ["none"], "secret": SECRET}]},
            "plugins.jwt-auth.issuers[0].algorithms[0]",
            "never accepted",
        ),
        (
            {"issuers": [{"algorithms": ["HS256", "RS256"], "secret": SECRET}]},
            "plugins.jwt-auth.issuers[0].algorithms",
            "do not mix",
        ),
        (
            {"issuers": [{"algorithms": ["HS256"], "secret_env": "FG_TEST_UNSET_VARIABLE"}]},
            "plugins.jwt-auth.issuers[0].secret_env",
            "is not set",
        ),
        (
            {"issuers": [{"algorithms": ["HS512"], "secret": SECRET}]},
            "plugins.jwt-auth.issuers[0].secret",
            "at least 64 bytes",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"]}]},
            "plugins.jwt-auth.issuers[0]",
            "no keys",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "public_key_files": ["/nonexistent.pem"]}]},
            "plugins.jwt-auth.issuers[0].public_key_files[0]",
            "cannot read",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "public_keys": [PRIVATE_PEM]}]},
            "plugins.jwt-auth.issuers[0].public_keys[0]",
            "private key",
        ),
        (
            {"issuers": [{"algorithms": ["ES256"], "public_keys": [_pem(RSA_A)]}]},
            "plugins.jwt-auth.issuers[0].public_keys[0]",
            "cannot verify",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "public_keys": [_pem(RSA_1024)]}]},
            "plugins.jwt-auth.issuers[0].public_keys[0]",
            "this key is an RSA key of 1024 bits, and RS*/PS* need at least 2048",
        ),
        (  # an EC key verifies only the algorithm of its curve: P-384 is ES384's
            {"issuers": [{"algorithms": ["ES256"], "public_keys": [_pem(EC_P384)]}]},
            "plugins.jwt-auth.issuers[0].public_keys[0]",
            "cannot verify any of ES256 (it verifies ES384)",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "jwks_url": "ftp://idp/keys"}]},
            "plugins.jwt-auth.issuers[0].jwks_url",
            "http",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "jwks_url": "https://x/", "leeway": "soon"}]},
            "plugins.jwt-auth.issuers[0].leeway",
            "duration",
        ),
        (
            {"issuers": [{"algorithms": ["RS256"], "jwks_url": "https://x/", "nope": 1}]},
            "plugins.jwt-auth.issuers[0].nope",
            "unknown key",
        ),
        (
            {
                "issuers": [
                    {"issuer": "a", "algorithms": ["RS256"], "jwks_url": "https://x/"},
                    {"issuer": "a", "algorithms": ["RS256"], "jwks_url": "https://y/"},
                ]
            },
            "plugins.jwt-auth.issuers[1].issuer",
            "already declared",
        ),
        (
            {
                "issuers": [
                    {"issuer": "a", "algorithms": ["RS256"], "jwks_url": "https://x/"},
                    {"algorithms": ["RS256"], "jwks_url": "https://y/"},
                ]
            },
            "plugins.jwt-auth.issuers[1].issuer",
            "required when there are several",
        ),
        (
            _rsa_config(claims_to_headers={"sub": "X User"}),
            "plugins.jwt-auth.claims_to_headers.sub",
            "header name",
        ),
        (_rsa_config(scope_match="most"), "plugins.jwt-auth.scope_match", "one of"),
        (
            {"issuers": [{"algorithms": ["RS256"], "jwks_url": "https://x/", "jwks_ca_file": "/"}]},
            "plugins.jwt-auth.issuers[0].jwks_ca_file",
            "cannot load",
        ),
        (_rsa_config(strip_headers=["X-*-Id"]), "plugins.jwt-auth.strip_headers[0]", "prefix"),
        (
            _rsa_config(issuer_over={"token_types": ["JWT", "application/"]}),
            "plugins.jwt-auth.issuers[0].token_types[1]",
            "media type",
        ),
        # Consumers of two issuers must not meet: "" + "partner:alice" == "partner:" + "alice".
        (
            {
                "issuers": [
                    {"issuer": "a", "algorithms": ["RS256"], "jwks_url": "https://x/"},
                    {
                        "issuer": "b",
                        "algorithms": ["RS256"],
                        "jwks_url": "https://y/",
                        "consumer_prefix": "partner:",
                    },
                ]
            },
            "plugins.jwt-auth.issuers[0].consumer_prefix",
            "every issuer",
        ),
        (
            {
                "issuers": [
                    {
                        "issuer": "a",
                        "algorithms": ["RS256"],
                        "jwks_url": "https://x/",
                        "consumer_prefix": "p:",
                    },
                    {
                        "issuer": "b",
                        "algorithms": ["RS256"],
                        "jwks_url": "https://y/",
                        "consumer_prefix": "p:x:",
                    },
                ]
            },
            "plugins.jwt-auth.issuers[1].consumer_prefix",
            "starts with",
        ),
    ],
)
def test_config_errors(config: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(JwtAuthConfig, config, "plugins.jwt-auth")
    assert info.value.path == path
    assert message in info.value.message
    assert SECRET not in str(info.value)


def test_check_refuses_a_short_rsa_key_file_and_exits_2(tmp_path: Any) -> None:
    path = tmp_path / "idp.pem"
    path.write_text(_pem(RSA_1024))
    config = {
        "upstreams": {"orders": {"targets": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/", "upstream": "orders"}],
        "plugins": {
            "jwt-auth": {"issuers": [{"algorithms": ["RS256"], "public_key_files": [str(path)]}]}
        },
    }
    (tmp_path / "g.toml").write_text(tomli_w.dumps(config))
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", "-c", str(tmp_path / "g.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "plugins.jwt-auth.issuers[0].public_key_files[0]:" in r.stderr
    assert f"{str(path)!r} is an RSA key of 1024 bits" in r.stderr


def _ec_p384_as_es256(**over: Any) -> str:
    """An ES256 token signed with a P-384 key: the wrong curve for its algorithm."""
    return _raw_token(
        {"alg": "ES256", "kid": "e384"},
        _claims(aud=None, **over),
        lambda m: der_to_raw_signature(EC_P384.sign(m, ec.ECDSA(hashes.SHA256())), EC_P384.curve),
    )


async def test_a_jwks_file_leaves_out_short_rsa_keys_and_wrong_curves(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "jwks.json"
    p384_as_es256 = {**_jwk(EC_P384, "e384"), "alg": "ES256"}
    keys = [_jwk(RSA_1024, "weak"), _jwk(RSA_A, "k1"), p384_as_es256]
    path.write_text(json.dumps({"keys": keys}))
    f = _filter(
        {"issuers": [{"issuer": ISS, "algorithms": ["RS256", "ES256"], "jwks_file": str(path)}]}
    )
    warned = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert warned == [
        f"jwks_file {path}: ignoring key 'weak': an RSA key of 1024 bits, "
        "and RS*/PS* need at least 2048 (RFC 7518 §3.3)"
    ]
    with trio.fail_after(5):
        assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
        with pytest.raises(Unauthorized, match="unknown key id"):
            await _run(f, _bearer(_weak_token(kid="weak", aud=None)))
        with pytest.raises(Unauthorized, match="invalid signature"):
            await _run(f, _bearer(_weak_token(kid=None, aud=None)))
        with pytest.raises(Unauthorized, match="unknown key id"):
            await _run(f, _bearer(_ec_p384_as_es256()))
    # Nothing but the short key: nothing to verify with, and the error says why.
    path.write_text(json.dumps({"keys": [_jwk(RSA_1024, "weak")]}))
    with pytest.raises(ConfigError) as info:
        build(JwtAuthConfig, {"issuers": [{"algorithms": ["RS256"], "jwks_file": str(path)}]})
    assert info.value.path == "issuers[0].jwks_file"
    assert "left out: key 'weak': an RSA key of 1024 bits" in info.value.message


def test_a_jwks_ca_file_replaced_on_disk_makes_a_new_config(tmp_path: Any) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    table = {
        "issuers": [{"algorithms": ["RS256"], "jwks_url": "https://x/", "jwks_ca_file": str(path)}]
    }
    before = build(JwtAuthConfig, table, "plugins.jwt-auth")
    assert before == build(JwtAuthConfig, table, "plugins.jwt-auth")
    trustme.CA().cert_pem.write_to_path(str(path))
    assert before != build(JwtAuthConfig, table, "plugins.jwt-auth")


def test_secrets_stay_out_of_reprs_and_reloads_see_changed_keys(tmp_path: Any) -> None:
    # The engine reuses a filter instance across a reload when repr(config) is unchanged.
    def hs(secret: str) -> JwtAuthConfig:
        return build(JwtAuthConfig, {"issuers": [{"algorithms": ["HS256"], "secret": secret}]})

    assert SECRET not in repr(hs(SECRET))
    assert repr(hs(SECRET)) == repr(hs(SECRET))
    assert repr(hs(SECRET)) != repr(hs(SECRET + "-rotated"))
    path = tmp_path / "key.pem"
    path.write_text(_pem(RSA_A))
    raw = {"issuers": [{"algorithms": ["RS256"], "public_key_files": [str(path)]}]}
    first, same = build(JwtAuthConfig, raw), build(JwtAuthConfig, raw)
    assert first == same  # an unchanged config keeps its filter instance on reload
    assert repr(first) == repr(same)
    path.write_text(_pem(RSA_B))
    rotated = build(JwtAuthConfig, raw)
    assert rotated != first  # a rotated key file makes a new one
    assert repr(rotated) != repr(first)


# -- a JWKS URL served by a real local HTTP server -----------------------------------------


class JwksServer:
    """A tiny HTTP server on 127.0.0.1 whose key set and health tests change at will."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.document: Any = {"keys": keys}
        self.status = 200
        self.hits = 0
        self.port = 0
        self.scheme = "http"

    async def serve(
        self,
        tls: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if tls is not None:
            self.scheme = "https"
            listeners = [trio.SSLListener(t, tls, https_compatible=True) for t in tcp]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        try:
            await self._answer(stream)
        except trio.BrokenResourceError:
            pass  # a client that gave up (or refused our certificate)

    async def _answer(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if isinstance(event, h11.Request):
                    continue
                if isinstance(event, h11.EndOfMessage):
                    break
                return
            self.hits += 1
            body = json.dumps(self.document).encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            await stream.send_all(conn.send(h11.Response(status_code=self.status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/.well-known/jwks.json"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Autojump, but only after 10 ms of real idleness: the loopback sockets of the JWKS
    # server answer well within that, so a fetch never sees virtual time jump past its
    # deadline, while TTLs and cooldowns of minutes pass instantly.
    return trio.testing.MockClock(autojump_threshold=0.01)


@asynccontextmanager
async def _jwks_server(keys: list[dict[str, Any]]) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def _jwks_filter(url: str, **issuer: Any) -> JwtAuth:
    return _filter(
        {
            "issuers": [
                {
                    "issuer": ISS,
                    "algorithms": ["RS256", "ES256"],
                    "jwks_url": url,
                    "jwks_ttl": "10m",
                    "jwks_cooldown": "30s",
                    **issuer,
                }
            ]
        }
    )


# Under the mock clock a deadline is in virtual time: it must cover the TTLs the test
# sleeps through, and a real hang still ends at once (the clock jumps to the deadline).
VIRTUAL_DEADLINE = 3600


async def test_jwks_startup_fetch_and_rotation(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server:
            f = _jwks_filter(server.url)
            await f.setup()
            assert server.hits == 1
            assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
            assert server.hits == 1  # a known kid needs no fetch

            # The IdP rotates to k2. Its first token triggers a refetch (cooldown passed).
            server.document = {"keys": [_jwk(RSA_B, "k2"), _jwk(EC_A, "e1")]}
            await trio.sleep(31)
            ex = await _run(f, _bearer(_token(key=RSA_B, kid="k2", aud=None)))
            assert ex.identity is not None
            assert server.hits == 2
            ec_token = _token(key=EC_A, alg="ES256", kid="e1", aud=None)
            assert (await _run(f, _bearer(ec_token))).identity is not None
            with pytest.raises(Unauthorized, match="unknown key id"):
                await _run(f, _bearer(_token(kid="k1", aud=None)))  # k1 was retired


async def test_a_jwks_url_leaves_out_short_rsa_keys_and_warns_once(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    def warnings_logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]

    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_1024, "weak"), _jwk(RSA_A, "k1")]) as server:
            f = _jwks_filter(server.url)
            async with trio.open_nursery() as nursery:
                await f.setup()
                nursery.start_soon(f.background)
                assert warnings_logged() == [
                    f"JWKS {server.url}: ignoring key 'weak': an RSA key of 1024 bits, "
                    "and RS*/PS* need at least 2048 (RFC 7518 §3.3)"
                ]
                assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
                with pytest.raises(Unauthorized, match="unknown key id"):
                    await _run(f, _bearer(_weak_token(kid="weak", aud=None)))
                with pytest.raises(Unauthorized, match="invalid signature"):
                    await _run(f, _bearer(_weak_token(kid=None, aud=None)))
                # The same set again on the TTL refresh: nothing new to say.
                await trio.sleep(601)
                assert server.hits == 2
                assert len(warnings_logged()) == 1
                # A set with only the short key is no key set: the last good one stays.
                server.document = {"keys": [_jwk(RSA_1024, "weak")]}
                await trio.sleep(601)
                assert server.hits == 3
                source = f.issuers[0].jwks
                assert source is not None
                assert source.last_error is not None
                assert "left out: key 'weak'" in source.last_error
                assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
                nursery.cancel_scope.cancel()


async def test_static_keys_verify_without_a_coroutine_and_jwks_refuses_alike(
    clock: trio.testing.MockClock,
) -> None:
    # Static keys never wait: the engine calls the request phase. A JWKS URL may make
    # it wait for a fetch: awaited. Both refuse and fail closed the same way.
    static = _filter(_rsa_config())
    assert [p.is_async for p in compile_chain([static]).request] == [False]
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server:
            jwks = _jwks_filter(server.url)
            assert [p.is_async for p in compile_chain([jwks]).request] == [True]
            await jwks.setup()
            bad_header = _filter(
                {
                    "issuers": [{"issuer": ISS, "algorithms": ["RS256"], "jwks_url": server.url}],
                    "claims_to_headers": {"email": "X-User-Email"},
                }
            )
            admin_only = _filter(
                {
                    "issuers": [{"issuer": ISS, "algorithms": ["RS256"], "jwks_url": server.url}],
                    "required_scopes": ["admin"],
                }
            )
            for f in (bad_header, admin_only):
                await f.setup()
            ok = await _run(jwks, _bearer(_token(aud=None)))
            assert ok.identity is not None
            assert ok.identity.consumer == "alice"
            with pytest.raises(Unauthorized, match="cannot be sent as a header"):
                await _run(bad_header, _bearer(_token(aud=None, email="a\nb")))
            with pytest.raises(Forbidden) as info:
                await _run(admin_only, _bearer(_token(aud=None)))
            assert 'error="insufficient_scope"' in _www(info.value)
            with pytest.raises(Unauthorized, match="invalid signature"):
                await _run(jwks, _bearer(_token(key=RSA_B, aud=None)))


async def test_jwks_background_refresh_on_ttl(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server, trio.open_nursery() as n:
            f = _jwks_filter(server.url)
            await f.setup()
            n.start_soon(f.background)
            server.document = {"keys": [_jwk(RSA_B, "k2")]}
            await trio.sleep(599)
            assert server.hits == 1
            await trio.sleep(2)
            assert server.hits == 2  # refreshed after the 10 min TTL, without any request
            hits = server.hits
            ex = await _run(f, _bearer(_token(key=RSA_B, kid="k2", aud=None)))
            assert ex.identity is not None
            assert server.hits == hits
            n.cancel_scope.cancel()


async def test_unknown_kid_spray_is_limited_by_the_cooldown(
    clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server:
            f = _jwks_filter(server.url)
            await f.setup()
            await trio.sleep(31)

            async def spray(i: int) -> None:
                with pytest.raises(Unauthorized, match="unknown key id"):
                    await _run(f, _bearer(_token(kid=f"bogus-{i}", aud=None)))

            async with trio.open_nursery() as nursery:  # concurrent: they share one fetch
                for i in range(50):
                    nursery.start_soon(spray, i)
            for i in range(50):  # sequential, within the cooldown: no fetch at all
                await spray(i)
            assert server.hits == 2
            await trio.sleep(31)
            for i in range(50):
                await spray(i)
            assert server.hits == 3
            assert (await _run(f, _bearer(_token(aud=None)))).identity is not None


async def test_provider_down_keeps_the_last_good_key_set(clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_DEADLINE):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server, trio.open_nursery() as n:
            f = _jwks_filter(server.url)
            await f.setup()
            n.start_soon(f.background)
            server.status = 503
            await trio.sleep(601)  # the TTL refresh fails ...
            server.document = "garbage"
            server.status = 200
            await trio.sleep(31)  # ... and so does the retry, on a document that is no JWKS
            assert server.hits == 3
            source = f.issuers[0].jwks
            assert source is not None
            assert source.last_error is not None
            assert "JSON Web Key Set" in source.last_error
            ex = await _run(f, _bearer(_token(aud=None)))  # still served by the last good set
            assert ex.identity is not None
            n.cancel_scope.cancel()


async def test_provider_down_from_the_start_is_a_503(clock: trio.testing.MockClock) -> None:
    port = _free_port()  # nothing listens there
    f = _jwks_filter(f"http://127.0.0.1:{port}/jwks.json")
    with trio.fail_after(VIRTUAL_DEADLINE):
        await f.setup()  # does not raise: the gateway starts without its IdP
        with pytest.raises(ServiceUnavailable) as info:
            await _run(f, _bearer(_token(aud=None)))
        assert dict(info.value.headers)[b"retry-after"] == b"30"
        # A missing token is still a plain 401: no key set is needed to say so.
        with pytest.raises(Unauthorized):
            await _run(f, [])
        # The IdP comes up on that port; after the cooldown the next request loads keys.
        server = JwksServer([_jwk(RSA_A, "k1")])
        listeners = [trio.SocketListener(_bind(port))]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, server._handle, listeners)
            with pytest.raises(ServiceUnavailable):
                await _run(f, _bearer(_token(aud=None)))  # within the cooldown: no fetch
            assert server.hits == 0
            await trio.sleep(30)
            assert (await _run(f, _bearer(_token(aud=None)))).identity is not None
            assert server.hits == 1
            nursery.cancel_scope.cancel()


def _bind(port: int) -> trio.socket.SocketType:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return trio.socket.from_stdlib_socket(sock)


async def test_jwks_over_https_with_a_private_ca(tmp_path: Any) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = JwksServer([_jwk(RSA_A, "k1")])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, server_tls)
            trusted = _jwks_filter(server.url, jwks_ca_file=str(ca_file))
            await trusted.setup()
            assert (await _run(trusted, _bearer(_token(aud=None)))).identity is not None
            # Without the private CA the certificate is not trusted: no keys, 503.
            untrusted = _jwks_filter(server.url)
            await untrusted.setup()
            source = untrusted.issuers[0].jwks
            assert source is not None
            assert source.last_error is not None
            assert "CERTIFICATE_VERIFY_FAILED" in source.last_error
            with pytest.raises(ServiceUnavailable):
                await _run(untrusted, _bearer(_token(aud=None)))
            assert server.hits == 1
            nursery.cancel_scope.cancel()


async def test_fetch_limits() -> None:
    with trio.fail_after(10):
        async with _jwks_server([_jwk(RSA_A, "k1")]) as server:
            result = await fetch(server.url, time_limit=5, max_bytes=100_000)
            assert result.status == 200
            assert json.loads(result.body)["keys"][0]["kid"] == "k1"
            with pytest.raises(FetchError, match="over 100 bytes"):
                await fetch(server.url, time_limit=5, max_bytes=100)
        with pytest.raises(FetchError, match="cannot fetch"):
            await fetch(f"http://127.0.0.1:{_free_port()}/", time_limit=5, max_bytes=100)
        with pytest.raises(FetchError, match="http"):
            await fetch("file:///etc/passwd", time_limit=5, max_bytes=100)


async def test_fetch_deadline(autojump_clock: trio.testing.MockClock) -> None:
    # A server that accepts and never answers: the fetch gives up at its deadline.
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, silent, 0)
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(FetchError, match="within 5s"):
                await fetch(f"http://127.0.0.1:{port}/", time_limit=5, max_bytes=100)
            nursery.cancel_scope.cancel()


# -- end to end through a running gateway --------------------------------------------------


async def test_end_to_end_through_the_gateway() -> None:
    testing = pytest.importorskip("engine.testing")
    with trio.fail_after(20):
        async with testing.open_stubs() as stubs:
            config = {
                "upstreams": {"echo": {"targets": [f"127.0.0.1:{stubs.ports['echo']}"]}},
                "plugins": {"jwt-auth": _rsa_config()},
                "routes": [
                    {"name": "orders", "prefix": "/orders", "upstream": "echo"},
                    {
                        "name": "public",
                        "prefix": "/public",
                        "upstream": "echo",
                        "plugins": {"jwt-auth": _rsa_config(allow_anonymous=True)},
                    },
                ],
            }
            async with testing.open_gateway(config) as gw:
                headers = [("authorization", f"Bearer {_token()}"), ("x-user-id", "admin")]
                resp = await testing.http_request(gw.port, "GET", "/orders/1", headers=headers)
                assert resp.status == 200
                seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
                assert seen["x-user-id"] == "alice"

                resp = await testing.http_request(gw.port, "GET", "/orders/1")
                assert resp.status == 401
                assert resp.header("www-authenticate") == 'Bearer realm="filtergate"'
                assert resp.json()["error"]["code"] == "unauthorized"

                bad = [("authorization", f"Bearer {_token(exp=_now() - 3600)}")]
                resp = await testing.http_request(gw.port, "GET", "/orders/1", headers=bad)
                assert resp.status == 401
                assert 'error="invalid_token"' in (resp.header("www-authenticate") or "")

                garbage = [("authorization", "Bearer " + _b64(b"[1]") * 3)]
                resp = await testing.http_request(gw.port, "GET", "/orders/1", headers=garbage)
                assert resp.status == 401

                resp = await testing.http_request(
                    gw.port, "GET", "/public/x", headers=[("x-user-id", "admin")]
                )
                assert resp.status == 200
                seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
                assert "x-user-id" not in seen


async def test_dotted_claims_end_to_end_through_the_gateway() -> None:
    testing = pytest.importorskip("engine.testing")
    plugin = _rsa_config(
        claims_to_headers={"user.id": "X-User-Id"},
        issuer_over={"consumer_claim": "user.id", "required_claims": ["org.tenant"]},
    )
    with trio.fail_after(20):
        async with testing.open_stubs() as stubs:
            config = {
                "upstreams": {"echo": {"targets": [f"127.0.0.1:{stubs.ports['echo']}"]}},
                "plugins": {"jwt-auth": plugin},
                "routes": [{"name": "orders", "prefix": "/orders", "upstream": "echo"}],
            }
            async with testing.open_gateway(config) as gw:

                async def get(token: str) -> Any:
                    headers = [("authorization", f"Bearer {token}")]
                    return await testing.http_request(gw.port, "GET", "/orders/1", headers=headers)

                resp = await get(_token(sub=None, user={"id": "u-7"}, org={"tenant": "acme"}))
                assert resp.status == 200
                seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
                assert seen["x-user-id"] == "u-7"

                lacking: list[tuple[dict[str, Any], str]] = [
                    ({"org": {"tenant": "acme"}}, "user.id"),
                    ({"user": {"id": "u-7"}}, "org.tenant"),
                ]
                for claims, missing in lacking:
                    resp = await get(_token(**claims))
                    assert resp.status == 401
                    www = resp.header("www-authenticate") or ""
                    assert f'error_description="the token has no {missing} claim"' in www


async def test_jwks_end_to_end_through_the_gateway() -> None:
    testing = pytest.importorskip("engine.testing")

    def route(name: str, url: str) -> dict[str, Any]:
        issuer = {"issuer": ISS, "algorithms": ["RS256"], "jwks_url": url, "jwks_timeout": "2s"}
        return {
            "name": name,
            "prefix": f"/{name}",
            "upstream": "echo",
            "plugins": {"jwt-auth": {"issuers": [issuer]}},
        }

    with trio.fail_after(20):
        async with testing.open_stubs() as stubs, _jwks_server([_jwk(RSA_A, "k1")]) as idp:
            config = {
                "upstreams": {"echo": {"targets": [f"127.0.0.1:{stubs.ports['echo']}"]}},
                "routes": [
                    route("up", idp.url),
                    route("down", f"http://127.0.0.1:{_free_port()}/jwks.json"),
                ],
            }
            # The gateway starts although one identity provider is down.
            async with testing.open_gateway(config) as gw:
                assert idp.hits == 1  # fetched during start-up, before serving
                headers = [("authorization", f"Bearer {_token(aud=None)}")]
                resp = await testing.http_request(gw.port, "GET", "/up", headers=headers)
                assert resp.status == 200
                resp = await testing.http_request(gw.port, "GET", "/down", headers=headers)
                assert resp.status == 503
                assert resp.header("retry-after") is not None


# -- the verified-token cache ---------------------------------------------------------------


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of the jwt-auth module's function ``name``: ``[count]``."""
    count = [0]
    fn = getattr(jwt_auth_module, name)

    def counting(*args: Any) -> Any:
        count[0] += 1
        return fn(*args)

    monkeypatch.setattr(jwt_auth_module, name, counting)
    return count


async def test_a_verified_token_is_remembered_until_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.testing import build_filter, make_exchange

    secret = "s" * 40
    now = time.time()
    token = jwt.encode({"sub": "ada", "exp": int(now) + 100}, secret, algorithm="HS256")
    f = build_filter(
        JwtAuth,
        {"issuers": [{"algorithms": ["HS256"], "secret": secret, "leeway": 0}], "cache_size": 2},
    )
    decodes = _count_calls(monkeypatch, "_decode")
    for _ in range(3):
        ex = make_exchange(headers=[("authorization", f"Bearer {token}")])
        await _request_phase(f, ex)
        assert ex.identity is not None
        assert ex.identity.consumer == "ada"
    assert decodes[0] == 1
    # Past its expiry the entry no longer holds: the token is verified again, and refused.
    monkeypatch.setattr(time, "time", lambda: now + 101)
    with pytest.raises(Unauthorized):
        await _request_phase(f, make_exchange(headers=[("authorization", f"Bearer {token}")]))
    assert decodes[0] == 2
    # Bounded: only the newest cache_size tokens stay.
    monkeypatch.setattr(time, "time", lambda: now)
    for sub in ("a", "b", "c"):
        t = jwt.encode({"sub": sub, "exp": int(now) + 100}, secret, algorithm="HS256")
        await _request_phase(f, make_exchange(headers=[("authorization", f"Bearer {t}")]))
    assert len(f._verified) == 2


async def test_padded_spellings_of_one_token_share_one_cache_entry() -> None:
    """Any user could fill the verified-token cache (10,000 entries by default) with
    one token spelled with ~15 KB of whitespace each way: ~150 MB per instance."""
    f = _filter(_rsa_config())
    token = _token()
    with trio.fail_after(5):
        for pad in range(1, 60):
            ex = await _run(f, [("Authorization", "Bearer" + " \t" * pad + token)])
            assert ex.identity is not None
            assert ex.identity.consumer == "alice"
        assert list(f._verified) == [("header", token)]
        await _run(f, _bearer(token))  # the plain spelling: found by its raw value
        assert len(f._verified) == 2


async def test_a_remembered_token_is_found_by_the_raw_header_without_parsing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = _filter(_rsa_config())
    token = _token()
    parses = _count_calls(monkeypatch, "parse_unverified")
    with trio.fail_after(5):
        for _ in range(3):
            ex = await _run(f, _bearer(token))
            assert ex.identity is not None
            assert ex.identity.consumer == "alice"
        assert parses[0] == 1
        assert list(f._verified) == [f"Bearer {token}".encode()]
        # Another spelling of the same credential is another key: verified once more.
        ex = await _run(f, [("Authorization", f"bearer {token}")])
        assert ex.identity is not None
        assert parses[0] == 2
        # A remembered value sent twice is still ambiguous.
        with pytest.raises(BadRequest):
            await _run(f, [*_bearer(token), *_bearer(token)])
        # Another scheme is no token, whatever else is remembered.
        with pytest.raises(Unauthorized):
            await _run(f, [("Authorization", f"Basic {token}")])


async def test_a_cookie_token_is_remembered_apart_from_header_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # scheme = "": the header's whole value is the token, so a header value and a
    # cookie token can be the same text; each is remembered under its own key.
    f = _filter(_rsa_config(scheme="", cookie="session"))
    token = _token()
    decodes = _count_calls(monkeypatch, "_decode")
    with trio.fail_after(5):
        for _ in range(2):
            ex = await _run(f, [("Cookie", f"session={token}")])
            assert ex.identity is not None
        assert decodes[0] == 1
        ex = await _run(f, [("Authorization", token)])
        assert ex.identity is not None
        assert decodes[0] == 2
        assert list(f._verified) == [("cookie", token), token.encode()]
        # The header wins over the cookie, remembered or not.
        with pytest.raises(Unauthorized):
            await _run(f, [("Authorization", "not-a-token"), ("Cookie", f"session={token}")])


async def test_a_remembered_token_past_its_end_is_verified_again() -> None:
    f = _filter(_rsa_config())
    token = _token()
    with trio.fail_after(5):
        await _run(f, _bearer(token))
        (key, entry) = next(iter(f._verified.items()))
        assert entry.still_valid(time.time())
        # Past its end the entry no longer holds: the token is verified again (and
        # remembered afresh under the same key).
        entry.until = time.time() - 1
        ex = await _run(f, _bearer(token))
        assert ex.identity is not None
        assert f._verified[key] is not entry


async def test_a_remembered_token_holds_only_with_the_key_set_that_verified_it() -> None:
    class _Jwks:
        keys: object = None

    f = _filter(_rsa_config())
    token = _token()
    with trio.fail_after(5):
        await _run(f, _bearer(token))
        (key, entry) = next(iter(f._verified.items()))
        jwks = _Jwks()
        jwks.keys = entry.jwks_keys = object()
        entry.issuer = types.SimpleNamespace(jwks=jwks)  # type: ignore[assignment]
        await _run(f, _bearer(token))
        assert f._verified[key] is entry  # the same key set: found, not verified again
        jwks.keys = object()  # a refresh replaced the key set
        ex = await _run(f, _bearer(token))
        assert ex.identity is not None
        assert f._verified[key] is not entry
