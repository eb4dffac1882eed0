"""The running gateway: config lifecycle, background tasks, reload and shutdown.

:class:`Gateway` owns the :class:`~engine.server.Server`, the current
:class:`~engine.gateway.Runtime` and the tasks that live as long as a config does
(health checks, filters' ``background()``). ``reload`` builds the new runtime beside
the old one and swaps it in one assignment: requests in flight finish on the old one,
and a bad new config is refused while the old one keeps serving.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

from engine import metrics
from engine.config import Config, parse_address
from engine.gateway import Runtime, compile_runtime, route_notes
from engine.metrics import MetricDump
from engine.plugins import Registry, discover
from engine.schema import ConfigError
from engine.server import Server, open_listeners
from engine.sockets import accept_backoff
from engine.upstream import publish_health

__all__ = ["Gateway", "check_addresses", "load_ssl_context"]

log = logging.getLogger("filtergate")

ADMIN_METHODS = (b"GET", b"HEAD")
_CACHE_METHODS = (b"DELETE",)  # /cache: a purge


def load_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``[server] tls``.

    Raises :class:`ConfigError` naming ``server.tls.cert`` or ``server.tls.key``, so that
    ``check``, ``run`` and a reload refuse a bad pair alike, before anything listens.
    """
    tls = config.server.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # Parse the certificate alone first, so that a problem is pinned to one file.
        ssl.create_default_context().load_verify_locations(cafile=tls.cert)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("server.tls.cert", f"{tls.cert}: {_ssl_reason(e)}") from None
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("server.tls.key", f"{tls.key}: {_ssl_reason(e)}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _ssl_reason(e: OSError | ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLError):
        return f"not a usable PEM file ({e.reason or e})"
    return e.strerror or str(e)


def _same_socket(a: str, b: str) -> bool:
    """Whether listening on ``a`` and on ``b`` (``host:port``) would take one address:
    the same port and address family, and the same host or that family's wildcard
    (IPv6 listeners are IPv6-only, so ``0.0.0.0`` and ``[::]`` on one port bind both;
    ``localhost`` binds ``127.0.0.1``)."""
    (ha, pa), (hb, pb) = parse_address(a), parse_address(b)
    if pa != pb or pa == 0:
        return False
    ha, hb = (_address_text(h) for h in (ha, hb))
    if (":" in ha) != (":" in hb):
        return False
    return ha == hb or {ha, hb} & {"0.0.0.0", "::"} != set()


def _address_text(host: str) -> str:
    """One spelling per address (``127.1`` is ``127.0.0.1``, ``0::1`` is ``::1``)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(host))))
    except OSError:
        pass
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def check_addresses(config: Config) -> None:
    """Raise :class:`ConfigError` when two listeners would take one address (the admin
    listener a serving one, or one serving address listed twice): ``check`` must refuse
    what ``run`` could not bind."""
    listen = config.server.listen
    for i, addr in enumerate(listen):
        for j in range(i):
            if _same_socket(listen[j], addr):
                raise ConfigError(f"server.listen[{i}]", f"{addr} is server.listen[{j}]")
    if not config.admin.enabled:
        return
    for i, addr in enumerate(listen):
        if _same_socket(config.admin.listen, addr):
            raise ConfigError("admin.listen", f"{config.admin.listen} is server.listen[{i}]")


_ADMIN_BODY_LIMIT = 1 << 20  # bytes of a request body the admin listener reads past


def _admin_refusal(h: h11.Connection, status: int) -> bytes:
    """The answer to a request the admin listener cannot read (h11's hint: 400, 431)."""
    body = f"{HTTPStatus(status).phrase.lower()}\n".encode()
    head = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    head.append((b"connection", b"close"))
    out = h.send(h11.Response(status_code=status, headers=head)) or b""
    return out + (h.send(h11.Data(data=body)) or b"") + (h.send(h11.EndOfMessage()) or b"")


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _jsonable(value: Any) -> Any:
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that differ between ``old`` and ``new`` but that a reload cannot apply."""
    keys = {
        "server.listen": (old.server.listen, new.server.listen),
        "server.workers": (old.server.workers, new.server.workers),
        "admin.listen": (old.admin.listen, new.admin.listen),
        "admin.enabled": (old.admin.enabled, new.admin.enabled),
    }
    return [key for key, (a, b) in keys.items() if a != b]


def _log_chain_notes(runtime: Runtime) -> None:
    for name, notes in route_notes(runtime).items():
        for note in notes:
            log.warning("route %s: %s", name, note)


def _plugin_path(config: Config, name: str, scope: str) -> str:
    """The key path of a filter instance's table: ``plugins.NAME`` for the global one,
    ``routes[i].plugins.NAME`` for a route's own (scope ``route:ROUTE``)."""
    if scope.startswith("route:"):
        route = scope[len("route:") :]
        for i, r in enumerate(config.routes):
            if r.name == route:
                return f"routes[{i}].plugins.{name}"
    return f"plugins.{name}"


class Gateway:
    """One gateway process: serve ``config`` until cancelled or :meth:`shutdown`."""

    def __init__(
        self,
        config: Config,
        registry: Registry | None = None,
        *,
        extra_plugins: list[tuple[str, object]] | None = None,
        admin: bool = True,
        worker_metrics: Callable[[], Awaitable[list[dict[str, MetricDump]]]] | None = None,
        worker_purge: Callable[[dict[str, Any]], Awaitable[tuple[int, int]]] | None = None,
    ) -> None:
        self.extra_plugins = extra_plugins or []
        self.registry = registry or discover(
            config.discovery.blocked,
            extra=self.extra_plugins,
            entry_points=config.discovery.entry_points,
        )
        self.runtime: Runtime = compile_runtime(config, self.registry)
        self._started = config  # what listeners, workers and admin were made from
        publish_health(self.runtime.pools)
        self._first_process = admin  # the others say nothing the first one says
        if admin:
            _log_chain_notes(self.runtime)
        self.server = Server(self.runtime, load_ssl_context(config))
        # Worker processes leave the admin listener to the first process: one address,
        # one owner. Its /metrics adds up what ``worker_metrics`` gathers from them.
        self.serve_admin = admin and config.admin.enabled
        self.worker_metrics = worker_metrics
        self.worker_purge = worker_purge  # (what the workers dropped, how many did not say)
        self.ports: list[int] = []
        self.admin_port: int | None = None
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[int, trio.CancelScope] = {}
        self._ready = False

    async def _setup(self, runtime: Runtime, previous: Runtime | None = None) -> None:
        # Concurrently: several identity providers that are down must not add up.
        # Instances carried over from the previous config were set up already.
        # A setup that raises is the config's error, named by its key path (exit 2 at
        # start, a refused reload later), never a traceback.
        done = {id(entry[3]) for entry in previous.instances} if previous else set()
        unique = {id(e[3]): e for e in runtime.instances if id(e[3]) not in done}
        failures: list[ConfigError] = []

        async def set_up(name: str, scope: str, setup: Any) -> None:
            try:
                await setup()
            except (Exception, SystemExit) as e:  # (a SystemExit would end the gateway)
                path = _plugin_path(runtime.config, name, scope)
                message = f"filter {name!r} failed to set up: {type(e).__name__}: {e}"
                failures.append(ConfigError(path, message))

        async with trio.open_nursery() as nursery:
            for name, scope, _, instance in unique.values():
                setup = getattr(instance, "setup", None)
                if setup is not None:
                    nursery.start_soon(set_up, name, scope, setup)
        if failures:
            failures.sort(key=lambda e: e.path)
            for other in failures[1:]:
                log.error("%s", other)
            raise failures[0]

    def _start_background(self, runtime: Runtime) -> None:
        assert self._nursery is not None
        wanted: dict[int, Any] = {}
        for *_, instance in runtime.instances:
            if getattr(instance, "background", None) is not None:
                wanted[id(instance)] = instance.background
        for pool in runtime.pools.values():
            if pool.config.health_check is not None:
                wanted[id(pool)] = pool.serve_health_checks
        if runtime.access_log is not None:
            wanted[id(runtime.access_log)] = runtime.access_log.serve
        for key in list(self._scopes):
            if key not in wanted:
                self._scopes.pop(key).cancel()
        for key, fn in wanted.items():
            if key not in self._scopes:
                scope = trio.CancelScope()
                self._scopes[key] = scope
                self._nursery.start_soon(self._run_in_scope, scope, fn)

    @staticmethod
    async def _run_in_scope(scope: trio.CancelScope, fn: Any) -> None:
        with scope:
            try:
                await fn()
            except Exception:
                log.exception("a background task failed")

    async def serve(
        self,
        sockets: list[socket.socket] | None = None,
        *,
        admin_socket: socket.socket | None = None,
        task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status.started(self)`` once accepting.

        ``sockets`` and ``admin_socket`` are listening sockets to use; the addresses of
        the config are bound when they are omitted.
        """
        config = self.runtime.config
        if self.serve_admin and admin_socket is None:
            admin_socket = open_listeners([config.admin.listen])[0]
        if sockets is None:
            sockets = open_listeners(config.server.listen, reuse_port=config.server.workers > 1)
        self.ports = [s.getsockname()[1] for s in sockets]
        await self._setup(self.runtime)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_background(self.runtime)
            if admin_socket is not None:
                self.admin_port = admin_socket.getsockname()[1]
                nursery.start_soon(self._serve_admin, admin_socket)
            await nursery.start(self.server.serve, sockets)
            self._ready = True
            log.info(
                "filtergate serving on %s (%d routes)",
                ", ".join(config.server.listen),
                len(config.routes),
            )
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                for pool in self.runtime.pools.values():
                    pool.close()

    async def reload(self, config: Config) -> None:
        """Swap in ``config``; raises (and keeps the old config) when it is bad."""
        registry = discover(
            config.discovery.blocked,
            extra=self.extra_plugins,
            entry_points=config.discovery.entry_points,
        )
        ssl_context = load_ssl_context(config)
        runtime = compile_runtime(config, registry, previous=self.runtime)
        try:
            await self._setup(runtime, self.runtime)
        except BaseException:
            for name, pool in runtime.pools.items():  # refused: its new pools go too
                if self.runtime.pools.get(name) is not pool:
                    pool.close()
            raise
        old = self.runtime
        for name, pool in runtime.pools.items():
            replaced = old.pools.get(name)
            if replaced is not None and replaced is not pool:
                # What the old pool knows of its names serves on (a reload during a DNS
                # outage must not start from nothing); only once the reload is accepted.
                pool.names.adopt(replaced.names, {(t.host, t.port) for t in pool.targets})
        self.registry = registry
        self.runtime = runtime
        publish_health(runtime.pools)
        self.server.runtime = runtime
        self.server.wake_acceptors()  # max_connections may have changed
        self.server.ssl_context = ssl_context  # new connections; open ones keep theirs
        # Against what this process started with (what is bound), not the last file: a
        # value put back to the running one needs no restart, and a change made over two
        # reloads still does.
        changed = _restart_only_changes(old.config, config)
        for key in _restart_only_changes(self._started, config):
            if key in changed:
                log.warning("%s changed: it takes effect at the next restart, not on reload", key)
        if self._nursery is not None:
            self._start_background(runtime)
        for name, pool in old.pools.items():
            if runtime.pools.get(name) is not pool:
                pool.close()
        log.info("configuration reloaded: %d routes", len(config.routes))
        if self._first_process:
            _log_chain_notes(runtime)

    async def shutdown(self, grace: float | None = None, delay: float | None = None) -> None:
        """Stop accepting, let requests in flight finish within ``grace`` seconds, return.

        First, for ``delay`` seconds (default ``[server] drain_delay``), ``/readyz``
        answers 503 while the gateway still accepts and serves: a load balancer that
        polls it stops sending new connections before the listeners close.
        """
        self._ready = False
        server = self.server
        wait = self.runtime.config.server.drain_delay if delay is None else delay
        if wait > 0:
            log.info("draining: not ready; still accepting for %gs", wait)
            await trio.sleep(wait)
        server.stop_accepting()
        limit = grace if grace is not None else self.runtime.config.server.shutdown_timeout
        with trio.move_on_after(limit) as waited:
            await server.wait_idle()
        if waited.cancelled_caught and server.busy:
            log.warning(
                "shutdown: %d request(s) still in flight after %gs are cut off",
                server.busy,
                limit,
            )
        for pool in self.runtime.pools.values():
            pool.close()

    # -- admin ---------------------------------------------------------------------

    async def _serve_admin(self, sock: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    raw, _ = sock.accept()
                except BlockingIOError:
                    continue
                except OSError as e:
                    # Out of descriptors must not take the gateway down with the admin port.
                    await accept_backoff(e, log)
                    continue
                raw.setblocking(False)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
                nursery.start_soon(self._admin_connection, stream)

    async def _metrics(self) -> bytes:
        if self.worker_metrics is None:
            return metrics.render()
        gathered = await self.worker_metrics()
        return metrics.render_dumps(metrics.merge([metrics.dump(), *gathered]))

    async def _admin_answer(self, path: str) -> tuple[int, bytes, bytes]:
        rt = self.runtime
        if path == "/healthz":
            return 200, b"text/plain", b"ok\n"
        if path == "/readyz":
            return (
                (200, b"text/plain", b"ready\n")
                if self._ready
                else (503, b"text/plain", b"draining\n")
            )
        if path == "/metrics":
            return 200, b"text/plain; version=0.0.4", await self._metrics()
        if path == "/routes":
            doc = [
                {
                    "name": r.config.name,
                    "hosts": r.config.hosts,
                    "path": r.config.path,
                    "prefix": r.config.prefix,
                    "methods": r.config.methods,
                    "upstream": r.config.upstream,
                    "chain": [f"{f.name} ({f.stage.name.lower()})" for f in r.chain.filters],
                }
                for r in rt.routes
            ]
            return 200, b"application/json", json.dumps(doc, indent=2).encode()
        if path == "/plugins":
            # Any filter instance may expose its state with snapshot() (circuit breakers do).
            states: dict[str, Any] = {}
            for name, scope, _cfg, instance in rt.instances:
                snapshot = getattr(instance, "snapshot", None)
                if callable(snapshot):
                    states[f"{name} ({scope})"] = snapshot()
            return (
                200,
                b"application/json",
                json.dumps(states, indent=2, default=_jsonable).encode(),
            )
        if path == "/upstreams":
            doc2 = {name: pool.snapshot() for name, pool in rt.pools.items()}
            return 200, b"application/json", json.dumps(doc2, indent=2).encode()
        return 404, b"text/plain", b"not found\n"

    def purge(self, selector: dict[str, Any]) -> int:
        """Have this process's filters drop the answers they keep (caches) that
        ``selector`` names; how many they dropped. ``route``: a route's name; ``target``:
        the request target as sent upstream, a prefix when it ends in ``*``; either may
        be absent (every route, every target)."""
        route = selector.get("route")
        target: bytes | None = None
        prefix = False
        if selector.get("target") is not None:
            raw = str(selector["target"])
            prefix = raw.endswith("*")
            target = (raw[:-1] if prefix else raw).encode("latin-1")
        dropped = 0
        seen: set[int] = set()
        for *_, instance in self.runtime.instances:
            purge = getattr(instance, "purge", None)
            if purge is not None and id(instance) not in seen:
                seen.add(id(instance))
                dropped += int(purge(route=route, target=target, prefix=prefix))
        return dropped

    async def _admin_purge(self, query: str) -> tuple[int, bytes, bytes]:
        """``DELETE /cache``: purge this process's caches and every worker's."""
        selector: dict[str, Any] = {}
        pairs: list[tuple[str, str]] = []
        for part in query.split("&") if query else ():
            name, eq, value = part.partition("=")
            try:  # percent-decoded as a path is ("+" stays: targets keep it as sent)
                pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
            except UnicodeDecodeError:
                eq = ""
            if not eq:
                return 400, b"text/plain", b"a query of name=value pairs: route, target\n"
        for name, value in pairs:
            if name not in ("route", "target"):
                return 400, b"text/plain", f"unknown parameter {name!r} (route, target)\n".encode()
            if name in selector:
                return 400, b"text/plain", f"{name!r} given twice\n".encode()
            selector[name] = value
        route = selector.get("route")
        if route is not None and all(r.config.name != route for r in self.runtime.routes):
            return 404, b"text/plain", f"no route named {route!r}\n".encode()
        target = selector.get("target")
        if target is not None and not (target.startswith("/") and _latin1(target)):
            return 400, b"text/plain", b"target: the target as sent upstream, from its /\n"
        purged, silent = self.purge(selector), 0
        if self.worker_purge is not None:
            theirs, silent = await self.worker_purge(selector)
            purged += theirs
        doc = {
            "purged": purged,
            "processes": self._started.server.workers,
            "processes_not_answering": silent,
        }
        return 200, b"application/json", json.dumps(doc).encode()

    async def _admin_response(self, h: h11.Connection, request: h11.Request) -> bytes:
        headers: list[tuple[bytes, bytes]] = []
        path, _, query = request.target.decode("latin-1").partition("?")
        allowed = _CACHE_METHODS if path == "/cache" else ADMIN_METHODS
        if request.method in allowed:
            try:
                if path == "/cache":
                    status, ctype, body = await self._admin_purge(query)
                else:
                    status, ctype, body = await self._admin_answer(path)
            except Exception:  # a plugin's snapshot(), purge() or metric: never the end
                log.exception("admin request for %s failed", path)
                status, ctype, body = 500, b"text/plain", b"internal error\n"
        else:
            status, ctype, body = 405, b"text/plain", b"method not allowed\n"
            headers.append((b"allow", b", ".join(allowed)))
        headers += [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        reason = HTTPStatus(status).phrase.encode()
        out = h.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if request.method != b"HEAD":  # h11 refuses a body for HEAD: the head says it all
            out += h.send(h11.Data(data=body)) or b""
        return out + (h.send(h11.EndOfMessage()) or b"")

    async def _admin_connection(self, stream: trio.SocketStream) -> None:
        h = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(10):
                request: h11.Request | None = None
                body = 0
                while True:
                    try:
                        ev = h.next_event()
                    except h11.RemoteProtocolError as e:  # malformed, or a head too large
                        await stream.send_all(_admin_refusal(h, e.error_status_hint))
                        break
                    if ev is h11.NEED_DATA:
                        data = await stream.receive_some(16384)
                        body += len(data)
                        if request is not None and body > _ADMIN_BODY_LIMIT:
                            break  # a body no admin request has: not read for ever
                        h.receive_data(data)
                        continue
                    if type(ev) is h11.Request:
                        # Its body (none is needed) is read first: closing with unread
                        # bytes would reset the connection and lose the answer.
                        request, body = ev, 0
                        continue
                    if type(ev) is h11.EndOfMessage and request is not None:
                        await stream.send_all(await self._admin_response(h, request))
                        break
                    if type(ev) is not h11.Data:
                        break
        except (h11.ProtocolError, trio.BrokenResourceError, OSError):
            pass
        finally:
            stream.socket.close()
