"""The shared store: counters in Redis, one atomic Lua script per decision.

Every decision is a single ``EVALSHA`` (``EVAL`` when the server answers ``NOSCRIPT``,
e.g. after a restart) of the algorithm's script over all the quotas of a policy. The
script reads the server's clock with ``TIME``, so gateways with skewed clocks enforce
one limit, and it counts the request in every quota or in none. All keys of one
decision share a hash tag, so they live in one slot should the server be a cluster.

The client underneath is deliberately small: RESP over trio TCP streams (TLS for
``rediss://``, verified against the system's CAs or a given bundle), parsed by
``hiredis.Reader``; a pool of at most ``pool_size`` connections, made on demand; every
command bounded by ``timeout`` (waiting for a connection included). A connection that
failed or timed out mid-command is closed, never reused, so reconnection is simply the
next command making a new one.

With Redis Sentinel (:class:`Sentinels`), the pool asks the sentinels where the master
is before it connects, checks with ``ROLE`` that it reached a master, and asks again
every ``SENTINEL_POLL`` seconds in the background (:meth:`RedisPool.watch`): after a
failover, idle connections to the old master are closed and the next command connects
to the new one. Without Sentinel the same holds for a name whose address moves (a
managed Redis' primary endpoint): a ``READONLY`` reply, a master demoted to replica,
closes the pool's connections, so the next one looks the name up again.

With Redis Cluster (:class:`RedisCluster`), a pool per master; each decision goes to the
master of its keys' slot (one hash tag: one slot), following ``MOVED`` and ``ASK``
redirections, and a master's failure is its slots' alone (below).

When Redis fails, the store raises :class:`~plugins.rate_limit.store.StoreUnavailable`
and, for ``retry_interval`` seconds, answers every decision that way without touching
the network (so a dead server costs no request a timeout); then one decision probes
the server while the others keep failing fast, and the first success restores service.
With a cluster, this holds per master: the decisions of the slots a failing master
serves fail fast, the others go on.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import logging
import os
import re
import ssl
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import trio

from plugins.rate_limit.algorithms import Verdict
from plugins.rate_limit.store import Outcome, Policy, StoreUnavailable, combine

__all__ = [
    "CLUSTER_SLOTS",
    "AnyPool",
    "RedisAddress",
    "RedisCluster",
    "RedisError",
    "RedisMigrating",
    "RedisPool",
    "RedisReplyError",
    "RedisStore",
    "RedisUnavailable",
    "Sentinels",
    "key_slot",
    "parse_redis_url",
    "parse_sentinel_node",
    "shared_pool",
]

log = logging.getLogger("filtergate.plugins.rate-limit")

#: A write refused by a replica: ``READONLY ...`` (Redis 7), or inside a script's error
#: before Redis 7 (``ERR Error running script ...: -READONLY You can't write ...``).
_READONLY = re.compile(r"(?:^|-)READONLY ")

#: Seconds between two questions to the sentinels about where the master is. A failover
#: is seen this long after the sentinels announce it at the latest; a connection error
#: or a ``READONLY`` reply makes the pool ask at once.
SENTINEL_POLL = 1.0
SENTINEL_PORT = 26379


class RedisError(Exception):
    """Base of the Redis client's errors."""


class RedisUnavailable(RedisError):
    """No answer: cannot connect, connection lost, timed out, or garbled protocol."""


class RedisMigrating(RedisUnavailable):
    """A cluster slot stayed in migration (``TRYAGAIN``) past the command's timeout: no
    failure of the master's."""


class _ConnectionLost(RedisUnavailable):
    """The server closed the connection."""


class RedisReplyError(RedisError):
    """The server answered with an error reply (``-ERR ...``, ``-NOSCRIPT ...``)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = None
    tls: bool = False  # rediss://


@dataclass(frozen=True, slots=True)
class Sentinels:
    """Redis Sentinel: the master named ``master``, as ``nodes`` (host, port) know it."""

    master: str
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        nodes = ", ".join(_host_port(n) for n in self.nodes)
        return f"master {self.master!r} of sentinels {nodes}"


def _host_port(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sentinel_node(node: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` of a sentinel (port 26379 by default);
    ``ValueError`` with a message for the user."""
    parts = urlsplit(f"//{node}")
    try:
        port = SENTINEL_PORT if parts.port is None else parts.port
    except ValueError:
        raise ValueError(f"bad port in {node!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {node!r}")
    host = parts.hostname
    if not host or parts.netloc != node or "@" in node:
        raise ValueError(f'expected "host:port", got {node!r}')
    return host, port


