"""The test kit: for filtergate's own tests and for plugin authors.

* :func:`open_stubs` - the demo upstream services on free ports.
* :func:`open_gateway` - a running gateway (a config dict, TOML text or ``Config``) on a
  free port inside the caller's trio run; plugins under test are passed as ``extra_plugins``.
* :func:`http_request` / :class:`Client` - an h11 client over real sockets.
* :func:`make_exchange`, :func:`build_filter`, :func:`run_chain` - run one filter or a
  whole chain on an in-memory exchange, no sockets at all.

Time: use pytest-trio's ``autojump_clock`` fixture (or ``trio.testing.MockClock``);
filters read ``trio.current_time()``, so they follow it.
"""

from __future__ import annotations

import copy
import json
import socket
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from engine.app import Gateway
from engine.chain import (
    FilterContext,
    compile_chain,
    run_log_phases,
    run_request_phases,
    run_response_phases,
    wrap_upstream,
)
from engine.config import Config, RouteConfig, load
from engine.errors import GatewayError, render_error
from engine.exchange import Exchange, Headers, Request, Response, Timings, UpstreamCall
from engine.schema import build
from engine.stubs import Stubs, open_stubs

__all__ = [
    "Client",
    "HeaderLookup",
    "HttpResponse",
    "RunningGateway",
    "Stubs",
    "build_filter",
    "free_port",
    "http_request",
    "make_exchange",
    "open_gateway",
    "open_stubs",
    "run_chain",
    "wait_listening",
]


class HeaderLookup:
    """``header``/``header_all`` over a ``headers`` list of ``(lowercase name, value)``."""

    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded."""
        key = name.lower().encode()
        for n, v in self.headers:
            if n == key:
                return v.decode("latin-1")
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in order, decoded."""
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n == key]


@dataclass
class HttpResponse(HeaderLookup):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes = b"1.1"

    def json(self) -> Any:
        return json.loads(self.body)


HeaderList = Sequence[tuple[str | bytes, str | bytes]]


def _hb(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


class Client:
    """One keep-alive client connection (h11), for tests over real sockets."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int, host: str = "127.0.0.1") -> AsyncIterator[Client]:
        stream = await trio.open_tcp_stream(host, port)
        try:
            yield cls(stream)
        finally:
            await stream.aclose()

    async def request(
        self,
        method: str,
        path: str,
        headers: HeaderList = (),
        body: bytes | None = None,
        *,
        host: str = "test.local",
    ) -> HttpResponse:
        """Send a request and read the whole response (reusing the connection)."""
        h = self.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        hdrs = [(_hb(n), _hb(v)) for n, v in headers]
        if not any(n.lower() == b"host" for n, _ in hdrs):
            hdrs.insert(0, (b"host", host.encode()))
        if body is not None and not any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in hdrs
        ):
            hdrs.append((b"content-length", str(len(body)).encode()))
        data = h.send(h11.Request(method=method, target=path, headers=hdrs)) or b""
        if body:
            data += h.send(h11.Data(data=body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        return await self.read_response()

    async def read_response(self) -> HttpResponse:
        h = self.h11
        resp: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                h.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("connection closed before a response")
        assert resp is not None
        return HttpResponse(
            status=resp.status_code,
            reason=resp.reason,
            headers=list(resp.headers),
            body=b"".join(chunks),
            http_version=resp.http_version,
        )


async def http_request(
    port: int,
    method: str,
    path: str,
    headers: HeaderList = (),
    body: bytes | None = None,
    *,
    host: str = "test.local",
    address: str = "127.0.0.1",
) -> HttpResponse:
    """One request on a new connection; returns the whole response."""
    async with Client.open(port, address) as client:
        return await client.request(method, path, headers, body, host=host)


async def raw_exchange(port: int, data: bytes, *, address: str = "127.0.0.1") -> bytes:
    """Send raw bytes and read until the server closes; for hostile-input tests."""
    stream = await trio.open_tcp_stream(address, port)
    try:
        await stream.send_all(data)
        out = bytearray()
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        await stream.aclose()


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int | None
    config: Config = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for subprocess gateways)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_listening(port: int, process: trio.Process | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts; raise if ``process`` exits first.

    Put it under a deadline (``trio.fail_after``): it waits as long as it takes.
    """
    while True:
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"the process exited with {process.returncode} before listening")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


