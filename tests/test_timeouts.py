"""Client-side and upstream timeouts, in virtual time.

Every party (client, gateway, upstream) runs in this trio run, so with pytest-trio's
``autojump_clock`` the clock jumps to the next deadline whenever all of them are
blocked: no test waits in real time, and elapsed times are measured exactly with
``trio.current_time()``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import warnings
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from engine.chain import Filter, Stage
from engine.exchange import Exchange
from engine.testing import Client, RunningGateway, open_gateway
from tests.test_chain import FilterSet
from tests.test_hostile import assert_gateway_error, head, parse_responses
from tests.upstreams import (
    Upstream,
    UpstreamConn,
    open_blackhole_upstream,
    open_counting_upstream,
    open_refusing_upstream,
    open_stalling_upstream,
    open_streaming_upstream,
    open_truncating_upstream,
    response_head,
    serve_upstream,
)

HEAD_TIMEOUT = 5.0
BODY_TIMEOUT = 7.0
KEEPALIVE_TIMEOUT = 20.0
WRITE_TIMEOUT = 3.0
DEADLINE = 120  # virtual seconds: far above every timeout under test

SERVER = {
    "head_timeout": f"{HEAD_TIMEOUT}s",
    "body_timeout": f"{BODY_TIMEOUT}s",
    "keepalive_timeout": f"{KEEPALIVE_TIMEOUT}s",
    "write_timeout": f"{WRITE_TIMEOUT}s",
    "min_body_rate": 0,  # each timeout alone (the rate floor has its own tests)
}


def make_config(
    target: str, upstream: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    return {
        "server": dict(SERVER),
        "upstreams": {"u": {"targets": [target], **(upstream or {})}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u", **route}],
    }


@dataclass
class Setup:
    gw: RunningGateway
    up: Upstream


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    async with open_counting_upstream() as up, open_gateway(make_config(up.target)) as gw:
        yield Setup(gw, up)


@dataclass
class Outcome:
    data: bytes
    closed_at: float  # virtual time at which the gateway closed the connection


async def read_until_closed(stream: trio.SocketStream) -> Outcome:
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            return Outcome(bytes(data), trio.current_time())
        data += chunk


async def assert_serves(port: int) -> float:
    """A normal request is answered; returns how long it took (virtual seconds)."""
    start = trio.current_time()
    async with Client.open(port) as client:
        resp = await client.request("GET", "/normal")
    assert resp.status == 200, resp.body
    return trio.current_time() - start


# -- client side -----------------------------------------------------------------------


async def test_half_a_head_gets_408_after_head_timeout(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        start = trio.current_time()
        await stream.send_all(b"GET /half HTTP/1.1\r\nHost: a\r\nX-Par")
        out = await read_until_closed(stream)
        await stream.aclose()
        assert out.closed_at - start == pytest.approx(HEAD_TIMEOUT, abs=0.1)
        [resp] = parse_responses(out.data)
        assert_gateway_error(resp, 408)
        assert setup.up.requests == []
        await assert_serves(setup.gw.port)


async def test_half_a_head_pipelined_behind_a_request_gets_the_head_timeout(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    # The part of a second head that arrived with the first request starts the head
    # clock at once: it does not get the (longer) keep-alive wait.
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        start = trio.current_time()
        await stream.send_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHo")
        out = await read_until_closed(stream)
        await stream.aclose()
        assert out.closed_at - start == pytest.approx(HEAD_TIMEOUT, abs=0.1)
        first, second = parse_responses(out.data)
        assert first.status == 200
        assert_gateway_error(second, 408)
        await assert_serves(setup.gw.port)


async def test_dribbling_a_head_does_not_extend_the_head_timeout(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    data = b"GET /dribble HTTP/1.1\r\nHost: a\r\nX-Long: " + b"d" * 1000

    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        start = trio.current_time()

        async def dribble() -> None:
            try:
                for i in range(len(data)):
                    await stream.send_all(data[i : i + 1])
                    await trio.sleep(0.5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            out = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
        await stream.aclose()
        assert out.closed_at - start == pytest.approx(HEAD_TIMEOUT, abs=0.6)
        [resp] = parse_responses(out.data)
        assert_gateway_error(resp, 408)


async def test_idle_keep_alive_connection_closed_after_keepalive_timeout(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        await stream.send_all(head("/first", "Host: a"))
        data = bytearray()
        while not parse_responses(bytes(data)):
            data += await stream.receive_some(65536)
        assert parse_responses(bytes(data))[0].status == 200
        start = trio.current_time()
        out = await read_until_closed(stream)
        await stream.aclose()
        # Closed silently (no 408 for a connection between requests) on time.
        assert out.data == b""
        assert out.closed_at - start == pytest.approx(KEEPALIVE_TIMEOUT, abs=0.1)


async def test_keep_alive_connection_in_use_is_not_cut(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    # Requests spaced under keepalive_timeout keep one connection alive past it.
    with trio.fail_after(DEADLINE):
        async with Client.open(setup.gw.port) as client:
            for _ in range(4):
                resp = await client.request("GET", "/again")
                assert resp.status == 200
                await trio.sleep(KEEPALIVE_TIMEOUT * 0.75)


async def test_stalled_request_body_gets_408_after_body_timeout(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        await stream.send_all(head("/upload", "Host: a", "Content-Length: 1000", method="POST"))
        await stream.send_all(b"x" * 100)
        start = trio.current_time()
        out = await read_until_closed(stream)
        await stream.aclose()
        assert out.closed_at - start == pytest.approx(BODY_TIMEOUT, abs=0.1)
        [resp] = parse_responses(out.data)
        assert_gateway_error(resp, 408)
        assert setup.up.completed == 0  # the upstream never got a complete request
        await assert_serves(setup.gw.port)


async def test_a_body_that_trickles_is_cut_at_min_body_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A byte every 5 s never trips body_timeout (30 s): with max_connections, 50 such
    uploads held every slot for good. Past 5 s of waiting, the body must average
    min_body_rate; waiting on a slow upstream does not count against the client."""
    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as up:
            config = make_config(up.target)
            config["server"]["min_body_rate"] = "100B"
            config["server"]["body_timeout"] = "30s"
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    head("/upload", "Host: a", "Content-Length: 100000", method="POST")
                )
                start = trio.current_time()

                async def trickle() -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while True:
                            await stream.send_all(b"x")
                            await trio.sleep(1)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    out = await read_until_closed(stream)
                    nursery.cancel_scope.cancel()
                await stream.aclose()
                # 5 s of grace, then 100 bytes a second: about 1 byte a second is cut at 5 s.
                assert out.closed_at - start == pytest.approx(5.0, abs=0.2)
                [resp] = parse_responses(out.data)
                assert_gateway_error(resp, 408)
                assert b"slower than 100 bytes a second" in resp.body
                # A steady upload above the floor goes through.
                body = b"y" * 2000
                steady = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await steady.send_all(
                    head("/upload", "Host: a", f"Content-Length: {len(body)}", method="POST")
                )
                for i in range(0, len(body), 200):
                    await steady.send_all(body[i : i + 200])
                    await trio.sleep(1)  # 200 bytes a second for 10 s
                got = await steady.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200 ")
                await steady.aclose()


