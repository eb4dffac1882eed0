"""Serving clients: listeners, one trio task per connection, the request cycle.

The protocol work is h11's; this module adds what h11 leaves to the application:
limits (head size even when it arrives in one read, header count, body size), timeouts
(head, body idle, keep-alive idle, write), framing checks h11 lets through (both
Content-Length and Transfer-Encoding, unsupported versions, absolute-form, CONNECT),
header hygiene and re-framing in both directions, and graceful shutdown.
"""

from __future__ import annotations

import contextvars
import ipaddress
import itertools
import logging
import os
import re
import select
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import Any

import h11
import trio

from engine import sockets
from engine.canonical import canonical_path, split_target
from engine.chain import (
    Chain,
    run_log_phases,
    run_request_phases,
    run_response_phases,
    run_sync_request_phases,
    run_sync_response_phases,
    wrap_upstream,
)
from engine.config import parse_address
from engine.errors import (
    BadGateway,
    BadRequest,
    ClientGone,
    GatewayError,
    HeaderTooLarge,
    HttpVersionNotSupported,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
    reason_phrase,
    render_error,
)
from engine.exchange import (
    HOP_BY_HOP,
    BodyStream,
    Exchange,
    Headers,
    Request,
    Response,
    Timings,
    TlsInfo,
    UpstreamCall,
    preflight_method,
)
from engine.gateway import RouteRuntime, Runtime
from engine.metrics import BoundHistogram, counter, gauge, histogram
from engine.router import Match
from engine.sockets import RawSocket, StreamSocket, TlsSocket, accept_backoff, acked
from engine.upstream import (
    _END,
    UpstreamBodyError,
    _raise_if_local,
    _Switched,
    _UpstreamBody,
    open_connection,
)
from engine.wire import BodyReader, ChunkedReader, ContentLengthReader, ProtocolError, Reader

__all__ = ["Server", "open_listeners"]

log = logging.getLogger("filtergate.server")

_INF = float("inf")

#: What a tunnel relays between: the client's side and an upstream's, plain or TLS.
_Stream = RawSocket | StreamSocket | TlsSocket

_HOP_BY_HOP = HOP_BY_HOP
# Request fields the gateway recomputes instead of forwarding; value: how it uses them.
_REQ_SPECIAL = {name: 1 for name in _HOP_BY_HOP} | {
    b"content-length": 2,
    b"host": 3,
    b"x-forwarded-for": 4,
    b"x-forwarded-proto": 5,
    b"x-forwarded-host": 6,
    b"authorization": 7,
    b"expect": 8,
    # Forwarding headers the gateway does not rewrite: believed from trusted proxies
    # only, dropped from anyone else (an upstream may take them for the client's).
    b"forwarded": 9,
    b"x-real-ip": 9,
    b"x-forwarded-port": 9,
    # The same for the path a proxy in front saw: Symfony, Laminas and IIS's URL Rewrite
    # serve X-Original-URL / X-Rewrite-URL in place of the request line, so "GET /" with
    # "X-Original-URL: /admin" would be routed as "/" and served as "/admin".
    b"x-original-url": 9,
    b"x-rewrite-url": 9,
    b"x-original-uri": 9,
    b"x-forwarded-uri": 9,
    b"x-forwarded-prefix": 9,
    b"x-envoy-original-path": 9,
}

_responses = counter("filtergate_responses_total", "Responses sent, by status class", ("code",))
# 1xx-5xx shown from the start (at 0); the others only if a filter ever makes one.
_RESPONSES = [
    _responses.bind(code=f"{c}xx") if 1 <= c <= 5 else _responses.bind_lazily(code=f"{c}xx")
    for c in range(10)
]
#: Seconds, from a parsed request head to the last byte of its response.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_duration = histogram(
    "filtergate_request_duration_seconds",
    "Time from a request's head to the last byte of its response, by route and status class "
    '(route "" when no route matched).',
    ("route", "code"),
    LATENCY_BUCKETS,
)
_UNROUTED: list[BoundHistogram | None] = [None] * 10
# Written by the gateway itself (date only when the response has none).
_OWN_RESPONSE_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"date"})
_date_cache: list[Any] = [-1, b""]  # [second, the "date: ..." line of that second]


def _rid_line(rt: Runtime, request_id: str) -> bytes:
    """The request id's header line, for heads written by hand."""
    return rt.rid_header + b": " + request_id.encode() + b"\r\n"