def _as_config(config: dict[str, Any] | str | Config) -> Config:
    if isinstance(config, Config):
        return config
    data = tomllib.loads(config) if isinstance(config, str) else copy.deepcopy(config)
    server = data.setdefault("server", {})
    server.setdefault("listen", ["127.0.0.1:0"])
    admin = data.setdefault("admin", {})
    admin.setdefault("listen", "127.0.0.1:0")
    return load(data)


@asynccontextmanager
async def open_gateway(
    config: dict[str, Any] | str | Config,
    *,
    extra_plugins: Sequence[tuple[str, object]] = (),
) -> AsyncIterator[RunningGateway]:
    """A gateway serving ``config`` until the block ends.

    ``listen`` defaults to ``127.0.0.1:0`` (a free port), as does the admin listener.
    ``extra_plugins`` are ``(name, plugin)`` pairs registered beside the built-ins, the
    way a test registers the plugin module it exercises.
    """
    cfg = _as_config(config)
    gateway = Gateway(cfg, extra_plugins=list(extra_plugins))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        try:
            yield RunningGateway(gateway, gateway.ports[0], gateway.admin_port, cfg)
        finally:
            nursery.cancel_scope.cancel()


def make_exchange(
    method: str = "GET",
    path: str = "/",
    headers: HeaderList = (),
    *,
    query: str = "",
    client: str = "127.0.0.1",
    route_name: str = "test",
    body: bytes | None = None,
    captures: dict[str, str] | None = None,
) -> Exchange:
    """An exchange as a filter would see it, with no connection behind it."""
    request = Request(
        method=method.encode(),
        path=path,
        raw_query=query.encode(),
        headers=Headers([(_hb(n).lower(), _hb(v)) for n, v in headers]),
        http_version=b"1.1",
        client=client,
        peer=(client, 40000),
        body=body,
    )
    ex = Exchange(request=request, request_id="test-1", timings=Timings(start=0.0))
    ex.route = RouteConfig(name=route_name, prefix="/")
    ex.captures = dict(captures or {})
    return ex


def build_filter(cls: type[Any], table: dict[str, Any] | None = None, scope: str = "global") -> Any:
    """An instance of filter type ``cls`` with its config built (and checked) from ``table``."""
    config = build(cls.Config, table or {}, f"plugins.{cls.name}")
    return cls(config, FilterContext(cls.name, scope))


Upstream = Callable[[UpstreamCall], Awaitable[Response]]


async def run_chain(
    filters: Sequence[Any],
    exchange: Exchange,
    upstream: Upstream | Response | None = None,
) -> Response:
    """Run ``filters`` as the engine would (stage order, short-circuits, errors).

    ``upstream`` answers when no filter does: a function of the call, or a fixed
    response (default: ``200`` with an empty body). Gateway errors become the error
    response, and response phases run on it as in the engine.
    """
    chain = compile_chain(list(filters))

    async def send(call: UpstreamCall) -> Response:
        if upstream is None:
            return Response(status=200, headers=Headers([]), body=b"")
        if isinstance(upstream, Response):
            return upstream
        return await upstream(call)

    async def caller(ex: Exchange, call: UpstreamCall) -> Response:
        return await wrap_upstream(chain.around, ex, send)(call)

    exchange.caller = caller
    exchange.credential_headers = chain.credential_headers
    depth = len(chain.filters)
    try:
        answer, depth = await run_request_phases(chain, exchange)
        if answer is None:
            r = exchange.request
            call = UpstreamCall(
                upstream="test",
                method=r.method,
                target=r.target,
                headers=r.headers,
                body=r.body,
            )
            answer = await wrap_upstream(chain.around, exchange, send)(call)
    except GatewayError as err:
        depth = getattr(err, "filter_depth", depth)
        status, hdrs, body = render_error(err, exchange.request_id)
        answer = Response(status=status, headers=Headers(hdrs), body=body)
        exchange.error = err
    try:
        await run_response_phases(chain.response_for(depth), exchange, answer)
    except GatewayError as err:
        status, hdrs, body = render_error(err, exchange.request_id)
        answer = Response(status=status, headers=Headers(hdrs), body=body)
        exchange.error = err
        await run_response_phases(getattr(err, "phases_left", []), exchange, answer)
    exchange.response = answer
    await run_log_phases(chain, exchange)
    return answer
