"""The retry plugin: which calls are retried, where, how often; the budget; config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from engine.chain import FilterContext, compile_chain, wrap_upstream
from engine.config import RouteConfig
from engine.errors import (
    BadGateway,
    CircuitOpen,
    GatewayError,
    NoHealthyTarget,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from engine.exchange import Exchange, Headers, Request, Response, Timings, UpstreamCall
from engine.metrics import render
from engine.schema import ConfigError, build
from engine.testing import http_request, open_gateway, open_stubs
from plugins.circuit_breaker import CircuitBreaker, CircuitBreakerConfig
from plugins.retry import (
    _RETRIES_TOTAL,
    ReplayBuffer,
    Retry,
    RetryBudget,
    RetryConfig,
    backoff_cap,
)
from tests.upstreams import (
    UpstreamConn,
    open_counting_upstream,
    open_refusing_upstream,
    open_stalling_upstream,
    response_head,
    serve_upstream,
)


class UpstreamReset(BadGateway):
    """What the upstream layer raises for a reset before any response byte."""

    code = "upstream_reset"


class Body:
    """A streamed response body that records whether it was abandoned."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield b"body"

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """A fake pool: targets answer in turn from ``script`` (a status or an exception)."""

    def __init__(self, *script: int | GatewayError, targets: int = 2, strict: bool = False) -> None:
        self.script = list(script)
        self.strict = strict  # like the engine's pool: no target left -> NoHealthyTarget
        self.targets = [f"10.0.0.{i}:80" for i in range(1, targets + 1)]
        self.seen: list[tuple[str, frozenset[str], int]] = []  # target, exclude, attempt
        self.responses: list[Response] = []
        self.body_started_on_send = False

    async def __call__(self, call: UpstreamCall) -> Response:
        target = next((t for t in self.targets if t not in call.exclude), None)
        if target is None:
            if self.strict:
                raise NoHealthyTarget("every target is excluded")
            target = self.targets[0]
        call.target_address = target
        self.seen.append((target, frozenset(call.exclude), call.attempt))
        if self.body_started_on_send:
            call.body_started = True
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, GatewayError):
            raise step
        response = Response(step, stream=Body())
        self.responses.append(response)
        return response

    @property
    def calls(self) -> int:
        return len(self.seen)


def make_exchange() -> Exchange:
    request = Request(
        method=b"GET",
        path="/x",
        raw_query=b"",
        headers=Headers(),
        http_version=b"1.1",
        client="127.0.0.1",
        peer=("127.0.0.1", 1),
    )
    return Exchange(
        request=request, request_id="req-1", timings=Timings(0.0), route=RouteConfig(name="r")
    )


def make_call(method: bytes = b"GET", body: Any = None, upstream: str = "users") -> UpstreamCall:
    return UpstreamCall(
        upstream=upstream, method=method, target=b"/x", headers=Headers(), body=body
    )


def make_retry(**overrides: Any) -> Retry:
    config = build(RetryConfig, overrides, "plugins.retry")
    f = Retry(config, FilterContext("retry", "global"))
    f.random.seed(1)
    return f


async def call_status(f: Retry, upstream: Upstream, call: UpstreamCall | None = None) -> int:
    try:
        response = await f.around_upstream(make_exchange(), call or make_call(), upstream)
    except GatewayError as e:
        return e.status
    return response.status


# --------------------------------------------------------------------------- what is retried


