"""The demo upstream services: small ASGI apps served by hypercorn on trio.

``filtergate stubs`` serves them for the demo ``gateway.toml``; tests start them on
free ports with :func:`open_stubs`. They are fixtures, not benchmark upstreams: a
hypercorn app saturates well below the gateway (see ``benchmarks/rawstub.py`` for the
throughput upstream).

Services (each also answers ``GET /healthz`` with ``{"status": "ok", "service": NAME}``):

``users``, ``orders``, ``catalog``
    JSON records. ``GET /users``, ``GET /users/{id}``, ``GET /orders``,
    ``GET /orders?user_id=1``, ``GET /orders/{id}``, ``GET /catalog``,
    ``GET /catalog/{id}``; the leading service segment is optional (``/1`` works too, for
    a gateway that strips its route prefix). Unknown ids and paths answer 404
    ``{"error": "not_found", ...}``; other methods 405.
``echo``
    Any method and path: ``{"method", "path", "query", "args", "headers",
    "header_list", "body"}`` of what it received. ``headers`` maps each lowercase name to
    its value (repeated headers joined with ``", "``); ``header_list`` keeps every
    ``[name, value]`` pair in order; ``body`` is the body decoded as UTF-8 (invalid bytes
    replaced). A WebSocket handshake to any path is accepted: the first message is a
    JSON text of what it saw (``path``, ``query``, ``headers``), then every message is
    echoed back. (The other services refuse WebSockets.)
``slow``
    Answers after ``?delay=SECONDS`` (default 1). When the client goes away before the
    delay is over the call counts as cancelled: ``GET /slow/stats`` (or ``/stats``)
    answers ``{"started", "completed", "cancelled", "in_flight"}``.
``flaky``
    Fails with ``?status=`` (default 500) either at random with probability ``?rate=``
    (a seeded generator, so a sequence is reproducible) or deterministically with
    ``?fail=N-of-M`` (the first N of every M requests fail) or ``?fail=N`` (the first N
    requests fail, then every one succeeds). Deterministic counters are kept per
    ``?key=`` (default ``""``). ``GET /flaky/stats`` answers ``{"requests", "failures"}``;
    ``POST /flaky/reset`` zeroes every counter.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

__all__ = [
    "STUB_PORTS",
    "CatalogService",
    "EchoService",
    "FlakyService",
    "OrdersService",
    "SlowService",
    "StubTls",
    "Stubs",
    "UsersService",
    "build_services",
    "main",
    "open_stubs",
    "serve_stubs",
]

#: Default port of each service; ``filtergate stubs --base-port P`` shifts them all.
STUB_PORTS: Mapping[str, int] = {
    "users": 9001,
    "orders": 9002,
    "catalog": 9003,
    "echo": 9004,
    "slow": 9005,
    "flaky": 9006,
}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

USERS: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "tier": "gold"},
    {"id": 2, "name": "Alan Turing", "email": "alan@example.com", "tier": "silver"},
    {"id": 3, "name": "Grace Hopper", "email": "grace@example.com", "tier": "gold"},
)

ORDERS: tuple[dict[str, Any], ...] = (
    {"id": 101, "user_id": 1, "items": [{"sku": "KB-01", "qty": 1}], "total": 89.0},
    {"id": 102, "user_id": 1, "items": [{"sku": "MS-02", "qty": 2}], "total": 50.0},
    {"id": 103, "user_id": 2, "items": [{"sku": "MN-27", "qty": 1}], "total": 329.0},
    {"id": 104, "user_id": 3, "items": [{"sku": "KB-01", "qty": 3}], "total": 267.0},
)

CATALOG: tuple[dict[str, Any], ...] = (
    {"id": 1, "sku": "KB-01", "name": "Mechanical keyboard", "price": 89.0},
    {"id": 2, "sku": "MS-02", "name": "Wireless mouse", "price": 25.0},
    {"id": 3, "sku": "MN-27", "name": "27-inch monitor", "price": 329.0},
)


async def _send_json(send: Send, status: int, payload: Any, name: str) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-stub", name.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def _query(scope: Scope) -> dict[str, list[str]]:
    raw: bytes = scope.get("query_string", b"")
    return parse_qs(raw.decode("latin-1"), keep_blank_values=True)


def _first(args: Mapping[str, list[str]], name: str) -> str | None:
    values = args.get(name)
    return values[0] if values else None


class StubService:
    """Base of every stub: lifespan handling, ``/healthz``, and dispatch to ``handle``."""

    name = "stub"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await _read_body(receive)
            await _send_json(send, 200, {"status": "ok", "service": self.name}, self.name)
            return
        await self.handle(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        await self.not_found(send, scope["path"])

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket handshake: refused (403) but by the services that take them."""
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})

    async def not_found(self, send: Send, path: str) -> None:
        await _send_json(
            send, 404, {"error": "not_found", "message": f"no resource at {path}"}, self.name
        )


