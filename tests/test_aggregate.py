"""The aggregate filter: config checks, composition, and the concurrency semantics.

The semantics are tested against a fake upstream (an in-memory ``exchange.caller``
that answers by path after a delay, on trio's autojump clock); the end-to-end tests run
the real gateway against the stub services.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from engine.chain import Filter, FilterContext, Stage
from engine.errors import (
    BadGateway,
    BadRequest,
    ClientGone,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from engine.exchange import Exchange, Headers, Identity, Request, Response, Timings, UpstreamCall
from engine.schema import ConfigError, build
from engine.stubs import SlowService
from engine.testing import Client, Stubs, http_request, open_gateway, open_stubs
from plugins.aggregate import Aggregate, AggregateConfig
from tests.test_chain import FilterSet

# -- a fake upstream -------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if not self.data:
            raise StopAsyncIteration
        chunk, self.data = self.data[:3], self.data[3:]
        return chunk

    async def aclose(self) -> None:
        self.closed = True


Route = tuple[float, int, Any]  # delay, status, JSON answer (bytes: sent raw)


class FakeUpstreams:
    """Answers calls by ``upstream + target``; records calls, their headers, cancellations."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.calls: list[UpstreamCall] = []
        self.started: list[str] = []
        self.started_at: dict[str, float] = {}
        self.cancelled: list[str] = []
        self.bodies: list[_Body] = []

    async def __call__(self, exchange: Exchange, call: UpstreamCall) -> Response:
        key = f"{call.upstream}{call.target.decode()}"
        self.calls.append(call)
        self.started.append(key)
        self.started_at[key] = trio.current_time()
        if key not in self.routes:
            raise UpstreamUnreachable(f"no fake for {key}")
        delay, status, answer = self.routes[key]
        try:
            await trio.sleep(delay)
        except trio.Cancelled:
            self.cancelled.append(key)
            raise
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        body = _Body(data)
        self.bodies.append(body)
        return Response(
            status=status,
            headers=Headers([(b"content-type", b"application/json"), (b"set-cookie", b"s=1")]),
            stream=body,
        )


def _exchange(caller: Callable[[Exchange, UpstreamCall], Awaitable[Response]]) -> Exchange:
    request = Request(
        method=b"GET",
        path="/web/users/1",
        raw_query=b"lang=fr",
        headers=Headers(
            [
                (b"authorization", b"Bearer t"),
                (b"accept-language", b"fr"),
                (b"cookie", b"c=1"),
            ]
        ),
        http_version=b"1.1",
        client="127.0.0.1",
        peer=("127.0.0.1", 1),
    )
    return Exchange(
        request=request,
        request_id="rid",
        timings=Timings(start=0.0),
        captures={"id": "1"},
        identity=Identity("alice", claims={"sub": "u1"}),
        caller=caller,
    )


def _aggregate(table: dict[str, Any]) -> Aggregate:
    return Aggregate(
        build(AggregateConfig, table, "plugins.aggregate"), FilterContext("aggregate", "x")
    )


USER = {"id": 1, "name": "Ada", "email": "ada@example.com", "tier": "gold"}
ORDERS = {"orders": [{"id": 101, "items": [{"sku": "a"}]}, {"id": 102, "items": [{"sku": "b"}]}]}


def _calls(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "user", "upstream": "users", "path": "/users/{path.id}", "timeout": "1s"},
        *extra,
    ]


async def _run(agg: Aggregate, fake: FakeUpstreams) -> Response:
    with trio.fail_after(30):
        return await agg.on_request(_exchange(fake))


def _json(resp: Response) -> Any:
    assert resp.body is not None
    return json.loads(resp.body)


# -- semantics ---------------------------------------------------------------------------