@pytest.mark.parametrize(
    ("method", "step", "overrides", "retried"),
    [
        (b"GET", 503, {}, True),
        (b"GET", 502, {}, True),
        (b"HEAD", 503, {}, True),
        (b"PUT", 503, {}, True),
        (b"DELETE", UpstreamUnreachable("refused"), {}, True),
        (b"GET", UpstreamReset("reset"), {}, True),
        (b"GET", 500, {}, False),
        (b"GET", 504, {}, False),
        (b"GET", 404, {}, False),
        (b"GET", 200, {}, False),
        (b"GET", 500, {"statuses": [500]}, True),
        (b"GET", UpstreamTimeout("slow"), {}, False),
        (b"GET", UpstreamTimeout("slow"), {"on_timeout": True}, True),
        (b"GET", BadGateway("garbage"), {}, False),  # the upstream may have acted on it
        (b"GET", NoHealthyTarget("none"), {}, False),
        (b"GET", CircuitOpen("open", retry_after=5), {}, False),
        (b"POST", 503, {}, False),
        (b"POST", UpstreamUnreachable("refused"), {}, False),
        (b"PATCH", 503, {}, False),
        (b"POST", 503, {"methods": ["GET", "POST"]}, True),
        (b"GET", 503, {"methods": ["POST"]}, False),
        (b"GET", 503, {"attempts": 1}, False),
    ],
)
async def test_what_is_retried(
    autojump_clock: trio.testing.MockClock,
    method: bytes,
    step: int | GatewayError,
    overrides: dict[str, Any],
    retried: bool,
) -> None:
    with trio.fail_after(10):
        upstream = Upstream(step)
        status = await call_status(make_retry(**overrides), upstream, make_call(method))
        assert upstream.calls == (2 if retried else 1)
        if retried:
            assert status == 200
        else:
            assert status == (step if isinstance(step, int) else step.status)


async def test_retry_goes_to_another_target_and_discards_the_failed_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        upstream = Upstream(503, 503, targets=3)
        call = make_call()
        response = await make_retry(attempts=3).around_upstream(make_exchange(), call, upstream)
        assert response.status == 200
        assert upstream.seen == [
            ("10.0.0.1:80", frozenset(), 0),
            ("10.0.0.2:80", frozenset({"10.0.0.1:80"}), 1),
            ("10.0.0.3:80", frozenset({"10.0.0.1:80", "10.0.0.2:80"}), 2),
        ]
        first, second, third = upstream.responses
        assert first.stream is None  # aclose() abandoned it
        assert second.stream is None
        assert third is response
        assert response.stream is not None


async def test_a_retry_goes_back_to_a_failed_target_when_no_other_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        upstream = Upstream(503, targets=1, strict=True)
        call = make_call()
        assert await call_status(make_retry(), upstream, call) == 200
        assert [t for t, _, _ in upstream.seen] == ["10.0.0.1:80", "10.0.0.1:80"]
        assert call.exclude == set()
        # ... once: when even that finds no target, the client hears it
        upstream = Upstream(503, NoHealthyTarget("ejected"), NoHealthyTarget("ejected"))
        upstream.strict = True
        assert await call_status(make_retry(), upstream) == 503
        assert upstream.calls == 3


async def test_the_last_failed_response_goes_to_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        upstream = Upstream(503, 502)
        response = await make_retry().around_upstream(make_exchange(), make_call(), upstream)
        assert response.status == 502
        assert response.stream is not None  # relayed, not closed
        assert upstream.calls == 2


async def test_a_started_stream_is_not_replayed_without_a_replay_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        upstream = Upstream(503)
        upstream.body_started_on_send = True
        call = make_call(b"PUT", body=Body())
        assert await call_status(make_retry(replay_buffer=0), upstream, call) == 503
        assert upstream.calls == 1
        # a buffered body can be sent again
        upstream = Upstream(503)
        upstream.body_started_on_send = True
        assert await call_status(make_retry(), upstream, make_call(b"PUT", body=b"{}")) == 200


