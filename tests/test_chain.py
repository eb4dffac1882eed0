"""The filter chain, seen from a plugin: stages, phases, answers, errors, bodies, exchange.

Filters here are registered the way a plugin author's test registers a plugin: an object
with a ``filtergate_filters`` hook implementation, passed to ``open_gateway`` as
``extra_plugins``; the gateway runs in front of the stub services.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio

from engine.chain import (
    Filter,
    Stage,
    compile_chain,
    run_request_phases,
    run_sync_request_phases,
    run_sync_response_phases,
    wrap_upstream,
)
from engine.errors import CircuitOpen, Forbidden, GatewayError, RateLimited, Unauthorized
from engine.exchange import Exchange, Headers, Identity, Response, StashKey, UpstreamCall
from engine.plugins import hookimpl
from engine.testing import (
    Client,
    Stubs,
    build_filter,
    http_request,
    make_exchange,
    open_gateway,
    run_chain,
)

CallNext = Any  # Callable[[UpstreamCall], Awaitable[Response]]


class FilterSet:
    """A plugin object providing ``types``, as a test registers it."""

    def __init__(self, *types: type[Any]) -> None:
        self.types = types

    @hookimpl
    def filtergate_filters(self) -> Sequence[type[Any]]:
        return list(self.types)


def recorder(name: str, stage: Stage, log: list[str], *, is_async: bool) -> type[Filter]:
    """A filter type that records its phases in ``log`` and marks both directions.

    The request side appends ``x-req-order: NAME`` (the echo stub shows what arrived), the
    response side appends ``x-order: NAME`` (the client sees it).
    """
    if is_async:

        class AsyncRecorder(Filter):
            async def on_request(self, exchange: Exchange) -> None:
                log.append(f"req:{self.name}")
                exchange.request.headers.add("x-req-order", self.name)

            async def on_response(self, exchange: Exchange, response: Response) -> None:
                log.append(f"resp:{self.name}")
                response.headers.add("x-order", self.name)

        cls: type[Filter] = AsyncRecorder
    else:

        class SyncRecorder(Filter):
            def on_request(self, exchange: Exchange) -> None:
                log.append(f"req:{self.name}")
                exchange.request.headers.add("x-req-order", self.name)

            def on_response(self, exchange: Exchange, response: Response) -> None:
                log.append(f"resp:{self.name}")
                response.headers.add("x-order", self.name)

        cls = SyncRecorder
    cls.name = name
    cls.stage = stage
    return cls


def echo_config(stubs: Stubs, **route: Any) -> dict[str, Any]:
    """One route ``r`` on ``/`` to the echo stub; ``route`` adds or overrides keys."""
    match = {} if "path" in route else {"prefix": "/"}
    return {
        "upstreams": {
            "echo": {"targets": [stubs.target("echo")]},
            "slow": {"targets": [stubs.target("slow")]},
        },
        "routes": [{"name": "r", **match, "upstream": "echo", **route}],
    }


def echoed(resp: Any, header: str) -> list[str]:
    """Values of ``header`` as the echo stub received them, in order."""
    return [v for k, v in resp.json()["header_list"] if k == header]


# -- stage order -------------------------------------------------------------------------


async def test_stages_run_in_order_whatever_the_config_order(stubs: Stubs) -> None:
    log: list[str] = []
    types = [
        recorder("t2", Stage.TRANSFORM, log, is_async=False),
        recorder("z1", Stage.TERMINAL, log, is_async=True),
        recorder("l1", Stage.LIMIT, log, is_async=False),
        recorder("t1", Stage.TRANSFORM, log, is_async=True),
        recorder("a1", Stage.AUTHENTICATE, log, is_async=True),
        recorder("e1", Stage.EDGE, log, is_async=False),
    ]
    config = echo_config(stubs)
    # Config order: t2 before t1 (a tie in TRANSFORM), every stage scrambled.
    config["plugins"] = {t.name: {} for t in types}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/x")
    order = ["e1", "a1", "l1", "t2", "t1", "z1"]
    assert resp.status == 200
    assert echoed(resp, "x-req-order") == order
    assert resp.header_all("x-order") == order[::-1]
    assert log == [f"req:{n}" for n in order] + [f"resp:{n}" for n in reversed(order)]


async def test_config_order_breaks_ties_both_ways(stubs: Stubs) -> None:
    log: list[str] = []
    first = recorder("first", Stage.LIMIT, log, is_async=False)
    second = recorder("second", Stage.LIMIT, log, is_async=True)
    plugin = FilterSet(first, second)
    with trio.fail_after(10):
        for names in (["first", "second"], ["second", "first"]):
            config = echo_config(stubs)
            config["plugins"] = {n: {} for n in names}
            async with open_gateway(config, extra_plugins=[("rec", plugin)]) as gw:
                resp = await http_request(gw.port, "GET", "/")
            assert echoed(resp, "x-req-order") == names
            assert resp.header_all("x-order") == names[::-1]


# -- a filter answers --------------------------------------------------------------------


def answering(style: str) -> type[Filter]:
    """A LIMIT filter that answers 418 when the request has ``x-answer``.

    ``style``: ``return`` / ``set`` (sync, returns or sets ``exchange.response``) or
    ``async-return``.
    """

    def answer(exchange: Exchange) -> Response | None:
        if "x-answer" not in exchange.request.headers:
            return None
        response = Response(418, Headers([(b"content-type", b"text/plain")]), b"short")
        if style == "set":
            exchange.response = response
            return None
        return response

    class Answer(Filter):
        name, stage = "answer", Stage.LIMIT

        def on_response(self, exchange: Exchange, response: Response) -> None:
            response.headers.add("x-order", self.name)

    if style == "async-return":

        async def on_request_async(self: Filter, exchange: Exchange) -> Response | None:
            await trio.lowlevel.checkpoint()
            return answer(exchange)

        Answer.on_request = on_request_async  # type: ignore[attr-defined]
    else:

        def on_request_sync(self: Filter, exchange: Exchange) -> Response | None:
            return answer(exchange)

        Answer.on_request = on_request_sync  # type: ignore[attr-defined]
    return Answer


@pytest.mark.parametrize("style", ["return", "set", "async-return"])
async def test_an_answer_skips_the_rest_and_the_upstream(stubs: Stubs, style: str) -> None:
    log: list[str] = []
    types = [
        recorder("late", Stage.TRANSFORM, log, is_async=False),
        answering(style),
        recorder("auth", Stage.AUTHENTICATE, log, is_async=True),
        recorder("edge", Stage.EDGE, log, is_async=False),
    ]
    config = echo_config(stubs, upstream="slow")
    config["plugins"] = {t.name: {} for t in types}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/?delay=0", headers=[("x-answer", "1")])
            assert resp.status == 418
            assert resp.body == b"short"
            assert stubs.slow.started == 0  # the upstream was never called
            # The response side of every filter whose request side ran, in reverse
            # order (the answering filter's own included); "late" never ran.
            assert resp.header_all("x-order") == ["answer", "auth", "edge"]
            assert log == ["req:edge", "req:auth", "resp:auth", "resp:edge"]

            # The same chain without an answer reaches the upstream.
            resp = await http_request(gw.port, "GET", "/?delay=0")
            assert resp.status == 200
            assert stubs.slow.started == 1
            assert resp.header_all("x-order") == ["late", "answer", "auth", "edge"]


@pytest.mark.parametrize(
    ("error", "stage", "status", "code", "extra_header", "seen"),
    [
        (
            Unauthorized("token expired", headers=[(b"www-authenticate", b"Bearer")]),
            Stage.AUTHENTICATE,
            401,
            "unauthorized",
            ("www-authenticate", "Bearer"),
            ["raiser", "edge"],
        ),
        (
            RateLimited(2.5),
            Stage.LIMIT,
            429,
            "rate_limited",
            ("retry-after", "3"),
            ["raiser", "auth", "edge"],
        ),
    ],
)
async def test_a_gateway_error_gets_the_error_body_and_response_side_headers(
    stubs: Stubs,
    error: GatewayError,
    stage: Stage,
    status: int,
    code: str,
    extra_header: tuple[str, str],
    seen: list[str],
) -> None:
    log: list[str] = []

    class Raiser(Filter):
        name = "raiser"

        async def on_request(self, exchange: Exchange) -> None:
            raise error

        def on_response(self, exchange: Exchange, response: Response) -> None:
            response.headers.add("x-order", self.name)

    Raiser.stage = stage
    types: list[type[Filter]] = [
        Raiser,
        recorder("late", Stage.TRANSFORM, log, is_async=True),
        recorder("auth", Stage.AUTHENTICATE, log, is_async=False),
        recorder("edge", Stage.EDGE, log, is_async=True),
    ]
    config = echo_config(stubs, upstream="slow")
    config["plugins"] = {t.name: {} for t in types}
    if stage == Stage.AUTHENTICATE:
        del config["plugins"]["auth"]  # a tie with the raiser: keep the expectation simple
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/?delay=0")
    assert resp.status == status
    assert resp.header("content-type") == "application/json"
    assert resp.header(extra_header[0]) == extra_header[1]
    body = resp.json()["error"]
    assert body["status"] == status
    assert body["code"] == code
    assert body["message"] == error.message
    assert body["request_id"] == resp.header("x-request-id")
    assert resp.header_all("x-order") == seen
    assert stubs.slow.started == 0


class Buggy(Filter):
    """A LIMIT filter with a bug that shows when the request has ``x-boom``."""

    name, stage = "buggy", Stage.LIMIT

    def on_request(self, exchange: Exchange) -> None:
        if "x-boom" in exchange.request.headers:
            raise KeyError("boom")


async def test_a_filter_bug_is_a_500_and_the_connection_survives(
    stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    types: list[type[Filter]] = [Buggy, recorder("edge", Stage.EDGE, log, is_async=False)]
    config = echo_config(stubs)
    config["plugins"] = {"buggy": {}, "edge": {}}
    with trio.fail_after(10):
        async with (
            open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw,
            Client.open(gw.port) as client,
        ):
            resp = await client.request("GET", "/", headers=[("x-boom", "1")])
            assert resp.status == 500
            assert resp.json()["error"]["code"] == "internal_error"
            assert "boom" not in resp.body.decode()  # no internals leak to the client
            assert resp.header_all("x-order") == ["edge"]
            resp = await client.request("GET", "/")
            assert resp.status == 200
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_a_filter_bug_skips_the_response_side_of_later_filters(stubs: Stubs) -> None:
    log: list[str] = []
    types: list[type[Filter]] = [Buggy, recorder("late", Stage.TRANSFORM, log, is_async=False)]
    config = echo_config(stubs)
    config["plugins"] = {"buggy": {}, "late": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/", headers=[("x-boom", "1")])
    assert resp.status == 500
    # As for a GatewayError: "late" never saw the request, so not the response either.
    assert resp.header_all("x-order") == []


class DenyOnResponse(Filter):
    """Turns an upstream 200 into a 403 on the response side."""

    name, stage = "deny-on-response", Stage.TRANSFORM

    def on_response(self, exchange: Exchange, response: Response) -> None:
        if response.status == 200:
            raise Forbidden("not for you")


async def test_an_error_raised_on_the_response_side(stubs: Stubs) -> None:
    log: list[str] = []
    types: list[type[Filter]] = [DenyOnResponse, recorder("edge", Stage.EDGE, log, is_async=False)]
    config = echo_config(stubs)
    config["plugins"] = {"deny-on-response": {}, "edge": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/")
    assert resp.status == 403
    assert resp.json()["error"]["message"] == "not for you"
    assert resp.header_all("x-order") == ["edge"]  # earlier filters still see it


async def test_an_error_on_the_response_side_releases_the_upstream_connection(
    stubs: Stubs,
) -> None:
    config = echo_config(stubs)
    config["plugins"] = {"deny-on-response": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(DenyOnResponse))]) as gw:
            for _ in range(3):
                assert (await http_request(gw.port, "GET", "/")).status == 403
            assert gw.admin_port is not None
            upstreams = (await http_request(gw.admin_port, "GET", "/upstreams")).json()
    assert [t["active"] for t in upstreams["echo"]["targets"]] == [0]


# -- around_upstream ---------------------------------------------------------------------


SIDE: StashKey[dict[str, Any]] = StashKey("side")


async def test_around_upstream_wraps_proxied_calls_and_filter_calls(stubs: Stubs) -> None:
    events: list[str] = []

    class Outer(Filter):
        name, stage = "outer", Stage.EDGE

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            events.append(f"outer>{call.target.decode()}")
            call.headers.add("x-around", "outer")
            response: Response = await call_next(call)
            events.append(f"outer<{response.status}")
            response.headers.add("x-around-seen", call.target.decode())
            return response

    class Inner(Filter):
        name, stage = "inner", Stage.LIMIT

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            events.append(f"inner>{call.target.decode()}")
            call.headers.add("x-around", "inner")
            response: Response = await call_next(call)
            events.append(f"inner<{response.status}")
            return response

    class SideCall(Filter):
        name, stage = "side-call", Stage.TRANSFORM

        async def on_request(self, exchange: Exchange) -> None:
            call = UpstreamCall(
                upstream="echo", method=b"GET", target=b"/side", headers=Headers([])
            )
            response = await exchange.call_upstream(call)
            assert response.stream is not None
            body = b"".join([chunk async for chunk in response.stream])
            exchange.stash[SIDE] = json.loads(body)
            seen_by_around = response.headers.get("x-around-seen") or b"(none)"
            exchange.request.headers.set("x-side-around", seen_by_around)

    types = [SideCall, Inner, Outer]
    config = echo_config(stubs)
    config["plugins"] = {"side-call": {}, "inner": {}, "outer": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(*types))]) as gw:
            resp = await http_request(gw.port, "GET", "/main")
    assert resp.status == 200
    # Both calls went through both wrappers, the earlier stage outermost.
    assert events == [
        "outer>/side",
        "inner>/side",
        "inner<200",
        "outer<200",
        "outer>/main",
        "inner>/main",
        "inner<200",
        "outer<200",
    ]
    assert echoed(resp, "x-around") == ["outer", "inner"]
    assert echoed(resp, "x-side-around") == ["/side"]  # the filter's call was wrapped too
    assert resp.header("x-around-seen") == "/main"


async def test_around_upstream_may_answer_without_calling(stubs: Stubs) -> None:
    class Breaker(Filter):
        name, stage = "breaker", Stage.EDGE

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            raise CircuitOpen("the circuit is open", retry_after=5)

        def on_response(self, exchange: Exchange, response: Response) -> None:
            response.headers.add("x-order", self.name)

    config = echo_config(stubs, upstream="slow")
    config["plugins"] = {"breaker": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(Breaker))]) as gw:
            resp = await http_request(gw.port, "GET", "/?delay=0")
    assert resp.status == 503
    assert resp.header("retry-after") == "5"
    assert resp.json()["error"]["code"] == "circuit_open"
    assert resp.header_all("x-order") == ["breaker"]
    assert stubs.slow.started == 0


# -- on_log ------------------------------------------------------------------------------


async def test_a_failing_on_log_never_reaches_the_client(
    stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    logged: list[tuple[int, str | None]] = []
    done = trio.Event()

    class SyncFail(Filter):
        name, stage = "sync-fail", Stage.EDGE

        def on_log(self, exchange: Exchange) -> None:
            raise RuntimeError("sync on_log failed")

    class AsyncFail(Filter):
        name, stage = "async-fail", Stage.LIMIT

        async def on_log(self, exchange: Exchange) -> None:
            await trio.lowlevel.checkpoint()
            raise RuntimeError("async on_log failed")

    class Recorder(Filter):
        name, stage = "log-recorder", Stage.TRANSFORM

        async def on_log(self, exchange: Exchange) -> None:
            assert exchange.response is not None
            logged.append((exchange.response.status, exchange.request.path))
            done.set()

    config = echo_config(stubs)
    config["plugins"] = {"log-recorder": {}, "async-fail": {}, "sync-fail": {}}
    plugin = FilterSet(SyncFail, AsyncFail, Recorder)
    with trio.fail_after(10):
        async with (
            open_gateway(config, extra_plugins=[("rec", plugin)]) as gw,
            Client.open(gw.port) as client,
        ):
            resp = await client.request("GET", "/one")
            assert resp.status == 200
            await done.wait()
            resp = await client.request("GET", "/two")  # the connection is still good
            assert resp.status == 200
    assert logged[0] == (200, "/one")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    failures = [
        str(r.exc_info[1]) for r in caplog.records if r.exc_info and r.exc_info[1] is not None
    ]
    assert "sync on_log failed" in failures
    assert "async on_log failed" in failures
    assert any("on_log" in m for m in messages)


# -- bodies ------------------------------------------------------------------------------


async def test_bodies_are_buffered_for_filters_that_ask(stubs: Stubs) -> None:
    seen: dict[str, Any] = {}

    class Early(Filter):
        name, stage = "early", Stage.EDGE

        def on_request(self, exchange: Exchange) -> None:
            seen["early"] = exchange.request.body  # before the body-needing filter

    class NeedsRequest(Filter):
        name, stage = "needs-request", Stage.TRANSFORM
        needs_request_body = True

        def on_request(self, exchange: Exchange) -> None:
            body = exchange.request.body
            seen["request"] = body
            if body is not None:
                exchange.request.body = body.upper()

    class NeedsResponse(Filter):
        name, stage = "needs-response", Stage.TRANSFORM
        needs_response_body = True

        async def on_response(self, exchange: Exchange, response: Response) -> None:
            seen["response"] = response.body
            seen["stream"] = response.stream is not None
            if response.body is not None:
                doc = json.loads(response.body)
                response.body = json.dumps({"echoed": doc["body"]}).encode()

    config = echo_config(stubs)
    config["server"] = {"max_buffered_body": "1KiB"}
    config["plugins"] = {"needs-response": {}, "needs-request": {}, "early": {}}
    plugin = FilterSet(Early, NeedsRequest, NeedsResponse)
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", plugin)]) as gw:
            resp = await http_request(gw.port, "POST", "/", body=b"small body")
            assert resp.status == 200
            assert resp.json() == {"echoed": "SMALL BODY"}
            assert int(resp.header("content-length") or 0) == len(resp.body)
            assert seen["early"] is None
            assert seen["request"] == b"small body"
            assert json.loads(seen["response"])["body"] == "SMALL BODY"
            assert seen["stream"] is False

            # Over max_buffered_body: the filters see None and both bodies still stream.
            big = b"x" * 4000
            seen.clear()
            resp = await http_request(gw.port, "POST", "/", body=big)
            assert resp.status == 200
            assert resp.json()["body"] == big.decode()
            assert seen["request"] is None
            assert seen["response"] is None
            assert seen["stream"] is True


async def test_a_body_over_max_body_size_is_413_before_any_upstream_call(stubs: Stubs) -> None:
    class NeedsRequest(Filter):
        name, stage = "needs-request", Stage.TRANSFORM
        needs_request_body = True

        def on_request(self, exchange: Exchange) -> None:
            pass

    config = echo_config(stubs, upstream="slow", max_body_size="2KiB")
    config["plugins"] = {"needs-request": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(NeedsRequest))]) as gw:
            resp = await http_request(gw.port, "POST", "/?delay=0", body=b"y" * 5000)
    assert resp.status == 413
    assert resp.json()["error"]["code"] == "body_too_large"
    assert stubs.slow.started == 0


# -- the exchange ------------------------------------------------------------------------


HITS: StashKey[int] = StashKey("hits")


async def test_the_exchange_fields_filters_see(stubs: Stubs) -> None:
    seen: dict[str, Any] = {}
    logged = trio.Event()

    class Auth(Filter):
        name, stage = "auth", Stage.AUTHENTICATE

        def on_request(self, exchange: Exchange) -> None:
            r = exchange.request
            assert exchange.route is not None
            seen.update(
                method=r.method,
                path=r.path,
                target=r.target,
                captures=dict(exchange.captures),
                query=r.query,
                raw_query=r.raw_query,
                header=r.headers.get("x-custom"),
                header_names_lowercase=all(n == n.lower() for n, _ in r.headers),
                client=r.client,
                peer_host=r.peer[0],
                scheme=r.scheme,
                tls=r.tls,
                route=exchange.route.name,
                request_id=exchange.request_id,
                identity_before=exchange.identity,
                routed=exchange.timings.routed is not None,
                upstream_start_before=exchange.timings.upstream_start,
            )
            exchange.identity = Identity("alice", groups=("admins",), source="test")
            exchange.stash[HITS] = 7

    class Reader(Filter):
        name, stage = "reader", Stage.TRANSFORM

        async def on_request(self, exchange: Exchange) -> None:
            seen["identity"] = exchange.identity
            seen["hits"] = exchange.stash[HITS]
            seen["missing"] = exchange.stash.get(SIDE)

        def on_response(self, exchange: Exchange, response: Response) -> None:
            t = exchange.timings
            assert t.routed is not None
            assert t.upstream_start is not None
            assert t.upstream_headers is not None
            seen["timings_ordered"] = t.start <= t.routed <= t.upstream_start
            seen["headers_after_start"] = t.upstream_start <= t.upstream_headers
            seen["upstream_target"] = exchange.upstream_target
            seen["status"] = response.status

        def on_log(self, exchange: Exchange) -> None:
            seen["end"] = exchange.timings.end is not None
            seen["logged_status"] = exchange.response.status if exchange.response else None
            logged.set()

    config = echo_config(stubs, path="/items/{id}", name="items")
    config["plugins"] = {"reader": {}, "auth": {}}
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("rec", FilterSet(Auth, Reader))]) as gw:
            resp = await http_request(
                gw.port,
                "GET",
                "/a/../items/%34%32?q=1&q=2&e=",
                headers=[("X-Custom", "hello")],
            )
            await logged.wait()
    assert resp.status == 200
    assert resp.json()["path"] == "/items/42"  # what was forwarded: the canonical path
    assert seen == {
        "method": b"GET",
        "path": "/items/42",
        "target": b"/items/42?q=1&q=2&e=",
        "captures": {"id": "42"},
        "query": {"q": ["1", "2"], "e": [""]},
        "raw_query": b"q=1&q=2&e=",
        "header": b"hello",
        "header_names_lowercase": True,
        "client": "127.0.0.1",
        "peer_host": "127.0.0.1",
        "scheme": "http",
        "tls": None,
        "route": "items",
        "request_id": resp.header("x-request-id"),
        "identity_before": None,
        "routed": True,
        "upstream_start_before": None,
        "identity": Identity("alice", groups=("admins",), source="test"),
        "hits": 7,
        "missing": None,
        "timings_ordered": True,
        "headers_after_start": True,
        "upstream_target": stubs.target("echo"),
        "status": 200,
        "end": True,
        "logged_status": 200,
    }


# -- compiling a chain (no sockets) ------------------------------------------------------


def test_compile_decides_sync_or_async_once_and_skips_missing_phases() -> None:
    log: list[str] = []
    a = build_filter(recorder("a", Stage.EDGE, log, is_async=True))
    b = build_filter(recorder("b", Stage.EDGE, log, is_async=False))

    class OnlyLog(Filter):
        name, stage = "only-log", Stage.EDGE

        def on_log(self, exchange: Exchange) -> None:
            pass

    c = build_filter(OnlyLog)
    chain = compile_chain([c, b, a])
    assert chain.names == ["only-log", "b", "a"]
    assert [(p.filter.name, p.is_async) for p in chain.request] == [("b", False), ("a", True)]
    assert [p.filter.name for p in chain.response] == ["a", "b"]
    assert [p.filter.name for p in chain.log] == ["only-log"]
    assert chain.around == []
    # Response phases for a request that stopped after the first two filters.
    assert [p.filter.name for p in chain.response_for(2)] == ["b"]
    assert chain.response_for(0) == []


async def test_the_request_depth_counts_filters_without_a_request_side() -> None:
    log: list[str] = []

    class OnlyResponse(Filter):
        name, stage = "only-response", Stage.EDGE

        def on_response(self, exchange: Exchange, response: Response) -> None:
            log.append("resp:only-response")

    class Answer(Filter):
        name, stage = "answer", Stage.LIMIT

        async def on_request(self, exchange: Exchange) -> Response:
            return Response(204)

    class Deny(Filter):
        name, stage = "deny", Stage.LIMIT

        def on_request(self, exchange: Exchange) -> None:
            raise Forbidden()

    edge = build_filter(recorder("edge", Stage.EDGE, log, is_async=False))
    late = build_filter(recorder("late", Stage.TRANSFORM, log, is_async=True))
    only = build_filter(OnlyResponse)
    with trio.fail_after(5):
        # No answer: every filter counts, those without a request side too.
        chain = compile_chain([late, only, edge])
        assert await run_request_phases(chain, make_exchange()) == (None, 3)
        # An answer from the 4th filter of 5, two of which have no request side.
        chain = compile_chain([late, build_filter(Answer), only, edge, build_filter(OnlyResponse)])
        assert chain.names == ["only-response", "edge", "only-response", "answer", "late"]
        answer, depth = await run_request_phases(chain, make_exchange())
        assert answer is not None
        assert answer.status == 204
        assert depth == 4
        # An error carries the depth of the filter that raised.
        chain = compile_chain([late, build_filter(Deny), only, edge])
        with pytest.raises(Forbidden) as caught:
            await run_request_phases(chain, make_exchange())
        assert caught.value.filter_depth == 3  # type: ignore[attr-defined]
        assert chain.names == ["only-response", "edge", "deny", "late"]
        assert [p.filter.name for p in chain.response_for(3)] == ["edge", "only-response"]
        # No filter with a request side at all.
        chain = compile_chain([only])
        assert await run_request_phases(chain, make_exchange()) == (None, 1)
        assert await run_request_phases(compile_chain([]), make_exchange()) == (None, 0)


async def test_a_chain_of_plain_functions_runs_without_a_coroutine() -> None:
    """The engine's plain-call runners do what the async ones do, and the chain says
    when they may be used: every phase of that side sync, no request body to buffer."""
    log: list[str] = []

    class Deny(Filter):
        name, stage = "deny", Stage.LIMIT

        def on_request(self, exchange: Exchange) -> None:
            if "x-deny" in exchange.request.headers:
                raise Forbidden()

    class BreaksResponse(Filter):
        name, stage = "breaks-response", Stage.TRANSFORM

        def on_response(self, exchange: Exchange, response: Response) -> None:
            raise GatewayError("broken")

    class NeedsBody(Filter):
        name, stage = "needs-body", Stage.TRANSFORM
        needs_request_body = True

    edge = build_filter(recorder("edge", Stage.EDGE, log, is_async=False))
    deny = build_filter(Deny)
    breaks = build_filter(BreaksResponse)
    chain = compile_chain([breaks, deny, edge])
    assert (chain.sync_request, chain.sync_response) == (True, True)
    with trio.fail_after(5):
        assert run_sync_request_phases(chain, make_exchange()) == (None, 3)
        assert await run_request_phases(chain, make_exchange()) == (None, 3)
        with pytest.raises(Forbidden) as plain:
            run_sync_request_phases(chain, make_exchange(headers=[("x-deny", "1")]))
        with pytest.raises(Forbidden) as awaited:
            await run_request_phases(chain, make_exchange(headers=[("x-deny", "1")]))
        assert plain.value.filter_depth == awaited.value.filter_depth == 2  # type: ignore[attr-defined]
    # The response side: an error carries the phases still to run, as the async one.
    with pytest.raises(GatewayError) as raised:
        run_sync_response_phases(chain.response_for(3), make_exchange(), Response(200))
    assert [p.filter.name for p in raised.value.phases_left] == ["edge"]  # type: ignore[attr-defined]

    late = build_filter(recorder("late", Stage.TRANSFORM, log, is_async=True))
    assert (compile_chain([late, edge]).sync_request, compile_chain([late]).sync_response) == (
        False,
        False,
    )
    # A filter that needs the body: the request side waits for it, so it is async.
    chain = compile_chain([build_filter(NeedsBody), edge])
    assert (chain.sync_request, chain.sync_response) == (False, True)


async def test_the_body_is_buffered_just_before_the_first_filter_that_needs_it() -> None:
    log: list[str] = []

    class NeedsBody(Filter):
        name, stage = "needs-body", Stage.LIMIT
        needs_request_body = True

        def on_response(self, exchange: Exchange, response: Response) -> None:
            pass

    async def buffer() -> None:
        log.append("buffer")

    async def failing_buffer() -> None:
        raise GatewayError("the body broke")

    edge = build_filter(recorder("edge", Stage.EDGE, log, is_async=False))
    late = build_filter(recorder("late", Stage.TRANSFORM, log, is_async=True))
    needs = build_filter(NeedsBody)  # no request side of its own
    with trio.fail_after(5):
        chain = compile_chain([late, needs, edge])
        assert chain.request_body_at == 1
        assert await run_request_phases(chain, make_exchange(), buffer) == (None, 3)
        assert log == ["req:edge", "buffer", "req:late"]
        log.clear()
        # Without a buffer function nothing is buffered (the route has no body).
        assert await run_request_phases(chain, make_exchange()) == (None, 3)
        assert log == ["req:edge", "req:late"]
        log.clear()
        # The filter that needs it is the last one: buffered after every request phase.
        chain = compile_chain([needs, edge])
        assert await run_request_phases(chain, make_exchange(), buffer) == (None, 2)
        assert log == ["req:edge", "buffer"]
        log.clear()
        # A failure while buffering counts the filter that needed the body.
        chain = compile_chain([late, needs, edge])
        with pytest.raises(GatewayError) as caught:
            await run_request_phases(chain, make_exchange(), failing_buffer)
        assert caught.value.filter_depth == 2  # type: ignore[attr-defined]
        assert log == ["req:edge"]
        log.clear()

        # A filter before it answers: the body is never read.
        class Answer(Filter):
            name, stage = "answer", Stage.AUTHENTICATE

            def on_request(self, exchange: Exchange) -> Response:
                return Response(401)

        chain = compile_chain([late, needs, build_filter(Answer), edge])
        answer, depth = await run_request_phases(chain, make_exchange(), buffer)
        assert answer is not None
        assert (answer.status, depth) == (401, 2)
        assert log == ["req:edge"]


def _logged(log: list[str], fn: Callable[..., Awaitable[Response]]) -> Any:
    """A decorator hiding ``fn``'s parameters behind ``*args, **kwargs``."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        log.append("decorated")
        return await fn(*args, **kwargs)

    return wrapper