async def test_client_that_never_reads_is_cut_off_after_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size = 512 * 1024 * 1024  # far more than socket buffers hold
    with trio.fail_after(DEADLINE):
        async with open_streaming_upstream(size) as big, open_counting_upstream() as normal:
            config = make_config(normal.target)
            config["upstreams"]["big"] = {"targets": [big.target]}
            config["routes"].insert(0, {"name": "big", "prefix": "/big", "upstream": "big"})
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                # A small receive buffer, so that the gateway blocks soon.
                stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 64 * 1024)
                start = trio.current_time()
                await stream.send_all(head("/big", "Host: a"))
                await big.wait_requests(1)
                # Read nothing for a long time: the gateway gives up after write_timeout
                # and drops the upstream connection too.
                await trio.sleep(10 * WRITE_TIMEOUT)
                assert len(big.closed_at) == 1
                assert big.closed_at[0] - start == pytest.approx(WRITE_TIMEOUT, abs=0.5)
                out = await read_until_closed(stream)
                await stream.aclose()
                assert out.data.startswith(b"HTTP/1.1 200 ")
                assert len(out.data) < size
                await assert_serves(gw.port)


async def test_a_client_that_reads_slowly_but_steadily_gets_the_whole_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """write_timeout is for a client that reads nothing: one that takes 32 KiB every
    50 ms (640 KiB/s) is never cut off, although the kernel wakes a writer only once
    half its send buffer is free, which takes longer than write_timeout here."""
    size = 24 * 1024 * 1024
    with trio.fail_after(DEADLINE):
        async with open_streaming_upstream(size) as big:
            config = make_config(big.target)
            config["server"]["write_timeout"] = "300ms"  # less than freeing half the buffer
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 32 * 1024)
                await stream.send_all(head("/big", "Host: a", "Connection: close"))
                received = 0
                while chunk := await stream.receive_some(32 * 1024):
                    received += len(chunk)
                    await trio.sleep(0.05)
                await stream.aclose()
    assert received > size  # the head, and the whole body