class ClientBody:
    """A streamed request body: ``chunks`` once, then the end (as the client's is)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.read = 0

    def __aiter__(self) -> ClientBody:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        self.read += 1
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        self.chunks = []


async def _read(stream: Any, n: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    async for chunk in stream:
        out.append(chunk)
        if n is not None and len(out) == n:
            break
    return out


async def test_the_replay_buffer_gives_each_attempt_the_whole_body() -> None:
    client = ClientBody(b"ab", b"cd", b"ef")
    replay = ReplayBuffer(client, limit=6)
    assert await _read(replay.attempt(), 2) == [b"ab", b"cd"]  # cut short
    assert await _read(replay.attempt()) == [b"abcd", b"ef"]  # kept, then the rest
    assert await _read(replay.attempt()) == [b"abcdef"]
    assert client.read == 3  # each client byte read once
    assert not replay.overflowed


async def test_the_replay_buffer_lets_go_of_a_body_larger_than_its_limit() -> None:
    replay = ReplayBuffer(ClientBody(b"abc", b"def", b"g"), limit=6)
    assert await _read(replay.attempt()) == [b"abc", b"def", b"g"]
    assert replay.overflowed
    assert replay.kept == b""  # nothing held for a retry that cannot happen


async def test_the_replay_buffer_holds_bytes_not_chunks() -> None:
    """A body sent a byte per chunk is kept as one buffer (no object per chunk), and
    replayed in slices."""
    replay = ReplayBuffer(ClientBody(*[b"x"] * 1000), limit=1000)
    assert len(await _read(replay.attempt())) == 1000
    assert replay.kept == b"x" * 1000
    assert await _read(replay.attempt()) == [b"x" * 1000]
    replay.release()  # the answer stands: nothing more is kept
    assert replay.kept == b""
    assert replay.overflowed


async def test_a_started_stream_is_replayed_from_the_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[list[bytes]] = []

    async def upstream(call: UpstreamCall) -> Response:
        call.body_started = True
        call.target_address = f"10.0.0.{len(sent)}:80"
        sent.append(await _read(call.body, 1 if not sent else None))  # the first is cut
        return Response(503 if len(sent) == 1 else 200, stream=Body())

    with trio.fail_after(10):
        call = make_call(b"PUT", body=ClientBody(b"one", b"two"))
        response = await make_retry().around_upstream(make_exchange(), call, upstream)
        assert response.status == 200
        assert sent == [[b"one"], [b"one", b"two"]]
        # over the buffer: the first answer stands
        sent.clear()
        call = make_call(b"PUT", body=ClientBody(b"one", b"two"))
        response = await make_retry(replay_buffer=2).around_upstream(
            make_exchange(), call, upstream
        )
        assert response.status == 503


async def test_backoff_is_jittered_exponential_and_capped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert [backoff_cap(n, 0.025, 0.25) for n in range(6)] == [
        0.025,
        0.05,
        0.1,
        0.2,
        0.25,
        0.25,
    ]
    assert backoff_cap(10_000, 0.025, 0.25) == 0.25
    with trio.fail_after(10):
        sleeps: list[float] = []
        for _ in range(30):
            upstream = Upstream(503, 503, 503)
            start = trio.current_time()
            f = make_retry(attempts=4, backoff_base="100ms", backoff_max="150ms")
            f.random.seed(len(sleeps))
            assert await call_status(f, upstream) == 200
            sleeps.append(trio.current_time() - start)
        assert all(0 <= s <= 0.1 + 0.15 + 0.15 for s in sleeps)
        assert len({round(s, 6) for s in sleeps}) > 20  # jittered, not fixed


# --------------------------------------------------------------------------- the budget


def test_budget_table() -> None:
    b = RetryBudget(percent=20.0, min_per_second=0.0, window=10.0)
    for _ in range(10):
        b.record_request(0.0)
    assert [b.try_spend(0.0) for _ in range(3)] == [True, True, False]
    assert not b.try_spend(5.0)
    assert b.try_spend(11.0) is False  # the requests expired with the retries
    for _ in range(5):
        b.record_request(11.0)
    assert b.try_spend(11.0)  # 1 of 5 requests
    assert not b.try_spend(11.0)
    floor = RetryBudget(percent=0.0, min_per_second=1.0, window=10.0)
    assert sum(floor.try_spend(0.0) for _ in range(50)) == 10


async def test_budget_caps_retries_during_an_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        f = make_retry(attempts=3, budget_percent=10, min_retries_per_second=0.5)
        upstream = Upstream(*([503] * 10_000))
        statuses: list[int] = []

        async def client() -> None:
            statuses.append(await call_status(f, upstream))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(client)
        # 200 requests: at most 0.5 * 10 + 10% of 200 = 25 retries, not 400
        assert statuses == [503] * 200
        assert upstream.calls == 200 + 25
        assert "filtergate_upstream_retry_budget_exhausted_total" in render().decode()


async def test_budgets_are_per_upstream(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        f = make_retry(budget_percent=0, min_retries_per_second=0.1)  # one retry per 10 s
        a, b = Upstream(503, 200, 503), Upstream(503)
        assert await call_status(f, a, make_call(upstream="a")) == 200
        assert await call_status(f, a, make_call(upstream="a")) == 503
        assert await call_status(f, b, make_call(upstream="b")) == 200


async def test_per_try_timeout_bounds_each_attempt_not_the_call() -> None:
    with trio.fail_after(5):
        call = make_call()
        call.timeout = 1.0
        await make_retry(per_try_timeout="2s").around_upstream(make_exchange(), call, Upstream())
        assert (call.timeout, call.per_try_timeout) == (1.0, 2.0)


@pytest.mark.parametrize(("per_try", "attempts_made"), [(None, 1), ("1500ms", 2), ("500ms", 4)])
async def test_the_whole_call_timeout_holds_across_retries(
    autojump_clock: trio.testing.MockClock, per_try: str | None, attempts_made: int
) -> None:
    """The upstream's timeout is the whole call's: with retries on timeouts, a client
    waited attempts x timeout (8 s for 2 s and 4 attempts). Each attempt ends by the
    call's deadline; per_try_timeout cuts an attempt shorter, never the call longer."""
    retry: dict[str, Any] = {"attempts": 4, "on_timeout": True, "backoff_base": "1ms"}
    if per_try is not None:
        retry["per_try_timeout"] = per_try
    with trio.fail_after(60):
        async with open_stalling_upstream() as a, open_stalling_upstream() as b:
            config = {
                "upstreams": {"u": {"targets": [a.target, b.target], "timeout": "2s"}},
                "routes": [
                    {"name": "r", "prefix": "/", "upstream": "u", "plugins": {"retry": retry}}
                ],
            }
            async with open_gateway(config) as gw:
                start = trio.current_time()
                r = await http_request(gw.port, "GET", "/x")
                elapsed = trio.current_time() - start
    assert r.status == 504
    assert elapsed == pytest.approx(2.0, abs=0.1)
    assert len(a.requests) + len(b.requests) == attempts_made