async def test_call_next_takes_the_call_by_keyword_too() -> None:
    """``call_next(call=...)`` worked with the engine's own send (its parameter is
    ``call``) but not when another around phase was inside: its binding named it ``c``."""

    class Outer(Filter):
        name, stage = "outer", Stage.EDGE

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            response: Response = await call_next(call=call)
            return response

    class Inner(Filter):
        name, stage = "inner", Stage.LIMIT

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            response: Response = await call_next(call)
            return response

    chain = compile_chain([build_filter(Inner), build_filter(Outer)])

    async def send(call: UpstreamCall) -> Response:
        return Response(204)

    call = UpstreamCall(upstream="u", method=b"GET", target=b"/x", headers=Headers())
    with trio.fail_after(5):
        response = await wrap_upstream(chain.around, make_exchange(), send)(call)
    assert response.status == 204


async def test_wrap_upstream_nests_any_shape_of_around_upstream() -> None:
    events: list[str] = []

    class Named(Filter):
        name, stage = "named", Stage.EDGE

        async def around_upstream(
            self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
        ) -> Response:
            events.append("named>")
            response: Response = await call_next(call)
            events.append("named<")
            return response

    class OtherName(Filter):
        name, stage = "other-name", Stage.AUTHENTICATE

        async def around_upstream(self, exchange: Exchange, c: UpstreamCall, nxt: Any) -> Any:
            events.append("other>")
            return await nxt(c)

    class PositionalOnly(Filter):
        name, stage = "positional-only", Stage.LIMIT

        async def around_upstream(self, exchange: Exchange, c: UpstreamCall, n: Any, /) -> Any:
            events.append("positional>")
            return await n(c)

    class Decorated(Filter):
        name, stage = "decorated", Stage.TRANSFORM

        async def _around(self, exchange: Exchange, call: UpstreamCall, call_next: Any) -> Any:
            events.append("decorated>")
            return await call_next(call)

        around_upstream = _logged(events, _around)

    filters = [build_filter(t) for t in (Decorated, PositionalOnly, OtherName, Named)]
    chain = compile_chain(filters)

    async def send(call: UpstreamCall) -> Response:
        events.append(f"send {call.target.decode()}")
        return Response(200)

    exchange = make_exchange()
    call = UpstreamCall(upstream="u", method=b"GET", target=b"/x", headers=Headers())
    with trio.fail_after(5):
        response = await wrap_upstream(chain.around, exchange, send)(call)
        assert response.status == 200
        assert events == [
            "named>",
            "other>",
            "positional>",
            "decorated",
            "decorated>",
            "send /x",
            "named<",
        ]
        events.clear()
        # From an index on: the outer wrappers are left out.
        await wrap_upstream(chain.around, exchange, send, start=2)(call)
        assert events == ["positional>", "decorated", "decorated>", "send /x"]
        events.clear()
        assert wrap_upstream(chain.around, exchange, send, start=4) is send


def test_a_sync_around_upstream_is_refused_at_compile_time() -> None:
    class SyncAround(Filter):
        name, stage = "sync-around", Stage.EDGE

        def around_upstream(self, exchange: Exchange, call: UpstreamCall, call_next: Any) -> Any:
            return call_next(call)

    with pytest.raises(TypeError, match="around_upstream must be async"):
        compile_chain([build_filter(SyncAround)])


async def test_run_chain_matches_the_engine_for_an_error() -> None:
    log: list[str] = []

    class Deny(Filter):
        name, stage = "deny", Stage.AUTHENTICATE

        def on_request(self, exchange: Exchange) -> None:
            raise Unauthorized()

    filters = [
        build_filter(recorder("late", Stage.LIMIT, log, is_async=False)),
        build_filter(Deny),
        build_filter(recorder("edge", Stage.EDGE, log, is_async=True)),
    ]
    with trio.fail_after(5):
        exchange = make_exchange()
        response = await run_chain(filters, exchange)
    assert response.status == 401
    assert response.headers.get_all("x-order") == [b"edge"]
    assert log == ["req:edge", "resp:edge"]
    assert isinstance(exchange.error, Unauthorized)