async def test_all_calls_succeed_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {"name": "catalog", "upstream": "catalog", "path": "/catalog", "required": False},
            )
        }
    )
    fake = FakeUpstreams(
        {"users/users/1": (0.5, 200, USER), "catalog/catalog": (0.5, 200, {"catalog": []})}
    )
    start = trio.current_time()
    resp = await _run(agg, fake)
    assert trio.current_time() - start == pytest.approx(0.5)  # concurrent, not 1 s
    assert resp.status == 200
    assert _json(resp) == {"user": USER, "catalog": {"catalog": []}}
    assert resp.headers.get("content-type") == b"application/json"
    assert "set-cookie" not in resp.headers
    assert "x-aggregate-partial" not in resp.headers


async def test_dependent_call_starts_when_its_dependency_arrived(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {
                    "name": "orders",
                    "upstream": "orders",
                    "path": "/orders?user_id={user.id}&tier={user.tier}",
                    "extract": "orders[*].items",
                    "flatten": True,
                },
                {"name": "other", "upstream": "catalog", "path": "/catalog"},
            )
        }
    )
    fake = FakeUpstreams(
        {
            "users/users/1": (0.5, 200, USER),
            "orders/orders?user_id=1&tier=gold": (0.5, 200, ORDERS),
            "catalog/catalog": (2.0, 200, []),
        }
    )
    start = trio.current_time()
    resp = await _run(agg, fake)
    # The dependent call ran right after its dependency (0.5 + 0.5), beside the slow one.
    assert trio.current_time() - start == pytest.approx(2.0)
    assert sorted(fake.started[:2]) == ["catalog/catalog", "users/users/1"]
    assert fake.started[2] == "orders/orders?user_id=1&tier=gold"
    assert fake.started_at[fake.started[2]] - start == pytest.approx(0.5)
    assert _json(resp)["orders"] == [{"sku": "a"}, {"sku": "b"}]


async def test_optional_call_failing_is_listed(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {"name": "recs", "upstream": "recs", "path": "/r", "required": False},
                {"name": "gone", "upstream": "nowhere", "path": "/", "required": False},
                {"name": "garbage", "upstream": "recs", "path": "/g", "required": False},
            )
        }
    )
    fake = FakeUpstreams(
        {
            "users/users/1": (0.1, 200, USER),
            "recs/r": (0.1, 500, {"trace": "secret"}),
            "recs/g": (0.1, 200, b"<html>"),
        }
    )
    resp = await _run(agg, fake)
    assert resp.status == 200
    assert _json(resp) == {"user": USER, "_partial": ["recs", "gone", "garbage"]}
    assert resp.headers.get("x-aggregate-partial") == b"recs, gone, garbage"


async def test_optional_call_timing_out(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {
                    "name": "recs",
                    "upstream": "recs",
                    "path": "/r",
                    "required": False,
                    "timeout": "200ms",
                }
            )
        }
    )
    fake = FakeUpstreams({"users/users/1": (0.5, 200, USER), "recs/r": (10.0, 200, [])})
    start = trio.current_time()
    resp = await _run(agg, fake)
    assert trio.current_time() - start == pytest.approx(0.5)
    assert _json(resp) == {"user": USER, "_partial": ["recs"]}
    assert fake.cancelled == ["recs/r"]


async def test_required_call_failing_cancels_siblings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {"name": "slow", "upstream": "slow", "path": "/s", "required": False},
                {"name": "dep", "upstream": "orders", "path": "/o/{user.id}", "required": True},
            )
        }
    )
    fake = FakeUpstreams({"users/users/1": (0.3, 503, {}), "slow/s": (10.0, 200, {})})
    start = trio.current_time()
    with pytest.raises(BadGateway) as info:
        await _run(agg, fake)
    assert "'user'" in info.value.message
    assert trio.current_time() - start == pytest.approx(0.3)
    assert fake.cancelled == ["slow/s"]
    assert sorted(fake.started) == ["slow/s", "users/users/1"]


