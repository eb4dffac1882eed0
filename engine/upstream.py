"""Upstream pools: keep-alive h11 client connections per target, balancing, health.

Only this module and :mod:`engine.server` touch sockets. A pool hands out connections
with an idle (keep-alive) h11 client state; a connection goes back only when its
response ended cleanly (``EndOfMessage``, no bytes after it, no error). Errors become
the gateway's types where they enter:

* refused / unreachable connect -> the target is ejected for ``eject_cooldown`` and the
  call moves to another target (only connect failures: a request that may have reached
  a server is never replayed); all targets failing -> :class:`UpstreamUnreachable` (502),
  or :class:`UpstreamTimeout` (504) when they all timed out;
* no available target -> :class:`NoHealthyTarget` (503);
* no response head within ``read_timeout`` or the call over its total ``timeout`` ->
  :class:`UpstreamTimeout` (504); garbage -> :class:`BadGateway` (502).
"""

from __future__ import annotations

import logging
import random
import select
from collections.abc import AsyncIterator
from typing import Any

import h11
import trio
from h11._headers import Headers as H11Headers

from engine.config import OutlierConfig, TargetConfig, UpstreamConfig, parse_address
from engine.errors import BadGateway, NoHealthyTarget, UpstreamTimeout, UpstreamUnreachable
from engine.exchange import Headers, Response, UpstreamCall
from engine.metrics import counter, gauge

__all__ = ["Pool", "Target", "UpstreamBodyError"]

log = logging.getLogger("filtergate.upstream")

READ_SIZE = 64 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_METHODS_WITH_BODY = frozenset({b"POST", b"PUT", b"PATCH"})

_requests = counter(
    "filtergate_upstream_requests_total", "Upstream calls by result", ("upstream", "result")
)
_healthy = gauge(
    "filtergate_upstream_target_healthy", "1 when a target is in rotation", ("upstream", "target")
)


class UpstreamBodyError(BadGateway):
    """The upstream failed in the middle of a response body (closed, stalled, garbage).

    When the response head was already relayed, the client connection is aborted so
    the client never takes a truncated body for a complete one.
    """