async def test_slowloris_does_not_stop_normal_requests(
    autojump_clock: trio.testing.MockClock, setup: Setup
) -> None:
    count = 300
    closed: list[float] = []
    start = trio.current_time()

    async def slow_client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.gw.port)
        data = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-A: " + b"s" * 100

        async def dribble() -> None:
            try:
                for i in range(len(data)):
                    await stream.send_all(data[i : i + 1])
                    await trio.sleep(1.0)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            out = await read_until_closed(stream)
            closed.append(out.closed_at)
            nursery.cancel_scope.cancel()
        await stream.aclose()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(slow_client)
            await trio.sleep(2.5)  # every slow client is connected and dribbling
            assert not closed
            # Normal requests are answered at once, over and over, while they dribble.
            for _ in range(3):
                assert await assert_serves(setup.gw.port) < 0.1
                await trio.sleep(0.7)
        # Each slow client was cut off at head_timeout, none later.
        assert len(closed) == count
        assert max(closed) - start <= HEAD_TIMEOUT + 1.0
        assert len(setup.up.requests) == 3


# -- upstream side ---------------------------------------------------------------------


async def timed_request(port: int, path: str = "/x") -> tuple[int, float, Any]:
    start = trio.current_time()
    async with Client.open(port) as client:
        resp = await client.request("GET", path)
    return resp.status, trio.current_time() - start, resp


async def test_upstream_read_timeout_is_504(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_stalling_upstream() as up,
            open_gateway(make_config(up.target, {"read_timeout": "4s"})) as gw,
        ):
            status, elapsed, resp = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(4.0, abs=0.1)
            assert resp.json()["error"]["code"] == "upstream_timeout"


async def test_a_head_trickled_a_byte_at_a_time_is_504_at_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """read_timeout bounds the whole response head, not each read: an upstream that
    sends a byte every 0.3 s cannot hold the request past it."""

    async def trickle(conn: UpstreamConn) -> None:
        if await conn.read_request() is None:
            return
        for byte in b"HTTP/1.1 200 OK\r\nx-padding: " + b"p" * 100:
            await conn.send(bytes([byte]))
            await trio.sleep(0.3)

    with trio.fail_after(DEADLINE):
        async with (
            serve_upstream(trickle) as up,
            open_gateway(make_config(up.target, {"read_timeout": "2s"})) as gw,
        ):
            status, elapsed, _ = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(2.0, abs=0.1)


