"""Upstream pools: keep-alive client connections per target, balancing, health.

Only this module and :mod:`engine.server` touch sockets. The gateway writes each
request head itself; h11 parses the responses (:mod:`engine.wire`). A connection goes
back to its pool only when its response ended cleanly (where its framing said, no bytes
after it, no error). A request body is sent while the response is watched for
(RFC 9112 9.5): a final response that comes first (a 413 or 401 right after the head)
stops the sending and is returned, and that connection is never reused. Errors become
the gateway's types where they enter:

* refused / unreachable connect -> the target is ejected for ``eject_cooldown`` and the
  call moves to another target (only connect failures: a request that may have reached
  a server is never replayed); all targets failing -> :class:`UpstreamUnreachable` (502),
  or :class:`UpstreamTimeout` (504) when they all timed out;
* a pooled connection the server had closed -> the call goes again on a new connection
  to the same target, once, when the request did not reach the server whole or has an
  idempotent method (:func:`_safe_to_repeat`); otherwise :class:`UpstreamReset` (502);
* no available target -> :class:`NoHealthyTarget` (503);
* no response head within ``read_timeout`` or the call over its total ``timeout`` ->
  :class:`UpstreamTimeout` (504); garbage -> :class:`BadGateway` (502).
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import math
import os
import random
import re
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import h11
import trio

from engine.config import OutlierConfig, TargetConfig, UpstreamConfig, parse_address
from engine.errors import (
    BadGateway,
    ClientGone,
    GatewayError,
    NoHealthyTarget,
    ServiceUnavailable,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from engine.exchange import END, BodyStream, Exchange, Headers, Response, UpstreamCall
from engine.metrics import before_dump, counter, gauge
from engine.names import Names, is_address, lookup
from engine.sockets import RESOURCE_ERRORS, RawSocket, TlsSocket
from engine.wire import BodyReader, ChunkedReader, Http10Reader, ProtocolError, Reader

__all__ = ["Pool", "Target", "UpstreamBodyError"]

log = logging.getLogger("filtergate.upstream")

READ_SIZE = 64 * 1024
_EOM = h11.EndOfMessage()  # events are immutable: one instance serves every message
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_METHODS_WITH_BODY = frozenset({b"POST", b"PUT", b"PATCH"})
# A method is any token (RFC 9110 9.1): M-SEARCH, VERSION-CONTROL.
_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")

_requests = counter(
    "filtergate_upstream_requests_total", "Upstream calls by result", ("upstream", "result")
)
# Each process keeps its own view of its targets: over several workers, /metrics shows
# 1 only for a target in rotation in every one of them.
_healthy = gauge(
    "filtergate_upstream_target_healthy",
    "1 when a target is in rotation",
    ("upstream", "target"),
    merge="min",
)


#: Seconds an upstream may take to answer before the gateway looks whether the client
#: still waits, and then how often it looks again: a client that has gone makes the
#: call end with :class:`ClientGone` (the connection is let go, and the upstream sees
#: the call end), as nginx and Envoy let go of an abandoned call.
CLIENT_CHECK = 1.0


def _smooth_weighted(targets: list[Target], busy: bool = False) -> Target:
    """nginx's smooth weighted round robin over ``targets`` by their weights; with
    ``busy``, by weight / (calls in flight + 1) (Envoy's weighted least request)."""
    total = 0.0
    best = targets[0]
    for t in targets:
        w = t.weight / (t.active + 1) if busy else t.weight
        t.current_weight += w
        total += w
        if t.current_weight > best.current_weight:
            best = t
    best.current_weight -= total
    return best


def _hash_key(hash_on: str) -> Callable[[Exchange], bytes | None]:
    """What of a request picks its target, for ``hash_on`` (checked at load); None when
    the request has none (no such header or cookie, an anonymous caller)."""
    kind, _, name = hash_on.partition(":")
    wanted = name.lower().encode()
    if wanted == b"host":  # not among the forwarded fields: the client's, as forwarded
        wanted = b"x-forwarded-host"
    if kind == "ip":
        return lambda exchange: exchange.request.client.encode()
    if kind == "path":
        return lambda exchange: exchange.request.path.encode()
    if kind == "consumer":

        def consumer(exchange: Exchange) -> bytes | None:
            identity = exchange.identity
            if identity is None:
                return None
            return f"{identity.source}\0{identity.consumer}".encode()

        return consumer
    if kind == "header":

        def header(exchange: Exchange) -> bytes | None:
            # "a, b" in one field is "a" and "b" in two (RFC 9110 5.3); empty is none.
            parts = [
                p.strip()
                for n, v in exchange.request.headers.items
                if n == wanted
                for p in v.split(b",")
            ]
            key = b",".join(p for p in parts if p)
            return key or None

        return header
    cookie_name = name.encode()

    def cookie(exchange: Exchange) -> bytes | None:
        for n, v in exchange.request.headers.items:
            if n == b"cookie":
                for pair in v.split(b";"):
                    k, eq, value = pair.strip().partition(b"=")
                    if eq and k == cookie_name:
                        return value or None
        return None

    return cookie


_published: Mapping[str, Pool] = {}


def publish_health(pools: Mapping[str, Pool]) -> None:
    """``filtergate_upstream_target_healthy`` for the targets of ``pools`` (those of the
    config serving), and for no other: a pool built by a refused reload must not say a
    target is back, nor a target a reload removed stay exported. Looked at again at
    every scrape: a target is in rotation when active checks pass and no passive
    ejection (a refused connection, outlier detection) holds it out, which time alone
    ends."""
    global _published
    _published = pools
    _refresh_health()


def _refresh_health() -> None:
    try:
        now = trio.current_time()
    except RuntimeError:  # no trio run (a dump outside the gateway): as last published
        return
    _healthy.replace_all(
        {
            (name, t.address): 1.0 if t.available(now) else 0.0
            for name, pool in _published.items()
            for t in pool.targets
        }
    )


before_dump(_refresh_health)


class UpstreamBodyError(BadGateway):
    """The upstream failed in the middle of a response body (closed, stalled, garbage).

    When the response head was already relayed, the client connection is aborted so
    the client never takes a truncated body for a complete one.
    """


#: The largest response head accepted from an upstream.
MAX_RESPONSE_HEAD = 64 * 1024


class _Conn:
    __slots__ = ("generation", "idle_since", "io", "peer", "reused", "target", "wire")

    def __init__(
        self, io: RawSocket | TlsSocket, target: Target, generation: int, peer: Any
    ) -> None:
        self.io = io
        self.generation = generation  # the target's, when its addresses were taken
        self.peer = peer  # the address connected to
        # Empty whenever the connection is idle: it is pooled only when a response
        # ended exactly where its framing said.
        self.wire = Reader(MAX_RESPONSE_HEAD)
        self.target = target
        self.idle_since = 0.0
        self.reused = False

    def looks_dead(self) -> bool:
        # An idle connection with readable bytes is closed (EOF) or broken (garbage):
        # one zero-timeout poll, as urllib3 does, saves a request from a stale socket.
        # poll(), not select(), which fails for descriptors past 1023 (a gateway with
        # thousands of clients has those); not a peeking recv either, whose "nothing
        # there" is an exception, three times the cost. Over TLS, bytes may also wait
        # inside TLS itself, where the socket does not show them.
        io = self.io
        if type(io) is TlsSocket and io.holds_data():
            return True
        fd = io.fileno()
        try:
            _POLL.register(fd, select.POLLIN)
        except (OSError, ValueError):
            return True
        try:
            return bool(_POLL.poll(0))
        finally:
            _POLL.unregister(fd)


# The liveness check's poll object, shared: each check registers, polls and unregisters
# without an await in between, so checks never overlap.
_POLL = select.poll()


# RFC 8305 ("Happy Eyeballs"): the next address is tried when the last one has not
# connected within this, or at once when it failed.
CONNECT_STAGGER = 0.25


async def open_connection(
    host: str, port: int, deadline: float, infos: list[Any] | None = None
) -> RawSocket:
    """A connected non-blocking TCP socket to ``host``, by ``deadline``: the name lookup
    counts against it (``infos``: its addresses, looked up already). Raises ``OSError``
    or ``trio.TooSlowError``.

    A name with several addresses is connected to as Happy Eyeballs does (RFC 8305, as
    trio's ``open_tcp_stream``): the addresses in the resolver's order, the next one
    started when the last has not connected within :data:`CONNECT_STAGGER` or has
    failed, each with the time up to ``deadline``; the first to connect wins and the
    others are closed. So ``localhost`` giving ``::1`` first to a service listening on
    ``127.0.0.1`` only, or an address that drops the attempt, costs at most the stagger.
    A shortage of the gateway's own (out of descriptors) is raised at once, with its
    errno, so that the target is not blamed for it.
    """
    if infos is None:
        infos = await lookup(host, port, deadline)
    if len(infos) == 1:  # an address target: no race to run
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            await _connect(sock, addr, deadline)
        except OSError as e:
            sock.close()
            raise _connect_error(host, port, e) from None
        except BaseException:
            sock.close()
            raise
        return RawSocket(sock)
    infos = _interleave_families(infos)
    failures: list[OSError | trio.TooSlowError] = []
    winner: socket.socket | None = None
    shortage: OSError | None = None

    async def attempt(sock: socket.socket, addr: Any, failed: trio.Event) -> None:
        nonlocal winner
        try:
            await _connect(sock, addr, deadline)
        except (OSError, trio.TooSlowError) as e:
            sock.close()
            failures.append(e)
            failed.set()
            return
        except BaseException:
            sock.close()
            raise
        if winner is None:
            winner = sock
            nursery.cancel_scope.cancel()  # the others lost
        else:
            sock.close()

    no_socket: list[OSError] = []  # addresses of a family this host cannot open
    try:
        async with trio.open_nursery() as nursery:
            for family, type_, proto, _, addr in infos:
                try:
                    sock = socket.socket(family, type_, proto)
                except OSError as e:
                    if e.errno in RESOURCE_ERRORS:
                        shortage = e
                        nursery.cancel_scope.cancel()
                        break
                    no_socket.append(e)  # e.g. IPv6 turned off on this host: the next one
                    continue
                failed = trio.Event()
                nursery.start_soon(attempt, sock, addr, failed)
                with trio.move_on_after(CONNECT_STAGGER):
                    await failed.wait()
    except BaseException:
        # Cancelled from outside (the call's deadline, the client gone) in the pass a
        # winner connected: the winner is nobody's to close but ours.
        if winner is not None:
            winner.close()
        raise
    if winner is not None:
        return RawSocket(winner)
    if shortage is not None:
        raise shortage
    # What the targets did decides: an address that dropped the attempt is a timeout,
    # whatever this host could not open; refused anywhere is refused.
    refused = [f for f in failures if isinstance(f, OSError)]
    if refused or not failures:
        raise _connect_error(host, port, (refused or no_socket)[-1])
    raise trio.TooSlowError


def _connect_error(host: str, port: int, error: OSError) -> OSError:
    """``error`` with the target it is about (its errno kept for the pool's checks)."""
    return OSError(error.errno, f"connect to {host}:{port}: {error.strerror or error}")


def _interleave_families(infos: list[Any]) -> list[Any]:
    """The addresses with their families alternating, the resolver's first family first
    (RFC 8305 4): three dead IPv6 addresses must not hold up the first IPv4 one."""
    families: dict[int, list[Any]] = {}
    for info in infos:
        families.setdefault(info[0], []).append(info)
    if len(families) < 2:
        return infos
    queues = list(families.values())
    out: list[Any] = []
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out


async def _connect(sock: socket.socket, addr: Any, deadline: float) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        with trio.CancelScope(deadline=deadline) as scope:
            await trio.lowlevel.wait_writable(sock)
        if scope.cancelled_caught:
            raise trio.TooSlowError
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def start_tls(
    io: RawSocket, context: ssl.SSLContext, server_name: str, deadline: float
) -> TlsSocket:
    """``io`` with TLS on it, the handshake done and the certificate checked against
    ``server_name`` by ``deadline``. Raises ``trio.TooSlowError``, or ``OSError`` saying
    why the handshake failed (the socket is closed then)."""
    try:
        tls = TlsSocket(io, context, server_name)
        await tls.handshake(deadline)
    except (OSError, ValueError) as e:  # ValueError: a name TLS cannot send (UnicodeError)
        io.close()
        raise OSError(f"TLS handshake with {server_name}: {e}") from None
    except BaseException:
        io.close()
        raise
    return tls


class Target:
    """One ``host:port`` of an upstream, with its idle connections and health."""

    def __init__(self, config: TargetConfig) -> None:
        self.address = config.address
        self.host, self.port = parse_address(config.address)
        self.numeric = is_address(self.host)  # else a name, whose addresses may change
        # Bumped when the name's addresses change: connections made before are let go.
        self.generation = 0
        self.weight = config.weight
        self.idle: list[_Conn] = []
        self.active = 0
        self.current_weight = 0.0  # smooth weighted round robin's running weight
        self.ejected_until = 0.0
        self.healthy = True  # set by active health checks
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.outlier_until = 0.0
        self.hc_successes = 0
        self.hc_failures = 0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until and now >= self.outlier_until


#: Points on the hash ring per unit of a target's weight (ketama uses 160 a server).
RING_POINTS = 160
MAX_RING_POINTS = 100_000


def ring_hash(data: bytes) -> int:
    """A 64-bit hash, the same in every process and instance (Python's ``hash`` of
    bytes is salted per process): a key must reach the same target from each."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """Consistent hashing over targets (ketama): ``RING_POINTS`` points a unit of
    weight, so a target that leaves moves only its own keys, to the next targets."""

    def __init__(self, targets: list[Target]) -> None:
        # Weights in proportion: divided by their greatest common divisor (10, 20, 70
        # are 1, 2, 7), then scaled down to at most MAX_RING_POINTS in all (one point a
        # target at least): the ring is built at load, and bisected per call. A target
        # keeps its points while the divisor and the scale stay what they were.
        unit = math.gcd(*(t.weight for t in targets))
        total = RING_POINTS * sum(t.weight // unit for t in targets)
        scale = min(1.0, MAX_RING_POINTS / total)
        points = sorted(
            (ring_hash(f"{t.address}-{i}".encode()), n)
            for n, t in enumerate(targets)
            for i in range(max(1, round(RING_POINTS * (t.weight // unit) * scale)))
        )
        self.points = [p for p, _ in points]
        self.owners = [targets[n] for _, n in points]
        self.size = len(targets)

    def walk(self, key: bytes) -> Iterator[Target]:
        """Every target once, from ``key``'s place on the ring on."""
        start = bisect.bisect(self.points, ring_hash(key))
        seen: set[int] = set()
        owners = self.owners
        for i in range(len(owners)):
            target = owners[(start + i) % len(owners)]
            if id(target) not in seen:
                seen.add(id(target))
                yield target
                if len(seen) == self.size:
                    return


class Pool:
    """The runtime of one ``[upstreams.NAME]``: targets, balancing, connections."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        self.targets = [Target(t) for t in config.target_list]
        self._by_address = {t.address: t for t in self.targets}
        self._rng = random.Random()
        self._rr = 0
        # Weights that differ make least_conn and random weigh targets, as round robin
        # does; equal ones leave them the plain algorithms.
        self._weighted = len({t.weight for t in self.targets}) > 1
        self._ring = Ring(self.targets) if config.balance == "hash" else None
        self.key_of = _hash_key(config.hash_on or "ip") if self._ring is not None else None
        self.closed = False
        self._host_header = config.host_header.encode() if config.host_header else None
        self._tls = config.ssl_context()
        self.names = Names(name, self._addresses_changed)
        self._count = {
            r: _requests.bind(upstream=name, result=r)
            for r in (
                "response",
                "timeout",
                "garbage",
                "reset",
                "connect_error",
                "no_healthy_target",
            )
        }

    # -- balancing ------------------------------------------------------------------

    def pick(
        self,
        exclude: set[str] | frozenset[str],
        now: float,
        failed: set[str] | frozenset[str] = frozenset(),
        key: bytes | None = None,
    ) -> Target:
        """A target for the next call. Raises ``NoHealthyTarget``.

        ``failed`` targets are never picked; ``exclude`` ones only when nothing else is
        available. With ``balance = "hash"``, ``key``'s target on the ring, or the next
        one there that is available (round robin without a key).
        """
        if key is not None and self._ring is not None:
            second: Target | None = None  # an excluded one, if nothing else is there
            for t in self._ring.walk(key):
                if t.available(now) and t.address not in failed:
                    if t.address not in exclude:
                        return t
                    second = second or t
            if second is not None:
                return second
            raise NoHealthyTarget(f"upstream {self.name!r} has no healthy target")
        ts = [t for t in self.targets if t.available(now) and t.address not in failed]
        if not ts:
            raise NoHealthyTarget(f"upstream {self.name!r} has no healthy target")
        if exclude:
            # ``exclude`` is a preference (a retry would rather go elsewhere), not a
            # reason to fail while an excluded target is still in rotation.
            preferred = [t for t in ts if t.address not in exclude]
            ts = preferred or ts
        if len(ts) == 1:
            return ts[0]
        balance = self.config.balance
        if balance == "round_robin" or balance == "hash":  # (hash: a call without a key)
            # nginx's smooth weighted round robin: even spread, weights honoured.
            return _smooth_weighted(ts)
        if balance == "least_conn":
            if self._weighted:
                # Envoy's weighted least request: round robin by weight / (active + 1).
                # Weights hold at light load (every target idle), and under load a
                # busy target gets less: least active / weight alone ties at 0 when
                # idle, and a 9:1 pool took requests 1:1.
                return _smooth_weighted(ts, busy=True)
            self._rr += 1
            start = self._rr % len(ts)
            rotated = ts[start:] + ts[:start]  # ties broken in turn, not always the first
            return min(rotated, key=lambda t: t.active)
        # Power of two choices; with weights, both drawn by weight (at light load the
        # two tie, and the first drawn wins: the weights hold).
        if self._weighted:
            a, b = self._rng.choices(ts, weights=[t.weight for t in ts], k=2)
        else:
            a, b = self._rng.sample(ts, 2)
        return a if a.active / a.weight <= b.active / b.weight else b

    # -- connections -----------------------------------------------------------------

    async def _connect(self, target: Target, limit: float) -> _Conn:
        deadline = trio.current_time() + limit
        generation = target.generation  # before the addresses: they may move meanwhile
        infos = await self.addresses(target, deadline)
        io = await open_connection(target.host, target.port, deadline, infos)
        try:
            peer = io.sock.getpeername()
        except OSError:
            peer = None
        if self._tls is None:
            return _Conn(io, target, generation, peer)
        name = self.config.tls_server_name or target.host
        try:
            return _Conn(await start_tls(io, self._tls, name, deadline), target, generation, peer)
        except OSError as e:
            log.warning("upstream %s: target %s: %s", self.name, target.address, e)
            raise

    async def addresses(self, target: Target, deadline: float) -> list[Any]:
        """``target``'s addresses for a connection to be made by ``deadline``: an IP
        literal's at once, a name's as :class:`~engine.names.Names` keeps them."""
        if target.numeric:
            return await lookup(target.host, target.port, deadline)
        return await self.names.addresses(target.host, target.port, deadline)

    def _addresses_changed(self, key: tuple[str, int], gone: set[Any]) -> None:
        """A name no longer has the addresses ``gone`` (blue/green behind one name):
        idle connections to them go, connections in use now are not pooled again, and
        an ejection earned by the old addresses ends."""
        for target in self.targets:
            if (target.host, target.port) != key:
                continue
            target.generation += 1
            kept = []
            for conn in target.idle:
                if conn.peer in gone:
                    self._discard(conn)
                else:
                    conn.generation = target.generation  # still listed: stays pooled
                    kept.append(conn)
            target.idle[:] = kept
            target.ejected_until = target.outlier_until = 0.0

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
        """Back to the pool: the response ended cleanly, with nothing after it."""
        target = conn.target
        if (
            self.closed
            or len(target.idle) >= self.config.pool_max_idle
            or conn.generation != target.generation
        ):
            self._discard(conn)
            return
        conn.idle_since = trio.current_time()
        target.idle.append(conn)

    @staticmethod
    def _discard(conn: _Conn) -> None:
        conn.io.close()

    def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self.closed = True
        self.names.close()
        for t in self.targets:
            while t.idle:
                self._discard(t.idle.pop())

    # -- passive health: connect failures and outliers ---------------------------------

    def _eject(self, target: Target, now: float) -> None:
        target.ejected_until = now + self.config.eject_cooldown
        log.warning(
            # Refused, timed out, or (with tls) a failed handshake, logged before this.
            "upstream %s: target %s could not be connected to; ejected for %gs",
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
        request_target = call.target
        method = call.method
        if (
            b" " in request_target
            or b"\r" in request_target
            or b"\n" in request_target
            or not (method.isalpha() or _METHOD.fullmatch(method))
        ):
            # Filters may rewrite these; nothing may break the request line. The
            # gateway's own fault (500): no target is tried, blamed or ejected for it.
            raise GatewayError("cannot forward this request: invalid method or target")
        ct = connect_timeout if connect_timeout is not None else self.config.connect_timeout
        rt = read_timeout if read_timeout is not None else self.config.read_timeout
        deadline = call.deadline
        if deadline is None:  # the first attempt: the whole call ends by this
            total = call.timeout if call.timeout is not None else (self.config.timeout or None)
            deadline = call.deadline = trio.current_time() + total if total else float("inf")
        if call.per_try_timeout is not None:
            deadline = min(deadline, trio.current_time() + call.per_try_timeout)
        timed_out = 0
        refused = 0
        failed: set[str] = set()  # targets that refused this call: never tried again
        while True:
            now = trio.current_time()
            try:
                target = self.pick(call.exclude, now, failed, call.hash_key)
            except NoHealthyTarget:
                if timed_out and not refused:
                    raise UpstreamTimeout(
                        f"upstream {self.name!r}: connect timed out on every target"
                    ) from None
                if refused:
                    raise UpstreamUnreachable(
                        f"upstream {self.name!r}: no target accepted a connection"
                    ) from None
                self._count["no_healthy_target"].inc()
                raise
            call.target_address = target.address
            conn = self._checkout_idle(target, now)
            if conn is None:
                try:
                    conn = await self._connect(target, min(ct, max(0.0, deadline - now)))
                except trio.TooSlowError:
                    timed_out += 1
                    self._connect_failed(target, failed)
                    continue
                except OSError as e:
                    _raise_if_local(e)
                    refused += 1
                    self._connect_failed(target, failed)
                    continue
            target.active += 1
            try:
                try:
                    resp = await self._exchange(call, conn, rt, deadline)
                except _StaleConnection:
                    # A reused connection the server had closed: nothing reached it, so
                    # the call can go again on a fresh connection to the same target.
                    try:
                        left = deadline - trio.current_time()  # (the first exchange took some)
                        conn = await self._connect(target, min(ct, max(0.0, left)))
                    except (trio.TooSlowError, OSError) as e:
                        if isinstance(e, OSError):
                            _raise_if_local(e)  # the handler below releases the target
                        target.active -= 1
                        refused += 1
                        self._connect_failed(target, failed)
                        continue
                    try:
                        resp = await self._exchange(call, conn, rt, deadline)
                    except _StaleConnection:
                        self._count["reset"].inc()
                        raise UpstreamReset(
                            f"upstream {self.name!r} closed the connection without answering"
                        ) from None
            except GatewayError as e:
                target.active -= 1
                # Against the target: not the gateway's shortage (OutOfResources), nor a
                # client's fault met while relaying its body (408 stalled, 413, 400):
                # clients that stop mid-upload must not eject a healthy target.
                if e.status >= 500 and not isinstance(e, OutOfResources):
                    self.record_result(target.address, True, trio.current_time())
                raise
            except BaseException:
                target.active -= 1
                raise
            if self.config.outlier is not None:
                self.record_result(
                    target.address, self.is_failure_status(resp.status), trio.current_time()
                )
            return resp

    def _connect_failed(self, target: Target, failed: set[str]) -> None:
        self._count["connect_error"].inc()
        now = trio.current_time()
        self._eject(target, now)
        failed.add(target.address)
        self.record_result(target.address, True, now)

    async def _exchange(
        self, call: UpstreamCall, conn: _Conn, read_timeout: float, deadline: float
    ) -> Response:
        # The gateway writes the request; h11 parses the response (engine.wire).
        io = conn.io
        body = call.body
        if body is not None:
            call.upgrade = None  # only a request without a body may switch protocols
        method = call.method
        target = call.target
        # The head is written here: every field was validated by h11 when it was parsed
        # or by Headers when a filter set it, and is not validated again.
        head = [method, b" ", target, b" HTTP/1.1\r\n"]
        has_host = False
        for n, v in call.headers.items:
            if n == b"host":
                has_host = True
            head += (n, b": ", v, b"\r\n")
        if not has_host:
            head += (b"host: ", self._host_header or conn.target.address.encode(), b"\r\n")
        chunked = False
        if body is None:
            if call.upgrade is not None:
                head += (b"connection: upgrade\r\nupgrade: ", call.upgrade, b"\r\n")
            if method in _METHODS_WITH_BODY:
                head.append(b"content-length: 0\r\n")
        elif isinstance(body, bytes):
            head.append(b"content-length: %d\r\n" % len(body))
        elif call.body_length is not None:
            head.append(b"content-length: %d\r\n" % call.body_length)
        else:
            head.append(b"transfer-encoding: chunked\r\n")
            chunked = True
        head.append(b"\r\n")
        data = b"".join(head)
        wt = self.config.write_timeout
        sender: _BodySender | None = None
        try:
            try:
                if body is None:
                    await io.send_all(data, wt, deadline)
                elif isinstance(body, bytes):
                    data += body
                    # What the kernel takes at once goes out here, as send_all would;
                    # a rest is sent while the upstream is watched for an early answer.
                    # (Over TLS the sender sends it all: records are not split here.)
                    sent = 0
                    if type(io) is RawSocket:
                        try:
                            sent = io.sock.send(data)
                        except BlockingIOError:
                            pass
                    if sent < len(data):
                        sender = _BodySender(io, data[sent:], None, False, None, wt, deadline)
                else:
                    await io.send_all(data, wt, deadline)
                    call.body_started = True
                    sender = _BodySender(io, b"", body, chunked, call.body_length, wt, deadline)
            except OSError:
                # The upstream may have answered early and closed; read what it said.
                if conn.reused and not call.body_started:
                    self._discard(conn)
                    raise _StaleConnection() from None
            if sender is None:
                ev = await self._response_head(conn, call, read_timeout, deadline, None)
            else:
                ev = await self._send_watching(conn, call, sender, read_timeout, deadline)
        except trio.TooSlowError:
            self._discard(conn)
            self._count["timeout"].inc()
            raise UpstreamTimeout(f"upstream {self.name!r} did not answer in time") from None
        except ProtocolError as e:
            self._discard(conn)
            self._count["garbage"].inc()
            raise BadGateway(f"upstream {self.name!r} answered garbage: {e}") from None
        except BaseException:
            self._discard(conn)
            raise
        self._count["response"].inc()
        items = [(n, v) for _, n, v in ev.headers._full_items]
        if type(ev) is h11.InformationalResponse:  # a 101 to the upgrade asked (see below)
            return self._switched(call, conn, ev, items, read_timeout)
        te = False
        cl: bytes | None = None
        keep_alive = ev.http_version == b"1.1"  # HTTP/1.0 keep-alive is not used (as h11)
        if (sender is not None and not sender.done) or call.upgrade is not None:
            # Answered before the request body went out whole: the connection is in
            # the middle of a request, never to be reused. (Nor is one that was asked
            # to switch protocols and did not: it may still mean to.)
            keep_alive = False
        for n, v in items:
            if n == b"transfer-encoding":
                te = True
            elif n == b"content-length":
                cl = v
            elif n == b"connection" and b"close" in v.lower():
                keep_alive = False
        if te and cl is not None:
            # h11 would read it as chunked; a client behind us might not. Refuse it.
            self._discard(conn)
            self._count["garbage"].inc()
            raise BadGateway(
                f"upstream {self.name!r} sent both Content-Length and Transfer-Encoding"
            )
        headers = Headers(items)
        resp = Response(status=ev.status_code, headers=headers, reason=ev.reason)
        status = ev.status_code
        # The response's framing, as RFC 9112 6.3 (and h11) decide it.
        reader: BodyReader | None = None
        if call.method == b"HEAD" or status == 204 or status == 304:
            length: int | None = 0
        elif te:
            length = None
            reader = ChunkedReader()  # h11 refused any coding but chunked
        elif cl is not None:
            length = int(cl)  # h11 checked it is one well-formed number
        else:
            length = None
            reader = Http10Reader()  # the body ends when the upstream closes
            keep_alive = False
        resp.stream = _UpstreamBody(self, conn, read_timeout, deadline, length, reader, keep_alive)
        return resp

    def _switched(
        self,
        call: UpstreamCall,
        conn: _Conn,
        ev: h11.InformationalResponse,
        items: Any,
        read_timeout: float,
    ) -> Response:
        """The upstream's 101: the connection now speaks the protocol it names, which
        must be one the call asked for; it is handed over, never pooled again."""
        named = b",".join(v for n, v in items if n == b"upgrade")
        protocol = named.split(b",", 1)[0].strip()
        asked = {p.strip().lower() for p in (call.upgrade or b"").split(b",")}
        if not protocol or protocol.lower() not in asked:
            # A 101 to something not asked (or to nothing) would turn the connection
            # into a tunnel the client could send any request through.
            self._discard(conn)
            self._count["garbage"].inc()
            raise BadGateway(
                f"upstream {self.name!r} switched to a protocol that was not asked for"
            )
        resp = Response(status=101, headers=Headers(items), reason=ev.reason)
        resp.upgraded = _Switched(conn, protocol, read_timeout)
        return resp

    async def _response_head(
        self,
        conn: _Conn,
        call: UpstreamCall,
        read_timeout: float,
        deadline: float,
        sender: _BodySender | None,
    ) -> h11.Response | h11.InformationalResponse:
        """The final response head; 1xx ones are skipped, but for the 101 an upgrade
        asked for.

        While ``sender`` still sends the request body, the upstream is watched without
        ``read_timeout`` (which starts once the request is sent): it may answer before
        reading the body. Raises :class:`_StaleConnection`, :class:`UpstreamReset`,
        :class:`BadGateway`, ``ProtocolError`` (garbage) or ``trio.TooSlowError``.
        """
        wire = conn.wire
        io = conn.io
        got_bytes = False
        informational = 0
        # read_timeout bounds the whole head, not each read: an upstream that trickles
        # its head a byte at a time must not hold the request for ever. Each 1xx (at
        # most 10) starts the wait again, as 102 Processing asks.
        until: float | None = None
        look = 0.0  # the next look whether the client still waits
        while True:
            ev = wire.response()
            if ev is None:
                try:
                    if sender is not None and sender.running:
                        chunk = await sender.watch()
                        if chunk is None:
                            continue  # the sending ended: read_timeout from now on
                        if not chunk:
                            sender.stop()  # the upstream closed: nobody reads the rest
                    else:
                        # Just sent: the answer is seldom here yet, so wait before reading.
                        if until is None:
                            now = trio.current_time()
                            until = min(deadline, now + read_timeout)
                            # While the upstream is slow, look whether the client still
                            # waits (see CLIENT_CHECK); a quick answer costs nothing more.
                            # (Plain upstreams only: a TLS one's wait may be flushing
                            # TLS's own bytes, which a look's timeout would cut.)
                            look = (
                                now + CLIENT_CHECK
                                if call.client_gone is not None and type(io) is RawSocket
                                else until
                            )
                        try:
                            chunk = await io.recv_until(min(look, until))
                        except trio.TooSlowError:
                            now = trio.current_time()
                            if look >= until or now < look or call.client_gone is None:
                                raise  # read_timeout, or ended from outside (a shutdown)
                            if call.client_gone():
                                raise ClientGone() from None
                            look = now + CLIENT_CHECK
                            continue
                except OSError as e:
                    self._discard(conn)
                    self._count["reset"].inc()
                    if got_bytes:
                        raise BadGateway(
                            f"upstream {self.name!r} reset the connection: {e}"
                        ) from None
                    raise UpstreamReset(
                        f"upstream {self.name!r} reset the connection: {e}"
                    ) from None
                if chunk:
                    got_bytes = True
                elif not got_bytes or not wire:
                    self._discard(conn)
                    # A request that went out whole may have been acted on before the
                    # server closed, so only a call safe to repeat goes again.
                    if (
                        not got_bytes
                        and conn.reused
                        and not call.body_started
                        and (_safe_to_repeat(call) or (sender is not None and sender.failed))
                    ):
                        raise _StaleConnection()
                    self._count["reset"].inc()
                    raise UpstreamReset(
                        f"upstream {self.name!r} closed the connection without answering"
                    )
                wire.feed(chunk)
                continue
            if type(ev) is h11.Response:
                if ev.status_code > 599:  # h11 takes any three digits; HTTP ends at 599
                    raise ProtocolError(f"status {ev.status_code} is not an HTTP status")
                return ev
            if ev.status_code == 101:
                if call.upgrade is not None:
                    return ev  # the switch asked for (checked by _switched)
                raise BadGateway(f"upstream {self.name!r} switched protocols unasked")
            informational += 1
            if informational > 10:  # an upstream may not stall us with 1xx forever
                raise BadGateway(f"upstream {self.name!r} sent too many 1xx responses")
            until = None

    async def _send_watching(
        self,
        conn: _Conn,
        call: UpstreamCall,
        sender: _BodySender,
        read_timeout: float,
        deadline: float,
    ) -> h11.Response | h11.InformationalResponse:
        """The final response head, read while ``sender`` sends the request body.

        RFC 9112 9.5: a client sending a body should watch for an error response
        meanwhile. An upstream that refuses a request (413, 401) may answer right
        after its head and never read the body; a final head that comes first stops
        the sending (``sender.done`` stays false). Raises as :meth:`_response_head`,
        and what the sending raises (``trio.TooSlowError``, :class:`BadGateway`, the
        errors of the client's body stream), unwrapped from the nursery.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender.run)
                ev = await self._response_head(conn, call, read_timeout, deadline, sender)
                sender.stop()
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        return ev

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
                deadline = trio.current_time() + hc.timeout
                infos = await self.addresses(target, deadline)
                raw = await open_connection(target.host, target.port, deadline, infos)
                tcp = trio.SocketStream(trio.socket.from_stdlib_socket(raw.sock))
                stream: trio.abc.Stream = tcp
                try:
                    if self._tls is not None:
                        name = self.config.tls_server_name or target.host
                        stream = trio.SSLStream(tcp, self._tls, server_hostname=name)
                    h = h11.Connection(h11.CLIENT)
                    host = (self.config.host_header or target.address).encode()
                    req = h11.Request(
                        method=b"GET",
                        target=hc.path.encode(),
                        headers=[(b"host", host), (b"connection", b"close")],
                    )
                    await stream.send_all((h.send(req) or b"") + (h.send(_EOM) or b""))
                    while True:
                        ev = h.next_event()
                        if ev is h11.NEED_DATA:
                            h.receive_data(bytes(await stream.receive_some(READ_SIZE)))
                            continue
                        if type(ev) is h11.Response:
                            ok = ev.status_code in hc.expected_statuses
                            break
                        if type(ev) is h11.InformationalResponse:
                            continue
                        break
                finally:
                    tcp.socket.close()
        except OSError as e:
            if e.errno in RESOURCE_ERRORS or e.errno == errno.EADDRNOTAVAIL:
                return  # the gateway's own shortage says nothing about the target
            ok = False
        except (trio.TooSlowError, h11.ProtocolError, trio.BrokenResourceError):
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
                log.warning("upstream %s: target %s is healthy again", self.name, target.address)
            elif target.healthy and (target.ejected_until or target.outlier_until):
                # A passing check brings a passively ejected target back early.
                target.ejected_until = target.outlier_until = 0.0
        else:
            target.hc_successes = 0
            target.hc_failures += 1
            if target.healthy and target.hc_failures >= hc.unhealthy_threshold:
                target.healthy = False
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


class OutOfResources(ServiceUnavailable):
    """503: an upstream connection could not be opened for want of the gateway's own
    resources (descriptors, memory). It says nothing about the target."""


def _raise_if_local(error: OSError) -> None:
    """Raise :class:`OutOfResources` for a connect that failed for want of the gateway's
    own resources (descriptors, memory, local ports: EADDRNOTAVAIL): the target must not
    be ejected or counted against for it."""
    if error.errno in RESOURCE_ERRORS or error.errno == errno.EADDRNOTAVAIL:
        log.warning("cannot open an upstream connection: %s", error)
        raise OutOfResources(f"the gateway is out of resources ({error.strerror})") from None


class _StaleConnection(Exception):
    """A reused connection that the server had closed: the call can go again on a new one.

    Raised when writing the request failed (it did not reach the server whole), or when
    the server closed without a byte of a response to a :func:`_safe_to_repeat` call.
    """


class _BodySender:
    """Sends the rest of a request (its body) in a task of its own.

    ``done`` once the request went out whole; ``failed`` when a write failed (the
    upstream stopped reading: its answer, if it sent one, is read all the same).
    """

    __slots__ = (
        "_body",
        "_chunked",
        "_data",
        "_deadline",
        "_io",
        "_length",
        "_scope",
        "_wake",
        "_write_timeout",
        "done",
        "failed",
        "running",
    )

    def __init__(
        self,
        io: RawSocket | TlsSocket,
        data: bytes,
        body: BodyStream | None,
        chunked: bool,
        length: int | None,
        write_timeout: float,
        deadline: float,
    ) -> None:
        self._io = io
        self._data = data
        self._body = body
        self._chunked = chunked
        self._length = length
        self._write_timeout = write_timeout
        self._deadline = deadline
        self._scope = trio.CancelScope()
        self._wake: trio.CancelScope | None = None
        self.running = True
        self.done = False
        self.failed = False

    async def run(self) -> None:
        try:
            with self._scope:
                await self._send()
                self.done = True
        except OSError:
            self.failed = True
        finally:
            self.running = False
            if self._wake is not None:
                self._wake.cancel()  # ends a watch in progress: the reading goes on

    async def _send(self) -> None:
        io = self._io
        wt = self._write_timeout
        deadline = self._deadline
        if self._data:
            await io.send_all(self._data, wt, deadline)
        body = self._body
        if body is None:
            return
        chunked = self._chunked
        length = self._length
        sent = 0
        async for chunk in body:
            if chunk:
                sent += len(chunk)
                if chunked:
                    chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
                await io.send_all(chunk, wt, deadline)
                if not chunked:
                    # Sent whole with its last byte: the answer may come before the
                    # stream has said that it ended.
                    self.done = sent == length
                await trio.lowlevel.checkpoint()
        if chunked:
            await io.send_all(b"0\r\n\r\n", wt, deadline)
        elif sent != length:
            raise BadGateway("the request body did not match its Content-Length")

    def stop(self) -> None:
        """Send no more (the upstream answered or closed); no-op once ended."""
        self._scope.cancel()

    async def watch(self) -> bytes | None:
        """What the upstream sends next (``b""`` when it closed), or ``None`` when the
        sending ended first. Raises ``OSError``; ``trio.TooSlowError`` when a write
        timed out (the sender raises that too)."""
        with trio.CancelScope() as wake:
            self._wake = wake
            try:
                return await self._io.recv_until(math.inf)
            except trio.ClosedResourceError:
                # expire() ends every wait on the socket, this one too.
                raise trio.TooSlowError from None
        return None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What to raise for the errors of a nursery's tasks: the first that is not a
    cancellation (a write timeout ends the watch too), else the group itself."""
    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return group
    leaf: BaseException = rest
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _safe_to_repeat(call: UpstreamCall) -> bool:
    """Whether ``call`` may be sent again after the server may have received it.

    RFC 9110 9.2.2 and RFC 9112 9.3.1: a proxy must not retry a non-idempotent request
    on its own. Not even one with an ``Idempotency-Key``: the gateway cannot know that
    the upstream honours the key (nginx never replays a POST either). A route that
    knows better can say so with the ``retry`` plugin's ``methods``.
    """
    return call.method in IDEMPOTENT


_END = END  # what _UpstreamBody.poll returns when the body is complete


class _Switched:
    """An upstream connection a 101 switched to ``protocol``: its socket, with what the
    upstream sent after the 101's head, and the call's ``read_timeout`` (the relay's
    idle limit). Closed (never pooled) when dropped."""

    __slots__ = ("_done", "conn", "idle", "protocol")

    def __init__(self, conn: _Conn, protocol: bytes, idle: float) -> None:
        self.conn = conn
        self.protocol = protocol
        self.idle = idle
        self._done = False

    @property
    def io(self) -> RawSocket | TlsSocket:
        return self.conn.io

    def take(self) -> bytes:
        """What the upstream sent past the 101's head, already read."""
        return self.conn.wire.take()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.conn.target.active -= 1
            self.conn.io.close()

    async def aclose(self) -> None:
        self.close()


class _UpstreamBody:
    """The upstream's response body, chunk by chunk; releases the connection at the end.

    A body with a Content-Length is relayed as the bytes arrive, counted, without
    passing each chunk through h11 (there is nothing to parse in it); chunked and
    close-delimited bodies are read by h11. A connection is reused only when the
    response allowed it and ended exactly where its framing said.
    """

    __slots__ = (
        "_conn",
        "_deadline",
        "_done",
        "_keep_alive",
        "_pending",
        "_pool",
        "_read_timeout",
        "_reader",
        "_remaining",
        "length",
    )

    def __init__(
        self,
        pool: Pool,
        conn: _Conn,
        read_timeout: float,
        deadline: float,
        length: int | None,
        reader: BodyReader | None,
        keep_alive: bool,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._done = False
        self._keep_alive = keep_alive
        # The body's length as the upstream's framing says (0 for HEAD, 204 and 304,
        # whatever Content-Length they carry); None: chunked or close-delimited.
        self.length = length
        self._remaining = length
        self._reader = reader
        self._pending = b""
        if length is not None:
            # What was read past the head is the start of the body.
            buffered = conn.wire.take()
            if len(buffered) > length:
                buffered = buffered[:length]
                self._keep_alive = False  # bytes after the body: never reuse
            self._pending = buffered
            self._remaining = length - len(buffered)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def poll(self) -> Any:
        """The next chunk if it is already here, ``_END`` at the end, else ``None``.

        Raises :class:`UpstreamBodyError` like ``__anext__``; never does I/O.
        """
        if self._done:
            return _END
        if self._remaining is not None:
            if self._pending:
                chunk, self._pending = self._pending, b""
                return chunk
            if self._remaining == 0:
                self._finish(clean=True)
                return _END
            return None
        assert self._reader is not None
        try:
            ev = self._conn.wire.body(self._reader)
        except ProtocolError as e:
            self._finish(clean=False)
            raise UpstreamBodyError(f"upstream {self._pool.name!r} broke the body: {e}") from None
        if ev is None:
            return None
        if type(ev) is h11.Data:
            return bytes(ev.data)
        self._finish(clean=True)  # EndOfMessage
        return _END

    async def __anext__(self) -> bytes:
        while True:
            chunk = self.poll()
            if chunk is _END:
                raise StopAsyncIteration
            if chunk is not None:
                return chunk  # type: ignore[no-any-return]
            await self._receive()

    async def _receive(self) -> None:
        """Read what the upstream sends next, for ``poll`` to hand out.

        Raises :class:`UpstreamBodyError` (and ends the body) on a stall, a reset, or a
        Content-Length body that ends early.
        """
        conn = self._conn
        try:
            data = await conn.io.recv(self._read_timeout, self._deadline)
            if self._remaining is None:
                if not data and type(conn.io) is TlsSocket and conn.io.ragged_eof:
                    # Closed without TLS's close_notify: for a body only the close ends,
                    # the end is unproven (RFC 9112 9.8); chunked framing is cut anyway.
                    raise OSError("the connection closed without TLS close_notify")
                conn.wire.feed(data)  # h11 frames it: EOF may be the end
                return
            if not data:
                raise UpstreamBodyError(f"upstream {self._pool.name!r} ended the body early")
            if len(data) > self._remaining:
                data = data[: self._remaining]
                self._keep_alive = False  # bytes after the body: never reuse
            self._remaining -= len(data)
            self._pending = data
        except trio.TooSlowError:
            self._finish(clean=False)
            raise UpstreamBodyError(
                f"upstream {self._pool.name!r} stalled in the middle of a body"
            ) from None
        except OSError as e:
            self._finish(clean=False)
            raise UpstreamBodyError(
                f"upstream {self._pool.name!r} reset the connection: {e}"
            ) from None
        except BaseException:
            self._finish(clean=False)
            raise

    def _finish(self, clean: bool) -> None:
        if self._done:
            return
        self._done = True
        self._conn.target.active -= 1
        conn = self._conn
        if clean and self._keep_alive and (self._remaining is not None or not conn.wire):
            self._pool._release(conn)
        else:
            self._pool._discard(conn)

    async def aclose(self) -> None:
        """Abandon the rest of the body: the connection is closed, not reused."""
        self._finish(clean=False)