# --------------------------------------------------------------------------- with the breaker


async def test_retry_wraps_the_breaker_and_an_open_breaker_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        retry = make_retry(attempts=3)
        breaker = CircuitBreaker(
            build(CircuitBreakerConfig, {"consecutive_failures": 2}),
            FilterContext("circuit-breaker", "global"),
        )
        chain = compile_chain([breaker, retry])  # config order does not matter: stages do
        assert chain.names == ["retry", "circuit-breaker"]
        upstream = Upstream(503, 503, 503)
        exchange = make_exchange()
        send = wrap_upstream(chain.around, exchange, upstream)
        with pytest.raises(CircuitOpen):
            await send(make_call())
        # both attempts counted in the breaker; the third met it open and stopped there
        assert upstream.calls == 2


@pytest.mark.parametrize("hide", [False, True])
async def test_a_hidden_failed_response_is_retried_as_the_response(
    autojump_clock: trio.testing.MockClock, hide: bool
) -> None:
    # hide_failed_responses turns the upstream's 503 into a 502 for the client; the
    # retry around the breaker still sees the 503, and retries it as it would the response.
    with trio.fail_after(10):
        retry = make_retry()
        breaker = CircuitBreaker(
            build(CircuitBreakerConfig, {"hide_failed_responses": hide}),
            FilterContext("circuit-breaker", "global"),
        )
        chain = compile_chain([retry, breaker])
        upstream = Upstream(503, 200)
        send = wrap_upstream(chain.around, make_exchange(), upstream)
        response = await send(make_call())
        assert response.status == 200
        assert upstream.calls == 2
        # A status the retry filter does not retry: the 502 reaches the client.
        upstream = Upstream(500, 200)
        send = wrap_upstream(chain.around, make_exchange(), upstream)
        if hide:
            with pytest.raises(BadGateway):
                await send(make_call())
        else:
            assert (await send(make_call())).status == 500
        assert upstream.calls == 1