async def test_a_call_whose_client_left_is_let_go(autojump_clock: trio.testing.MockClock) -> None:
    """The client closes its connection while a slow upstream has not answered: the
    upstream connection is closed within a second or two (it held on until
    read_timeout, 60 s), logged as 499, and counted against nothing: outlier
    detection and the breaker (both at 1 failure) still let the next call through."""

    async def slow_or_fast(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            if got[0].target == b"/slow":  # never answers; returns once the gateway closes
                while await conn.stream.receive_some(65536):
                    pass
                return
            await conn.send(response_head(200, content_length=2) + b"ok")

    with trio.fail_after(DEADLINE):
        async with serve_upstream(slow_or_fast) as up:
            config = make_config(
                up.target, {"read_timeout": "60s", "outlier": {"consecutive_failures": 1}}
            )
            config["plugins"] = {"circuit-breaker": {"consecutive_failures": 1}}
            config["access_log"] = {"path": "-", "format": "json"}
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(head("/slow", "Host: a"))
                await up.wait_requests(1)
                left = trio.current_time()
                await trio.sleep(0.3)
                await stream.aclose()  # the client gives up
                while True:
                    if up.closed_at:
                        break
                    await trio.sleep(0.05)
                assert up.closed_at[0] - left <= 2.1
                status, _, _ = await timed_request(gw.port, "/fast")
                assert status == 200


class _LogRecorder(Filter):
    """Records what on_log sees of each exchange."""

    name, stage = "log-recorder", Stage.EDGE
    seen: ClassVar[list[tuple[str, int | None, bool, int, str | None]]] = []
    logged: ClassVar[trio.Event]

    async def on_log(self, exchange: Exchange) -> None:
        await trio.sleep(5)  # a slow log sink: the client must not wait for it
        status = exchange.response.status if exchange.response is not None else None
        error = type(exchange.error).__name__ if exchange.error is not None else None
        self.seen.append(
            (exchange.request.path, status, exchange.aborted, exchange.bytes_sent, error)
        )
        self.logged.set()


async def test_on_log_sees_a_client_gone_and_a_cut_off_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """on_log ran only for responses sent whole: a plugin's own logs or metrics missed the
    499s and the responses cut off midway that the access log has."""

    async def slow_or_short(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            if got[0].target == b"/slow":  # never answers
                while await conn.stream.receive_some(65536):
                    pass
                return
            if got[0].target == b"/short":  # promises 1000 bytes, sends 10 and closes
                await conn.send(response_head(200, content_length=1000) + b"x" * 10)
                return
            await conn.send(response_head(200, content_length=2) + b"ok")

    _LogRecorder.seen = []
    with trio.fail_after(DEADLINE):
        async with serve_upstream(slow_or_short) as up:
            config = make_config(up.target, {"read_timeout": "60s"})
            config["plugins"] = {"log-recorder": {}}
            plugin = ("rec", FilterSet(_LogRecorder))
            async with open_gateway(config, extra_plugins=[plugin]) as gw:
                _LogRecorder.logged = trio.Event()
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(head("/slow", "Host: a"))
                await up.wait_requests(1)
                await stream.aclose()  # the client gives up
                await _LogRecorder.logged.wait()

                _LogRecorder.logged = trio.Event()
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                asked = trio.current_time()
                await stream.send_all(head("/short", "Host: a"))
                got = await read_until_closed(stream)
                assert got.data.startswith(b"HTTP/1.1 200 ")
                assert got.closed_at - asked < 1  # not after the 5 s on_log
                await _LogRecorder.logged.wait()

                _LogRecorder.logged = trio.Event()
                status, _, _ = await timed_request(gw.port, "/whole")
                assert status == 200
                await _LogRecorder.logged.wait()
    gone, short, whole = _LogRecorder.seen
    assert gone == ("/slow", None, True, 0, "ClientGone")
    assert short[:3] == ("/short", 200, True)
    assert short[4] is None
    assert short[3] == len(got.data)  # bytes_sent: what went out before the cut
    assert short[3] > 10
    assert whole[:3] == ("/whole", 200, False)


async def test_a_drain_waits_for_the_on_log_of_a_client_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The on_log of an aborted exchange runs once the client's socket is closed; the
    request no longer counted as busy then, so a SIGTERM drain ended without it."""

    async def silent(conn: UpstreamConn) -> None:
        while await conn.stream.receive_some(65536):
            pass

    _LogRecorder.seen = []
    _LogRecorder.logged = trio.Event()
    with trio.fail_after(DEADLINE):
        async with serve_upstream(silent) as up:
            config = make_config(up.target, {"read_timeout": "60s"})
            config["plugins"] = {"log-recorder": {}}
            async with open_gateway(config, extra_plugins=[("rec", FilterSet(_LogRecorder))]) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(head("/slow", "Host: a"))
                await trio.sleep(0.5)
                await stream.aclose()  # gone: let go within a second or two
                while True:  # until the gateway has let the call go
                    if up.closed_at:
                        break
                    await trio.sleep(0.05)
                await gw.gateway.shutdown(grace=30)  # on_log takes 5 s: waited for
                assert [entry[:3] for entry in _LogRecorder.seen] == [("/slow", None, True)]


class _QuickLog(Filter):
    name, stage = "quick-log", Stage.EDGE
    paths: ClassVar[list[str]] = []

    def on_log(self, exchange: Exchange) -> None:
        self.paths.append(exchange.request.path)


async def test_a_drain_does_not_wait_for_a_lingering_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cut-off response with a pipelined request behind it is closed lingering (up to
    30 s, as the client likes); its on_log waited for that, and the drain for its on_log:
    a SIGTERM took shutdown_timeout instead of a moment."""
    _QuickLog.paths = []
    with trio.fail_after(DEADLINE):
        async with open_truncating_upstream(declared=1000, sent=10) as up:
            config = make_config(up.target)
            config["plugins"] = {"quick-log": {}}
            async with open_gateway(config, extra_plugins=[("q", FilterSet(_QuickLog))]) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(head("/cut", "Host: a") + head("/next", "Host: a"))
                got = b""
                while not got.endswith(b"x" * 10):
                    got += await stream.receive_some(65536)
                await trio.testing.wait_all_tasks_blocked()
                started = trio.current_time()
                await gw.gateway.shutdown(grace=20)
                assert trio.current_time() - started < 1
                assert _QuickLog.paths == ["/cut"]
                await stream.aclose()


async def test_route_read_timeout_overrides_the_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_stalling_upstream() as up,
            open_gateway(
                make_config(up.target, {"read_timeout": "30s"}, read_timeout="1500ms")
            ) as gw,
        ):
            status, elapsed, _ = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(1.5, abs=0.1)


async def test_route_total_timeout_overrides_the_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_stalling_upstream() as up,
            open_gateway(
                make_config(up.target, {"read_timeout": "30s", "timeout": "20s"}, timeout="2s")
            ) as gw,
        ):
            status, elapsed, _ = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(2.0, abs=0.1)


