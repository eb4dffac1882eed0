"""An upstream's early final response wins over the request body still being sent.

RFC 9112 9.5: a client sending a body should watch the connection for an error
response meanwhile. An upstream that refuses a request (413, 401) may answer right
after its head and never read the body; the gateway stops sending it and relays the
answer at once, instead of waiting on a full socket (504 after ``write_timeout``) or
on a stalled client (408 after ``body_timeout``). A connection answered early is never
reused. The contrast: an upstream that reads the whole body first, then answers.

Virtual time (``autojump_clock``): the clock jumps to the next deadline as soon as
every party is blocked, so "at once" means in no virtual time at all.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from engine.testing import Client, HttpResponse, open_gateway
from tests.test_hostile import head, send_raw
from tests.upstreams import (
    CHUNK,
    AbstractUpstream,
    RecordedRequest,
    UpstreamConn,
    open_counting_upstream,
    response_head,
    serve_upstream,
)

BODY_TIMEOUT = 7.0
UPSTREAM_WRITE_TIMEOUT = 20.0
DEADLINE = 120  # virtual seconds: far above every timeout in play
BIG = 5 * 1000 * 1000


def make_config(target: str) -> dict[str, Any]:
    return {
        "server": {"body_timeout": f"{BODY_TIMEOUT}s"},
        "upstreams": {"u": {"targets": [target], "write_timeout": f"{UPSTREAM_WRITE_TIMEOUT}s"}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
    }


def open_refusing_early_upstream(
    status: int, reason: str, body: bytes, *, close: bool
) -> AbstractUpstream:
    """Answers every POST with ``status`` as soon as its head is read, and never reads
    its body; then closes (``close``, announced) or keeps the connection open and
    unread. Any other method is answered ``ok`` (keep-alive)."""

    async def handler(conn: UpstreamConn) -> None:
        while True:
            got = await conn.read_head()
            if got is None:
                return
            h, req = got
            conn.upstream._saw(RecordedRequest(req.method, req.target, list(req.headers), 0))
            if req.method != b"POST":
                await conn.read_body(h)
                await conn.send(response_head(200, content_length=2) + b"ok")
                continue
            headers = [("connection", "close")] if close else []
            await conn.send(
                response_head(status, headers, content_length=len(body), reason=reason) + body
            )
            if not close:
                await trio.sleep_forever()
            return

    return serve_upstream(handler)


def post_head(*headers: str) -> bytes:
    return head("/upload", "Host: a", *headers, method="POST")


async def answer_while_sending(
    port: int, request: bytes | list[bytes], within: float
) -> HttpResponse:
    """The response to ``request`` (written piece by piece, never ended by the client),
    which must arrive within ``within`` virtual seconds."""
    start = trio.current_time()
    [resp], _ = await send_raw(port, request, wait_close=False)
    assert trio.current_time() - start < within
    return resp


async def test_413_right_after_the_head_of_a_5mb_body_is_relayed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    block = b"u" * CHUNK
    pieces = [post_head(f"Content-Length: {BIG}")]
    pieces += [block] * (BIG // CHUNK) + [block[: BIG % CHUNK]]
    with trio.fail_after(DEADLINE):
        async with (
            open_refusing_early_upstream(413, "Payload Too Large", b"too big", close=False) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            resp = await answer_while_sending(gw.port, pieces, 1.0)  # not write_timeout later
            assert (resp.status, resp.body) == (413, b"too big")
            # The gateway goes on serving; the connection answered early is not reused.
            async with Client.open(gw.port) as client:
                again = await client.request("GET", "/next")
            assert (again.status, again.body) == (200, b"ok")
            assert up.connections == 2
            assert [r.method for r in up.requests] == [b"POST", b"GET"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_401_with_close_reaches_a_client_stalled_mid_body(
    autojump_clock: trio.testing.MockClock, chunked: bool
) -> None:
    # The client sends 1000 bytes of its body and stalls: the answer comes now, not a
    # 408 after body_timeout.
    part = b"p" * 1000
    if chunked:
        request = post_head("Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (len(part), part)
    else:
        request = post_head("Content-Length: 100000") + part
    with trio.fail_after(DEADLINE):
        async with (
            open_refusing_early_upstream(401, "Unauthorized", b"who are you", close=True) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            resp = await answer_while_sending(gw.port, request, BODY_TIMEOUT / 2)
            assert (resp.status, resp.body) == (401, b"who are you")


@pytest.mark.parametrize("close", [False, True], ids=["upstream-keeps-open", "upstream-closes"])
async def test_early_answer_to_a_chunked_body_still_flowing(
    autojump_clock: trio.testing.MockClock, close: bool
) -> None:
    # A chunked body of 5 MB, written as fast as the gateway takes it, never ended.
    block = b"c" * CHUNK
    piece = b"%x\r\n%s\r\n" % (len(block), block)
    pieces = [post_head("Transfer-Encoding: chunked")] + [piece] * (BIG // CHUNK)
    with trio.fail_after(DEADLINE):
        async with (
            open_refusing_early_upstream(403, "Forbidden", b"no uploads", close=close) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            resp = await answer_while_sending(gw.port, pieces, 1.0)
            assert (resp.status, resp.body) == (403, b"no uploads")
            async with Client.open(gw.port) as client:
                assert (await client.request("GET", "/next")).status == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upstream_reading_the_whole_body_first_gets_it_intact(chunked: bool) -> None:
    # The usual case: a 1 MB body streams through whole, the answer follows, and the
    # upstream connection is reused for the next request.
    size = 1024 * 1024
    framing = [("transfer-encoding", "chunked")] if chunked else []
    with trio.fail_after(30):
        async with (
            open_counting_upstream(keep=16) as up,
            open_gateway(make_config(up.target)) as gw,
        ):
            async with Client.open(gw.port) as client:
                for i in range(3):
                    body = bytes([ord("a") + i]) * size
                    resp = await client.request("POST", f"/up{i}", framing, body)
                    assert resp.status == 200
                    answer = resp.json()
                    assert answer["received"] == size
                    assert answer["body"] == body[:16].decode()
            assert up.body_bytes == 3 * size
            assert up.completed == 3
            assert up.connections == 1


async def test_100_continue_while_the_body_streams_is_skipped() -> None:
    # An interim answer during the sending is not the final one: the body goes on.
    size = 300 * 1024

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_head()) is not None:
            h, _req = got
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            received, _ = await conn.read_body(h)
            answer = str(received).encode()
            await conn.send(response_head(200, content_length=len(answer)) + answer)

    with trio.fail_after(30):
        async with serve_upstream(handler) as up, open_gateway(make_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                for _ in range(2):
                    resp = await client.request("POST", "/x", body=b"b" * size)
                    assert (resp.status, resp.body) == (200, str(size).encode())
            assert up.connections == 1