async def test_a_fallback_answer_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        retry = make_retry(attempts=3)
        breaker = CircuitBreaker(
            build(
                CircuitBreakerConfig,
                {"consecutive_failures": 1, "fallback": {"status": 503, "body": "later"}},
            ),
            FilterContext("circuit-breaker", "global"),
        )
        chain = compile_chain([retry, breaker])
        upstream = Upstream(503, 503, 503)
        send = wrap_upstream(chain.around, make_exchange(), upstream)
        response = await send(make_call(upstream="fallback"))
        assert (response.status, response.body) == (503, b"later")
        assert upstream.calls == 1


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ({"attempts": 0}, "attempts", "expected 1 to 10"),
        ({"attempts": "2"}, "attempts", "expected an integer"),
        ({"methods": ["get"]}, "methods[0]", "upper-case method"),
        ({"statuses": [502, 700]}, "statuses[1]", "from 100 to 599"),
        ({"backoff_base": "1s", "backoff_max": "100ms"}, "backoff_max", "at least backoff_base"),
        ({"budget_percent": 150}, "budget_percent", "expected 0 to 100"),
        ({"budget_window": 0}, "budget_window", "must be positive"),
        ({"per_try_timeout": "0s"}, "per_try_timeout", "must be positive"),
        ({"retry_on": ["reset"]}, "retry_on", "unknown key"),
    ],
)
def test_config_errors(table: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(RetryConfig, table, "routes[0].plugins.retry")
    assert info.value.path == f"routes[0].plugins.retry.{path}"
    assert message in info.value.message


# --------------------------------------------------------------------------- end to end


def two_target_gateway(targets: list[str], **retry: Any) -> dict[str, Any]:
    return {
        "upstreams": {"pair": {"targets": targets}},
        "routes": [
            {"name": "pair", "prefix": "/", "upstream": "pair", "plugins": {"retry": retry}}
        ],
    }


def retries_counted(upstream: str, reason: str) -> float:
    return _RETRIES_TOTAL.value(upstream=upstream, reason=reason)


async def test_end_to_end_idempotent_requests_are_retried_onto_the_healthy_target() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["flaky", "echo"]) as stubs:
            # the flaky target answers every request with 503; echo is healthy
            config = two_target_gateway([stubs.target("flaky"), stubs.target("echo")])
            before = retries_counted("pair", "status_503")
            async with open_gateway(config) as gw:
                for _ in range(6):
                    r = await http_request(gw.port, "GET", "/things?fail=1000&status=503")
                    assert r.status == 200
                    assert r.json()["path"] == "/things"
                assert stubs.flaky.requests >= 1
                assert retries_counted("pair", "status_503") - before == stubs.flaky.requests


async def test_end_to_end_post_is_not_retried() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["flaky", "echo"]) as stubs:
            config = two_target_gateway([stubs.target("flaky"), stubs.target("echo")])
            async with open_gateway(config) as gw:
                statuses = [
                    (
                        await http_request(gw.port, "POST", "/?fail=1000&status=503", body=b"x")
                    ).status
                    for _ in range(4)
                ]
                assert sorted(statuses) == [200, 200, 503, 503]  # round robin, no retry
                assert stubs.flaky.requests == 2
            # ... unless the route allows it, and the body can be sent again
            targets = [stubs.target("flaky"), stubs.target("echo")]
            async with open_gateway(two_target_gateway(targets, methods=["POST"])) as gw:
                for _ in range(4):
                    r = await http_request(gw.port, "POST", "/?fail=1000&status=503")
                    assert (r.status, r.json()["method"]) == (200, "POST")
            # a streamed body that was sent once is sent again from the replay buffer
            body = bytes(range(256)) * 40  # 10 KiB
            async with open_gateway(two_target_gateway(targets, methods=["POST"])) as gw:
                flaky_before = stubs.flaky.requests
                r = await http_request(gw.port, "POST", "/?fail=1000&status=503", body=body)
                assert r.status == 200  # round robin starts with the flaky target
                assert r.json()["body"] == body.decode("utf-8", errors="replace")
                assert stubs.flaky.requests == flaky_before + 1
            # ... unless it outgrew the buffer, or there is none
            for size in ("4KiB", 0):
                config = two_target_gateway(targets, methods=["POST"], replay_buffer=size)
                async with open_gateway(config) as gw:
                    flaky_before = stubs.flaky.requests
                    r = await http_request(gw.port, "POST", "/?fail=1000&status=503", body=body)
                    assert r.status == 503
                    assert stubs.flaky.requests == flaky_before + 1