async def test_connect_timeout_is_504(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_blackhole_upstream() as up,
            open_gateway(make_config(up.target, {"connect_timeout": "3s"})) as gw,
        ):
            status, elapsed, resp = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(3.0, abs=0.1)
            assert resp.json()["error"]["code"] == "upstream_timeout"


async def test_route_connect_timeout_overrides_the_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        async with (
            open_blackhole_upstream() as up,
            open_gateway(
                make_config(up.target, {"connect_timeout": "30s"}, connect_timeout="1s")
            ) as gw,
        ):
            status, elapsed, _ = await timed_request(gw.port)
            assert status == 504
            assert elapsed == pytest.approx(1.0, abs=0.1)


async def test_refused_connect_is_502_at_once(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(DEADLINE):
        async with open_refusing_upstream() as up, open_gateway(make_config(up.target)) as gw:
            status, elapsed, resp = await timed_request(gw.port)
            assert status == 502
            assert elapsed < 0.1
            assert resp.json()["error"]["code"] == "upstream_unreachable"


# -- names with several addresses, and name lookups that hang -----------------------------


class _Names(trio.abc.HostnameResolver):
    """Test names: each maps to a list of (address, port), or to ``None`` (the lookup
    never answers). Connections to the addresses are real."""

    def __init__(self, names: Mapping[str, list[tuple[str, int]] | None]) -> None:
        self.names = names

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, int, str, Any]]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        addresses = self.names[name]
        if addresses is None:
            await trio.sleep_forever()
        return [
            # "nowhere": an address family this host cannot open a socket of (as IPv6
            # on a host with it turned off)
            (5 if address[0] == "nowhere" else socket.AF_INET, socket.SOCK_STREAM, 0, "", address)
            for address in addresses or []
        ]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