def parse_redis_url(
    url: str, password: str | None = None, *, host_required: bool = True
) -> RedisAddress:
    """The address in ``redis://[[user]:password@]host[:port][/db]`` (``rediss://``:
    the same over TLS).

    ``password``, when given, overrides the URL's. Without ``host_required`` (the
    sentinels say where the master is), the host may be left out. Raises
    ``ValueError`` with a message for the user.
    """
    parts = urlsplit(url)
    shown = _without_password(url)  # error messages end up in logs and terminals
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f'expected a URL like "redis://127.0.0.1:6379/0" or "rediss://...", got {shown!r}'
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {shown!r}") from None
    host = parts.hostname or ""
    if not host and host_required:
        raise ValueError(f"no host in {shown!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        # The shown URL, not the path: an unencoded "/" in a password ends up there.
        raise ValueError(f"expected a database number after the port in {shown!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"unexpected query or fragment in {shown!r}")
    return RedisAddress(
        host=host,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=password
        if password is not None
        else (unquote(parts.password) if parts.password is not None else None),
        tls=parts.scheme == "rediss",
    )


def _without_password(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostpart}"


def _encode(args: Sequence[bytes | str | int | float]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = repr(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


_ASKING = _encode([b"ASKING"])


class _Connection:
    __slots__ = ("address", "reader", "stream")

    def __init__(self, stream: trio.abc.Stream, address: tuple[str, int]) -> None:
        self.stream = stream
        self.address = address
        self.reader = hiredis.Reader()

    async def roundtrip(self, payload: bytes, replies: int = 1) -> Any:
        """Send ``replies`` commands (one by default), return the last reply, or the
        first error reply (a ``hiredis.ReplyError`` is returned, not raised)."""
        await self.stream.send_all(payload)
        reader = self.reader
        first_error: Any = None
        while True:
            reply = reader.gets()
            if reply is not False:
                replies -= 1
                if isinstance(reply, hiredis.ReplyError) and first_error is None:
                    first_error = reply
                if not replies:
                    return first_error if first_error is not None else reply
                continue
            data = await self.stream.receive_some(65536)
            if not data:
                raise _ConnectionLost("connection closed by the server")
            reader.feed(bytes(data))  # a TLS stream may give a bytearray


class _Turns:
    """A job that the users of a shared object run one at a time: when the one running it
    leaves (its task cancelled), another that waits takes over."""

    def __init__(self) -> None:
        self._busy = False
        self._left = trio.Event()

    async def take(self, job: Callable[[], Awaitable[None]], closed: Callable[[], bool]) -> None:
        """Run ``job`` when no other user does, until ``closed()``; returns then."""
        while not closed():
            if self._busy:
                await self._left.wait()
                continue
            self._busy = True
            try:
                await job()
            finally:
                self._busy = False
                self._left.set()
                self._left = trio.Event()


class RedisPool:
    """At most ``pool_size`` connections to one server, each command within ``timeout``.

    With ``sentinels`` the server is the master they name: see the module docstring.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout: float,
        pool_size: int,
        ssl_context: ssl.SSLContext | None = None,
        sentinels: Sentinels | None = None,
    ) -> None:
        """``ssl_context`` verifies a ``rediss://`` server (default: the system's CAs)."""
        if sentinels is not None and address.tls:
            raise ValueError("rediss:// is not supported with Redis Sentinel")
        self.address = address
        self.timeout = timeout
        self.sentinels = sentinels
        self._ssl_context = (ssl_context or ssl.create_default_context()) if address.tls else None
        self._limiter = trio.CapacityLimiter(pool_size)
        self._idle: list[_Connection] = []
        self._closed = False
        # Where the master is, as the sentinels last said; None: ask them. The last one
        # known stays as a fallback for when no sentinel answers (ROLE checks it).
        self._master: tuple[str, int] | None = None
        self._last_master: tuple[str, int] | None = None
        self._nodes = list(sentinels.nodes) if sentinels is not None else []
        self._asking = trio.Lock()  # one question to the sentinels at a time
        # Users that :meth:`serve`; one of them at a time runs :meth:`watch`.
        self._users = 0
        self._served = False  # whether users serve it (then the last one leaving closes)
        self._watcher = _Turns()  # one user's serve() at a time runs watch()

    @property
    def where(self) -> str:
        """The server, for log lines."""
        if self.sentinels is None:
            return _host_port((self.address.host, self.address.port))
        if self._master is None:
            return str(self.sentinels)
        return f"{self.sentinels} (at {_host_port(self._master)})"

    async def _locate(self) -> tuple[str, int]:
        if self.sentinels is None:
            return self.address.host, self.address.port
        if self._master is not None:
            return self._master
        async with self._asking:
            if self._master is None:
                try:
                    # Each sentinel gets its share of the decision's time: one that
                    # hangs must not use it all.
                    master = await self._ask_sentinels(
                        self.sentinels, self.timeout / len(self._nodes)
                    )
                except RedisUnavailable:
                    if self._last_master is None:
                        raise
                    master = self._last_master  # ROLE will say whether it still is
                self._set_master(master)
            assert self._master is not None
            return self._master

    def _set_master(self, master: tuple[str, int]) -> None:
        self._master = self._last_master = master

    async def _ask_sentinels(self, sentinels: Sentinels, each: float) -> tuple[str, int]:
        """The master's address from the first sentinel that knows it, each given
        ``each`` seconds; that sentinel is asked first next time."""
        failures: list[str] = []
        for node in list(self._nodes):
            with trio.move_on_after(each):
                answer = await self._ask_one(sentinels, node, failures)
                if answer is not None:
                    return answer
                continue
            failures.append(f"{_host_port(node)}: no answer within {each:g}s")
        raise RedisUnavailable(f"no sentinel named the master ({'; '.join(failures)})")

    async def _ask_one(
        self, sentinels: Sentinels, node: tuple[str, int], failures: list[str]
    ) -> tuple[str, int] | None:
        """One sentinel's answer, or None with the reason added to ``failures``."""
        where = _host_port(node)
        try:
            stream = await trio.open_tcp_stream(*node)
        except OSError as e:
            failures.append(f"{where}: {_connect_failure(e)}")
            return None
        try:
            conn = _Connection(stream, node)
            reply = None
            if sentinels.password is not None:
                auth = [sentinels.username, sentinels.password]
                reply = await conn.roundtrip(_encode(["AUTH", *(a for a in auth if a)]))
            if not isinstance(reply, hiredis.ReplyError):
                reply = await conn.roundtrip(
                    _encode(["SENTINEL", "get-master-addr-by-name", sentinels.master])
                )
        except (RedisError, OSError, trio.BrokenResourceError, hiredis.ProtocolError) as e:
            failures.append(f"{where}: {e}")
            return None
        finally:
            await trio.aclose_forcefully(stream)
        if isinstance(reply, hiredis.ReplyError):
            failures.append(f"{where}: {reply}")
            return None
        if reply is None:
            failures.append(f"{where}: does not know {sentinels.master!r}")
            return None
        try:
            host, port = reply[0].decode(), int(reply[1])
        except (TypeError, ValueError, IndexError, AttributeError, UnicodeError):
            failures.append(f"{where}: unexpected reply {reply!r}")
            return None
        if node != self._nodes[0]:
            self._nodes.remove(node)
            self._nodes.insert(0, node)
        return host, port

    def _forget(self, address: tuple[str, int]) -> None:
        """``address`` failed or is no master now: ask the sentinels again before the
        next connection, and close the idle connections to it."""
        if self._master == address:
            self._master = None
        self._drop_idle(address, to_it=True)

    def _drop_idle(self, address: tuple[str, int], *, to_it: bool) -> None:
        """Close the idle connections to ``address`` (``to_it``) or to any other."""
        keep = []
        for conn in self._idle:
            if (conn.address == address) == to_it:
                _close_now(conn)
            else:
                keep.append(conn)
        self._idle = keep

    async def _connect(self) -> _Connection:
        a = self.address
        host, port = await self._locate()
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except OSError:
            if self.sentinels is not None:
                self._forget((host, port))
            raise
        conn = _Connection(stream, (host, port))
        try:
            if self._ssl_context is not None:
                # The certificate is checked against the URL's host, as redis-cli does.
                tls = trio.SSLStream(stream, self._ssl_context, server_hostname=a.host)
                await tls.do_handshake()
                conn = _Connection(tls, (host, port))
            if a.password is not None:
                auth = ["AUTH", a.username, a.password] if a.username else ["AUTH", a.password]
                self._check(await conn.roundtrip(_encode(auth)))
            if a.db:
                self._check(await conn.roundtrip(_encode(["SELECT", a.db])))
            if self.sentinels is not None:
                role = self._check(await conn.roundtrip(_encode(["ROLE"])))
                if not role or role[0] != b"master":
                    self._forget((host, port))
                    raise RedisUnavailable(
                        f"{_host_port((host, port))}, named master by the sentinels, is "
                        "not a master (a failover under way?)"
                    )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return conn

    @staticmethod
    def _check(reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            raise RedisUnavailable(f"connection set-up refused: {reply}")
        return reply

    async def execute(self, *args: bytes | str | int | float, asking: bool = False) -> Any:
        """The reply to one command (after ``ASKING``, for a Redis Cluster's ``ASK``
        redirection, with ``asking``).

        Raises :class:`RedisReplyError` for an error reply and :class:`RedisUnavailable`
        when there is no reply within ``timeout``, the connection fails, or the server
        is a read-only replica now.
        """
        if self._closed:
            raise RedisUnavailable("the pool is closed")
        payload = _encode(args)
        replies = 1
        if asking:
            payload, replies = _ASKING + payload, 2
        reply: Any = None
        with trio.move_on_after(self.timeout) as scope:
            async with self._limiter:
                conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                try:
                    if conn is None:
                        conn = await self._connect()
                    try:
                        reply = await conn.roundtrip(payload, replies)
                    except (_ConnectionLost, trio.BrokenResourceError, OSError) as e:
                        if not reused:
                            raise
                        # A pooled connection the server closed while idle (restart,
                        # timeout): try once more on a fresh one.
                        log.debug("pooled Redis connection was dead (%s); reconnecting", e)
                        await trio.aclose_forcefully(conn.stream)
                        conn = None
                        conn = await self._connect()
                        reply = await conn.roundtrip(payload, replies)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    if conn is not None:
                        await trio.aclose_forcefully(conn.stream)
                        self._lost(conn)
                    # trio's BrokenResourceError says nothing itself: its cause (a failed
                    # TLS handshake's certificate error, say) does.
                    cause = e if str(e) or e.__cause__ is None else e.__cause__
                    raise RedisUnavailable(f"{type(cause).__name__}: {cause}") from e
                except hiredis.ProtocolError as e:
                    if conn is not None:
                        await trio.aclose_forcefully(conn.stream)
                        self._lost(conn)
                    raise RedisUnavailable(f"protocol error: {e}") from e
                except _ConnectionLost:
                    if conn is not None:
                        await trio.aclose_forcefully(conn.stream)
                        self._lost(conn)
                    raise
                except BaseException:
                    # Cancelled (our timeout or the caller's) mid-command: the reply may
                    # still come, so this connection can never be trusted again.
                    if conn is not None:
                        await trio.aclose_forcefully(conn.stream)
                    raise
                if isinstance(reply, hiredis.ReplyError) and _READONLY.search(str(reply)):
                    # A master demoted to replica by a failover. Its other connections
                    # are no better; new ones go where the sentinels or the name say.
                    await trio.aclose_forcefully(conn.stream)
                    self._forget(conn.address)
                    raise RedisUnavailable(
                        f"{_host_port(conn.address)} is a read-only replica now "
                        "(a failover?); reconnecting"
                    )
                if (
                    self._closed
                    or (self._served and not self._users)  # its users have all gone
                    or (self.sentinels is not None and conn.address != self._master)
                ):
                    await trio.aclose_forcefully(conn.stream)
                else:
                    self._idle.append(conn)
        if scope.cancelled_caught:
            raise RedisUnavailable(f"no answer within {self.timeout:g}s")
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def _lost(self, conn: _Connection) -> None:
        """A connection failed: with sentinels, its server may be gone for good."""
        if self.sentinels is not None:
            self._forget(conn.address)

    async def watch(self) -> None:
        """With sentinels, ask them where the master is every ``SENTINEL_POLL`` seconds
        and move to a new one; otherwise wait. Runs until cancelled."""
        sentinels = self.sentinels
        if sentinels is None:
            await trio.sleep_forever()
            return
        failing = False
        while not self._closed:
            await trio.sleep(SENTINEL_POLL)
            try:
                async with self._asking:  # each sentinel given the whole timeout here
                    master = await self._ask_sentinels(sentinels, self.timeout)
            except RedisUnavailable as e:
                # The data path may still work: keep the master known until it fails.
                if not failing:
                    failing = True
                    known = self._last_master
                    log.warning(
                        "Redis %s: %s; %s",
                        sentinels,
                        e,
                        "the master known serves on" if known else "no master is known",
                    )
                continue
            if failing:
                failing = False
                log.warning("Redis %s: the sentinels answer again", sentinels)
            if master != self._master:
                previous = self._master or self._last_master
                if previous is not None and previous != master:
                    log.warning(
                        "Redis %s moved from %s to %s (a failover)",
                        sentinels,
                        _host_port(previous),
                        _host_port(master),
                    )
                self._set_master(master)
                self._drop_idle(master, to_it=False)

    async def serve(self) -> None:
        """Run while a user (a store of a filter in use) needs this pool; several may
        share it. One of them at a time runs :meth:`watch`; when it leaves, another
        takes over. When the last one leaves, the idle connections are closed (the pool
        stays usable: a user that comes later opens new ones)."""
        self._users += 1
        self._served = True
        try:
            await self._watcher.take(self.watch, lambda: self._closed)
            await trio.sleep_forever()  # closed: nothing to watch, hold until cancelled
        finally:
            self._users -= 1
            if not self._users:
                idle, self._idle = self._idle, []
                for conn in idle:
                    _close_now(conn)

    async def aclose(self) -> None:
        """Close idle connections; connections in use close when their command ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


# -- Redis Cluster ----------------------------------------------------------------------

CLUSTER_SLOTS = 16384
#: Redirections (MOVED, ASK) one command may follow before it gives up: a resharding
#: moves a slot once; more means the map is changing faster than it can be followed.
_MAX_REDIRECTS = 5
#: Pause before a command its slot's migration refused (``TRYAGAIN``) is sent again.
_TRYAGAIN_PAUSE = 0.01
#: Pause between two failed attempts of the background map refresh.
_REMAP_PAUSE = 0.1


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) of its hash tag (the part between the
    first ``{`` and the next ``}``, when not empty) or of the whole key, mod 16384."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % CLUSTER_SLOTS


def _as_bytes(arg: bytes | str | int | float) -> bytes:
    return arg if isinstance(arg, bytes) else str(arg).encode()


def _command_key(args: Sequence[bytes | str | int | float]) -> bytes | None:
    """The key a command is routed by: the first key of ``EVAL``/``EVALSHA``, else none
    (``PING`` and the like go to any node)."""
    command = _as_bytes(args[0]).upper() if args else b""
    if command in (b"EVAL", b"EVALSHA") and len(args) > 3 and int(args[2]) > 0:
        return _as_bytes(args[3])
    return None


class RedisCluster:
    """A Redis Cluster, reached through ``address`` (one node, or a managed service's
    configuration endpoint): a :class:`RedisPool` per master, each command sent to the
    master of its key's slot.

    The slot map comes from ``CLUSTER SLOTS``, asked of the nodes known (masters and
    replicas the last map named, then ``address``), each within its share of
    ``timeout``. A ``MOVED`` reply (the slot has a new master: a failover, a resharding)
    updates that slot; an ``ASK`` reply (a slot being migrated) sends the command once to
    the node named, after ``ASKING``; ``TRYAGAIN`` (a multi-key command while its slot
    migrates) is sent again after a short pause. A ``MOVED``, ``CLUSTERDOWN`` or a node
    that fails has the whole map asked again: in the background while a user
    :meth:`serve` s the cluster (a command whose slot is known does not wait for it),
    else before the next command. Every command, redirections and waits included, ends
    within ``timeout``. Credentials and TLS are ``address``'s for every node; a TLS
    certificate is checked against the name the cluster gives the node (its hostname, or
    its IP address).
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        timeout: float,
        pool_size: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if address.db:
            raise ValueError("a Redis Cluster has only database 0")
        self.address = address
        self.timeout = timeout
        self._pool_size = pool_size
        self._ssl_context = ssl_context
        self._pools: dict[tuple[str, int], RedisPool] = {}
        self._slots: list[tuple[str, int] | None] = [None] * CLUSTER_SLOTS
        self._masters: list[tuple[str, int]] = []
        self._known: list[tuple[str, int]] = []  # masters and replicas, to ask the map of
        self._stale = True  # the map must be asked for again
        self._stale_event = trio.Event()  # set when it becomes stale (for serve)
        self._mapping = trio.Lock()
        self._closed = False
        self._users = 0
        self.generation = 0  # of the slot map
        self._refresher = _Turns()  # one user's serve() at a time refreshes the map

    @property
    def where(self) -> str:
        return f"cluster via {_host_port((self.address.host, self.address.port))}"

    def node_of(self, key: bytes) -> tuple[str, int] | None:
        """The master that serves ``key``'s slot, as the map says (None: not known)."""
        return self._slots[key_slot(key)]

    def _mark_stale(self) -> None:
        self._stale = True
        self._stale_event.set()

    def _pool(self, node: tuple[str, int]) -> RedisPool:
        pool = self._pools.get(node)
        if pool is None:
            a = self.address
            pool = self._pools[node] = RedisPool(
                RedisAddress(node[0], node[1], 0, a.username, a.password, a.tls),
                timeout=self.timeout,
                pool_size=self._pool_size,
                ssl_context=self._ssl_context,
            )
            pool._served = self._users > 0  # (connections close when no user is left)
            pool._users = self._users
        return pool

    async def _map(self) -> None:
        """Ask the nodes known, the seed last, for the slot map, each within its share of
        ``timeout`` (one asker at a time; the others wait for its answer)."""
        async with self._mapping:
            if not self._stale:
                return
            self._stale = False  # a MOVED while this runs makes it stale again
            if self._stale_event.is_set():  # (its waiters have woken: they read anew)
                self._stale_event = trio.Event()
            seed = (self.address.host, self.address.port)
            nodes = self._known + ([seed] if seed not in self._known else [])
            each = self.timeout / len(nodes)
            failures: list[str] = []
            try:
                for node in nodes:
                    with trio.move_on_after(each):
                        try:
                            reply = await self._pool(node).execute(b"CLUSTER", b"SLOTS")
                            self._read_map(node, reply)
                        except (RedisError, ValueError, TypeError, IndexError) as e:
                            failures.append(f"{_host_port(node)}: {e}")
                            continue
                        return
                    failures.append(f"{_host_port(node)}: no answer within {each:.3g}s")
                raise RedisUnavailable(f"no node gave the slot map ({'; '.join(failures)})")
            except BaseException:
                self._mark_stale()  # (cut short by the caller's deadline too)
                raise

    def _read_map(self, asked: tuple[str, int], reply: Any) -> None:
        slots: list[tuple[str, int] | None] = [None] * CLUSTER_SLOTS
        masters: list[tuple[str, int]] = []
        known: list[tuple[str, int]] = []
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            if not 0 <= start <= end < CLUSTER_SLOTS:
                raise ValueError(f"a slot range out of bounds: {start}-{end}")
            nodes = []
            for node in entry[2:]:
                host = node[0].decode() if node[0] else asked[0]  # "": the node asked
                nodes.append((host, int(node[1])))
            if not nodes:
                raise ValueError(f"no master for slots {start}-{end}")
            master = nodes[0]
            if master not in masters:
                masters.append(master)
            for node in nodes:
                if node not in known:
                    known.append(node)
            slots[start : end + 1] = [master] * (end + 1 - start)
        if not masters:
            raise ValueError("no slot is served (is the cluster set up?)")
        if slots != self._slots:
            self.generation += 1  # (outages recorded under the old map are forgotten)
        self._slots, self._masters, self._known = slots, masters, known
        for node in list(self._pools):
            if node not in masters and node != (self.address.host, self.address.port):
                self._drop(node)  # a node that serves no slot now

    def _drop(self, node: tuple[str, int]) -> None:
        """Close the pool to ``node`` (its connections in use close when they end)."""
        pool = self._pools.pop(node)
        pool._closed = True
        idle, pool._idle = pool._idle, []
        for conn in idle:
            _close_now(conn)

    async def execute(self, *args: bytes | str | int | float) -> Any:
        """The reply to one command, from the master of its key's slot (see the class
        docstring), within ``timeout``; raises as :meth:`RedisPool.execute`."""
        if self._closed:
            raise RedisUnavailable("the pool is closed")
        waiting: list[bool] = [False]  # whether the time ran out waiting on TRYAGAIN
        with trio.move_on_after(self.timeout):
            return await self._execute(args, waiting)
        if waiting[0]:
            raise RedisMigrating(f"the slot was migrating (TRYAGAIN) for {self.timeout:g}s")
        self._mark_stale()  # a master that does not answer: a failover may be under way
        raise RedisUnavailable(f"no answer within {self.timeout:g}s")

    async def _execute(self, args: Sequence[bytes | str | int | float], waiting: list[bool]) -> Any:
        key = _command_key(args)
        node = self.node_of(key) if key is not None else None
        if node is None and key is None and self._masters:
            node = self._masters[0]
        if node is None or (self._stale and not self._users):
            # Unknown yet, or nobody refreshes the map in the background: ask now.
            await self._map()
            node = self.node_of(key) if key is not None else self._masters[0]
        asking = False
        redirects = 0
        while True:
            if node is None:  # a slot no master serves: the cluster is missing a part
                self._mark_stale()
                raise RedisUnavailable("no master serves this key's slot")
            try:
                return await self._pool(node).execute(*args, asking=asking)
            except RedisReplyError as e:
                kind, _, rest = str(e).partition(" ")
                if kind == "TRYAGAIN":
                    # A multi-key command while its slot migrates: soon over. Sent again
                    # from the slot's master as the map says (the caller's timeout ends
                    # the waiting).
                    waiting[0] = True
                    await trio.sleep(_TRYAGAIN_PAUSE)
                    waiting[0] = False
                    node = self.node_of(key) if key is not None else node
                    asking, redirects = False, 0
                    continue
                if kind == "CLUSTERDOWN":
                    self._mark_stale()
                    raise RedisUnavailable(str(e)) from None
                if kind not in ("MOVED", "ASK"):
                    raise
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise RedisUnavailable(
                        f"more than {_MAX_REDIRECTS} redirections for one command"
                    ) from None
                slot, _, target = rest.partition(" ")
                host, _, port = target.rpartition(":")
                node = (host.strip("[]") or node[0], int(port))
                asking = kind == "ASK"
                if not asking:
                    self._slots[int(slot)] = node
                    self._mark_stale()  # more slots may have moved with it
            except RedisUnavailable:
                self._mark_stale()  # a master gone: a failover may be under way
                raise

    async def serve(self) -> None:
        """Run while a user (a store of a filter in use) needs the cluster; several may
        share it. One of them at a time asks the slot map again whenever it is stale
        (when it leaves, another takes over); when the last one leaves, the idle
        connections are closed (as :meth:`RedisPool.serve`)."""
        self._users += 1
        for pool in self._pools.values():
            pool._served, pool._users = True, self._users
        try:
            await self._refresher.take(self._refresh_when_stale, lambda: self._closed)
            await trio.sleep_forever()
        finally:
            self._users -= 1
            for pool in self._pools.values():
                pool._users = self._users
                if not self._users:
                    idle, pool._idle = pool._idle, []
                    for conn in idle:
                        _close_now(conn)

    async def _refresh_when_stale(self) -> None:
        failing = False
        while not self._closed:
            if not self._stale:
                await self._stale_event.wait()
                continue
            try:
                with trio.move_on_after(self.timeout) as scope:
                    await self._map()
                if scope.cancelled_caught:
                    raise RedisUnavailable(f"no node gave the slot map within {self.timeout:g}s")
            except RedisUnavailable as e:
                if not failing:
                    failing = True
                    log.warning("Redis %s: %s; asking again every %gs", self.where, e, _REMAP_PAUSE)
                await trio.sleep(_REMAP_PAUSE)
                continue
            if failing and not self._stale:
                failing = False
                log.warning("Redis %s: the slot map is known again", self.where)

    async def aclose(self) -> None:
        self._closed = True
        self._stale_event.set()
        for pool in self._pools.values():
            await pool.aclose()


#: A server's pool, or a cluster's pools.
AnyPool = RedisPool | RedisCluster

#: The pools in use, by what makes them (server, credentials, TLS files, limits): every
#: filter instance with the same Redis settings shares one, so ``pool_size`` and the
#: sentinel questions are per process, not per route. Held weakly: a pool goes with
#: the last store that uses it.
#: One registry per trio run: a pool's locks and limiter belong to the run that made it.
_SHARED: trio.lowlevel.RunVar[weakref.WeakValueDictionary[Hashable, AnyPool]] = (
    trio.lowlevel.RunVar("filtergate_redis_pools")
)


def shared_pool(key: Hashable, make: Callable[[], AnyPool]) -> AnyPool:
    """The pool for ``key``, made by ``make`` when there is none (see :data:`_SHARED`).
    Outside a trio run (``filtergate check``) every caller gets a pool of its own."""
    try:
        pools = _SHARED.get()
    except LookupError:
        pools = weakref.WeakValueDictionary()
        _SHARED.set(pools)
    except RuntimeError:  # not in a trio run
        return make()
    pool = pools.get(key)
    if pool is None or pool._closed:
        pool = pools[key] = make()
    return pool


def _connect_failure(e: OSError) -> str:
    """Why ``trio.open_tcp_stream`` failed: its own message names no reason when the
    address had one attempt ("all attempts to connect to ... failed"); the cause has it."""
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return e.strerror or str(e)


def _close_now(conn: _Connection) -> None:
    """Close an idle connection without awaiting: its socket goes at once (a TLS
    stream's close_notify is not sent, as ``aclose_forcefully`` does not send it)."""
    stream = conn.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()


# --- the scripts --------------------------------------------------------------------------
#
# Each script takes one key per quota and returns {allowed, v1..., v2..., ...} where each
# quota's v is {allowed, remaining, reset_us, retry_after_us}. Times are integers in
# microseconds (exact in Lua's doubles). The arithmetic mirrors algorithms.py.

_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

_SLIDING_WINDOW = (
    _CLOCK
    + """
local n = #KEYS
local out = {1}
local new = {}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[2 * i - 1])
  local w = tonumber(ARGV[2 * i])
  local index = math.floor(now / w)
  local h = redis.call('HMGET', KEYS[i], 'i', 'c', 'p')
  local si, cur, prev = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if si == nil then
    cur, prev = 0, 0
  elseif index == si + 1 then
    cur, prev = 0, cur
  elseif index ~= si then
    cur, prev = 0, 0
  end
  local start = index * w
  local estimate = prev * (1 - (now - start) / w) + cur
  new[i] = {index, cur, prev}
  if estimate + 1 <= limit then
    local rem = math.floor(limit - estimate - 1)
    if rem < 0 then rem = 0 end
    out[#out + 1] = 1
    out[#out + 1] = rem
    out[#out + 1] = math.ceil(start + 2 * w - now)
    out[#out + 1] = 0
  else
    all = false
    local reset = 0
    if cur > 0 then reset = start + 2 * w - now elseif prev > 0 then reset = start + w - now end
    local room = limit - 1
    local retry
    if cur <= room and prev > 0 then
      retry = start + (1 - (room - cur) / prev) * w - now
    else
      retry = start + w + (1 - room / cur) * w - now
    end
    if retry < 0 then retry = 0 end
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = math.ceil(reset)
    out[#out + 1] = math.ceil(retry)
  end
end
if all then
  for i = 1, n do
    local w = tonumber(ARGV[2 * i])
    redis.call('HSET', KEYS[i], 'i', new[i][1], 'c', new[i][2] + 1, 'p', new[i][3])
    redis.call('PEXPIRE', KEYS[i], math.ceil(2 * w / 1000) + 1000)
  end
else
  out[1] = 0
end
return out
"""
)

_SLIDING_LOG = (
    _CLOCK
    + """
local n = #KEYS
local out = {1}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local w = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - w)
  local count = redis.call('ZCARD', KEYS[i])
  if count < limit then
    out[#out + 1] = 1
    out[#out + 1] = limit - count - 1
    out[#out + 1] = w
    out[#out + 1] = 0
  else
    all = false
    local oldest = redis.call('ZRANGE', KEYS[i], count - limit, count - limit, 'WITHSCORES')
    local newest = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
    local retry = tonumber(oldest[2]) + w - now
    if retry < 0 then retry = 0 end
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = math.ceil(tonumber(newest[2]) + w - now)
    out[#out + 1] = math.ceil(retry)
  end
end
if all then
  local member = tostring(now) .. '-' .. ARGV[1]
  for i = 1, n do
    local w = tonumber(ARGV[2 * i + 1])
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], math.ceil(w / 1000) + 1000)
  end
else
  out[1] = 0
end
return out
"""
)

_TOKEN_BUCKET = (
    _CLOCK
    + """
local n = #KEYS
local out = {1}
local left = {}
local all = true
for i = 1, n do
  local limit = tonumber(ARGV[3 * i - 2])
  local w = tonumber(ARGV[3 * i - 1])
  local cap = tonumber(ARGV[3 * i])
  local rate = limit / w
  local h = redis.call('HMGET', KEYS[i], 't', 's')
  local tokens, stamp = tonumber(h[1]), tonumber(h[2])
  if tokens == nil or stamp == nil then
    tokens = cap
  else
    local gap = now - stamp
    if gap < 0 then gap = 0 end
    tokens = math.min(cap, tokens + gap * rate)
  end
  if tokens >= 1 then
    left[i] = tokens - 1
    out[#out + 1] = 1
    out[#out + 1] = math.floor(tokens - 1)
    out[#out + 1] = math.ceil((cap - tokens + 1) / rate)
    out[#out + 1] = 0
  else
    all = false
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = math.ceil((cap - tokens) / rate)
    out[#out + 1] = math.ceil((1 - tokens) / rate)
  end
end
if all then
  for i = 1, n do
    local limit = tonumber(ARGV[3 * i - 2])
    local w = tonumber(ARGV[3 * i - 1])
    local cap = tonumber(ARGV[3 * i])
    redis.call('HSET', KEYS[i], 't', string.format('%.17g', left[i]), 's', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - left[i]) / (limit / w) / 1000) + 1000)
  end
else
  out[1] = 0
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class _Script:
    source: bytes
    sha: bytes

    @classmethod
    def of(cls, source: str) -> _Script:
        data = source.encode()
        return cls(data, hashlib.sha1(data).hexdigest().encode())


_SCRIPTS = {
    "sliding-window": _Script.of(_SLIDING_WINDOW),
    "sliding-log": _Script.of(_SLIDING_LOG),
    "token-bucket": _Script.of(_TOKEN_BUCKET),
}

_ABBREV = {"sliding-window": "sw", "sliding-log": "sl", "token-bucket": "tb"}


def _micros(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a policy sends with every decision: key suffixes and script arguments."""

    script: _Script
    suffixes: tuple[str, ...]
    argv: tuple[int, ...]


class _Outage:
    """A failure of the store (or of one master of a cluster): decisions fail fast until
    ``retry_at``, then one ``probing`` decision tries while the others keep failing."""

    __slots__ = ("probing", "retry_at", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.retry_at = since
        self.probing = False


class RedisStore:
    """Counters in Redis, shared by every gateway that uses the same server and prefix.

    ``prefix`` starts every key; the filter's key (scope, tier, caller) is the hash tag.
    """

    def __init__(self, pool: AnyPool, *, prefix: str, retry_interval: float) -> None:
        self.pool = pool
        self.prefix = prefix
        self.retry_interval = retry_interval
        self._plans: dict[Policy, _Plan] = {}
        # Unique sliding-log members across processes: a random process part + a count.
        self._nonce_base = os.urandom(6).hex()
        self._nonces = itertools.count()
        # Outages by what failed: the server (None), or with a cluster the master of the
        # slot, so that one failing master does not fail the callers of the others.
        self._down: dict[Hashable, _Outage] = {}
        self._down_generation = 0  # the cluster's map generation they were recorded under

    @property
    def available(self) -> bool:
        """False from a failure until the next successful decision (of each master of
        a cluster that failed)."""
        return not self._down

    def _plan(self, policy: Policy) -> _Plan:
        plan = self._plans.get(policy)
        if plan is None:
            abbrev = _ABBREV[policy.algorithm]
            suffixes = []
            argv: list[int] = []
            for q in policy.quotas:
                w = _micros(q.window)
                suffixes.append(f":{abbrev}:{q.limit}/{w}")
                argv += [q.limit, w]
                if policy.algorithm == "token-bucket":
                    suffixes[-1] += f"/{q.capacity}"
                    argv.append(q.capacity)
            plan = self._plans[policy] = _Plan(
                _SCRIPTS[policy.algorithm], tuple(suffixes), tuple(argv)
            )
        return plan

    async def _eval(self, script: _Script, keys: list[str], argv: list[bytes | str | int]) -> Any:
        try:
            return await self.pool.execute(b"EVALSHA", script.sha, len(keys), *keys, *argv)
        except RedisReplyError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        # EVAL also caches the script, so the next EVALSHA finds it.
        return await self.pool.execute(b"EVAL", script.source, len(keys), *keys, *argv)

    async def decide(self, key: str, policy: Policy, now: float) -> Outcome:
        plan = self._plan(policy)
        base = f"{self.prefix}{{{key}}}"
        keys = [base + s for s in plan.suffixes]
        pool = self.pool
        domain = None
        if isinstance(pool, RedisCluster):
            domain = pool.node_of(keys[0].encode())
            if self._down and pool.generation != self._down_generation:
                self._down.clear()  # a new map: what failed may be elsewhere now
            self._down_generation = pool.generation
        outage = self._down.get(domain)
        if outage is not None and (now < outage.retry_at or outage.probing):
            raise StoreUnavailable("Redis is unavailable; retrying shortly")
        if outage is not None:
            outage.probing = True
        argv: list[bytes | str | int] = list(plan.argv)
        if policy.algorithm == "sliding-log":
            argv.insert(0, f"{self._nonce_base}.{next(self._nonces)}")
        try:
            reply = await self._eval(plan.script, keys, argv)
        except RedisMigrating as e:  # one slot's migration: its master is fine
            raise StoreUnavailable(str(e)) from e
        except RedisError as e:
            self._failed(domain, now, e)
            raise StoreUnavailable(str(e)) from e
        finally:
            if outage is not None:
                outage.probing = False
        try:
            outcome = self._outcome(policy, reply)
        except (TypeError, ValueError, IndexError) as e:
            self._failed(domain, now, e)
            raise StoreUnavailable(f"unexpected reply from Redis: {reply!r}") from e
        outage = self._down.pop(domain, None)
        if outage is not None:
            log.warning(
                "Redis %s is available again after %.1fs", self._where(domain), now - outage.since
            )
        return outcome

    def _where(self, domain: Hashable) -> str:
        if domain is None:
            return self.pool.where
        return f"{self.pool.where}, master {_host_port(domain)}"  # type: ignore[arg-type]

    def _failed(self, domain: Hashable, now: float, error: Exception) -> None:
        outage = self._down.get(domain)
        if outage is None:
            outage = self._down[domain] = _Outage(now)
            log.error("Redis %s is unavailable: %s", self._where(domain), error)
        outage.retry_at = now + self.retry_interval

    @staticmethod
    def _outcome(policy: Policy, reply: Any) -> Outcome:
        quotas = policy.quotas
        if not isinstance(reply, list) or len(reply) != 1 + 4 * len(quotas):
            raise ValueError("wrong reply shape")
        verdicts = [
            Verdict(
                bool(reply[1 + 4 * i]),
                int(reply[2 + 4 * i]),
                int(reply[3 + 4 * i]) / 1_000_000,
                int(reply[4 + 4 * i]) / 1_000_000,
            )
            for i in range(len(quotas))
        ]
        return combine(quotas, verdicts)

    async def ping(self) -> None:
        """Raises :class:`RedisError` unless the server answers ``PING`` in time."""
        await self.pool.execute(b"PING")

    async def aclose(self) -> None:
        await self.pool.aclose()