async def test_required_call_timing_out_answers_504(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agg = _aggregate({"calls": _calls()})
    fake = FakeUpstreams({"users/users/1": (5.0, 200, USER)})
    with pytest.raises(UpstreamTimeout):
        await _run(agg, fake)


async def test_overall_deadline(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "timeout": "2s",
            "calls": [
                {"name": "user", "upstream": "users", "path": "/users/1"},
                {"name": "recs", "upstream": "recs", "path": "/r", "required": False},
            ],
        }
    )
    fake = FakeUpstreams({"users/users/1": (1.0, 200, USER), "recs/r": (3.0, 200, [])})
    start = trio.current_time()
    resp = await _run(agg, fake)
    assert trio.current_time() - start == pytest.approx(2.0)
    assert _json(resp) == {"user": USER, "_partial": ["recs"]}

    fake = FakeUpstreams({"users/users/1": (3.0, 200, USER), "recs/r": (1.0, 200, [])})
    with pytest.raises(UpstreamTimeout):
        await _run(agg, fake)
    assert fake.cancelled == ["users/users/1"]


async def test_missing_dependency_value_fails_the_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agg = _aggregate(
        {
            "calls": _calls(
                {"name": "o", "upstream": "orders", "path": "/o/{user.nope}", "required": False},
                {"name": "o2", "upstream": "orders", "path": "/o/{user.nope|0}", "required": False},
            )
        }
    )
    fake = FakeUpstreams({"users/users/1": (0.1, 200, USER), "orders/o/0": (0.1, 200, [])})
    resp = await _run(agg, fake)
    assert _json(resp) == {"user": USER, "o2": [], "_partial": ["o"]}


async def test_shaping_and_top_level_merge(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "merge": "top-level",
            "calls": [
                {
                    "name": "user",
                    "upstream": "users",
                    "path": "/users/1",
                    "fields": {
                        "allow": ["id", "name", "email"],
                        "deny": ["email"],
                        "rename": {"name": "display_name"},
                    },
                },
                {
                    "name": "orders",
                    "upstream": "orders",
                    "path": "/orders",
                    "extract": "orders",
                    "fields": {"deny": ["items"]},
                },
                {"name": "hidden", "upstream": "users", "path": "/users/1", "include": False},
            ],
        }
    )
    fake = FakeUpstreams({"users/users/1": (0.1, 200, USER), "orders/orders": (0.1, 200, ORDERS)})
    resp = await _run(agg, fake)
    assert _json(resp) == {"id": 1, "display_name": "Ada", "orders": [{"id": 101}, {"id": 102}]}