def _closing_error(err: GatewayError, request_id: str, extra: bytes = b"") -> tuple[int, bytes]:
    """The whole response for ``err`` written by hand, ending the connection: for when
    no request could be read, so nothing of the request cycle applies (counted here)."""
    status, headers, body = render_error(err, request_id)
    head = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    head += [n + b": " + v + b"\r\n" for n, v in headers]
    head += [_date_line(), extra, b"connection: close\r\n\r\n"]
    _RESPONSES[status // 100].inc()
    return status, b"".join(head) + body


def _date_line() -> bytes:
    """``date: <IMF-fixdate>``, made once per second: RFC 9110 6.6.1 asks a server with
    a clock for it, and a proxy to add it to a response that has none."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    line: bytes = _date_cache[1]
    return line


_open_connections = gauge("filtergate_open_connections", "Client connections open")


# RFC 9110 4.2: "http" or "https" (any case), "//", the authority up to the first
# "/", "?" or "#", then the path and query.
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)(.*)", re.IGNORECASE | re.DOTALL)
# A Host value: uri-host [":" port], uri-host an IP-literal or a host name (letters,
# digits, "-", ".", "_"; IPv4 addresses are names by their characters). RFC 3986 allows
# more in a reg-name ("%", ",", ";", "!"...), which no DNS name has: "admin.example.com,"
# would miss its route and reach an upstream that reads it as "admin.example.com".
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._]*)(?::[0-9]*)?")
_VALID_HOSTS: dict[bytes, bool] = {}
# A request id a trusted proxy sent, kept as it is: visible ASCII, at most 200 bytes (a
# UUID is 36). Anything else gets an id of the gateway's own.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")


def _valid_host(host: bytes) -> bool:
    """Whether ``host`` is a valid Host value; remembered, as clients repeat a few. A
    name has at most 253 bytes (RFC 1035), so anything much longer is refused, and
    never remembered: 4096 entries of 16 KB would be 64 MB."""
    if len(host) > 300:
        return False
    known = _VALID_HOSTS.get(host)
    if known is None:
        if len(_VALID_HOSTS) >= 4096:
            _VALID_HOSTS.clear()
        known = _VALID_HOSTS[host] = _HOST.fullmatch(host) is not None
    return known


# Never echoed by TRACE (RFC 9110 9.3.8: leave out fields likely to be sensitive).
_NOT_ECHOED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def _max_forwards(route: RouteRuntime, request: Request, req: h11.Request) -> Response | None:
    """RFC 9110 7.6.2 for OPTIONS and TRACE: at ``Max-Forwards: 0`` the gateway answers
    as the final recipient; otherwise the value goes on one lower."""
    items = request.headers.items
    at = next((i for i, (name, _) in enumerate(items) if name == b"max-forwards"), None)
    if at is None or not items[at][1].isdigit():
        return None  # absent, or not a number: forwarded as it came
    hops = int(items[at][1])
    if hops > 0:
        items[at] = (b"max-forwards", b"%d" % (hops - 1))
        return None
    if request.method == b"OPTIONS":
        allow = ", ".join(route.allow).encode()
        return Response(200, Headers([(b"allow", allow)]), body=b"")
    lines = [b"%s %s HTTP/%s" % (req.method, req.target, req.http_version)]
    hidden = route.chain.credential_headers  # e.g. key-auth's header = "X-Api-Key"
    lines += [
        raw + b": " + v
        for raw, n, v in req.headers._full_items
        if n not in _NOT_ECHOED and n not in hidden
    ]
    echo = b"\r\n".join(lines) + b"\r\n\r\n"
    return Response(200, Headers([(b"content-type", b"message/http")]), body=echo)


def _bind_duration(route: RouteRuntime | None, cls: int) -> BoundHistogram:
    """The duration series of ``route`` (None: no route matched) and a status class."""
    latency = route.latency if route is not None else _UNROUTED
    name = route.config.name if route is not None else ""
    series = latency[cls] = _duration.bind(route=name, code=f"{cls}xx")
    return series


# The server name a TLS client asked for (SNI). A server-side SSL object has no
# server_hostname: the name only reaches the context's SNI callback, which runs inside
# the connection task's handshake, so a context variable carries it to that task.
_SNI: contextvars.ContextVar[str | None] = contextvars.ContextVar("filtergate_sni", default=None)


def _record_sni(_ssl: object, server_name: str | None, _context: ssl.SSLContext) -> None:
    _SNI.set(server_name)


def _quiet_bad_server_names() -> None:
    """Keep a server name that is not ASCII from printing a traceback on stderr.

    CPython decodes the name a client sends before it calls the SNI callback; one that
    is not ASCII fails there, the handshake is refused (right), and the error goes to
    ``sys.unraisablehook``: five lines of traceback per connection, on stderr, for any
    anonymous client. Those are dropped (counted in the debug log); every other
    unraisable error goes where it went."""
    previous = sys.unraisablehook
    if getattr(previous, "filtergate_sni", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(
            unraisable.object, bytes
        ):
            log.debug("a TLS client sent a server name that is not ASCII: refused")
            return
        previous(unraisable)

    hook.filtergate_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


#: Seconds between two looks of an accept loop held at max_connections (see there).
_FULL_LOOK = 0.1


def _readable(sock: socket.socket) -> bool:
    """Whether ``sock`` has something to read now (a listener: a connection to accept)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


# Linux's "the peer closed its end", reported even with unread bytes before it.
_RDHUP: int = getattr(select, "POLLRDHUP", 0)


class _Abort(Exception):
    """The client connection must be dropped without a word (framing cannot be kept)."""


def _parse_error(e: ProtocolError) -> GatewayError:
    if e.status == 431:
        return HeaderTooLarge("request head too large")
    return BadRequest(f"malformed request: {e}")


class _RequestIds:
    """Unique request ids without a syscall per request: random prefix + counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.counter):x}"


class Server:
    """The gateway's listeners and connections; ``runtime`` is swapped on reload."""

    def __init__(self, runtime: Runtime, ssl_context: ssl.SSLContext | None = None) -> None:
        self.runtime = runtime
        self._ssl_context: ssl.SSLContext | None = None
        self.ssl_context = ssl_context
        self.draining = False
        self.ids = _RequestIds()
        self._idle: set[RawSocket | StreamSocket] = set()  # waiting for a next request
        # Those idle after a request (not waiting for their first), oldest first: the
        # ones let go to make room at max_connections.
        self._kept: dict[RawSocket | StreamSocket, None] = {}
        self._busy = 0
        self._no_busy = trio.Event()
        self._open = 0  # client connections, for [server] max_connections
        # Request-body bytes being read into memory for filters, by every connection:
        # bounded by [server] max_buffering (a slow upload holds its part meanwhile).
        self.buffering = 0
        # Accept loops waiting for room under max_connections; woken as connections end.
        self._room = trio.lowlevel.ParkingLot()
        # trio's clock, read by every request several times: serve() binds the run's own
        # clock method, one call where trio.current_time() makes three.
        self.now: Callable[[], float] = trio.current_time

    @property
    def busy(self) -> int:
        """Requests being handled now (head read, response not yet sent in full)."""
        return self._busy

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of new connections (swapped when certificates change)."""
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext | None) -> None:
        if context is not None:
            context.sni_callback = _record_sni
            _quiet_bad_server_names()
        self._ssl_context = context

    def request_done(self) -> None:
        """A request counted busy has ended (and its on_log has run)."""
        self._busy -= 1
        if not self._busy:
            self._no_busy.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        while self._busy:
            self._no_busy = trio.Event()
            await self._no_busy.wait()

    # -- listening ---------------------------------------------------------------------

    async def serve(
        self,
        sockets: list[socket.socket],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``sockets`` (listening, non-blocking) until cancelled."""
        self.now = trio.lowlevel.current_clock().current_time
        async with trio.open_nursery() as conns, trio.open_nursery() as acceptors:
            for sock in sockets:
                acceptors.start_soon(self._accept_loop, sock, conns)
            task_status.started()
            self._acceptors = acceptors
            await trio.sleep_forever()

    async def _accept_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        batch = self.runtime.config.server.accept_batch
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                # Drain the accept queue on every wake-up: accepting one connection per
                # scheduler pass lets a burst of connects wait behind everything else.
                for _ in range(batch):
                    limit = self.runtime.config.server.max_connections
                    while limit and self._open >= limit:
                        # Full: the next clients wait in the kernel's accept queue. For
                        # one that does wait there, the oldest keep-alive connection idle
                        # after a request is let go to make room (as nginx reuses idle
                        # connections when short): clients that stay idle must not lock
                        # out the others. One still to send its first request is not.
                        if self._kept and _readable(sock):
                            oldest = next(iter(self._kept))
                            del self._kept[oldest]
                            oldest.expire()
                        # Woken as a connection ends; and looking again now and then,
                        # since a client may come once the connections are idle.
                        with trio.move_on_after(_FULL_LOOK):
                            await self._room.park()
                        limit = self.runtime.config.server.max_connections
                    try:
                        raw, addr = sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        await accept_backoff(e, log)  # e.g. out of file descriptors
                        break
                    raw.setblocking(False)
                    try:
                        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:
                        pass
                    self._open += 1  # now, not when the task starts: the limit holds
                    nursery.start_soon(self._connection, raw, (addr[0], addr[1]))
        finally:
            sock.close()

    def wake_acceptors(self) -> None:
        """Let accept loops parked at ``max_connections`` look again (a reload changed it)."""
        self._room.unpark_all()

    def stop_accepting(self) -> None:
        """Stop accepting; idle keep-alive connections close, busy ones finish."""
        self.draining = True
        acceptors = getattr(self, "_acceptors", None)
        if acceptors is not None:
            acceptors.cancel_scope.cancel()
        for io in list(self._idle):
            io.expire()

    # -- one connection ----------------------------------------------------------------

    def _plain_http_on_tls(self, raw: socket.socket, peer: tuple[str, int]) -> None:
        """Say why, in plain text, to a client that spoke HTTP to a TLS listener (nginx
        answers it the same way), instead of closing without a word; logged as any
        request that could not be read."""
        err = BadRequest("a plain HTTP request was sent to an HTTPS port")
        request_id = self.ids.next()
        status, data = _closing_error(err, request_id, _rid_line(self.runtime, request_id))
        try:
            sent = raw.send(data)  # small: the kernel takes it at once
        except OSError:
            sent = 0
        access = self.runtime.access_log
        if access is not None:
            access.record(peer[0], None, None, status, request_id, 0.0, sent)

    async def _connection(self, raw: socket.socket, peer: tuple[str, int]) -> None:
        _open_connections.add(1)
        started = self.now()
        tls: TlsInfo | None = None
        io: RawSocket | StreamSocket = RawSocket(raw)
        conn: _Connection | None = None
        try:
            if self.ssl_context is not None:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                ssl_stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
                with trio.move_on_after(self.runtime.config.server.head_timeout) as cs:
                    try:
                        await ssl_stream.do_handshake()
                    except (trio.BrokenResourceError, ssl.SSLError) as e:
                        cause = e if isinstance(e, ssl.SSLError) else e.__cause__
                        if getattr(cause, "reason", None) == "HTTP_REQUEST":
                            self._plain_http_on_tls(raw, peer)
                        return
                if cs.cancelled_caught:
                    return
                ssl_obj: Any = ssl_stream
                cipher = ssl_obj.cipher()
                tls = TlsInfo(
                    version=ssl_obj.version() or "",
                    cipher=cipher[0] if cipher else "",
                    server_name=_SNI.get(),
                    alpn=ssl_obj.selected_alpn_protocol(),
                )
                io = StreamSocket(ssl_stream, raw)
            conn = _Connection(self, io, peer, tls, started)
            await conn.run()
            if conn.late_log is not None:
                # The exchange that ended the connection: the client sees the end (its
                # write side shut), then its on_log runs, before any lingering close,
                # which a drain must not wait for.
                try:
                    raw.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                await self._run_late_log(conn)
            if isinstance(io, RawSocket) and conn.input_unread():
                await _linger(io)
            elif isinstance(io, StreamSocket) and conn.input_unread():
                # As over plain TCP: a close with unread input resets, and a client still
                # sending its body would lose the 413 (401, 404 ...) it was answered. The
                # answer is whole in the kernel: linger on the transport (without
                # close_notify: its framing already says where the answer ends).
                await _linger(RawSocket(raw))
            elif isinstance(io, StreamSocket):
                # close_notify, so a TLS client can tell a complete close from a cut.
                with trio.move_on_after(1):
                    await io.stream.aclose()
        except Exception:
            # One connection's failure must never reach the nursery that serves everyone.
            log.exception("connection from %s:%d failed", *peer)
        finally:
            _open_connections.add(-1)
            self._open -= 1
            if self._room:
                self._room.unpark_all()
            try:
                raw.close()
            except OSError:
                pass
            if conn is not None and conn.late_log is not None:  # (run() raised)
                await self._run_late_log(conn)

    async def _run_late_log(self, conn: _Connection) -> None:
        """The on_log of the exchange that ended ``conn``. Its request stays busy until
        then, so a drain waits for it as for any request in flight."""
        assert conn.late_log is not None
        late, conn.late_log = conn.late_log, None
        try:
            await run_log_phases(*late)
        finally:
            self.request_done()


# Closing in stages (RFC 9112 9.6), with nginx's lingering_time and lingering_timeout.
_LINGER_TOTAL = 30.0
_LINGER_IDLE = 5.0


async def _linger(io: RawSocket) -> None:
    """Half-close, then read and drop what the client still sends, until it closes too.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the response the client has not read yet: a client that sends its whole body
    before reading (Python's http.client, curl without Expect) would never see the 413
    it was answered. Bounded in time like nginx's lingering close.
    """
    io.shutdown_write()
    end = trio.current_time() + _LINGER_TOTAL
    try:
        while await io.recv_until(min(end, trio.current_time() + _LINGER_IDLE)):
            pass
    except (trio.TooSlowError, OSError):
        pass


#: A chunked body's chunks already received are passed on together, up to this much.
_CHUNK_GATHER = 64 * 1024
#: Seconds of waiting on a request body before min_body_rate applies (Kestrel's 5 s).
_BODY_RATE_GRACE = 5.0


class _ClientBody:
    """The client's request body as it arrives, with the size cap and idle timeout."""

    __slots__ = ("_conn", "_done", "_error", "_limit", "_prefix", "_reader", "_seen", "_waited")

    def __init__(self, conn: _Connection, reader: BodyReader, limit: int) -> None:
        self._conn = conn
        self._reader = reader
        self._limit = limit
        self._seen = 0
        self._waited = 0.0  # seconds spent waiting for the client's bytes (see min_body_rate)
        self._error: ProtocolError | None = None  # met by _more_chunks: the next call's
        self._done = False
        self._prefix: list[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        conn = self._conn
        if conn.expect_100:  # the client holds the body back until told to send it
            conn.expect_100 = False
            try:
                await conn.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
            except trio.Cancelled:
                # Cancelled mid-write (an upstream answered first, over TLS): the client
                # may have part of a line. Nothing more can be said on this connection.
                conn.framing_broken = True
                raise
        wire = conn.wire
        reader = self._reader
        while True:
            try:
                if self._error is not None:  # the reader has gone past it: never again
                    raise self._error
                ev = wire.body(reader)
            except ProtocolError as e:
                conn.framing_broken = True
                raise BadRequest(f"malformed request body: {e}") from None
            if ev is None:
                cfg = conn.server.runtime.config.server
                timeout = float(cfg.body_timeout)
                rate = cfg.min_body_rate
                slow = False
                if rate:
                    # Only time spent waiting on the client counts (not an upstream that
                    # holds the relay back): past a grace, it must have sent min_body_rate
                    # bytes a second on average (Kestrel's MinRequestBodyDataRate).
                    left = max(_BODY_RATE_GRACE, self._seen / rate) - self._waited
                    if left < timeout:
                        timeout, slow = max(left, 0.0), True
                before = trio.current_time()
                try:
                    data = await conn.io.recv(timeout)
                except trio.TooSlowError:
                    conn.framing_broken = True
                    if slow:
                        raise RequestTimeout(
                            f"the request body arrives slower than {rate} bytes a second"
                        ) from None
                    raise RequestTimeout("the request body stopped arriving") from None
                except OSError:
                    conn.framing_broken = True
                    raise _Abort() from None
                self._waited += trio.current_time() - before
                wire.feed(data)
                continue
            if type(ev) is h11.Data:
                piece: bytes | bytearray = ev.data
                if type(reader) is ChunkedReader:
                    piece = self._more_chunks(piece)
                self._seen += len(piece)
                if self._seen > self._limit:
                    conn.framing_broken = True
                    raise PayloadTooLarge(f"request body larger than {self._limit} bytes")
                return bytes(piece)
            self._done = True  # EndOfMessage
            conn.body_reader = None
            raise StopAsyncIteration

    def _more_chunks(self, data: bytes | bytearray) -> bytes | bytearray:
        """``data`` and the chunks already received after it, up to 64 KiB: a body of
        one-byte chunks cost a send upstream (and 20 us) per chunk. An end of the body
        met here ends the iteration at the next call."""
        wire = self._conn.wire
        reader = self._reader
        parts = [data]
        size = len(data)
        while size < _CHUNK_GATHER:
            try:
                ev = wire.body(reader)
            except ProtocolError as e:
                # The reader consumed the bad bytes before it raised: kept, and raised
                # by the next call, after the good chunks before it went on.
                self._error = e
                break
            if type(ev) is h11.Data:
                parts.append(ev.data)
                size += len(ev.data)
                continue
            if ev is not None:  # EndOfMessage
                self._done = True
                self._conn.body_reader = None
            break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_all(self, cap: int) -> bytes | None:
        """The whole body if it fits in ``cap`` bytes, else ``None`` (body left unread).

        The bytes read so far count against ``[server] max_buffering`` while the body
        arrives: past it, the request is refused (503, close) rather than let slow
        uploads hold ``max_buffered_body`` each, as many as there are connections.
        """
        server = self._conn.server
        limit = server.runtime.config.server.max_buffering
        parts = []
        size = 0
        try:
            async for chunk in self:
                parts.append(chunk)
                size += len(chunk)
                server.buffering += len(chunk)
                if size > cap:  # too large to buffer: streamed on (first, so not a 503)
                    self._prefix = parts
                    return None
                if server.buffering > limit:
                    self._conn.framing_broken = True
                    raise ServiceUnavailable(
                        "too many request bodies are being buffered; try again",
                        retry_after=1,
                    )
            return b"".join(parts)
        finally:
            server.buffering -= size

    async def aclose(self) -> None:
        self._done = True


class _PrefixedBody:
    """A body stream whose first chunks were already read (a buffer cap was crossed)."""

    def __init__(self, prefix: list[bytes], rest: BodyStream) -> None:
        self._prefix = prefix
        self._rest = rest

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._prefix:
            return self._prefix.pop(0)
        chunk: bytes = await self._rest.__aiter__().__anext__()
        return chunk

    def poll(self) -> Any:
        """As the upstream body's: a chunk already here, ``_END``, or ``None`` (wait)."""
        if self._prefix:
            return self._prefix.pop(0)
        poll = getattr(self._rest, "poll", None)
        return poll() if poll is not None else None

    async def aclose(self) -> None:
        await self._rest.aclose()


class _Connection:
    __slots__ = (
        "body_reader",
        "bytes_out",
        "expect_100",
        "first",
        "framing_broken",
        "http11",
        "io",
        "keep_alive",
        "late_log",
        "peer",
        "scheme",
        "server",
        "started",
        "tls",
        "wire",
    )

    def __init__(
        self,
        server: Server,
        io: RawSocket | StreamSocket,
        peer: tuple[str, int],
        tls: TlsInfo | None,
        started: float,
    ) -> None:
        self.server = server
        self.started = started  # accepted: the first head is due head_timeout after it
        self.io = io
        self.peer = peer
        self.tls = tls
        self.scheme = "https" if tls else "http"
        # One reader for the connection's life: bytes pipelined behind a request stay
        # in its buffer for the next one.
        self.wire = Reader(server.runtime.config.server.max_head_size)
        self.first = True
        # The framing of the request body not read yet; None once read or when bodiless.
        self.body_reader: BodyReader | None = None
        self.expect_100 = False  # the client waits for "100 Continue" before its body
        self.framing_broken = False
        self.http11 = True
        self.keep_alive = True
        self.bytes_out = 0  # written to the client on this connection, heads included
        # The on_log of an exchange that ended the connection (cut off, client gone):
        # run once the client has seen the end, so a slow on_log never keeps a client
        # from seeing its response end (see Server._run_late_log).
        self.late_log: tuple[Chain, Exchange] | None = None

    def client_gone(self) -> bool:
        """Whether the client has closed its connection (or reset it). Asked of the
        kernel (POLLRDHUP, as nginx's EPOLLRDHUP): unread bytes before the end (a TLS
        client's close_notify, a late pipelined request) must not hide it. A client
        that half-closed after its request reads as gone, as to nginx."""
        io = self.io
        sock = io.sock if isinstance(io, RawSocket) else io.raw  # (TLS: the transport's)
        if sock.fileno() < 0:
            return True  # closed already
        if _RDHUP:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | _RDHUP)
            events = poller.poll(0)
            return bool(events and events[0][1] & (_RDHUP | select.POLLHUP | select.POLLERR))
        try:  # elsewhere, a peek that takes nothing (blind behind unread bytes)
            return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def input_unread(self) -> bool:
        """Whether the client may still be sending what this connection did not read: a
        request body it gave up on, bytes behind a malformed head, pipelined requests."""
        return self.framing_broken or self.body_reader is not None or len(self.wire) > 0

    async def send_raw(self, data: bytes | None) -> None:
        if not data:
            return
        timeout = self.server.runtime.config.server.write_timeout
        try:
            await self.io.send_all(data, timeout)
        except (trio.TooSlowError, OSError):
            raise _Abort() from None
        self.bytes_out += len(data)

    async def run(self) -> None:
        server = self.server
        try:
            while True:
                req = await self._read_head()
                if req is None:
                    return
                parks = sockets.parks
                self.first = False
                self.body_reader = None
                self.expect_100 = False
                server._busy += 1
                try:
                    await self._handle(req)
                finally:
                    if self.late_log is None:  # else busy until its on_log has run
                        server.request_done()
                if self.framing_broken or not self.keep_alive:
                    return
                if server.draining:
                    return
                if self.body_reader is not None and not await self._drain(self.body_reader):
                    return
                # Socket I/O does not yield when the kernel is ready: unless this
                # request waited for a socket (or another task ran meanwhile), yield
                # once, so one busy keep-alive connection cannot starve the others.
                if sockets.parks == parks:
                    await trio.lowlevel.checkpoint()
        except _Abort:
            return

    async def _read_head(self) -> h11.Request | None:
        """The next request head; ``None`` when the connection should end (answered
        already if the client deserved an answer)."""
        wire = self.wire
        server = self.server
        cfg = server.runtime.config.server
        got_bytes = len(wire) > 0  # pipelined behind the previous request
        if self.first:
            # From the connection's start: a TLS handshake spends the same allowance,
            # or a slow client would hold the connection for twice head_timeout.
            deadline = self.started + cfg.head_timeout
        else:
            wait = cfg.head_timeout if got_bytes else cfg.keepalive_timeout
            deadline = server.now() + wait
        while True:
            try:
                req = wire.request()
            except ProtocolError as e:
                await self._send_fatal(_parse_error(e))
                return None
            if req is not None:
                return req
            if wire.eof:
                return None  # the client closed between requests
            if server.draining and not got_bytes:
                return None
            data: bytes | None
            try:
                if got_bytes:
                    data = await self.io.recv(_INF, deadline)
                else:
                    data = self.io.recv_nowait()
                    if data is None:
                        # Idle between requests, until the keep-alive deadline or a
                        # shutdown (which expires the wait early).
                        io = self.io
                        server._idle.add(io)
                        if not self.first:
                            server._kept[io] = None
                        try:
                            data = await io.recv_until(deadline)
                        finally:
                            server._idle.discard(io)
                            server._kept.pop(io, None)
            except trio.TooSlowError:
                if got_bytes or (self.first and not server.draining):
                    await self._send_fatal(RequestTimeout("the request head took too long"))
                return None
            except OSError:
                return None
            assert data is not None
            if data and not got_bytes:
                got_bytes = True
                deadline = min(deadline, server.now() + cfg.head_timeout)
            wire.feed(data)

    async def _drain(self, reader: BodyReader) -> bool:
        """Read and drop an unread request body, within limits; ``False``: close instead."""
        if self.expect_100:
            return False  # the client still holds its body back: close instead of waiting
        cfg = self.server.runtime.config.server
        budget: int = cfg.drain_limit
        deadline = trio.current_time() + min(cfg.body_timeout, 5.0)
        wire = self.wire
        while True:
            try:
                ev = wire.body(reader)
            except ProtocolError:
                return False
            if ev is None:
                try:
                    data = await self.io.recv(_INF, deadline)
                except (trio.TooSlowError, OSError):
                    return False
                if not data:
                    return False
                budget -= len(data)
                if budget < 0:
                    return False
                wire.feed(data)
                continue
            if type(ev) is h11.EndOfMessage:
                self.body_reader = None
                return True

    async def _send_fatal(self, err: GatewayError) -> None:
        # h11 may be in an error state; write the whole response by hand and close.
        request_id = self.server.ids.next()
        status, data = _closing_error(err, request_id, _rid_line(self.server.runtime, request_id))
        try:
            await self.send_raw(data)
        except _Abort:
            pass
        self.framing_broken = True
        access = self.server.runtime.access_log
        if access is not None:  # no request could be read: its line is "-"
            access.record(self.peer[0], None, None, status, request_id, 0.0, len(data))

    # -- the request cycle -------------------------------------------------------------

    async def _handle(self, req: h11.Request) -> None:
        server = self.server
        rt = server.runtime
        cfg = rt.config.server
        now = server.now
        start = now()
        request_id: str | None = None
        answer: Response | None = None
        exchange: Exchange | None = None
        route: RouteRuntime | None = None
        depth = 0
        try:
            if req.http_version != b"1.1" and req.http_version != b"1.0":
                raise HttpVersionNotSupported(f"HTTP/{req.http_version.decode()} is not supported")
            items = req.headers._full_items
            if len(items) > cfg.max_header_count:
                raise HeaderTooLarge(f"more than {cfg.max_header_count} header fields")
            head_size = len(req.method) + len(req.target) + 12
            fwd: list[tuple[bytes, bytes]] = []
            host = b""
            xff = b""
            xfp = b""
            xfh = b""
            conn_tokens: bytes | None = None
            upgrade: bytes | None = None  # the protocols the client asks to switch to
            authz = 0
            content_length: bytes | None = None
            expect: bytes | None = None
            chunked = False
            rid_header = rt.rid_header
            client_rid: bytes | None = None
            special = _REQ_SPECIAL
            keep_underscores = cfg.underscores_in_headers == "allow"
            underscored = False
            from_proxies: list[tuple[bytes, bytes]] = []
            for _raw, name, value in items:
                head_size += len(name) + len(value) + 4
                kind = special.get(name)
                if kind is None:
                    if name == rid_header:
                        client_rid = value
                        continue
                    if b"_" in name and not keep_underscores:
                        # CGI and WSGI read X_User_Id as X-User-Id: a way around the
                        # headers the gateway sets or strips. Dropped, as nginx does.
                        underscored = True
                        continue
                    fwd.append((name, value))
                elif kind == 1:
                    if name == b"transfer-encoding":
                        chunked = True
                    elif name == b"connection":
                        conn_tokens = value if conn_tokens is None else conn_tokens + b"," + value
                    elif name == b"upgrade":
                        upgrade = value if upgrade is None else upgrade + b"," + value
                elif kind == 2:
                    content_length = value
                elif kind == 3:
                    host = value
                elif kind == 7:
                    authz += 1
                    fwd.append((name, value))
                elif kind == 4:
                    xff = value if not xff else xff + b", " + value
                elif kind == 5:
                    xfp = value
                elif kind == 6:
                    xfh = value
                elif kind == 9:
                    from_proxies.append((name, value))
                else:  # expect: answered here (100 Continue), never forwarded
                    expect = value
            # The body's framing first: whatever is refused below, the body must be
            # read past (or the connection closed) before the next request.
            if chunked:
                self.body_reader = ChunkedReader()
            elif content_length is not None and content_length != b"0":
                self.body_reader = ContentLengthReader(int(content_length))
            if expect is not None and req.http_version == b"1.1" and self.body_reader:
                self.expect_100 = b"100-continue" in expect.lower()
            if head_size > cfg.max_head_size:
                raise HeaderTooLarge(f"request head larger than {cfg.max_head_size} bytes")
            if chunked and content_length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding: ambiguous framing")
            if authz > 1:
                raise BadRequest("more than one Authorization header")
            if host and not _valid_host(host):
                raise BadRequest("invalid Host header")  # RFC 9112 3.2
            if underscored and cfg.underscores_in_headers == "reject":
                raise BadRequest("header names with underscores are not accepted")
            self.http11 = req.http_version == b"1.1"
            self.keep_alive = self.http11  # HTTP/1.0 keep-alive is not offered (as h11)
            if conn_tokens is not None:
                tokens = {t.strip().lower() for t in conn_tokens.split(b",")}
                tokens.discard(b"")
                if b"close" in tokens:
                    self.keep_alive = False
                if tokens - {b"close", b"keep-alive"}:
                    fwd = [(n, v) for n, v in fwd if n not in tokens]
                if b"upgrade" not in tokens or not self.http11:
                    # One the Connection header does not name is not meant for us; one in
                    # HTTP/1.0 is ignored (RFC 9110 7.8).
                    upgrade = None
            else:
                upgrade = None

            # Who is calling: the peer, or the rightmost untrusted hop behind trusted proxies.
            peer_ip = self.peer[0]
            trusted = rt.trusted and rt.is_trusted(peer_ip)
            client_ip = peer_ip
            if trusted:
                if xff:
                    # The rightmost hop our trusted proxies did not add is the client;
                    # empty hops are skipped, a malformed one ends the walk.
                    for hop in reversed(xff.split(b",")):
                        candidate = hop.strip().decode("latin-1")
                        if not candidate:
                            continue
                        if not _is_ip(candidate):
                            break
                        client_ip = candidate
                        if not rt.is_trusted(candidate):
                            break
                    xff_out = xff + b", " + peer_ip.encode()
                else:
                    xff_out = peer_ip.encode()
                proto = xfp or self.scheme.encode()
                fwd_host = xfh or host
                fwd += from_proxies
                if client_rid and _REQUEST_ID.fullmatch(client_rid):
                    request_id = client_rid.decode("ascii")
            else:
                xff_out = peer_ip.encode()
                proto = self.scheme.encode()
                fwd_host = host
            if request_id is None:
                request_id = server.ids.next()

            method = req.method
            if not method.isupper():
                # Methods are case-sensitive (RFC 9110 9.1), but frameworks upper-case
                # them: "get" would pass a route's methods = ["GET"] to a catch-all and
                # meet the upstream's GET handler there. Refused, as nginx does.
                raise BadRequest("the request method must be in upper case")
            target = req.target
            absolute = False
            if method == b"CONNECT":
                route = _connect_route(rt, target)
                if route is None:
                    raise BadRequest("CONNECT is not allowed here")
                # The route's filters decide first (authentication, limits): a tunnel is
                # no way around them. A tunnel, or its refusal, ends the connection.
                self.keep_alive = False
                chain = route.chain
                # Proxy-Authorization, the credential a client gives a proxy, is for
                # the filters to read here: a tunnel forwards no header.
                fwd += [(n, v) for _r, n, v in items if n == b"proxy-authorization"]
                request = Request(
                    method=method,
                    path=target.decode("latin-1"),  # the authority: host:port
                    raw_query=b"",
                    headers=Headers(fwd),
                    http_version=req.http_version,
                    client=client_ip,
                    peer=self.peer,
                    scheme=self.scheme,
                    tls=self.tls,
                )
                exchange = Exchange(request=request, request_id=request_id, timings=Timings(start))
                exchange.route = route.config
                exchange.caller = route.call_upstream
                exchange.credential_headers = chain.credential_headers
                exchange.timings.routed = now()
                answer, depth = await _tunnel_request_phases(chain, exchange)
                if answer is None:
                    sent_before = self.bytes_out
                    try:
                        await self._tunnel(route, exchange, request_id)
                    except trio.Cancelled:  # a shutdown cut it: still its line
                        if exchange.upstream_target is not None:  # (it had opened)
                            self._account(
                                rt, route, exchange, req, 200, request_id, start, sent_before
                            )
                        raise
                    # Its line once it ends: status 200, the tunnel's whole life, and
                    # every byte the client was sent through it (as nginx's stream log).
                    self._account(rt, route, exchange, req, 200, request_id, start, sent_before)
                    return
            else:
                if not target.startswith(b"/"):
                    absolute_form = _ABSOLUTE_FORM.fullmatch(target)
                    if absolute_form is None:
                        raise BadRequest("the request target must be a path")
                    if not rt.any_absolute_form:  # refused as such, not as an unknown path
                        raise BadRequest("absolute-form request targets are not accepted")
                    absolute = True
                    # RFC 9112 3.2.2: the target's authority replaces the Host header.
                    host, rest = absolute_form.groups()
                    if not host or not _valid_host(host) or host.startswith(b":"):
                        # Empty (RFC 9110 4.2.1) or with userinfo (4.2.4: treat as an error).
                        raise BadRequest("invalid authority in the request target")
                    fwd_host = host
                    target = rest if rest.startswith(b"/") else b"/" + rest
                raw_path, raw_query = split_target(target)
                path = canonical_path(raw_path)

                host_name = host.decode("latin-1").lower()
                if host_name.startswith("["):
                    host_name = host_name.split("]", 1)[0] + "]"
                elif ":" in host_name:
                    host_name = host_name.rsplit(":", 1)[0]
                if host_name.endswith("."):
                    # "api.example.com." is the same name, absolute (RFC 1034 3.1): it
                    # must meet that host's routes, not fall through to a catch-all.
                    host_name = host_name.rstrip(".")

                request = Request(
                    method=method,
                    path=path,
                    raw_query=raw_query,
                    headers=Headers(fwd),
                    http_version=req.http_version,
                    client=client_ip,
                    peer=self.peer,
                    scheme=self.scheme,
                    tls=self.tls,
                )
                exchange = Exchange(request=request, request_id=request_id, timings=Timings(start))
                query = request.query if rt.router_needs_query else None
                match = None
                if method == b"OPTIONS" and rt.any_preflight:
                    match = _preflight_match(rt, host_name, path, fwd, query, raw_query)
                if match is None:
                    match = rt.router.match(host_name, path, method, fwd, query, raw_query)
                route = match.value
                if absolute and not route.config.allow_absolute_form:
                    raise BadRequest("absolute-form request targets are not accepted on this route")
                if method == b"TRACE" and "TRACE" not in route.config.methods:
                    # A TRACE echo shows what the gateway added (identity headers): nginx
                    # refuses it too. A route that lists TRACE in its methods may have it.
                    raise MethodNotAllowed(list(route.allow))
                exchange.route = route.config
                exchange.caller = route.call_upstream
                exchange.client_gone = self.client_gone
                exchange.credential_headers = route.chain.credential_headers
                exchange.captures = match.captures
                exchange.timings.routed = now()
                if route.strip_identity is not None:  # an open route beside a guarded one
                    request.headers.remove_where(route.strip_identity)

                # Body: refuse before reading a byte when the declared length is too large.
                body: _ClientBody | None = None
                body_length: int | None = None
                if content_length is not None:
                    body_length = int(content_length)
                    if body_length > route.max_body_size:
                        raise PayloadTooLarge(
                            f"request body of {body_length} bytes is over {route.max_body_size}"
                        )
                if self.body_reader is not None:
                    body = _ClientBody(self, self.body_reader, route.max_body_size)

                chain = route.chain
                if chain.request_body_at is not None:

                    async def buffer_body() -> None:
                        if body is None or request.body is not None:
                            return
                        data = await body.read_all(cfg.max_buffered_body)
                        if data is not None:
                            request.body = data
                        else:
                            request.body_truncated = True

                    answer, depth = await run_request_phases(chain, exchange, buffer_body)
                elif chain.sync_request:
                    answer, depth = run_sync_request_phases(chain, exchange)
                elif chain.request:
                    answer, depth = await run_request_phases(chain, exchange)
                else:
                    depth = len(chain.filters)
                if answer is None and (method == b"OPTIONS" or method == b"TRACE"):
                    answer = _max_forwards(route, request, req)
                if answer is None:
                    if route.pool is None:
                        raise BadGateway("the route has no upstream and no filter answered")
                    call_body: Any
                    if request.body is not None:
                        call_body = request.body
                    elif body is not None:
                        prefix = body._prefix
                        call_body = _PrefixedBody(prefix, body) if prefix else body
                    else:
                        call_body = None
                    out_headers = request.headers
                    if route.config.preserve_host:
                        out_headers.items.append((b"host", fwd_host or host))
                    elif route.host_header is not None:
                        out_headers.items.append((b"host", route.host_header))
                    out_headers.items.append((b"x-forwarded-for", xff_out))
                    out_headers.items.append((b"x-forwarded-proto", proto))
                    if fwd_host:
                        out_headers.items.append((b"x-forwarded-host", fwd_host))
                    out_headers.items.append((b"via", rt.via_header if self.http11 else rt.via_10))
                    out_headers.items.append((rid_header, request_id.encode()))
                    call = UpstreamCall(
                        upstream=route.pool.name,
                        method=request.method,
                        target=_forward_target(route, exchange),
                        headers=out_headers,
                        body=call_body,
                        timeout=route.timeout,
                        body_length=body_length if call_body is body else None,
                        client_gone=exchange.client_gone,
                    )
                    if upgrade is not None and route.upgrades and call_body is None:
                        call.upgrade = _upgrades_allowed(upgrade, route.upgrades)
                    if route.pool.key_of is not None:  # balance = "hash"
                        call.hash_key = route.pool.key_of(exchange)
                    exchange.timings.upstream_start = now()
                    if chain.around:
                        answer = await wrap_upstream(chain.around, exchange, route.send_proxied)(
                            call
                        )
                    else:
                        answer = await route.pool.send(
                            call,
                            connect_timeout=route.connect_timeout,
                            read_timeout=route.read_timeout,
                        )
                    exchange.upstream_target = call.target_address
                    exchange.timings.upstream_headers = now()
                    _strip_hop_by_hop(answer.headers)
            if chain.needs_response_body and answer.stream is not None and answer.body is None:
                await _buffer_response(answer, cfg.max_buffered_body)
            if chain.response:
                if chain.sync_response:
                    run_sync_response_phases(chain.response_for(depth), exchange, answer)
                else:
                    await run_response_phases(chain.response_for(depth), exchange, answer)
        except GatewayError as err:
            if request_id is None:
                request_id = server.ids.next()
            if answer is not None:
                await answer.aclose()  # an upstream body nobody will read: release it
            answer = await self._error_response(err, exchange, route, request_id)
        except trio.Cancelled:
            if answer is not None:
                await answer.aclose()
            raise
        except _Abort:
            # The client broke off before it could be answered (a reset while its body
            # was read or relayed): logged as a client gone (499), as nginx does.
            if answer is not None:
                await answer.aclose()
            if request_id is None:
                request_id = server.ids.next()
            end = self._account(rt, route, exchange, req, 499, request_id, start, self.bytes_out)
            self._log_later(route, exchange, end, error=ClientGone())
            raise
        except ClientGone as gone:
            # Nobody to answer: the call was let go. Logged as nginx does (499).
            self.framing_broken = True
            if request_id is None:
                request_id = server.ids.next()
            end = self._account(rt, route, exchange, req, 499, request_id, start, self.bytes_out)
            self._log_later(route, exchange, end, error=gone)
            raise _Abort() from None
        except Exception as e:  # a filter's bug must not take the connection's framing down
            if request_id is None:
                request_id = server.ids.next()
            if answer is not None:
                await answer.aclose()
            log.exception("request %s failed", request_id)
            internal = GatewayError("internal error")
            internal.__cause__ = e
            # Only the filters whose request side ran see the error on the response side.
            internal.filter_depth = getattr(  # type: ignore[attr-defined]
                e, "filter_depth", len(route.chain.filters) if route is not None else 0
            )
            if hasattr(e, "phases_left"):
                internal.phases_left = e.phases_left  # type: ignore[attr-defined]
            answer = await self._error_response(internal, exchange, route, request_id)
        if answer.upgraded is not None:
            if answer.status == 101 and exchange is not None and route is not None:
                await self._switch(answer, exchange, route, req, request_id, start)
                return
            # A filter made it another answer: the switch is off.
            upgraded, answer.upgraded = answer.upgraded, None
            await upgraded.aclose()
        sent_before = self.bytes_out
        try:
            await self._send_response(answer, request_id, req.method)
        except trio.Cancelled:
            # A shutdown cut it midway (past shutdown_timeout): measured and logged with
            # the bytes that went out, as any response cut off.
            self._account(rt, route, exchange, req, answer.status, request_id, start, sent_before)
            raise
        except _Abort:
            # Cut off (the upstream's body broke, the client left): still measured and
            # logged, with the bytes that did go out, and seen by on_log as cut off.
            end = self._account(
                rt, route, exchange, req, answer.status, request_id, start, sent_before
            )
            if exchange is not None:
                exchange.response = answer
                exchange.bytes_sent = self.bytes_out - sent_before
            self._log_later(route, exchange, end)
            raise
        end = self._account(rt, route, exchange, req, answer.status, request_id, start, sent_before)
        if exchange is not None:
            exchange.response = answer
            exchange.timings.end = end
            exchange.bytes_sent = self.bytes_out - sent_before
            if route is not None and route.chain.log:
                await run_log_phases(route.chain, exchange)

    def _log_later(
        self,
        route: RouteRuntime | None,
        exchange: Exchange | None,
        end: float,
        error: Exception | None = None,
    ) -> None:
        """Mark ``exchange`` aborted (the client did not get its response whole) and
        have its on_log run once the connection has ended (see Server._run_late_log)."""
        if exchange is None or route is None or not route.chain.log:
            return
        if error is not None:
            exchange.error = error
        exchange.aborted = True
        exchange.timings.end = end
        self.late_log = (route.chain, exchange)

    def _account(
        self,
        rt: Runtime,
        route: RouteRuntime | None,
        exchange: Exchange | None,
        req: h11.Request,
        status: int,
        request_id: str,
        start: float,
        sent_before: int,
    ) -> float:
        """Observe the request's duration and write its access-log line; returns its end.

        The request is over: calls a filter makes from now on (in ``on_log``, from a
        background task) no longer end when its client goes."""
        if exchange is not None:
            exchange.client_gone = None
        end = self.server.now()
        cls = status // 100
        series = (route.latency if route is not None else _UNROUTED)[cls]
        if series is None:
            series = _bind_duration(route, cls)
        series.observe(end - start)
        access = rt.access_log
        if access is not None:
            client = exchange.request.client if exchange is not None else self.peer[0]
            sent = self.bytes_out - sent_before
            access.record(client, req, exchange, status, request_id, end - start, sent)
        return end

    async def _tunnel(self, route: RouteRuntime, exchange: Exchange, request_id: str) -> None:
        """Answer CONNECT with a TCP tunnel to the route's upstream, until both sides end.

        Returns once the tunnel was open and has ended, however it ended; raises a
        :class:`GatewayError` (or ``_Abort``) when it could not open.
        """
        assert route.pool is not None
        pool = route.pool
        self.framing_broken = True  # whatever happens, this connection speaks no more HTTP
        key = pool.key_of(exchange) if pool.key_of is not None else None
        target = pool.pick(frozenset(), trio.current_time(), key=key)
        connect_timeout = route.connect_timeout or pool.config.connect_timeout
        try:
            exchange.timings.upstream_start = trio.current_time()
            deadline = exchange.timings.upstream_start + connect_timeout
            infos = await pool.addresses(target, deadline)
            upstream = await open_connection(target.host, target.port, deadline, infos)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"upstream {pool.name!r}: the tunnel target did not accept in time"
            ) from None
        except OSError as e:
            _raise_if_local(e)  # out of descriptors: the gateway's 503, as for calls
            raise UpstreamUnreachable(
                f"upstream {pool.name!r}: the tunnel target refused"
            ) from None
        exchange.upstream_target = target.address
        exchange.timings.upstream_headers = trio.current_time()  # connected
        idle = route.read_timeout or pool.config.read_timeout
        try:
            await self.send_raw(
                b"HTTP/1.1 200 Connection Established\r\n"
                + _rid_line(self.server.runtime, request_id)
                + b"\r\n"
            )
            await self._relay(upstream, idle, self.wire.take(), b"")
        finally:
            upstream.close()

    async def _switch(
        self,
        answer: Response,
        exchange: Exchange,
        route: RouteRuntime,
        req: h11.Request,
        request_id: str,
        start: float,
    ) -> None:
        """Answer with the upstream's 101 and relay the protocol it switched to, both
        ways, until it ends; then the exchange is logged (status 101, its whole life)."""
        switched = answer.upgraded
        assert isinstance(switched, _Switched)
        rt = self.server.runtime
        self.keep_alive = False
        self.framing_broken = True  # whatever happens, this connection speaks no more HTTP
        rid = rt.rid_header
        head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for n, v in answer.headers.items:
            # No framing in a 1xx (RFC 9110 8.6); Connection and Upgrade are written here.
            if n != b"content-length" and n != b"transfer-encoding" and n != rid:
                head.append(n + b": " + v + b"\r\n")
        head += (b"connection: upgrade\r\nupgrade: ", switched.protocol, b"\r\n")
        head += (_rid_line(rt, request_id), b"\r\n")
        _RESPONSES[1].inc()
        sent_before = self.bytes_out
        try:
            try:
                await self.send_raw(b"".join(head))
                await self._relay(switched.io, switched.idle, self.wire.take(), switched.take())
            finally:
                switched.close()
        except trio.Cancelled:  # a shutdown cut it: still its line
            self._account(rt, route, exchange, req, 101, request_id, start, sent_before)
            raise
        except _Abort:  # the client left before the 101 reached it
            end = self._account(rt, route, exchange, req, 101, request_id, start, sent_before)
            exchange.response = answer
            exchange.bytes_sent = self.bytes_out - sent_before
            self._log_later(route, exchange, end)
            raise
        end = self._account(rt, route, exchange, req, 101, request_id, start, sent_before)
        exchange.response = answer
        exchange.timings.end = end
        exchange.bytes_sent = self.bytes_out - sent_before
        if route.chain.log:
            await run_log_phases(route.chain, exchange)

    async def _relay(
        self,
        upstream: RawSocket | TlsSocket,
        idle: float,
        to_upstream: bytes,
        to_client: bytes,
    ) -> None:
        """Pass bytes both ways between the client and ``upstream`` (a CONNECT tunnel, a
        switched protocol) until both sides have ended, one breaks, or no byte crossed
        either way for ``idle`` seconds. ``to_upstream`` / ``to_client`` were read
        already (past a head) and go first. Half-closes are passed on."""
        client = self.io
        try:
            if to_client:
                await client.send_all(to_client, idle)
                self.bytes_out += len(to_client)
            if to_upstream:
                await upstream.send_all(to_upstream, idle)
        except (trio.TooSlowError, OSError):
            return
        # When data last crossed, either way: the tunnel is idle only when both
        # directions are (as HAProxy's timeout tunnel), so a download is not cut
        # because the client has nothing to say.
        last = [trio.current_time()]
        ended = [0]  # directions that reached their end
        writing = [0]  # directions inside a write (which may wait on a slow reader)

        async def pump(src: _Stream, dst: _Stream) -> None:
            # No socket timers here: a timer ends every wait on its socket, so one
            # direction's would cut the other's write. The watchdog below times both.
            try:
                while data := await src.recv(_INF):
                    last[0] = trio.current_time()
                    writing[0] += 1
                    try:
                        await dst.send_all(data, _INF)
                    finally:
                        writing[0] -= 1
                    last[0] = trio.current_time()
                    if dst is client:
                        self.bytes_out += len(data)
                    await trio.lowlevel.checkpoint()
                if isinstance(dst, RawSocket):
                    dst.shutdown_write()  # pass the half-close on, keep the other way
                elif isinstance(dst, TlsSocket):
                    await dst.shutdown_write(idle)  # (close_notify first)
                else:  # a TLS client: trio's stream cannot half-close
                    nursery.cancel_scope.cancel()
            except (OSError, trio.TooSlowError):
                nursery.cancel_scope.cancel()  # one side broke: end the tunnel
                return
            ended[0] += 1
            if ended[0] == 2:
                nursery.cancel_scope.cancel()  # both ways closed: the watchdog too

        async def watchdog() -> None:
            # Idle only when no data crossed either way for read_timeout, as HAProxy's
            # timeout tunnel. A write blocked on a slow reader counts as crossing while
            # the reader's kernel takes bytes: it is woken only when half the send
            # buffer is free, which a steady slow reader may take longer than that for.
            taken = (acked(client), acked(upstream))
            while True:
                # Looked at four times per read_timeout, as a blocked write's progress.
                await trio.sleep_until(min(last[0] + idle, trio.current_time() + idle / 4))
                now = trio.current_time()
                before, taken = taken, (acked(client), acked(upstream))
                if writing[0] and taken != before and None not in taken:
                    last[0] = now  # a peer took bytes of a write that still waits
                if now >= last[0] + idle:
                    nursery.cancel_scope.cancel()
                    return

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
                nursery.start_soon(watchdog)
        except BaseExceptionGroup as group:
            if group.split(trio.Cancelled)[1] is not None:
                raise
            # Cut from outside (a shutdown): raised as the cancellation it is, which
            # the callers' line for a cut tunnel looks for (not as trio's group of it).
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None

    async def _error_response(
        self,
        err: GatewayError,
        exchange: Exchange | None,
        route: RouteRuntime | None,
        request_id: str,
    ) -> Response:
        if err.close:
            self.framing_broken = True
        status, headers, body = render_error(err, request_id)
        answer = Response(status=status, headers=Headers(headers), body=body)
        if exchange is not None and route is not None:
            exchange.error = err
            phases = getattr(err, "phases_left", None)
            if phases is None:
                depth = getattr(err, "filter_depth", len(route.chain.filters))
                phases = route.chain.response_for(depth)
            try:
                await run_response_phases(phases, exchange, answer)
            except GatewayError as again:
                status, headers, body = render_error(again, request_id)
                answer = Response(status=status, headers=Headers(headers), body=body)
            except Exception:
                log.exception("an on_response phase failed on an error response")
        return answer

    async def _send_response(self, resp: Response, request_id: str, method: bytes) -> None:
        """Write ``resp`` to the client, framed by the gateway.

        h11 parsed and validated every field this response carries (the upstream's head)
        or the field was checked when a filter set it (:class:`Headers`), so the head is
        written here directly instead of being validated again by h11's writer; the
        framing (Content-Length, chunked, or close-delimited for HTTP/1.0) is decided here.
        """
        server = self.server
        rid = server.runtime.rid_header
        # Framing is the gateway's own; an upstream's request id never doubles ours.
        head = [_STATUS_LINES.get(resp.status) or _status_line(resp.status, resp.reason)]
        dated = False
        for n, v in resp.headers.items:
            if n not in _OWN_RESPONSE_FIELDS:
                if n != rid:
                    head.append(n + b": " + v + b"\r\n")
            elif n == b"date":  # the upstream's is kept (RFC 9110 6.6.1)
                head.append(b"date: " + v + b"\r\n")
                dated = True
        if not dated:
            head.append(_date_line())
        head.append(rid + b": " + request_id.encode() + b"\r\n")
        body = resp.body
        stream = resp.stream
        status = resp.status
        chunked = False
        close_delimited = False
        if status < 200 or status == 204 or status == 304:
            if status == 304 and (cl := resp.headers.get(b"content-length")) is not None:
                head.append(b"content-length: " + cl + b"\r\n")  # the representation's
            body = None
            await _end_bodiless(resp)
            stream = None
        elif body is not None:
            if method == b"HEAD" and not body:
                # A HEAD answer buffered for a filter is empty; its length is the GET's,
                # and is left out when a filter made it unknown (RFC 9110 8.6).
                if cl := resp.headers.get(b"content-length"):
                    head.append(b"content-length: " + cl + b"\r\n")
            else:
                head.append(b"content-length: %d\r\n" % len(body))
            if stream is not None:
                await resp.aclose()
                stream = None
        elif stream is not None:
            # An upstream body's length is what its framing said, not what the headers say
            # now: a 304 mapped to 200 (its Content-Length is the representation's) has
            # none, and a wrong length here would run into the next response. (A HEAD
            # answer's Content-Length is the representation's: it stays.)
            length = stream.length if type(stream) is _UpstreamBody and method != b"HEAD" else None
            cl = b"%d" % length if length is not None else resp.headers.get(b"content-length")
            if cl is not None:
                head.append(b"content-length: " + cl + b"\r\n")
            elif self.http11:
                head.append(b"transfer-encoding: chunked\r\n")
                chunked = True
            else:
                close_delimited = True  # HTTP/1.0 has no chunked: the end is the close
        else:
            cl = resp.headers.get(b"content-length") if method == b"HEAD" else None
            head.append(b"content-length: " + (cl or b"0") + b"\r\n")
        reader = self.body_reader
        if reader is not None and (
            self.expect_100
            # A declared body longer than drain_limit will not be drained: say so now.
            or (
                type(reader) is ContentLengthReader
                and reader._remaining - len(self.wire) > server.runtime.config.server.drain_limit
            )
        ):
            self.framing_broken = True  # answered without the body it holds back: close
        if not self.keep_alive or self.framing_broken or server.draining or close_delimited:
            self.keep_alive = False
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        _RESPONSES[status // 100].inc()
        if method == b"HEAD":
            # The head says what a GET would have carried; no body follows.
            if stream is not None:
                await _end_bodiless(resp)
            await self.send_raw(b"".join(head))
            return
        if stream is None:
            if body:
                head.append(body)
            await self.send_raw(b"".join(head))
            return
        pending = b"".join(head)
        try:
            if type(stream) is _UpstreamBody:
                # Coalesce what the upstream already delivered into as few writes as
                # possible: a small response goes out head and body in one send.
                poll = stream.poll
                while True:
                    chunk = poll()
                    if chunk is None:
                        if pending:
                            await self.send_raw(pending)
                            pending = b""
                            await trio.lowlevel.checkpoint()
                        try:
                            chunk = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                    elif chunk is _END:
                        break
                    if chunked:
                        pending += b"%x\r\n" % len(chunk) + chunk + b"\r\n"
                    else:
                        pending += chunk
                    if len(pending) >= 65536:
                        await self.send_raw(pending)
                        pending = b""
                        await trio.lowlevel.checkpoint()
                await self.send_raw(pending + b"0\r\n\r\n" if chunked else pending)
                return
            # A stream from a filter: count it against the length it declared.
            declared = resp.headers.get(b"content-length")
            expected = int(declared) if declared is not None and not chunked else None
            sent = 0
            await self.send_raw(pending)
            async for chunk in stream:
                if chunk:
                    sent += len(chunk)
                    if expected is not None and sent > expected:
                        raise _Abort()
                    await self.send_raw(
                        b"%x\r\n" % len(chunk) + chunk + b"\r\n" if chunked else chunk
                    )
                    await trio.lowlevel.checkpoint()
            if expected is not None and sent != expected:
                raise _Abort()
            if chunked:
                await self.send_raw(b"0\r\n\r\n")
        except UpstreamBodyError as e:
            log.warning("request %s: %s; aborting the client connection", request_id, e)
            self.framing_broken = True
            raise _Abort() from None
        except _Abort:
            self.framing_broken = True
            await stream.aclose()
            raise
        except BaseException:
            self.framing_broken = True
            await stream.aclose()
            raise


def _status_line(status: int, reason: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))


