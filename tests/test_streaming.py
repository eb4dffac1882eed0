"""Bodies stream through the gateway, and a broken upstream never looks like a good one.

* 200 MB up and 200 MB down through a gateway run as its own process (``filtergate run``),
  whose peak RSS (``VmHWM``) must grow by less than 30 MB: memory per connection stays
  bounded whatever the body size.
* Upstream failures around a response: closed or stalled mid-body (the client connection
  is aborted, so the client can tell the body is incomplete), garbage (502), bytes after
  a response (that connection is not reused), 1xx before the final response, and a
  client's ``Expect: 100-continue``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from engine.testing import Client, Stubs, free_port, http_request, open_gateway, wait_listening
from tests.test_hostile import RawResponse, assert_gateway_error, head, parse_responses
from tests.upstreams import (
    CHUNK,
    AbstractUpstream,
    UpstreamConn,
    open_counting_upstream,
    open_garbage_upstream,
    open_informational_upstream,
    open_streaming_upstream,
    open_trailing_bytes_upstream,
    open_truncating_upstream,
    response_head,
    serve_upstream,
)

REPO = Path(__file__).resolve().parent.parent
BIG = 200 * 1024 * 1024
RSS_GROWTH_LIMIT = 30_000_000  # bytes


# -- the gateway as a process ----------------------------------------------------------


def memory(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak) and ``VmRSS`` of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


@asynccontextmanager
async def run_gateway_process(tmp_path: Path, target: str) -> AsyncIterator[tuple[int, int]]:
    """``filtergate run`` in front of ``target``; yields ``(pid, port)``."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[server]
listen = ["127.0.0.1:{port}"]
max_body_size = "1GiB"

[admin]
enabled = false

[upstreams.u]
targets = ["{target}"]

[[routes]]
name = "all"
prefix = "/"
upstream = "u"
"""
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "engine.cli", "--log-level", "warning", "run", "-c", str(config)],
        cwd=str(REPO),
    )
    try:
        with trio.fail_after(15):
            await wait_listening(port, proc)
        yield proc.pid, port
    finally:
        proc.terminate()
        with trio.move_on_after(10) as cs:
            await proc.wait()
        if cs.cancelled_caught:
            proc.kill()
            await proc.wait()


async def upload(port: int, size: int) -> Any:
    """POST ``size`` bytes in 64 KiB writes; returns the upstream's JSON answer."""
    block = b"u" * CHUNK
    async with Client.open(port) as client:
        h = client.h11
        hdrs = [("host", "a"), ("content-length", str(size))]
        await client.stream.send_all(
            h.send(h11.Request(method="POST", target="/up", headers=hdrs)) or b""
        )
        left = size
        while left:
            n = min(CHUNK, left)
            await client.stream.send_all(h.send(h11.Data(data=block[:n])) or b"")
            left -= n
        await client.stream.send_all(h.send(h11.EndOfMessage()) or b"")
        resp = await client.read_response()
    assert resp.status == 200, resp.body
    return resp.json()


async def download(port: int) -> tuple[int, int]:
    """GET a body over a raw socket; returns (declared Content-Length, bytes received)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(head("/down", "Host: a"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await stream.receive_some(CHUNK)
            assert chunk, "closed before the response head"
            buf += chunk
        head_bytes, _, rest = buf.partition(b"\r\n\r\n")
        assert head_bytes.startswith(b"HTTP/1.1 200 ")
        declared = 0
        for line in head_bytes.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                declared = int(value)
        received = len(rest)
        assert rest.count(b"Z") == len(rest)
        while received < declared:
            chunk = await stream.receive_some(CHUNK)
            if not chunk:
                break
            assert chunk.count(b"Z") == len(chunk)
            received += len(chunk)
        return declared, received
    finally:
        await stream.aclose()


async def test_200mb_request_body_streams_in_bounded_memory(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with (
            open_counting_upstream(keep=16) as up,
            run_gateway_process(tmp_path, up.target) as (pid, port),
        ):
            assert (await upload(port, 1024))["received"] == 1024  # warm up
            before = memory(pid)
            answer = await upload(port, BIG)
            after = memory(pid)
        assert answer["received"] == BIG
        assert up.body_bytes == BIG + 1024
        growth = after["VmHWM"] - before["VmHWM"]
        assert growth < RSS_GROWTH_LIMIT, (before, after)


async def test_200mb_response_body_streams_in_bounded_memory(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with (
            open_streaming_upstream(BIG) as up,
            run_gateway_process(tmp_path, up.target) as (pid, port),
        ):
            before = memory(pid)
            declared, received = await download(port)
            after = memory(pid)
        assert declared == received == BIG
        growth = after["VmHWM"] - before["VmHWM"]
        assert growth < RSS_GROWTH_LIMIT, (before, after)


# -- upstream failures -----------------------------------------------------------------


def make_config(target: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"targets": [target], **upstream}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
    }


async def fetch_raw(port: int, target: str = "/x") -> bytes:
    """One GET; everything the gateway sent until it closed the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(head(target, "Host: a"))
        data = bytearray()
        while True:
            try:
                chunk = await stream.receive_some(CHUNK)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)
    finally:
        await stream.aclose()