class _Conn:
    __slots__ = ("h11", "idle_since", "reused", "stream", "target")

    def __init__(self, stream: trio.SocketStream, target: Target) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.target = target
        self.idle_since = 0.0
        self.reused = False

    def looks_dead(self) -> bool:
        # An idle connection with readable bytes is closed (EOF) or broken (garbage):
        # one zero-timeout poll, as urllib3 does, saves a request from a stale socket.
        try:
            readable, _, _ = select.select([self.stream.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class Target:
    """One ``host:port`` of an upstream, with its idle connections and health."""

    def __init__(self, config: TargetConfig) -> None:
        self.address = config.address
        self.host, self.port = parse_address(config.address)
        self.weight = config.weight
        self.idle: list[_Conn] = []
        self.active = 0
        self.current_weight = 0
        self.ejected_until = 0.0
        self.healthy = True  # set by active health checks
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.outlier_until = 0.0
        self.hc_successes = 0
        self.hc_failures = 0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and now >= self.outlier_until


class Pool:
    """The runtime of one ``[upstreams.NAME]``: targets, balancing, connections."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.targets = [Target(t) for t in config.target_list]
        self._by_address = {t.address: t for t in self.targets}
        self._rng = random.Random()
        self._rr = 0
        self.closed = False
        for t in self.targets:
            _healthy.set(1, upstream=name, target=t.address)

    # -- balancing ------------------------------------------------------------------

    def pick(self, exclude: set[str] | frozenset[str], now: float) -> Target:
        """A target for the next call, not in ``exclude``. Raises ``NoHealthyTarget``."""
        ts = [t for t in self.targets if t.available(now) and t.address not in exclude]
        if not ts:
            raise NoHealthyTarget(f"upstream {self.name!r} has no healthy target")
        if len(ts) == 1:
            return ts[0]
        balance = self.config.balance
        if balance == "round_robin":
            # nginx's smooth weighted round robin: even spread, weights honoured.
            total = 0
            best = ts[0]
            for t in ts:
                t.current_weight += t.weight
                total += t.weight
                if t.current_weight > best.current_weight:
                    best = t
            best.current_weight -= total
            return best
        if balance == "least_conn":
            self._rr += 1
            start = self._rr % len(ts)
            rotated = ts[start:] + ts[:start]  # ties broken in turn, not always the first
            return min(rotated, key=lambda t: t.active / t.weight)
        a, b = self._rng.sample(ts, 2)  # power of two choices
        return a if a.active / a.weight <= b.active / b.weight else b

    # -- connections -----------------------------------------------------------------

    async def _connect(self, target: Target, limit: float) -> _Conn:
        with trio.fail_after(limit):
            stream = await trio.open_tcp_stream(target.host, target.port)
        try:
            stream.setsockopt(6, 1, 1)  # TCP_NODELAY (also set by trio; kept explicit)
        except OSError:
            pass
        return _Conn(stream, target)

    def _checkout_idle(self, target: Target, now: float) -> _Conn | None:
        idle = target.idle
        limit = self.config.pool_idle_timeout
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > limit or conn.looks_dead():
                self._discard(conn)
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, conn: _Conn) -> None:
        target = conn.target
        h = conn.h11
        if (
            self.closed
            or h.our_state is not h11.DONE
            or h.their_state is not h11.DONE
            or h.trailing_data[0]
            or len(target.idle) >= self.config.pool_max_idle
        ):
            self._discard(conn)
            return
        try:
            h.start_next_cycle()
        except h11.LocalProtocolError:
            self._discard(conn)
            return
        conn.idle_since = trio.current_time()
        target.idle.append(conn)

    @staticmethod
    def _discard(conn: _Conn) -> None:
        # Closing a socket needs no await; trio's aclose would only add a checkpoint.
        conn.stream.socket.close()

    def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self.closed = True
        for t in self.targets:
            while t.idle:
                self._discard(t.idle.pop())

    # -- passive health: connect failures and outliers ---------------------------------

    def _eject(self, target: Target, now: float) -> None:
        target.ejected_until = now + self.config.eject_cooldown
        log.warning(
            "upstream %s: target %s refused a connection; ejected for %gs",
            self.name,
            target.address,
            self.config.eject_cooldown,
        )

    def record_result(self, address: str | None, failed: bool, now: float) -> None:
        """Feed outlier detection with the outcome of a call to ``address``."""
        outlier: OutlierConfig | None = self.config.outlier
        target = self._by_address.get(address or "")
        if outlier is None or target is None:
            return
        if not failed:
            target.consecutive_failures = 0
            return
        target.consecutive_failures += 1
        if target.consecutive_failures < outlier.consecutive_failures:
            return
        ejected = sum(1 for t in self.targets if now < t.outlier_until)
        if (ejected + 1) * 100 > outlier.max_ejected_percent * len(self.targets):
            return
        target.times_ejected += 1
        duration = min(outlier.base_ejection * target.times_ejected, outlier.max_ejection)
        target.outlier_until = now + duration
        target.consecutive_failures = 0
        log.warning(
            "upstream %s: target %s ejected for %gs after %d consecutive failures",
            self.name,
            target.address,
            duration,
            outlier.consecutive_failures,
        )

    def is_failure_status(self, status: int) -> bool:
        return self.config.outlier is not None and status in self.config.outlier.failure_statuses

    # -- the call --------------------------------------------------------------------

    async def send(
        self,
        call: UpstreamCall,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Response:
        """Send ``call`` and return the response with its body streaming.

        The body stream returns the connection to the pool after its last byte; a
        caller that does not read it must ``aclose()`` the response. Raises the
        gateway errors listed in the module docstring.
        """
        ct = connect_timeout if connect_timeout is not None else self.config.connect_timeout
        rt = read_timeout if read_timeout is not None else self.config.read_timeout
        total = call.timeout if call.timeout is not None else (self.config.timeout or None)
        deadline = trio.current_time() + total if total else float("inf")
        timed_out = 0
        refused = 0
        exclude = set(call.exclude)
        while True:
            now = trio.current_time()
            try:
                target = self.pick(exclude, now)
            except NoHealthyTarget:
                if timed_out and not refused:
                    raise UpstreamTimeout(
                        f"upstream {self.name!r}: connect timed out on every target"
                    ) from None
                if refused:
                    raise UpstreamUnreachable(
                        f"upstream {self.name!r}: no target accepted a connection"
                    ) from None
                raise
            call.target_address = target.address
            conn = self._checkout_idle(target, now)
            if conn is None:
                try:
                    conn = await self._connect(target, min(ct, max(0.0, deadline - now)))
                except trio.TooSlowError:
                    timed_out += 1
                    self._eject(target, trio.current_time())
                    exclude.add(target.address)
                    self.record_result(target.address, True, trio.current_time())
                    continue
                except OSError:
                    refused += 1
                    self._eject(target, trio.current_time())
                    exclude.add(target.address)
                    self.record_result(target.address, True, trio.current_time())
                    continue
            target.active += 1
            try:
                return await self._exchange(call, conn, rt, deadline)
            except _StaleConnection:
                # A reused connection the server had closed: nothing reached it, so
                # the call can go again on a fresh connection to the same target.
                target.active -= 1
                conn.reused = False
                try:
                    conn = await self._connect(target, min(ct, max(0.0, deadline - now)))
                except (trio.TooSlowError, OSError):
                    self._eject(target, trio.current_time())
                    exclude.add(target.address)
                    refused += 1
                    continue
                target.active += 1
                try:
                    return await self._exchange(call, conn, rt, deadline)
                except _StaleConnection:
                    target.active -= 1
                    raise BadGateway(f"upstream {self.name!r} closed the connection") from None
                except BaseException:
                    target.active -= 1
                    raise
            except BaseException:
                target.active -= 1
                raise

    async def _exchange(
        self, call: UpstreamCall, conn: _Conn, read_timeout: float, deadline: float
    ) -> Response:
        h = conn.h11
        stream = conn.stream
        items = call.headers.items
        body = call.body
        framing: list[tuple[bytes, bytes, bytes]] = []
        if body is None:
            if call.method in _METHODS_WITH_BODY:
                framing.append((b"content-length", b"content-length", b"0"))
        elif isinstance(body, bytes):
            framing.append((b"content-length", b"content-length", str(len(body)).encode()))
        elif call.body_length is not None:
            framing.append((b"content-length", b"content-length", str(call.body_length).encode()))
        else:
            framing.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
        full = [(n, n, v) for n, v in items]
        if call.headers.get(b"host") is None:
            host = self.config.host_header or conn.target.address
            full.append((b"host", b"host", host.encode()))
        full += framing
        event = h11.Request(
            method=call.method, target=call.target, headers=H11Headers(full), _parsed=True
        )
        reused = conn.reused
        got_bytes = False
        try:
            with trio.fail_after(max(0.0, deadline - trio.current_time())):
                try:
                    data = h.send(event)
                    if isinstance(body, bytes):
                        data = (data or b"") + (h.send(h11.Data(data=body)) or b"")
                        data += h.send(h11.EndOfMessage()) or b""
                    elif body is None:
                        data = (data or b"") + (h.send(h11.EndOfMessage()) or b"")
                    assert data is not None
                    with trio.fail_after(self.config.write_timeout):
                        await stream.send_all(data)
                    if body is not None and not isinstance(body, bytes):
                        call.body_started = True
                        async for chunk in body:
                            if chunk:
                                with trio.fail_after(self.config.write_timeout):
                                    await stream.send_all(h.send(h11.Data(data=chunk)) or b"")
                        with trio.fail_after(self.config.write_timeout):
                            await stream.send_all(h.send(h11.EndOfMessage()) or b"")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    # The upstream may have answered early and closed; read what it said.
                    if reused and not call.body_started:
                        self._discard(conn)
                        raise _StaleConnection() from None
                # Response head: skip 1xx, keep the final one.
                while True:
                    ev = h.next_event()
                    if ev is h11.NEED_DATA:
                        with trio.fail_after(read_timeout):
                            chunk = await stream.receive_some(READ_SIZE)
                        if chunk:
                            got_bytes = True
                        elif reused and not got_bytes and not call.body_started:
                            self._discard(conn)
                            raise _StaleConnection()
                        h.receive_data(chunk)
                        continue
                    if type(ev) is h11.InformationalResponse:
                        continue
                    if type(ev) is h11.Response:
                        break
                    if type(ev) is h11.ConnectionClosed:
                        raise BadGateway(f"upstream {self.name!r} closed without answering")
                    raise BadGateway(f"upstream {self.name!r} sent an unexpected {ev!r}")
        except trio.TooSlowError:
            self._discard(conn)
            _requests.inc(upstream=self.name, result="timeout")
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except h11.RemoteProtocolError as e:
            self._discard(conn)
            _requests.inc(upstream=self.name, result="garbage")
            raise BadGateway(f"upstream {self.name!r} answered garbage: {e}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._discard(conn)
            _requests.inc(upstream=self.name, result="reset")
            raise BadGateway(f"upstream {self.name!r} reset the connection: {e}") from None
        except BaseException:
            self._discard(conn)
            raise
        _requests.inc(upstream=self.name, result="response")
        headers = Headers([(n, v) for _, n, v in ev.headers._full_items])
        resp = Response(status=ev.status_code, headers=headers, reason=ev.reason)
        resp.stream = _UpstreamBody(self, conn, read_timeout, deadline)
        return resp

    # -- active health checks ----------------------------------------------------------

    async def serve_health_checks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Probe every target forever on the configured interval."""
        hc = self.config.health_check
        task_status.started()
        if hc is None:
            return
        while True:
            async with trio.open_nursery() as nursery:
                for t in self.targets:
                    nursery.start_soon(self._probe, t)
            await trio.sleep(hc.interval)

    async def _probe(self, target: Target) -> None:
        hc = self.config.health_check
        assert hc is not None
        ok = False
        try:
            with trio.fail_after(hc.timeout):
                stream = await trio.open_tcp_stream(target.host, target.port)
                try:
                    h = h11.Connection(h11.CLIENT)
                    host = (self.config.host_header or target.address).encode()
                    req = h11.Request(
                        method=b"GET",
                        target=hc.path.encode(),
                        headers=[(b"host", host), (b"connection", b"close")],
                    )
                    await stream.send_all(
                        (h.send(req) or b"") + (h.send(h11.EndOfMessage()) or b"")
                    )
                    while True:
                        ev = h.next_event()
                        if ev is h11.NEED_DATA:
                            h.receive_data(await stream.receive_some(READ_SIZE))
                            continue
                        if type(ev) is h11.Response:
                            ok = ev.status_code in hc.expected_statuses
                            break
                        if type(ev) is h11.InformationalResponse:
                            continue
                        break
                finally:
                    stream.socket.close()
        except (trio.TooSlowError, OSError, h11.ProtocolError, trio.BrokenResourceError):
            ok = False
        self._record_probe(target, ok)

    def _record_probe(self, target: Target, ok: bool) -> None:
        hc = self.config.health_check
        assert hc is not None
        if ok:
            target.hc_failures = 0
            target.hc_successes += 1
            if not target.healthy and target.hc_successes >= hc.healthy_threshold:
                target.healthy = True
                target.ejected_until = target.outlier_until = 0.0
                _healthy.set(1, upstream=self.name, target=target.address)
                log.warning("upstream %s: target %s is healthy again", self.name, target.address)
            elif target.healthy and (target.ejected_until or target.outlier_until):
                # A passing check brings a passively ejected target back early.
                target.ejected_until = target.outlier_until = 0.0
        else:
            target.hc_successes = 0
            target.hc_failures += 1
            if target.healthy and target.hc_failures >= hc.unhealthy_threshold:
                target.healthy = False
                _healthy.set(0, upstream=self.name, target=target.address)
                log.warning(
                    "upstream %s: target %s failed health checks", self.name, target.address
                )

    def snapshot(self) -> dict[str, Any]:
        """Targets and their state, for the admin listener."""
        now = trio.current_time()
        return {
            "balance": self.config.balance,
            "targets": [
                {
                    "address": t.address,
                    "weight": t.weight,
                    "healthy": t.healthy,
                    "available": t.available(now),
                    "active": t.active,
                    "idle_connections": len(t.idle),
                }
                for t in self.targets
            ],
        }


class _StaleConnection(Exception):
    pass


class _UpstreamBody:
    """The upstream's response body, chunk by chunk; releases the connection at the end."""

    __slots__ = ("_conn", "_deadline", "_done", "_pool", "_read_timeout")

    def __init__(self, pool: Pool, conn: _Conn, read_timeout: float, deadline: float) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        conn = self._conn
        h = conn.h11
        try:
            while True:
                ev = h.next_event()
                if ev is h11.NEED_DATA:
                    timeout = min(self._read_timeout, self._deadline - trio.current_time())
                    with trio.fail_after(max(0.0, timeout)):
                        data = await conn.stream.receive_some(READ_SIZE)
                    h.receive_data(data)
                    continue
                t = type(ev)
                if t is h11.Data:
                    return bytes(ev.data)  # type: ignore[union-attr]
                if t is h11.EndOfMessage:
                    self._finish(clean=True)
                    raise StopAsyncIteration
                raise UpstreamBodyError(f"upstream {self._pool.name!r} ended the body early")
        except trio.TooSlowError:
            self._finish(clean=False)
            raise UpstreamBodyError(
                f"upstream {self._pool.name!r} stalled in the middle of a body"
            ) from None
        except h11.RemoteProtocolError as e:
            self._finish(clean=False)
            raise UpstreamBodyError(f"upstream {self._pool.name!r} broke the body: {e}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._finish(clean=False)
            raise UpstreamBodyError(
                f"upstream {self._pool.name!r} reset the connection: {e}"
            ) from None
        except trio.Cancelled:
            self._finish(clean=False)
            raise

    def _finish(self, clean: bool) -> None:
        if self._done:
            return
        self._done = True
        self._conn.target.active -= 1
        if clean:
            self._pool._release(self._conn)
        else:
            self._pool._discard(self._conn)

    async def aclose(self) -> None:
        """Abandon the rest of the body: the connection is closed, not reused."""
        self._finish(clean=False)