async def test_every_address_of_a_name_is_tried(autojump_clock: trio.testing.MockClock) -> None:
    """``localhost`` may give ``::1`` first to a service on 127.0.0.1 only: an address
    that refuses, or that the host has no socket for, is stepped over at once; one that
    drops the attempt costs the Happy Eyeballs stagger (250 ms), each in turn."""
    with trio.fail_after(DEADLINE):
        async with (
            open_refusing_upstream() as refusing,
            open_blackhole_upstream() as blackhole,
            open_counting_upstream() as up,
        ):
            good = ("127.0.0.1", up.port)
            trio.socket.set_custom_hostname_resolver(
                _Names(
                    {
                        "refused-first.test": [("127.0.0.1", refusing.port), good],
                        "no-socket-first.test": [("nowhere", 0), good],
                        "dropped-first.test": [("127.0.0.1", blackhole.port), good],
                        "dropped-twice.test": [("127.0.0.1", blackhole.port)] * 2 + [good],
                        "all-refuse.test": [("127.0.0.1", refusing.port)] * 3,
                    }
                )
            )
            # name: (status, virtual seconds it took)
            expected = {
                "refused-first.test": (200, 0.0),
                "no-socket-first.test": (200, 0.0),
                "dropped-first.test": (200, 0.25),
                "dropped-twice.test": (200, 0.5),
                "all-refuse.test": (502, 0.0),
            }
            for name, (want, took) in expected.items():
                config = make_config(f"{name}:80", {"connect_timeout": "3s"})
                async with open_gateway(config) as gw:
                    status, elapsed, _ = await timed_request(gw.port)
                assert (name, status) == (name, want)
                assert elapsed == pytest.approx(took, abs=0.05), name


async def test_a_name_lookup_that_hangs_is_504_at_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        trio.socket.set_custom_hostname_resolver(_Names({"hangs.test": None}))
        await _times_out_connecting("hangs.test", 2.0)


async def _times_out_connecting(name: str, connect_timeout: float) -> None:
    """A request to a gateway whose upstream is ``name`` gets 504 at connect_timeout."""
    config = make_config(f"{name}:80", {"connect_timeout": f"{connect_timeout}s"})
    async with open_gateway(config) as gw:
        status, elapsed, resp = await timed_request(gw.port)
    assert status == 504
    assert elapsed == pytest.approx(connect_timeout, abs=0.05)
    assert resp.json()["error"]["code"] == "upstream_timeout"