class RecordService(StubService):
    """A read-only JSON collection: list it, filter it by query, get one by id."""

    records: tuple[dict[str, Any], ...] = ()
    #: Query parameters that filter the list, each compared with the record's field.
    filters: tuple[str, ...] = ()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        if scope["method"] not in ("GET", "HEAD"):
            await _send_json(
                send,
                405,
                {"error": "method_not_allowed", "message": f"{self.name} is read-only"},
                self.name,
            )
            return
        segments = _segments(scope["path"])
        if segments and segments[0] == self.name:
            segments = segments[1:]
        if not segments:
            args = _query(scope)
            selected = [
                r
                for r in self.records
                if all(
                    str(r.get(key)) == value
                    for key in self.filters
                    if (value := _first(args, key)) is not None
                )
            ]
            await _send_json(send, 200, {self.name: selected}, self.name)
            return
        if len(segments) == 1:
            for record in self.records:
                if str(record["id"]) == segments[0]:
                    await _send_json(send, 200, record, self.name)
                    return
        await self.not_found(send, scope["path"])


class UsersService(RecordService):
    name = "users"
    records = USERS


class OrdersService(RecordService):
    name = "orders"
    records = ORDERS
    filters = ("user_id",)


class CatalogService(RecordService):
    name = "catalog"
    records = CATALOG
    filters = ("sku",)