async def test_a_backend_s_own_partial_field_never_reaches_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Merged at the top level, a backend's {"_partial": ["spoof"]} told the client that
    calls were left out when none was."""
    agg = _aggregate(
        {"merge": "top-level", "calls": [{"name": "u", "upstream": "users", "path": "/u"}]}
    )
    fake = FakeUpstreams({"users/u": (0.1, 200, {"id": 1, "_partial": ["spoof"]})})
    resp = await _run(agg, fake)
    assert _json(resp) == {"id": 1}
    assert resp.headers.get(b"x-aggregate-partial") is None


@pytest.mark.parametrize(
    "path", ["/orders?user_id={query.user}", "/orders?user_id={consumer}", "/users/{claims.sub}"]
)
async def test_a_request_value_that_is_missing_fails_the_call(
    autojump_clock: trio.testing.MockClock, path: str
) -> None:
    """It was the empty string: "/orders?user_id=" reached a backend that may read it
    as every user's orders (an anonymous caller, a client leaving out a parameter). A
    required call is a 400, an optional one is left out; "{ref|}" asks for ""."""
    fake = FakeUpstreams({"orders/orders?user_id=": (0.1, 200, ORDERS)})

    async def anonymous(agg: Aggregate) -> Response:
        exchange = _exchange(fake)
        exchange.identity = None
        with trio.fail_after(30):
            return await agg.on_request(exchange)

    required = _aggregate({"calls": [{"name": "o", "upstream": "orders", "path": path}]})
    with pytest.raises(BadRequest, match="needs a value: no value for"):
        await anonymous(required)
    optional = _aggregate(
        {"calls": [{"name": "o", "upstream": "orders", "path": path, "required": False}]}
    )
    assert _json(await anonymous(optional)) == {"_partial": ["o"]}
    assert fake.calls == []
    if "user_id" in path:
        explicit = path.replace("}", "|}")
        agg = _aggregate({"calls": [{"name": "o", "upstream": "orders", "path": explicit}]})
        assert "o" in _json(await anonymous(agg))


async def test_headers_sent_to_backends(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {
            "calls": [
                {
                    "name": "user",
                    "upstream": "users",
                    "path": "/users/{path.id}?lang={query.lang}&q={header.accept-language}",
                    "forward_headers": ["accept-language", "authorization"],
                    "headers": {"x-consumer": "{consumer}", "x-sub": "{claims.sub}"},
                },
                {"name": "plain", "upstream": "users", "path": "/p/{query.absent|}"},
            ]
        }
    )
    fake = FakeUpstreams(
        {"users/users/1?lang=fr&q=fr": (0.1, 200, USER), "users/p/": (0.1, 200, {})}
    )
    await _run(agg, fake)
    first, second = sorted(fake.calls, key=lambda c: len(c.target), reverse=True)
    assert first.method == b"GET"
    assert dict(first.headers.items) == {
        b"accept": b"application/json",
        b"x-request-id": b"rid",
        b"accept-language": b"fr",
        b"authorization": b"Bearer t",
        b"x-consumer": b"alice",
        b"x-sub": b"u1",
    }
    # Nothing is forwarded unless listed: no Authorization, no Cookie.
    assert dict(second.headers.items) == {b"accept": b"application/json", b"x-request-id": b"rid"}


async def test_oversized_answer_fails_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate(
        {"calls": [{"name": "user", "upstream": "users", "path": "/users/1", "max_body": 10}]}
    )
    fake = FakeUpstreams({"users/users/1": (0.1, 200, USER)})
    with pytest.raises(BadGateway):
        await _run(agg, fake)
    assert fake.bodies[0].closed


async def test_values_are_percent_encoded(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate({"calls": [{"name": "s", "upstream": "u", "path": "/s/{header.x-q}"}]})
    fake = FakeUpstreams({"u/s/a%2Fb%20c%3F": (0.1, 200, {})})
    ex = _exchange(fake)
    ex.request.headers.add("x-q", "a/b c?")
    with trio.fail_after(5):
        resp = await agg.on_request(ex)
    assert resp.status == 200


@pytest.mark.parametrize("value", ["..", "."])
async def test_a_value_never_makes_a_dot_segment(
    autojump_clock: trio.testing.MockClock, value: str
) -> None:
    # quote() leaves "." alone, and upstreams decode %2E before removing dot segments
    # (RFC 3986 6.2.2): "/users/../orders" would reach /orders. The call fails instead.
    agg = _aggregate(
        {"calls": [{"name": "s", "upstream": "u", "path": "/users/{header.x-uid}/orders"}]}
    )
    fake = FakeUpstreams({"u/orders": (0.1, 200, {}), "u/users/../orders": (0.1, 200, {})})
    ex = _exchange(fake)
    ex.request.headers.add("x-uid", value)
    with trio.fail_after(5), pytest.raises(BadGateway) as info:
        await agg.on_request(ex)
    assert "dot segment" in info.value.message
    assert fake.calls == []  # nothing was sent


@pytest.mark.parametrize("answer", [b'{"x": NaN}', b'{"x": 1e999}', b"[" * 100_000])
async def test_an_answer_that_is_not_strict_json_fails_the_call(
    autojump_clock: trio.testing.MockClock, answer: bytes
) -> None:
    # RFC 8259: no NaN, no number beyond a double; deep nesting is invalid, never a 500.
    agg = _aggregate({"calls": _calls()})
    fake = FakeUpstreams({"users/users/1": (0.1, 200, answer)})
    with pytest.raises(BadGateway) as info:
        await _run(agg, fake)
    assert "not valid JSON" in info.value.message


async def test_deep_answers_are_composed_or_refused_never_a_500(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An answer nested a few hundred deep, which the parser takes, is copied without
    recursion (fields.allow); one nested just under the parser's limit and made deeper
    by a rename cannot be written: 502, not an internal error."""
    deep = b"[" * 600 + b"]" * 600
    allow = {"fields": {"allow": ["a"]}}
    agg = _aggregate({"calls": [{**_calls()[0], **allow}]})
    fake = FakeUpstreams({"users/users/1": (0.1, 200, b'{"a": ' + deep + b', "b": 1}')})
    resp = await _run(agg, fake)
    assert resp.body == b'{"user":{"a":' + deep + b"}}"
    too_deep = b"[" * 900 + b"]" * 900
    rename = {"fields": {"rename": {"a": ".".join(f"p{i}" for i in range(200))}}}
    agg = _aggregate({"calls": [{**_calls()[0], **rename}]})
    fake = FakeUpstreams({"users/users/1": (0.1, 200, b'{"a": ' + too_deep + b"}")})
    with pytest.raises(BadGateway, match="cannot be written as JSON"):
        await _run(agg, fake)