def read_events(h: h11.Connection, events: list[type[Any]]) -> None:
    """Record the types of ``h``'s events up to the end of the message."""
    while True:
        ev = h.next_event()
        assert ev is not h11.NEED_DATA
        events.append(type(ev))
        if isinstance(ev, h11.EndOfMessage):
            return


def assert_incomplete(data: bytes) -> None:
    """``data`` (a whole connection's worth) holds a response whose body is cut short.

    What a careful client checks: h11 must report the body incomplete at end of stream.
    """
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method="GET", target="/x", headers=[("host", "a")]))
    h.send(h11.EndOfMessage())
    h.receive_data(data)
    h.receive_data(b"")
    events: list[type[Any]] = []
    with pytest.raises(h11.RemoteProtocolError):
        read_events(h, events)
    assert events[0] is h11.Response
    assert h11.EndOfMessage not in events


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upstream_closing_mid_body_aborts_the_client(chunked: bool) -> None:
    declared, sent = 1024 * 1024, 300 * 1024
    with trio.fail_after(10):
        async with (
            open_truncating_upstream(declared, sent, chunked=chunked) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            data = await fetch_raw(gw.port)
            assert_incomplete(data)
            if chunked:
                assert b"transfer-encoding: chunked" in data.lower()
            else:
                assert f"content-length: {declared}".encode() in data.lower()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upstream_stalling_mid_body_aborts_the_client_after_read_timeout(
    autojump_clock: trio.testing.MockClock, chunked: bool
) -> None:
    with trio.fail_after(100):
        async with (
            open_truncating_upstream(1024 * 1024, 100 * 1024, chunked=chunked, stall=True) as up,
            open_gateway(make_config(up.target, read_timeout="5s")) as gw,
        ):
            start = trio.current_time()
            data = await fetch_raw(gw.port)
            assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
            assert_incomplete(data)


async def test_upstream_garbage_is_502() -> None:
    with trio.fail_after(10):
        async with open_garbage_upstream() as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                for _ in range(2):
                    resp = await client.request("GET", "/x")
                    raw = RawResponse(resp.status, resp.reason, resp.headers, resp.body)
                    assert_gateway_error(raw, 502)
                    assert resp.json()["error"]["code"] == "bad_gateway"
            assert up.connections == 2


@pytest.mark.parametrize(
    "garbage",
    [
        # h11 takes any three digits; HTTP's statuses end at 599 (RFC 9110 15)
        b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\nok",
        # a head over the 64 KiB limit that arrives whole, in the read that crosses it
        b"HTTP/1.1 200 OK\r\nx-big: " + b"b" * 100_000 + b"\r\ncontent-length: 2\r\n\r\nok",
    ],
    ids=["status-600", "whole-head-over-64k"],
)
async def test_upstream_heads_that_are_no_http_are_502(garbage: bytes) -> None:
    with trio.fail_after(10):
        async with (
            open_garbage_upstream(garbage) as up,
            open_gateway(make_config(up.target)) as gw,
            Client.open(gw.port) as client,
        ):
            resp = await client.request("GET", "/x")
            assert resp.status == 502
            assert resp.json()["error"]["code"] == "bad_gateway"
            assert b"b" * 1000 not in resp.body


async def test_upstream_trailing_bytes_connection_not_reused() -> None:
    with trio.fail_after(10):
        async with open_trailing_bytes_upstream() as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                for i in range(1, 4):
                    resp = await client.request("GET", f"/r{i}")
                    assert resp.status == 200
                    # The answer of connection i, never the smuggled bytes.
                    assert resp.body == f"ok {i}".encode()
            assert up.connections == 3
            assert len(up.requests) == 3


async def test_upstream_trailing_bytes_arriving_later_connection_not_reused() -> None:
    async def handler(conn: UpstreamConn) -> None:
        while await conn.read_request() is not None:
            number = conn.upstream.connections
            body = f"ok {number}".encode()
            await conn.send(response_head(200, content_length=len(body)) + body)
            await trio.sleep(0.05)  # after the gateway has read the response
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled")

    with trio.fail_after(10):
        async with serve_upstream(handler) as up, open_gateway(make_config(up.target)) as gw:
            for i in range(1, 4):
                async with Client.open(gw.port) as client:
                    resp = await client.request("GET", f"/r{i}")
                assert resp.body == f"ok {i}".encode()
                await trio.sleep(0.2)
            assert up.connections == 3


async def test_clean_upstream_connection_is_reused() -> None:
    # The contrast to the two tests above: a clean response leaves a reusable connection.
    with trio.fail_after(10):
        async with open_counting_upstream() as up, open_gateway(make_config(up.target)) as gw:
            for i in range(3):
                async with Client.open(gw.port) as client:
                    resp = await client.request("GET", f"/r{i}")
                assert resp.status == 200
            assert up.connections == 1


async def test_upstream_informational_responses_then_the_final_one() -> None:
    with trio.fail_after(10):
        async with open_informational_upstream() as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                for _ in range(2):
                    resp = await client.request("POST", "/x", body=b"hello")
                    assert resp.status == 200
                    assert resp.json() == {"final": True, "received": 5}
            assert up.connections == 1


async def test_upstream_switching_protocols_unasked_is_502() -> None:
    # The gateway never forwards Upgrade, so a 101 is garbage, not a tunnel to open.
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    with trio.fail_after(10):
        async with (
            open_informational_upstream(switch) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            async with Client.open(gw.port) as client:
                resp = await client.request("GET", "/x")
                assert resp.status == 502
                again = await client.request("GET", "/y")  # the client connection is fine
                assert again.status == 502


async def test_client_expect_100_continue() -> None:
    body = b"b" * 50_000
    with trio.fail_after(10):
        async with open_counting_upstream() as up, open_gateway(make_config(up.target)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            try:
                await stream.send_all(
                    head(
                        "/upload",
                        "Host: a",
                        "Expect: 100-continue",
                        f"Content-Length: {len(body)}",
                        method="POST",
                    )
                )
                got = b""
                while b"\r\n\r\n" not in got:
                    got += await stream.receive_some(CHUNK)
                interim, _, rest = got.partition(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 ")
                assert rest == b""
                await stream.send_all(body + head("/next", "Host: a", "Connection: close"))
                data = bytearray(rest)
                while True:
                    chunk = await stream.receive_some(CHUNK)
                    if not chunk:
                        break
                    data += chunk
            finally:
                await stream.aclose()
            first, second = parse_responses(bytes(data))
            assert first.status == 200
            assert first.json()["received"] == len(body)
            assert "expect" not in {n for n, _ in first.json()["headers"]}
            assert second.json()["target"] == "/next"


async def test_expect_100_continue_answered_early_without_the_100() -> None:
    with trio.fail_after(10):
        async with open_counting_upstream() as up:
            config = make_config(up.target)
            config["routes"][0]["prefix"] = "/api"
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                try:
                    await stream.send_all(
                        head(
                            "/nowhere",
                            "Host: a",
                            "Expect: 100-continue",
                            "Content-Length: 100000",
                            method="POST",
                        )
                    )
                    data = bytearray()
                    while True:
                        chunk = await stream.receive_some(CHUNK)
                        if not chunk:
                            break
                        data += chunk
                finally:
                    await stream.aclose()
                # The final answer straight away (no 100), and the unsent body is not
                # waited for: the connection is closed.
                [resp] = parse_responses(bytes(data))
                assert_gateway_error(resp, 404)
                assert up.requests == []


# -- re-framing of relayed responses ---------------------------------------------------


def raw_upstream(response: bytes) -> AbstractUpstream:
    """Keep-alive; answers every request with the literal bytes ``response``."""

    async def handler(conn: UpstreamConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(response)

    return serve_upstream(handler)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_bodiless_status_relayed_without_body_framing(response: bytes) -> None:
    # RFC 9112 6.1: no Transfer-Encoding in a 204 (or 304); a client that believed one
    # would wait for a chunked body that never comes.
    with trio.fail_after(10):
        async with raw_upstream(response) as up, open_gateway(make_config(up.target)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            try:
                await stream.send_all(head("/a", "Host: a") + head("/b", "Host: a"))
                data = b""
                while data.count(b"\r\n\r\n") < 2:
                    data += await stream.receive_some(CHUNK)
            finally:
                await stream.aclose()
            first, second = data.split(b"\r\n\r\n")[:2]
            status = response[9:12]
            for resp_head in (first, second):
                assert resp_head.startswith(b"HTTP/1.1 " + status)
                assert b"transfer-encoding" not in resp_head.lower()


async def test_upstream_response_with_content_length_and_chunked() -> None:
    # h11 reads this body as chunked ("hello"); relaying the upstream's Content-Length
    # beside it would promise 100 bytes. Either refuse (502) or relay it re-framed.
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    with trio.fail_after(10):
        async with raw_upstream(response) as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                try:
                    resp = await client.request("GET", "/x")
                except (ConnectionError, h11.RemoteProtocolError) as e:
                    pytest.fail(f"the client got no usable answer: {e!r}")
            if resp.status == 502:
                assert resp.json()["error"]["code"] == "bad_gateway"
            else:
                assert (resp.status, resp.body) == (200, b"hello")


async def test_upstream_request_id_not_duplicated() -> None:
    # A service that echoes a request id must not give the client two of them.
    response = b"HTTP/1.1 200 OK\r\nx-request-id: upstream-made\r\ncontent-length: 2\r\n\r\nok"
    with trio.fail_after(10):
        async with raw_upstream(response) as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                resp = await client.request("GET", "/x")
            assert resp.status == 200
            assert resp.header_all("x-request-id") == [up.requests[0].header("x-request-id")]


@pytest.mark.parametrize("pause", [0.05, 2.0], ids=["soon", "later"])
@pytest.mark.parametrize("body", [None, b"streamed"], ids=["bodyless", "streamed-body"])
async def test_a_pooled_connection_the_upstream_closed_is_not_a_failure(
    autojump_clock: trio.testing.MockClock, pause: float, body: bytes | None
) -> None:
    # The upstream answers one request per connection and then closes it without a
    # word (as on its own idle timeout): the liveness poll drops the pooled connection
    # before use, so even a call whose body streams (it could not be sent twice) is
    # not failed by it. The client sees only 200s.
    async def one_shot(conn: UpstreamConn) -> None:
        if await conn.read_request() is not None:
            await conn.send(response_head(200, [], content_length=2) + b"ok")

    with trio.fail_after(30):
        async with serve_upstream(one_shot) as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                for i in range(3):
                    resp = await client.request("POST", f"/r{i}", body=body)
                    assert resp.status == 200
                    assert resp.body == b"ok"
                    await trio.sleep(pause)
            assert up.connections == 3


def _buffering_config(stubs: Stubs, max_buffering: str) -> dict[str, Any]:
    """A route whose transform needs the request body whole (8 KiB at most)."""
    return {
        "server": {"max_buffered_body": "8KiB", "max_buffering": max_buffering},
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [
            {
                "name": "edit",
                "prefix": "/",
                "upstream": "echo",
                "plugins": {"transform": {"request": {"json": {"set": {"seen": True}}}}},
            }
        ],
    }


async def test_bodies_being_buffered_are_bounded_for_the_whole_process(stubs: Stubs) -> None:
    """150 uploads of 1 MiB that went quiet held 150 MB (max_buffered_body each, as many
    as there are connections). Past max_buffering, the next is refused."""
    config = _buffering_config(stubs, "12KiB")
    body = b'{"pad": "' + b"x" * 7900 + b'"}'
    head = (
        b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(10):
        async with open_gateway(config) as gw:
            first = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await first.send_all(head + body[:7000])  # buffered, not whole yet
            await trio.testing.wait_all_tasks_blocked()
            second = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await second.send_all(head + body[:7000])  # 14,000 bytes with the first's
            refused = b""
            while chunk := await second.receive_some(65536):
                refused += chunk
            assert refused.startswith(b"HTTP/1.1 503 ")
            assert b"retry-after: 1" in refused.lower()
            await first.send_all(body[7000:])
            answered = await first.receive_some(65536)
            assert answered.startswith(b"HTTP/1.1 200 ")
            await first.aclose()
            await second.aclose()
            again = await http_request(
                gw.port, "POST", "/e", [("Content-Type", "application/json")], body
            )
            assert again.status == 200  # the budget came back


async def test_a_body_of_tiny_chunks_goes_upstream_in_few_pieces() -> None:
    """Each one-byte chunk was a send upstream of its own (and ~20 us of CPU): 2,000 of
    them in one packet went out as 2,000 chunks."""
    from tests.upstreams import serve_upstream

    raw = bytearray()

    async def record(conn: UpstreamConn) -> None:
        while data := await conn.stream.receive_some(65536):
            raw.extend(data)
            if raw.endswith(b"0\r\n\r\n"):
                await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                return

    body = b"".join(b"1\r\n%c\r\n" % (65 + i % 26) for i in range(2000)) + b"0\r\n\r\n"
    with trio.fail_after(10):
        async with serve_upstream(record) as up:
            config = {
                "upstreams": {"u": {"targets": [up.target]}},
                "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
            }
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
                )
                answer = await stream.receive_some(65536)
                await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 200 ")
    _head, _, rest = bytes(raw).partition(b"\r\n\r\n")
    pieces = []
    while True:  # the chunked framing the gateway wrote
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        pieces.append(rest[:size])
        rest = rest[size + 2 :]
    assert len(pieces) < 20
    assert b"".join(pieces) == bytes(65 + i % 26 for i in range(2000))  # every byte, in order


async def test_a_body_over_the_buffer_cap_streams_on_rather_than_503(stubs: Stubs) -> None:
    """With max_buffering = max_buffered_body (allowed), a body over the cap was a 503:
    the process-wide limit was looked at before the body's own."""
    config = _buffering_config(stubs, "8KiB")
    body = b'{"pad": "' + b"x" * 10_000 + b'"}'
    with trio.fail_after(10):
        async with open_gateway(config) as gw:
            resp = await http_request(
                gw.port, "POST", "/e", [("Content-Type", "application/json")], body
            )
    assert resp.status == 200  # passed on unedited, as too large to edit
    assert resp.json()["body"] == body.decode()


@pytest.mark.parametrize(
    "bad",
    [
        b"5\r\nhello\r\nzz\r\n5\r\nworld\r\n0\r\n\r\n",  # a chunk size that is no number
        b"5\r\nhelloXX\r\n5\r\nworld\r\n0\r\n\r\n",  # a chunk longer than its size
        b"5\r\nhello\r\n-1\r\nworld\r\n0\r\n\r\n",
    ],
)
async def test_a_malformed_chunk_after_good_ones_is_400_never_skipped(
    stubs: Stubs, bad: bytes
) -> None:
    """Gathering chunks swallowed the error of a bad chunk after good ones, and the body
    went on without the bad bytes: 200 'helloworld', where a strict parser stops."""
    config = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "echo"}],
    }
    with trio.fail_after(10):
        async with open_gateway(config) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + bad
            )
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400 ")
