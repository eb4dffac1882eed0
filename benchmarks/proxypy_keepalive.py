"""proxy.py with keep-alive clients: one upstream connection per client connection.

proxy.py 2.4's documented reverse-proxy route (``proxypy_plugin``) opens a new upstream
connection per request and breaks on a keep-alive connection's second request. This
plugin is the stronger reference: a route of proxy.py's built-in web server
(``--enable-web-server``) that

- opens ONE upstream TCP connection on the client connection's first request and keeps
  it for every following request of that client connection;
- sends each request as proxy.py parsed it (its ``HttpParser``, rebuilt with
  ``build()``): the first one parsed by proxy.py's protocol handler, the following ones
  here, one parser per request;
- relays the upstream's response bytes to the client as they arrive, without parsing
  them: no response framing, no header handling, nothing per response;
- closes the upstream connection when the client connection goes, and ends the client
  connection (once the upstream's bytes are flushed) when the upstream closes first, as
  after a ``Connection: close`` request.

Writes are sent at once (a non-blocking send; what the socket does not take waits in
proxy.py's buffer for its event loop), not only when proxy.py's loop next finds the
socket writable: that saves a loop pass per direction and made the relay ~1.5x faster
here. ``FILTERGATE_BENCH_PROXYPY_FLUSH=loop`` leaves every write to proxy.py's loop.

It does less work than a gateway must (a gateway parses and frames every response), so
it is the peer to beat, not a like-for-like one. :class:`BenchKeepAliveParsed` does that
part of a gateway's work too: it parses every response with proxy.py's own
``HttpParser`` and sends the client the response proxy.py rebuilds from it
(``build_response()``), which answers whether proxy.py stays ahead of the trio + h11
floor (``benchmarks/floor.py``) once it parses both heads as the floor does.

Requests are not pipelined (wrk does not pipeline): bytes after a complete request in
the same read are dropped, as in proxy.py's own web server; a slow client makes it
buffer the upstream's bytes in memory (no backpressure). proxy.py loads the class by its
dotted name (``--plugins``); the upstream URL comes from the environment variable
``FILTERGATE_BENCH_UPSTREAM``.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

from proxy.core.connection import TcpServerConnection  # type: ignore[import-not-found,unused-ignore]
from proxy.http.parser import HttpParser, httpParserTypes  # type: ignore[import-not-found,unused-ignore]
from proxy.http.server import (  # type: ignore[import-not-found,unused-ignore]
    HttpWebServerBasePlugin,
    httpProtocolTypes,
)


def upstream_address() -> tuple[str, int]:
    url = urlsplit(os.environ.get("FILTERGATE_BENCH_UPSTREAM", "http://127.0.0.1:9001/"))
    return url.hostname or "127.0.0.1", url.port or 80


def send_at_once() -> bool:
    return os.environ.get("FILTERGATE_BENCH_PROXYPY_FLUSH", "now") != "loop"


class BenchKeepAliveRelay(HttpWebServerBasePlugin):  # type: ignore[misc,unused-ignore]
    """One instance per client connection (proxy.py's web server makes one per accept)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.address = upstream_address()
        self.eager = send_at_once()
        self.upstream: Any = None  # a TcpServerConnection once the first request came
        self.pending: Any = None  # the HttpParser of a request still arriving
        self.recv_size: int = self.flags.server_recvbuf_size

    def routes(self) -> list[tuple[int, str]]:
        return [(httpProtocolTypes.HTTP, r"/")]

    def handle_request(self, request: Any) -> None:
        """A complete request: send it on the client connection's upstream."""
        if self.upstream is None:
            upstream = TcpServerConnection(*self.address)
            upstream.connect()
            sock = upstream.connection
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.upstream = upstream
        self.upstream.queue(memoryview(request.build()))
        if self.eager:
            try:
                self.upstream.flush()
            except OSError:
                pass  # still queued: the loop's next flush fails too and tears down

    def on_client_data(self, request: Any, raw: memoryview) -> memoryview | None:
        """The requests after the first: parsed here, one parser per request.

        Returning None keeps proxy.py's web server from parsing them itself (it would
        end the connection on a ``Connection: close`` request before its response).
        """
        if self.pending is None:
            self.pending = HttpParser(httpParserTypes.REQUEST_PARSER)
        self.pending.parse(raw)
        if self.pending.is_complete:
            self.handle_request(self.pending)
            self.pending = None
        return None

    async def get_descriptors(self) -> tuple[list[int], list[int]]:
        if self.upstream is None:
            return [], []
        fd: int = self.upstream.connection.fileno()
        return [fd], [fd] if self.upstream.has_buffer() else []

    async def write_to_descriptors(self, w: list[int]) -> bool:
        """Flush queued requests to the upstream; True (tear down) if it is gone."""
        upstream = self.upstream
        if upstream is not None and upstream.has_buffer() and upstream.connection.fileno() in w:
            try:
                upstream.flush()
            except OSError:
                return True
        return False

    async def read_from_descriptors(self, r: list[int]) -> bool:
        """Relay what the upstream sent, unparsed; True once the upstream closed.

        proxy.py then flushes what is queued for the client before closing it.
        """
        upstream = self.upstream
        if upstream is None or upstream.connection.fileno() not in r:
            return False
        try:
            data = upstream.recv(self.recv_size)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data is None:
            return True
        out = self.relay(data)
        if out is None:
            return False
        self.client.queue(out)
        if self.eager:
            try:
                self.client.flush()
            except OSError:
                return True
        return False

    def relay(self, data: memoryview) -> memoryview | None:
        """What to send the client for ``data`` from the upstream: the bytes themselves."""
        return data

    def on_client_connection_close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def on_access_log(self, context: dict[str, Any]) -> dict[str, Any] | None:
        return None  # no access log: the benchmark measures the relay


class BenchKeepAliveParsed(BenchKeepAliveRelay):
    """The same relay, but every response is parsed by proxy.py's ``HttpParser`` and the
    client gets the response rebuilt from the parse, once it is complete (proxy.py's
    parser buffers a body whole; the benchmark's bodies are small).

    Only for responses framed by Content-Length or chunked, one at a time, which is what
    the benchmark's stub sends: proxy.py's parser never completes a body that ends at
    the connection's close (it keeps only the last read of it), so such a response is
    not relayed, and bytes after a complete response in the same read are dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response: Any = None  # the HttpParser of a response still arriving

    def relay(self, data: memoryview) -> memoryview | None:
        if self.response is None:
            self.response = HttpParser(httpParserTypes.RESPONSE_PARSER)
        self.response.parse(data)
        if not self.response.is_complete:
            return None
        rebuilt: bytes = self.response.build_response()
        self.response = None
        return memoryview(rebuilt)
