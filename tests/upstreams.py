"""Purpose-built upstream servers for the engine's framing, timeout and streaming tests.

Each ``open_*`` function is an async context manager serving on ``127.0.0.1:<free port>``
while open and yielding an :class:`Upstream`: its ``port`` plus counters the tests assert
on (connections accepted, requests read, request-body bytes received, what each request
looked like). They are written on raw trio sockets so that they can misbehave on purpose
(garbage, truncated bodies, trailing bytes, stalls), which a real server never does;
requests are parsed with h11, responses are written as literal bytes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

from engine.testing import HeaderLookup

__all__ = [
    "CHUNK",
    "RecordedRequest",
    "Upstream",
    "open_blackhole_upstream",
    "open_counting_upstream",
    "open_garbage_upstream",
    "open_headers_upstream",
    "open_informational_upstream",
    "open_refusing_upstream",
    "open_stalling_upstream",
    "open_streaming_upstream",
    "open_trailing_bytes_upstream",
    "open_truncating_upstream",
    "serve_raw",
    "serve_upstream",
]

CHUNK = 64 * 1024


@dataclass
class RecordedRequest(HeaderLookup):
    """One request as the upstream received it (the body only counted, not kept)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body_length: int


@dataclass
class Upstream:
    """A running test upstream: where it listens and what it has seen so far."""

    port: int = 0
    connections: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    body_bytes: int = 0
    # Requests whose body was read to its end (EndOfMessage).
    completed: int = 0
    # Set each time a request head has been read (replaced after each set), for tests
    # that must wait until the gateway has reached the upstream.
    request_seen: trio.Event = field(default_factory=trio.Event)
    # trio.current_time() at which each connection ended, in order.
    closed_at: list[float] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _saw(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        event, self.request_seen = self.request_seen, trio.Event()
        event.set()

    async def wait_requests(self, count: int) -> None:
        """Return once at least ``count`` request heads have arrived."""
        while len(self.requests) < count:
            await self.request_seen.wait()


class UpstreamConn:
    """One accepted connection: reads requests with h11, writes raw bytes.

    A fresh h11 state per request, so a handler can write anything (garbage, a short
    body) and still read the next request that arrives on the same connection.
    """

    def __init__(self, stream: trio.SocketStream, upstream: Upstream) -> None:
        self.stream = stream
        self.upstream = upstream
        self._leftover = b""
        self.closed_by_peer = False

    async def read_head(self) -> tuple[h11.Connection, h11.Request] | None:
        """The next request head, or ``None`` when the peer closed the connection."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=1024 * 1024)
        if self._leftover:  # (receive_data(b"") would mean end of stream to h11)
            h.receive_data(self._leftover)
            self._leftover = b""
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                data = await self._receive()
                h.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                return h, ev
            return None

    async def read_body(self, h: h11.Connection, keep: int = 0) -> tuple[int, bytes]:
        """Consume the request body; returns its length and its first ``keep`` bytes."""
        size = 0
        kept = bytearray()
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                h.receive_data(await self._receive())
                continue
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                self.upstream.body_bytes += len(ev.data)
                if len(kept) < keep:
                    kept += ev.data[: keep - len(kept)]
                continue
            if isinstance(ev, h11.EndOfMessage):
                self.upstream.completed += 1
                self._leftover = bytes(h.trailing_data[0])
                return size, bytes(kept)
            raise ConnectionError(f"unexpected {ev!r} in a request body")

    async def read_request(self, keep: int = 0) -> tuple[RecordedRequest, bytes] | None:
        """Head and body of the next request, recorded; ``None`` at end of stream."""
        got = await self.read_head()
        if got is None:
            return None
        h, req = got
        # Record the head before the body, so that a test can see the request arrive.
        rec = RecordedRequest(req.method, req.target, list(req.headers), 0)
        self.upstream._saw(rec)
        rec.body_length, body = await self.read_body(h, keep)
        return rec, body

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed_by_peer = True
        return bytes(data)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


Handler = Callable[[UpstreamConn], Awaitable[None]]
# What every open_* returns: a context manager yielding the running Upstream.
AbstractUpstream = AbstractAsyncContextManager[Upstream]


def response_head(
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    *,
    content_length: int | None = None,
    reason: str = "OK",
) -> bytes:
    """The bytes of a response head; ``content_length`` None means chunked."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    for n, v in headers or []:
        lines.append(f"{n}: {v}")
    if content_length is None:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(payload: object, headers: list[tuple[str, str]] | None = None) -> bytes:
    body = json.dumps(payload).encode()
    hdrs = [("content-type", "application/json"), *(headers or [])]
    return response_head(200, hdrs, content_length=len(body)) + body


@asynccontextmanager
async def serve_upstream(handler: Handler) -> AsyncIterator[Upstream]:
    """Serve ``handler`` (one call per accepted connection) while the block runs."""
    upstream = Upstream()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    upstream.port = listeners[0].socket.getsockname()[1]

    async def one(stream: trio.SocketStream) -> None:
        upstream.connections += 1
        try:
            await handler(UpstreamConn(stream, upstream))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except h11.ProtocolError:
            pass
        finally:
            upstream.closed_at.append(trio.current_time())
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, one, listeners)
        try:
            yield upstream
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_raw(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> AsyncIterator[int]:
    """Serve ``handler`` on each accepted TCP stream as it is (no HTTP parsing, errors
    not swallowed) while the block runs; yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


# -- the upstreams --------------------------------------------------------------------


def open_counting_upstream(keep: int = 64 * 1024) -> AbstractUpstream:
    """Keep-alive; answers each request with JSON describing it (a recording echo).

    ``{"method", "target", "headers": [[name, value], ...], "received": body length,
    "body": first ``keep`` bytes decoded as latin-1, "connection": n, "request": n}``.
    """

    async def handler(conn: UpstreamConn) -> None:
        number = conn.upstream.connections
        while True:
            got = await conn.read_request(keep)
            if got is None:
                return
            rec, body = got
            await conn.send(
                json_response(
                    {
                        "method": rec.method.decode(),
                        "target": rec.target.decode("latin-1"),
                        "headers": [[n.decode(), v.decode("latin-1")] for n, v in rec.headers],
                        "received": rec.body_length,
                        "body": body.decode("latin-1"),
                        "connection": number,
                        "request": len(conn.upstream.requests),
                    }
                )
            )

    return serve_upstream(handler)


def open_garbage_upstream(
    garbage: bytes = b"SPDY/9 banana\r\n\x00\x01\r\n\r\n",
) -> AbstractUpstream:
    """Reads a request, answers bytes that are not HTTP, closes."""

    async def handler(conn: UpstreamConn) -> None:
        if await conn.read_request() is None:
            return
        await conn.send(garbage)

    return serve_upstream(handler)


def open_truncating_upstream(
    declared: int, sent: int, *, chunked: bool = False, stall: bool = False
) -> AbstractUpstream:
    """Promises ``declared`` body bytes (Content-Length, or chunked without a size) and
    sends only ``sent``; then closes, or with ``stall`` keeps the connection open and
    silent forever."""

    async def handler(conn: UpstreamConn) -> None:
        if await conn.read_request() is None:
            return
        if chunked:
            await conn.send(response_head(200, content_length=None))
        else:
            await conn.send(response_head(200, content_length=declared))
        left = sent
        while left > 0:
            n = min(CHUNK, left)
            data = b"x" * n
            await conn.send(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
            left -= n
        if stall:
            await trio.sleep_forever()

    return serve_upstream(handler)


def open_stalling_upstream(*, read_body: bool = True) -> AbstractUpstream:
    """Reads each request (the body too, unless ``read_body`` is false), never answers."""

    async def handler(conn: UpstreamConn) -> None:
        if read_body:
            await conn.read_request()
        else:
            got = await conn.read_head()
            if got is not None:
                _h, req = got
                conn.upstream._saw(RecordedRequest(req.method, req.target, list(req.headers), 0))
        await trio.sleep_forever()

    return serve_upstream(handler)


def open_trailing_bytes_upstream(
    extra: bytes = b"HTTP/1.1 200 OK\r\n\r\nsmuggled",
) -> AbstractUpstream:
    """Keep-alive; each response ``ok`` is followed, in the same write, by ``extra``.

    A gateway that put such a connection back in its pool would hand the extra bytes
    to the next request as its response (response splitting/desync).
    """

    async def handler(conn: UpstreamConn) -> None:
        while True:
            if await conn.read_request() is None:
                return
            number = conn.upstream.connections
            body = f"ok {number}".encode()
            await conn.send(response_head(200, content_length=len(body)) + body + extra)

    return serve_upstream(handler)


def open_informational_upstream(
    informational: bytes = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    ),
) -> AbstractUpstream:
    """Keep-alive; sends ``informational`` (1xx responses) before each final response."""

    async def handler(conn: UpstreamConn) -> None:
        while True:
            got = await conn.read_request()
            if got is None:
                return
            rec, _ = got
            await conn.send(informational)
            await conn.send(json_response({"final": True, "received": rec.body_length}))

    return serve_upstream(handler)


def open_headers_upstream(headers: list[tuple[str, str]]) -> AbstractUpstream:
    """Keep-alive; every response carries ``headers`` (e.g. hop-by-hop ones) and ``ok``."""

    async def handler(conn: UpstreamConn) -> None:
        while True:
            if await conn.read_request() is None:
                return
            await conn.send(response_head(200, headers, content_length=2) + b"ok")

    return serve_upstream(handler)


def open_streaming_upstream(size: int, *, chunked: bool = False) -> AbstractUpstream:
    """Keep-alive; answers every request with ``size`` body bytes in 64 KiB writes."""
    block = b"\x5a" * CHUNK

    async def handler(conn: UpstreamConn) -> None:
        while True:
            if await conn.read_request() is None:
                return
            await conn.send(response_head(200, content_length=None if chunked else size))
            left = size
            while left > 0:
                n = min(CHUNK, left)
                data = block if n == CHUNK else block[:n]
                await conn.send(b"%x\r\n%s\r\n" % (n, data) if chunked else data)
                left -= n
            if chunked:
                await conn.send(b"0\r\n\r\n")

    return serve_upstream(handler)


@asynccontextmanager
async def open_blackhole_upstream() -> AsyncIterator[Upstream]:
    """A port where a TCP connect neither succeeds nor fails: it hangs.

    A listener with ``listen(0)`` whose accept queue is already full (filler
    connections that are never accepted): Linux drops further SYNs, so the connecting
    side waits in SYN_SENT until its own timeout. Deterministic on Linux, unlike
    "unroutable" addresses, which a sandbox may answer with an immediate error.
    """
    import select
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(16):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(sock)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            # Loopback handshakes complete at once; one still pending after 200 ms has
            # had its SYN dropped, so the queue is full.
            _, writable, _ = select.select([], [sock], [], 0.2)
            if not writable:
                break
        else:
            raise RuntimeError("could not fill the accept queue of the blackhole listener")
        yield Upstream(port=port)
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


@asynccontextmanager
async def open_refusing_upstream() -> AsyncIterator[Upstream]:
    """A port that refuses connections: bound, never listening."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield Upstream(port=sock.getsockname()[1])
    finally:
        sock.close()