async def test_a_client_that_stalls_its_upload_is_not_the_target_s_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 408 for a stalled upload (or a 413, a malformed body) is the client's doing:
    outlier detection must not count it against the target, or a few clients that stop
    mid-upload would eject a healthy upstream."""
    outlier = {"consecutive_failures": 2, "base_ejection": "30s", "max_ejected_percent": 100}
    with trio.fail_after(DEADLINE):
        async with (
            open_counting_upstream() as up,
            open_gateway(make_config(up.target, {"outlier": outlier})) as gw,
        ):
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    head("/upload", "Host: a", "Content-Length: 1000", method="POST")
                )
                await stream.send_all(b"x" * 100)
                out = await read_until_closed(stream)
                await stream.aclose()
                [resp] = parse_responses(out.data)
                assert_gateway_error(resp, 408)
            await assert_serves(gw.port)  # not 503 no_healthy_target


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_race_won_as_the_caller_is_cancelled_leaves_no_socket(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's deadline (or the client going away) can land in the very pass the
    winning address connects: the winner must be closed, not left to the collector."""
    import engine.upstream as upstream

    connect = upstream._connect
    outer = trio.CancelScope()

    async def connect_then_cancel(sock: socket.socket, addr: Any, deadline: float) -> None:
        await connect(sock, addr, deadline)
        outer.cancel()  # lands in the pass the race is won

    with trio.fail_after(DEADLINE):
        async with open_blackhole_upstream() as blackhole, open_counting_upstream() as up:
            names = {"race.test": [("127.0.0.1", blackhole.port), ("127.0.0.1", up.port)]}
            trio.socket.set_custom_hostname_resolver(_Names(names))
            monkeypatch.setattr(upstream, "_connect", connect_then_cancel)
            before = _open_descriptors()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                with outer:
                    await upstream.open_connection("race.test", 80, trio.current_time() + 5)
                gc.collect()  # a socket left to the collector says so here
            assert outer.cancelled_caught
            assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
            await trio.testing.wait_all_tasks_blocked()  # the upstream sees the close
            assert _open_descriptors() == before


async def test_an_address_without_a_socket_does_not_turn_a_timeout_into_a_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """IPv6 off on the host, the IPv4 address dropping the attempt: a timeout (504, not
    retried by default), not 502 upstream_unreachable."""
    with trio.fail_after(DEADLINE):
        async with open_blackhole_upstream() as blackhole:
            names = {"v6-off.test": [("nowhere", 0), ("127.0.0.1", blackhole.port)]}
            trio.socket.set_custom_hostname_resolver(_Names(names))
            await _times_out_connecting("v6-off.test", 1.0)


class _Flaky(_Names):
    """``_Names`` that counts lookups, and fails them (a DNS outage) while ``down`` is
    ``"fail"``, or never answers while it is ``"hang"``."""

    def __init__(self, names: Mapping[str, list[tuple[str, int]] | None]) -> None:
        super().__init__(names)
        self.lookups = 0
        self.down: str | None = None
        self.delay = 0.0  # seconds each lookup takes

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, Any, int, str, Any]]:
        self.lookups += 1
        await trio.sleep(self.delay)
        if self.down == "hang":
            await trio.sleep_forever()
        if self.down == "fail":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return await super().getaddrinfo(host, port, family, type, proto, flags)


@pytest.mark.parametrize("outage", ["fail", "hang"])
async def test_a_name_is_looked_up_again_in_the_background_and_survives_a_dns_outage(
    autojump_clock: trio.testing.MockClock, outage: str
) -> None:
    """New connections reuse a name's addresses; after NAME_REFRESH seconds one lookup
    refreshes them in the background. A resolver that fails or hangs delays no request
    and ejects nothing: the last addresses serve, for up to NAME_STALE seconds."""
    from engine.names import NAME_REFRESH, NAME_STALE

    with trio.fail_after(DEADLINE * 10):
        async with open_counting_upstream() as up:
            names = _Flaky({"svc.test": [("127.0.0.1", up.port)]})
            trio.socket.set_custom_hostname_resolver(names)
            # no idle connections kept: every request opens one, and needs the addresses
            config = make_config("svc.test:80", {"pool_max_idle": 0, "connect_timeout": "1s"})
            async with open_gateway(config) as gw:
                for _ in range(3):
                    await assert_serves(gw.port)
                assert names.lookups == 1
                await trio.sleep(NAME_REFRESH + 1)
                await assert_serves(gw.port)
                await trio.testing.wait_all_tasks_blocked()
                assert names.lookups == 2  # refreshed, in the background
                names.down = outage
                await trio.sleep(NAME_REFRESH + 1)
                for _ in range(3):
                    assert await assert_serves(gw.port) < 0.1  # no wait, no 502/503
                await trio.testing.wait_all_tasks_blocked()
                assert names.lookups == 3  # one lookup under way or failed, not one each
                await trio.sleep(NAME_STALE)
                status, _, _ = await timed_request(gw.port)
                assert status == (502 if outage == "fail" else 504)  # too old to use