async def test_dots_inside_a_value_are_kept(autojump_clock: trio.testing.MockClock) -> None:
    agg = _aggregate({"calls": [{"name": "s", "upstream": "u", "path": "/files/{header.x-f}"}]})
    fake = FakeUpstreams({"u/files/a..b.json": (0.1, 200, {})})
    ex = _exchange(fake)
    ex.request.headers.add("x-f", "a..b.json")
    with trio.fail_after(5):
        resp = await agg.on_request(ex)
    assert resp.status == 200


# -- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "path", "words"),
    [
        ({"calls": []}, "calls", "at least one"),
        ({"timeout": "0s", "calls": _calls()}, "timeout", "positive"),
        ({"merge": "deep", "calls": _calls()}, "merge", "one of"),
        ({"calls": [{"name": "u", "upstream": "x"}]}, "calls[0].path", "missing"),
        ({"calls": [{"name": "u", "upstream": "x", "path": "x"}]}, "calls[0].path", '"/"'),
        ({"calls": [{"name": "path", "upstream": "x", "path": "/"}]}, "calls[0].name", "reserved"),
        ({"calls": [{"name": "a b", "upstream": "x", "path": "/"}]}, "calls[0].name", "name"),
        (
            {"calls": [{"name": "u", "upstream": "x", "path": "/", "method": "get"}]},
            "calls[0].method",
            "upper-case",
        ),
        (
            {"calls": [{"name": "u", "upstream": "x", "path": "/", "forward_headers": ["host"]}]},
            "calls[0].forward_headers[0]",
            "managed",
        ),
        (
            {"calls": _calls({"name": "user", "upstream": "x", "path": "/"})},
            "calls[1].name",
            "duplicate",
        ),
        (
            {"calls": _calls({"name": "o", "upstream": "x", "path": "/{usr.id}"})},
            "calls[1].path",
            "unknown name 'usr'",
        ),
        (
            {"calls": _calls({"name": "o", "upstream": "x", "path": "/", "headers": {"x": "{a"}})},
            "calls[1].headers.x",
            "unclosed",
        ),
        (
            {
                "calls": [
                    {"name": "a", "upstream": "x", "path": "/{b.id}"},
                    {"name": "b", "upstream": "x", "path": "/{c.id}"},
                    {"name": "c", "upstream": "x", "path": "/{a.id}"},
                ]
            },
            "calls[0]",
            "cycle: a -> b -> c -> a",
        ),
        (
            {"calls": [{"name": "a", "upstream": "x", "path": "/{a.id}"}]},
            "calls[0]",
            "cycle: a -> a",
        ),
        (
            {
                "calls": [
                    {"name": "a", "upstream": "x", "path": "/", "required": False},
                    {"name": "b", "upstream": "x", "path": "/{a.id}"},
                ]
            },
            "calls[1].required",
            "depends on optional",
        ),
        (
            {"calls": [{"name": "a", "upstream": "x", "path": "/", "fields": {"allow": ["a[*]"]}}]},
            "calls[0].fields.allow[0]",
            "wildcards",
        ),
        (
            {"calls": _calls({"name": "o", "upstream": "x", "path": "/", "key": "user"})},
            "calls[1].key",
            "twice",
        ),
        (
            {"calls": [{"name": "a", "upstream": "x", "path": "/", "timeout": "fast"}]},
            "calls[0].timeout",
            "duration",
        ),
    ],
)
def test_config_errors(table: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(AggregateConfig, table, "routes[3].plugins.aggregate")
    assert info.value.path == f"routes[3].plugins.aggregate.{path}"
    assert words in info.value.message


# -- end to end: a running gateway in front of the stub services ----------------------------


def _doc_routes() -> list[dict[str, Any]]:
    """The BFF routes of the default gateway.toml (also shown in the README)."""
    text = (Path(__file__).parent.parent / "gateway.toml").read_text()
    routes: list[dict[str, Any]] = [
        r for r in tomllib.loads(text)["routes"] if r["name"] in ("web-profile", "mobile-profile")
    ]
    assert len(routes) == 2
    return routes


def _stub_config(stubs: Stubs, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "upstreams": {
            name: {"targets": [f"127.0.0.1:{port}"]} for name, port in stubs.ports.items()
        },
        "routes": routes,
    }


def _route(calls: list[dict[str, Any]], **aggregate: Any) -> dict[str, Any]:
    return {
        "name": "bff",
        "path": "/bff/{id}",
        "plugins": {"aggregate": {"calls": calls, **aggregate}},
    }


def _slow(stubs: Stubs) -> SlowService:
    slow = stubs.services["slow"]
    assert isinstance(slow, SlowService)
    return slow


async def test_e2e_documented_bff_routes() -> None:
    with trio.fail_after(10):
        async with (
            open_stubs(names=["users", "orders", "catalog"]) as stubs,
            open_gateway(_stub_config(stubs, _doc_routes())) as gw,
        ):
            web = await http_request(gw.port, "GET", "/web/users/1")
            mobile = await http_request(gw.port, "GET", "/mobile/users/1")
            missing = await http_request(gw.port, "GET", "/mobile/users/99")
    assert web.status == 200
    body = web.json()
    assert body["user"] == {"id": 1, "name": "Ada Lovelace", "tier": "gold"}
    assert [o["id"] for o in body["orders"]] == [101, 102]
    assert body["catalog"][0] == {"sku": "KB-01", "name": "Mechanical keyboard", "price": 89.0}
    assert web.header("x-aggregate-partial") is None
    assert web.header("x-stub") is None
    assert mobile.status == 200
    assert mobile.json() == {
        "id": 1,
        "name": "Ada Lovelace",
        "items": [{"sku": "KB-01", "qty": 1}, {"sku": "MS-02", "qty": 2}],
    }
    # A required call answering 404 is the gateway's 502, never the backend's body.
    assert missing.status == 502
    assert missing.json()["error"]["code"] == "bad_gateway"


async def test_e2e_optional_call_failing_and_timing_out() -> None:
    calls: list[dict[str, Any]] = [
        {"name": "user", "upstream": "users", "path": "/users/{path.id}"},
        {"name": "flaky", "upstream": "flaky", "path": "/x?rate=1", "required": False},
        {
            "name": "recs",
            "upstream": "slow",
            "path": "/recs?delay=5",
            "required": False,
            "timeout": "300ms",
        },
    ]
    with trio.fail_after(10):
        async with (
            open_stubs(names=["users", "flaky", "slow"]) as stubs,
            open_gateway(_stub_config(stubs, [_route(calls)])) as gw,
        ):
            resp = await http_request(gw.port, "GET", "/bff/2")
            await _slow(stubs).wait_cancelled(1)
    assert resp.status == 200
    assert resp.json() == {
        "user": {"id": 2, "name": "Alan Turing", "email": "alan@example.com", "tier": "silver"},
        "_partial": ["flaky", "recs"],
    }
    assert resp.header("x-aggregate-partial") == "flaky, recs"


async def test_e2e_required_failure_cancels_siblings() -> None:
    calls: list[dict[str, Any]] = [
        {"name": "slow", "upstream": "slow", "path": "/s?delay=5", "required": False},
        # The failing call waits for a short one, so the slow call has surely started.
        {"name": "wait", "upstream": "slow", "path": "/w?delay=0.2", "include": False},
        {"name": "flaky", "upstream": "flaky", "path": "/x?fail=1&key=req&w={wait.delayed}"},
    ]
    with trio.fail_after(10):
        async with (
            open_stubs(names=["flaky", "slow"]) as stubs,
            open_gateway(_stub_config(stubs, [_route(calls)])) as gw,
        ):
            slow = _slow(stubs)
            start = trio.current_time()
            resp = await http_request(gw.port, "GET", "/bff/1")
            assert trio.current_time() - start < 3
            # The slow stub sees its call go away: the sibling was cancelled.
            await slow.wait_cancelled(1)
            assert slow.stats() == {
                "started": 2,
                "completed": 1,
                "cancelled": 1,
                "in_flight": 0,
            }
    assert resp.status == 502
    assert "flaky" in resp.json()["error"]["message"]


async def test_e2e_a_client_that_leaves_lets_the_calls_go(tmp_path: Path) -> None:
    """The calls went on to their own timeouts after the client had gone (here 30 s):
    now, as for a proxied call, the gateway sees it within a second, lets every call go
    (the upstreams see them end) and logs a 499."""
    calls: list[dict[str, Any]] = [
        {"name": "a", "upstream": "slow", "path": "/a?delay=30"},
        {"name": "b", "upstream": "slow", "path": "/b?delay=30", "required": False},
    ]
    log = tmp_path / "access.log"
    with trio.fail_after(10):
        async with open_stubs(names=["slow"]) as stubs:
            config = _stub_config(stubs, [_route(calls)])
            config["access_log"] = {"path": str(log), "format": "json"}
            async with open_gateway(config) as gw:
                slow = _slow(stubs)
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(b"GET /bff/1 HTTP/1.1\r\nHost: a\r\n\r\n")
                while slow.started < 2:
                    await slow.started_event.wait()
                await stream.aclose()
                left = trio.current_time()
                await slow.wait_cancelled(2)
                assert trio.current_time() - left < 3
                for _ in range(100):  # the line is written once the connection ended
                    if log.exists() and log.read_text():
                        break
                    await trio.sleep(0.02)
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["status"] == 499


async def test_a_client_gone_as_a_shutdown_cuts_the_aggregate_is_the_cut(
    autojump_clock: Any,
) -> None:
    """A call's ClientGone while a shutdown cut the request was raised together with the
    cut, in a group no handler of the engine took: the cut wins, as the cancellation
    it is."""

    async def caller(exchange: Exchange, call: UpstreamCall) -> Response:
        if call.target.startswith(b"/a"):
            await trio.sleep(1)
            raise ClientGone()  # the pool's check of the client fired
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.01)  # a shielded close of the upstream connection
            raise
        raise AssertionError("not reached")

    aggregate = _aggregate(
        {
            "calls": [
                {"name": "a", "upstream": "u", "path": "/a"},
                {"name": "b", "upstream": "u", "path": "/b", "required": False},
            ]
        }
    )
    escaped: list[BaseException] = []
    with trio.CancelScope() as cut:

        async def shutdown() -> None:
            await trio.sleep(1.005)  # while call b unwinds from the first cancellation
            cut.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shutdown)
            try:
                await aggregate.on_request(_exchange(caller))
            except BaseException as e:
                escaped.append(e)
                raise
    assert cut.cancelled_caught
    (raised,) = escaped
    # Only cancellations (as trio raises them out of a nursery), which the cut's scope
    # takes: no ClientGone mixed in.
    assert isinstance(raised, BaseExceptionGroup)
    assert raised.split(trio.Cancelled)[1] is None