async def test_end_to_end_a_body_cut_short_by_an_early_answer_is_replayed_whole() -> None:
    """The first target reads 1 KiB of a 300 KiB upload, answers 503 and closes; the
    retry sends the whole body, from its first byte, to the other target."""

    async def early_503(conn: UpstreamConn) -> None:
        got = await conn.read_head()
        assert got is not None
        await conn.stream.receive_some(1024)
        await conn.send(response_head(503, [("connection", "close")], content_length=0))
        await conn.stream.aclose()

    body = bytes(range(256)) * 1200
    with trio.fail_after(20):
        async with (
            serve_upstream(early_503) as early,
            open_counting_upstream(keep=len(body)) as good,
        ):
            config = two_target_gateway([early.target, good.target], replay_buffer="1MiB")
            async with open_gateway(config) as gw:
                r = await http_request(gw.port, "PUT", "/doc", body=body)
                assert r.status == 200
                assert r.json()["received"] == len(body)
                assert r.json()["body"] == body.decode("latin-1")
                assert early.connections == 1


async def test_end_to_end_dead_target_is_stepped_over() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["echo"]) as stubs:
            with trio.socket.socket() as s:  # a port nobody listens on
                await s.bind(("127.0.0.1", 0))
                dead = f"127.0.0.1:{s.getsockname()[1]}"
            async with open_gateway(two_target_gateway([dead, stubs.target("echo")])) as gw:
                for _ in range(4):
                    r = await http_request(gw.port, "GET", "/x")
                    assert r.status == 200


async def test_end_to_end_budget_caps_retries_during_an_outage() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["flaky"]) as stubs:
            config = two_target_gateway(
                [stubs.target("flaky")],
                attempts=3,
                budget_percent=10,
                min_retries_per_second=0.1,
                budget_window="1m",
                backoff_base="1ms",
                backoff_max="1ms",
            )
            async with open_gateway(config) as gw:
                for _ in range(30):
                    r = await http_request(gw.port, "GET", "/?fail=1000&status=503")
                    assert r.status == 503
                # 30 requests: at most 0.1 * 60 + 10% of 30 = 9 retries, not 60
                assert stubs.flaky.requests == 30 + 9


async def test_end_to_end_config_error_names_the_path() -> None:
    with trio.fail_after(10):
        config = two_target_gateway(["127.0.0.1:1"], statuses=[502, "503"])
        with pytest.raises(ConfigError) as info:
            async with open_gateway(config):
                pass
        assert info.value.path == "routes[0].plugins.retry.statuses[1]"


async def test_a_retry_with_no_target_left_gives_the_attempt_s_own_error() -> None:
    """One target, refusing: the first attempt ejects it and the retry finds no target.
    The client gets the 502 the attempt met, as without retry, not a 503 "no healthy
    target" that only the retry made."""
    with trio.fail_after(10):
        async with open_refusing_upstream() as up:
            config = {
                "upstreams": {"u": {"targets": [up.target]}},
                "routes": [{"name": "r", "prefix": "/", "upstream": "u", "plugins": {"retry": {}}}],
            }
            async with open_gateway(config) as gw:
                r = await http_request(gw.port, "GET", "/x")
    assert r.status == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"


def test_retry_after_is_never_rounded_down() -> None:
    """int(x + 0.999) rounded 10.0008 s down to 10: a client that waited exactly that
    long was refused again."""
    from engine.errors import RateLimited, ServiceUnavailable

    assert RateLimited(10.00084).retry_after == 11
    assert RateLimited(0.2).retry_after == 1
    assert RateLimited(3.0).retry_after == 3
    unavailable = ServiceUnavailable(retry_after=10.00084)
    assert (b"retry-after", b"11") in unavailable.headers


async def test_a_retry_that_cannot_start_in_time_leaves_the_answer_standing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With a backoff that would cross the call's deadline, no attempt follows and the
    upstream's own answer (or error) goes to the client: the last version made up a
    504 in its place, having spent the budget and closed the answer."""
    cases: list[tuple[tuple[int | GatewayError, ...], int]] = [
        ((503, 503), 503),
        ((UpstreamReset("reset"), 200), 502),
    ]
    for script, status in cases:
        upstream = Upstream(*script)
        call = make_call()
        call.deadline = trio.current_time() + 0.001  # as the pool sets it; no backoff fits
        f = make_retry(backoff_base="5s", backoff_max="5s")
        budget = f.budget_for(call.upstream)
        with trio.fail_after(10):
            assert await call_status(f, upstream, call) == status
        assert len(upstream.seen) == 1
        assert budget.retries.total(trio.current_time()) == 0  # no budget spent