async def test_health_checks_use_the_last_addresses_through_a_dns_outage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as up:
            names = _Flaky({"svc.test": [("127.0.0.1", up.port)]})
            trio.socket.set_custom_hostname_resolver(names)
            health = {"path": "/healthz", "interval": "1s", "unhealthy_threshold": 2}
            config = make_config("svc.test:80", {"health_check": health})
            async with open_gateway(config) as gw:
                await assert_serves(gw.port)
                names.down = "fail"
                await trio.sleep(30)  # 30 probes, 5 failed lookups
                await assert_serves(gw.port)  # still in rotation: not 503
                assert names.lookups > 1


async def test_connections_that_wait_for_a_name_share_one_lookup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as up:
            names = _Flaky({"svc.test": [("127.0.0.1", up.port)]})
            names.delay = 1.0  # every connection waits for this first lookup
            trio.socket.set_custom_hostname_resolver(names)
            async with open_gateway(make_config("svc.test:80")) as gw:
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(assert_serves, gw.port)
                assert names.lookups == 1


async def test_a_name_that_moves_to_other_addresses_takes_its_traffic_along(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Blue/green behind one name: once a refresh sees the new address, pooled
    connections to the old one are let go and new requests go to the new one."""
    from engine.names import NAME_REFRESH

    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as blue, open_counting_upstream() as green:
            names = _Flaky({"svc.test": [("127.0.0.1", blue.port)]})
            trio.socket.set_custom_hostname_resolver(names)
            async with open_gateway(make_config("svc.test:80")) as gw:
                await assert_serves(gw.port)
                await assert_serves(gw.port)
                assert (len(blue.requests), blue.connections) == (2, 1)  # one pooled
                names.names = {"svc.test": [("127.0.0.1", green.port)]}
                await trio.sleep(NAME_REFRESH + 1)
                await assert_serves(gw.port)
                await assert_serves(gw.port)
                assert len(blue.requests) == 2
                assert (len(green.requests), green.connections) == (2, 1)


async def test_a_reload_during_a_dns_outage_keeps_the_names_addresses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reload that changes the upstream builds a new pool: it starts from what the
    old one knew of its names, not from a lookup the outage would fail."""
    from engine.config import load

    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as up:
            names = _Flaky({"svc.test": [("127.0.0.1", up.port)]})
            trio.socket.set_custom_hostname_resolver(names)
            config = make_config("svc.test:80", {"pool_max_idle": 0, "connect_timeout": "1s"})
            async with open_gateway(config) as gw:
                await assert_serves(gw.port)
                names.down = "hang"
                config["upstreams"]["u"]["connect_timeout"] = "2s"
                old_pool = gw.gateway.runtime.pools["u"]
                await gw.gateway.reload(load(config))
                assert gw.gateway.runtime.pools["u"] is not old_pool  # a new pool
                assert await assert_serves(gw.port) < 0.1


async def test_a_refused_reload_leaves_no_keeper_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reload refused after its new pools were built must not keep looking their
    names up: one lookup per refresh, however many reloads were refused."""
    from engine.config import load
    from engine.names import NAME_REFRESH
    from engine.schema import ConfigError

    with trio.fail_after(DEADLINE):
        async with open_counting_upstream() as up:
            names = _Flaky({"svc.test": [("127.0.0.1", up.port)]})
            trio.socket.set_custom_hostname_resolver(names)
            config = make_config("svc.test:80")
            async with open_gateway(config) as gw:
                await assert_serves(gw.port)
                for timeout in ("2s", "3s", "4s"):
                    bad = make_config("svc.test:80", {"connect_timeout": timeout})
                    # a plugin's config is checked after the pools are built
                    bad["routes"][0]["plugins"] = {"retry": {"attempts": 99}}
                    with pytest.raises(ConfigError):
                        await gw.gateway.reload(load(bad))
                before = names.lookups
                await trio.sleep(NAME_REFRESH * 4 + 1)
                assert names.lookups - before == 4  # the serving pool's keeper only