async def test_a_call_made_in_on_log_finishes_after_the_client_left() -> None:
    """Once the response is over, a filter's call (an audit record in on_log) no longer
    follows the client: a keep-alive client closing after its answer, as they do, cut
    it with ClientGone (and a closed socket made the check itself fail)."""
    outcomes: list[object] = []
    done = trio.Event()

    class Audit(Filter):
        name, stage = "audit", Stage.EDGE

        async def on_log(self, exchange: Exchange) -> None:
            call = UpstreamCall(
                upstream="slow", method=b"GET", target=b"/audit?delay=2", headers=Headers()
            )
            try:
                response = await exchange.call_upstream(call)
                await response.aclose()
                outcomes.append(response.status)
            except Exception as e:
                outcomes.append(repr(e))
            done.set()

    with trio.fail_after(20):
        async with open_stubs(names=["slow", "echo"]) as stubs:
            config = {
                "upstreams": {n: {"targets": [stubs.target(n)]} for n in ("slow", "echo")},
                "routes": [{"prefix": "/", "upstream": "echo", "plugins": {"audit": {}}}],
            }
            async with open_gateway(config, extra_plugins=[("a", FilterSet(Audit))]) as gw:
                async with Client.open(gw.port) as client:
                    assert (await client.request("GET", "/x")).status == 200
                await done.wait()
    assert outcomes == [200]