class EchoService(StubService):
    """Answers every request with a JSON description of that request."""

    name = "echo"

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        header_list = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        headers: dict[str, str] = {}
        for k, v in header_list:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        payload = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "args": _query(scope),
            "headers": headers,
            "header_list": header_list,
            "body": body.decode("utf-8", errors="replace"),
        }
        await _send_json(send, 200, payload, self.name)

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Accepts, sends what it saw of the handshake as a JSON text message (``path``,
        ``query``, ``headers``), then echoes every message until the client closes."""
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        seen = {
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": headers,
        }
        await send({"type": "websocket.send", "text": json.dumps(seen)})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


@dataclass
class SlowService(StubService):
    """Delays each answer; counts calls whose client went away before the answer."""

    name = "slow"
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    # Set (and replaced) on each change, so that a test can wait for a count.
    started_event: trio.Event = field(default_factory=trio.Event)
    cancelled_event: trio.Event = field(default_factory=trio.Event)

    @property
    def in_flight(self) -> int:
        return self.started - self.completed - self.cancelled

    def stats(self) -> dict[str, int]:
        return {
            "started": self.started,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "in_flight": self.in_flight,
        }

    async def wait_started(self, count: int = 1) -> None:
        """Return once at least ``count`` calls have started their delay in total."""
        while self.started < count:
            await self.started_event.wait()

    async def wait_cancelled(self, count: int = 1) -> None:
        """Return once at least ``count`` calls have been cancelled in total."""
        while self.cancelled < count:
            await self.cancelled_event.wait()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _segments(scope["path"]) in (["stats"], ["slow", "stats"]):
            await _read_body(receive)
            await _send_json(send, 200, self.stats(), self.name)
            return
        raw_delay = _first(_query(scope), "delay")
        try:
            delay = 1.0 if raw_delay is None else float(raw_delay)
            if not math.isfinite(delay) or delay < 0:
                raise ValueError(raw_delay)
        except ValueError:
            await _read_body(receive)
            await _send_json(
                send,
                400,
                {"error": "bad_request", "message": "delay must be seconds >= 0"},
                self.name,
            )
            return
        body = await _read_body(receive)
        if body is None:
            return
        self.started += 1
        self.started_event.set()
        self.started_event = trio.Event()
        disconnected = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    nonlocal disconnected
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    disconnected = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_disconnect)
                await trio.sleep(delay)
                nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside (server shutdown) while waiting: the caller never
            # got its answer either.
            self._count_cancelled()
            raise
        if disconnected:
            self._count_cancelled()
            return
        self.completed += 1
        await _send_json(send, 200, {"delayed": delay}, self.name)

    def _count_cancelled(self) -> None:
        self.cancelled += 1
        self.cancelled_event.set()
        self.cancelled_event = trio.Event()


@dataclass
class FlakyService(StubService):
    """Fails on purpose, at random (seeded) or by a deterministic count."""

    name = "flaky"
    seed: int = 0
    requests: int = 0
    failures: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reset(self) -> None:
        self.requests = self.failures = 0
        self.counters.clear()
        self.rng = random.Random(self.seed)

    def should_fail(self, args: Mapping[str, list[str]]) -> bool:
        """Decide one request; raises ValueError on a malformed ``rate`` or ``fail``."""
        fail = _first(args, "fail")
        if fail is not None:
            n_text, _, m_text = fail.partition("-of-")
            n = int(n_text)
            m = int(m_text) if m_text else 0
            if n < 0 or m < 0 or (m and n > m):
                raise ValueError(fail)
            key = _first(args, "key") or ""
            index = self.counters.get(key, 0)
            self.counters[key] = index + 1
            return index % m < n if m else index < n
        rate_text = _first(args, "rate")
        rate = 0.0 if rate_text is None else float(rate_text)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(rate_text)
        return self.rng.random() < rate

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        segments = _segments(scope["path"])
        if segments in (["stats"], ["flaky", "stats"]):
            await _send_json(
                send, 200, {"requests": self.requests, "failures": self.failures}, self.name
            )
            return
        if segments in (["reset"], ["flaky", "reset"]) and scope["method"] == "POST":
            self.reset()
            await _send_json(send, 200, {"reset": True}, self.name)
            return
        args = _query(scope)
        try:
            fail = self.should_fail(args)
            status = int(_first(args, "status") or 500)
            if not 100 <= status <= 599:
                raise ValueError(status)
        except ValueError:
            await _send_json(
                send,
                400,
                {"error": "bad_request", "message": "rate is 0..1, fail is N or N-of-M"},
                self.name,
            )
            return
        self.requests += 1
        if fail:
            self.failures += 1
            await _send_json(
                send, status, {"error": "flaky", "message": "failed on purpose"}, self.name
            )
            return
        await _send_json(send, 200, {"ok": True, "request": self.requests}, self.name)


def build_services() -> dict[str, StubService]:
    """A fresh instance of every stub service, by name (the keys of :data:`STUB_PORTS`)."""
    return {
        "users": UsersService(),
        "orders": OrdersService(),
        "catalog": CatalogService(),
        "echo": EchoService(),
        "slow": SlowService(),
        "flaky": FlakyService(),
    }


@dataclass(frozen=True)
class StubTls:
    """Serve HTTPS (tests of TLS to upstreams): a PEM certificate chain and its key,
    and with ``client_ca_file`` ask every client for a certificate of that CA."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


def _hypercorn_config(host: str, port: int, tls: StubTls | None = None) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if tls is not None:
        config.certfile, config.keyfile = tls.cert_file, tls.key_file
        if tls.client_ca_file is not None:
            config.ca_certs = tls.client_ca_file
            config.verify_mode = ssl.CERT_REQUIRED
    config.accesslog = None
    # Quiet by default: hypercorn logs "Running on ..." at INFO; main() prints the ports.
    config.loglevel = "WARNING"
    # Short: shutdown of a test's stubs must not wait on a slow call in flight.
    config.graceful_timeout = 0.5
    return config