# The status lines of the standard codes, made once.
_STATUS_LINES = {s: _status_line(s, b"") for s in range(100, 600) if reason_phrase(s)}


async def _tunnel_request_phases(chain: Chain, exchange: Exchange) -> tuple[Response | None, int]:
    """The request phases of a CONNECT. A tunnel has no request body (what follows the
    head is the tunnel's own bytes), so a filter that asks for the body gets an empty one."""
    if chain.request_body_at is not None:

        async def no_body() -> None:
            exchange.request.body = b""

        return await run_request_phases(chain, exchange, no_body)
    if chain.sync_request:
        return run_sync_request_phases(chain, exchange)
    if chain.request:
        return await run_request_phases(chain, exchange)
    return None, len(chain.filters)


def _connect_route(rt: Runtime, authority: bytes) -> RouteRuntime | None:
    host = authority.rsplit(b":", 1)[0].decode("latin-1").lower().strip("[]").rstrip(".")
    for route in rt.routes:
        cfg = route.config
        if not cfg.allow_connect:
            continue
        if not cfg.hosts or any(
            h == host or (h.startswith("*.") and host.endswith(h[1:])) for h in cfg.hosts
        ):
            return route
    return None


def _is_ip(text: str) -> bool:
    """An IPv4 or IPv6 address, without an IPv6 zone: Python takes any text after "%"
    as one (spaces and quotes too), which would reach the logs as the client."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def _end_bodiless(resp: Response) -> None:
    stream = resp.stream
    if stream is None:
        return
    # An upstream's 204/304 ends at once: release its connection clean, not closed.
    if type(stream) is _UpstreamBody and stream.poll() is _END:
        resp.stream = None
        return
    await resp.aclose()


def _forward_target(route: RouteRuntime, exchange: Exchange) -> bytes:
    request = exchange.request
    path = request.path
    if route.rewrite is not None or route.config.strip_prefix:
        segs = path.split("/")[1:] if path != "/" else []
        n = 0
        pattern = route.config.pattern
        if route.config.is_prefix:
            psegs = [s for s in pattern.split("/")[1:] if s != ""] if pattern != "/" else []
            n = len(psegs)
        else:
            n = len(segs)
        rest = segs[n:]
        if route.rewrite is not None:
            # A capture as the client's segment is, still encoded (see _compile_rewrite).
            head = "".join(p if isinstance(p, str) else segs[p] for p in route.rewrite)
        else:
            head = ""
        if rest:
            path = head.rstrip("/") + "/" + "/".join(rest)
        else:
            path = head or "/"
        if not path.startswith("/"):
            path = "/" + path
    target = path.encode()
    if request.raw_query:
        target += b"?" + request.raw_query
    return target


def _upgrades_allowed(asked: bytes, allowed: frozenset[bytes]) -> bytes | None:
    """The protocols of a client's Upgrade (``websocket, foo/2``) that a route allows
    (by name, without version), in the client's order; ``None`` when none is."""
    offered = [p.strip() for p in asked.split(b",")]
    kept = [p for p in offered if p.split(b"/", 1)[0].strip().lower() in allowed]
    return b", ".join(kept) or None