async def test_e2e_dependent_call_and_overall_deadline() -> None:
    dependent = [
        {"name": "user", "upstream": "users", "path": "/users/{path.id}"},
        {"name": "orders", "upstream": "orders", "path": "/orders?user_id={user.id}"},
    ]
    deadline = [{"name": "slow", "upstream": "slow", "path": "/s?delay=5"}]
    routes = [
        _route(dependent),
        {**_route(deadline, timeout="300ms"), "name": "late", "path": "/late"},
    ]
    with trio.fail_after(10):
        async with (
            open_stubs(names=["users", "orders", "slow"]) as stubs,
            open_gateway(_stub_config(stubs, routes)) as gw,
        ):
            resp = await http_request(gw.port, "GET", "/bff/3")
            late = await http_request(gw.port, "GET", "/late")
            await _slow(stubs).wait_cancelled(1)
    assert resp.status == 200
    assert [o["id"] for o in resp.json()["orders"]["orders"]] == [104]
    assert late.status == 504
    assert late.json()["error"]["code"] == "upstream_timeout"


async def test_e2e_config_error_names_the_path() -> None:
    calls = [
        {"name": "user", "upstream": "users", "path": "/users/{path.id}"},
        {"name": "orders", "upstream": "orders", "path": "/orders?user_id={usr.id}"},
    ]
    config = {"upstreams": {"users": {"targets": ["127.0.0.1:9"]}}, "routes": [_route(calls)]}
    with trio.fail_after(5), pytest.raises(ConfigError) as info:
        async with open_gateway(config):
            pass
    assert info.value.path == "routes[0].plugins.aggregate.calls[1].path"
    assert "unknown name 'usr'" in info.value.message


async def test_a_call_to_an_upstream_that_does_not_exist_is_a_config_error() -> None:
    """check passed it, and every request was a 502 "no upstream named"."""
    from engine.schema import ConfigError
    from engine.testing import open_gateway

    config = {
        "upstreams": {"users": {"targets": ["127.0.0.1:1"]}},
        "routes": [
            {
                "name": "bff",
                "path": "/bff",
                "plugins": {
                    "aggregate": {"calls": [{"name": "x", "upstream": "nope", "path": "/"}]}
                },
            }
        ],
    }
    with trio.fail_after(5), pytest.raises(ConfigError, match="no upstream named 'nope'") as info:
        async with open_gateway(config):
            pytest.fail("the gateway started")
    assert info.value.path == "routes[0].plugins.aggregate.calls[0].upstream"