async def _serve_one(
    app: StubService,
    host: str,
    port: int,
    tls: StubTls | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def started_binds(*, task_status: trio.TaskStatus[list[str]]) -> None:
        # cast: hypercorn types its apps with its own TypedDict scopes and events.
        await hypercorn_serve(
            cast(Any, app), _hypercorn_config(host, port, tls), task_status=task_status
        )

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(started_binds)
        # hypercorn reports binds as "http://127.0.0.1:54321" (IPv6 as "http://[::1]:p",
        # TLS as "https://...").
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def serve_stubs(
    host: str = "127.0.0.1",
    ports: Mapping[str, int] = STUB_PORTS,
    *,
    services: Mapping[str, StubService] | None = None,
    tls: StubTls | None = None,
    task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the stub services named in ``ports`` until cancelled.

    A port of 0 picks a free one. Once every service listens, ``task_status.started``
    gets the actual port of each by name. ``services`` supplies the app instances (so a
    caller can read their counters); by default fresh ones from :func:`build_services`.
    ``tls`` serves them over HTTPS (:class:`StubTls`).
    Raises KeyError for an unknown service name and OSError when a port is taken.
    """
    apps = dict(services) if services is not None else build_services()
    unknown = sorted(set(ports) - set(apps))
    if unknown:
        raise KeyError(f"unknown stub service(s): {', '.join(unknown)}")
    async with trio.open_nursery() as nursery:
        bound: dict[str, int] = {}
        for name, port in ports.items():
            bound[name] = await nursery.start(_serve_one, apps[name], host, port, tls)
        task_status.started(bound)


@dataclass(frozen=True)
class Stubs:
    """Running stub services: ``ports[name]``, and the app instances for their counters."""

    host: str
    ports: dict[str, int]
    services: dict[str, StubService]

    def target(self, name: str) -> str:
        """``host:port`` of a service, as an upstream target in gateway.toml."""
        return f"{self.host}:{self.ports[name]}"

    def url(self, name: str, path: str = "/") -> str:
        return f"http://{self.target(name)}{path}"

    @property
    def slow(self) -> SlowService:
        service = self.services["slow"]
        assert isinstance(service, SlowService)
        return service

    @property
    def flaky(self) -> FlakyService:
        service = self.services["flaky"]
        assert isinstance(service, FlakyService)
        return service


@asynccontextmanager
async def open_stubs(
    host: str = "127.0.0.1", names: Iterable[str] | None = None, tls: StubTls | None = None
) -> AsyncIterator[Stubs]:
    """Serve the stub services (all, or those in ``names``) on free ports while open;
    over HTTPS with ``tls`` (:class:`StubTls`)."""
    services = build_services()
    wanted = list(STUB_PORTS) if names is None else list(names)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(
            lambda task_status: serve_stubs(
                host,
                dict.fromkeys(wanted, 0),
                services=services,
                tls=tls,
                task_status=task_status,
            )
        )
        try:
            yield Stubs(host=host, ports=ports, services=services)
        finally:
            nursery.cancel_scope.cancel()


def _cannot_bind(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (taken, no such address), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
    except OSError as e:
        return e.strerror or str(e)
    return None


def main(argv: list[str]) -> int:
    """``filtergate stubs [--host H] [--base-port P]``: serve every stub until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="filtergate stubs", description="Serve the demo upstream services."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--base-port",
        type=int,
        default=STUB_PORTS["users"],
        help="port of the first service; the others follow in order "
        "(users, orders, catalog, echo, slow, flaky); 0 picks free ports",
    )
    args = parser.parse_args(argv)
    base: int = args.base_port
    last = 65535 - (len(STUB_PORTS) - 1)
    if base and not 1 <= base <= last:
        parser.error(f"--base-port must be 0 or 1-{last} (the services take {len(STUB_PORTS)})")
    ports = {name: (base + i if base else 0) for i, name in enumerate(STUB_PORTS)}
    for name, port in ports.items():  # name the port that is taken, before serving any
        if port and (why := _cannot_bind(args.host, port)):
            sys.stderr.write(f"filtergate stubs: {args.host}:{port} ({name}): {why}\n")
            return 1

    async def run() -> None:
        # SIGINT and SIGTERM both stop the stubs cleanly (`make run` stops them by TERM).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    lambda task_status: serve_stubs(args.host, ports, task_status=task_status)
                )
                for name, port in bound.items():
                    sys.stdout.write(f"stub {name:<8} http://{args.host}:{port}\n")
                sys.stdout.flush()
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(run)
    except OSError as exc:
        sys.stderr.write(f"filtergate stubs: {exc}\n")
        return 1
    except BaseExceptionGroup as group:
        # A taken port arrives wrapped by the nurseries it crossed: unwrap it here.
        errors, rest = group.split(OSError)
        if errors is None or rest is not None:
            raise
        leaf: BaseException = errors
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        sys.stderr.write(f"filtergate stubs: {leaf}\n")
        return 1
    return 0