def _preflight_match(
    rt: Runtime,
    host: str,
    path: str,
    fields: list[tuple[bytes, bytes]],
    query: dict[str, list[str]] | None,
    raw_query: bytes,
) -> Match[RouteRuntime] | None:
    """The route of a CORS preflight: that of the method it announces, when a filter of
    that route answers preflights (``cors``). Otherwise the preflight is routed as the
    OPTIONS it is (None), unless that would take it to another route that answers
    preflights: a broader route's ``cors`` must not approve a call to a route left out
    of CORS (a 405 then)."""
    announced = preflight_method(fields)
    if announced is None:
        return None
    try:
        match = rt.router.match(host, path, announced, fields, query, raw_query)
    except GatewayError:  # no route for that method: the OPTIONS's own answer
        return None
    route = match.value
    if route.chain.handles_preflight:
        return match
    try:
        plain = rt.router.match(host, path, b"OPTIONS", fields, query, raw_query)
    except GatewayError:
        return None  # (the OPTIONS's own refusal)
    if plain.value is not route and plain.value.chain.handles_preflight:
        raise MethodNotAllowed(list(route.allow))
    return plain


def _strip_hop_by_hop(headers: Headers) -> None:
    items = headers.items
    conn = None
    for n, v in items:
        if n == b"connection":
            conn = v if conn is None else conn + b"," + v
    if conn is None:
        if not any(n in _HOP_BY_HOP for n, _ in items):
            return
        headers.items = [
            (n, v) for n, v in items if n not in _HOP_BY_HOP or n == b"transfer-encoding"
        ]
        return
    named = {t.strip().lower() for t in conn.split(b",")}
    headers.items = [
        (n, v)
        for n, v in items
        if (n not in _HOP_BY_HOP or n == b"transfer-encoding") and n not in named
    ]


async def _buffer_response(resp: Response, cap: int) -> None:
    assert resp.stream is not None
    parts: list[bytes] = []
    size = 0
    stream = resp.stream
    async for chunk in stream:
        parts.append(chunk)
        size += len(chunk)
        if size > cap:
            resp.stream = _PrefixedBody(parts, stream)
            return
    resp.body = b"".join(parts)
    resp.stream = None


def open_listeners(addresses: list[str], reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` addresses (v4 and v6)."""
    socks = []
    for addr in addresses:
        host, port = parse_address(addr)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
        socks.append(sock)
    return socks
