"""The socket layer under the server and the upstream pools.

trio's ``SocketStream`` checkpoints (yields to the scheduler) on every send and receive
and wraps each in a cancel scope; on a proxy's hot path that is several scheduler
passes per request for sockets that are almost always ready. :class:`RawSocket` tries
the non-blocking syscall first and waits (``wait_readable``/``wait_writable``) only when
the kernel says it must. Callers checkpoint once per request cycle, and once per chunk
in body loops, so a busy connection cannot starve the rest.

Timeouts. A cancel scope with a deadline costs about as much as parsing a request's
head here (it is entered and left on every wait, and files its deadline in trio's
deadline heap), and a proxied request waits at least twice. A wait of a
:class:`RawSocket` files its deadline in :class:`Timers` instead, a wheel of
``TICK``-wide slots: one system task per trio run wakes once per tick while any wait is
filed, and ends the waits whose deadline passed with ``trio.lowlevel.notify_closing``;
the waiting task then raises ``trio.TooSlowError``. Timeouts therefore fire up to one
tick late, never early.

TLS from clients uses :class:`StreamSocket`, the same interface over trio's
``SSLStream``, with a cancel scope per wait. TLS to upstreams uses :class:`TlsSocket`,
TLS done on memory buffers over a :class:`RawSocket` (see there why).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

__all__ = [
    "READ_SIZE",
    "RESOURCE_ERRORS",
    "TICK",
    "RawSocket",
    "StreamSocket",
    "Timers",
    "TlsSocket",
    "accept_backoff",
    "acked",
]

READ_SIZE = 64 * 1024
_INF = math.inf
#: The resolution of socket timeouts, in seconds.
TICK = 0.05
#: How many times a :class:`RawSocket` waited, in any task. When it did not change
#: across a stretch of a task's code, no other task ran meanwhile, so that code did not
#: yield to the scheduler (the server's fairness check).
parks = 0

# accept() errors that mean "out of resources": wait for some to be freed, do not spin.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


_ACCEPT_WARNING_EVERY = 5.0  # seconds between two warnings of failing accepts
_accept_warned = [-_ACCEPT_WARNING_EVERY, 0]  # [when last warned, pauses since]


async def accept_backoff(error: OSError, log: logging.Logger) -> None:
    """After a failed ``accept()``: back off when out of resources, else go on.

    The pause is 100 ms; the warning comes at most every 5 s, with the number of
    pauses since the last one (a flood of them would be ten lines a second).
    """
    if error.errno in RESOURCE_ERRORS:
        now = time.monotonic()  # not trio's clock: this outlives one trio run
        _accept_warned[1] += 1
        if now - _accept_warned[0] >= _ACCEPT_WARNING_EVERY:
            log.warning(
                "accept failed (%s); pausing accepts for 100 ms (%d pauses since the last warning)",
                error,
                _accept_warned[1],
            )
            _accept_warned[0], _accept_warned[1] = now, 0
        await trio.sleep(0.1)


class _Expiring(Protocol):
    """What :class:`Timers` ends: a socket's wait, or a send's progress check."""

    def expire(self) -> None: ...


# Linux's TCP_INFO: its tcpi_bytes_acked (a u64 at byte 120, since Linux 4.1) counts the
# bytes the peer's kernel has taken. It only grows; once the peer's receive buffer is
# full, only while the peer reads (bytes in flight when a write blocks settle first).
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None


def _acked(sock: socket.socket) -> int | None:
    """Bytes ``sock``'s peer has acknowledged so far; None where the kernel does not say."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 128)
    except OSError:
        return None
    return int.from_bytes(info[120:128], sys.byteorder) if len(info) >= 128 else None


def acked(stream: RawSocket | TlsSocket | StreamSocket) -> int | None:
    """Bytes the peer of ``stream`` has acknowledged so far (its TCP connection's, TLS
    included); None where the kernel does not say."""
    if isinstance(stream, RawSocket):
        return _acked(stream.sock)
    if isinstance(stream, TlsSocket):
        return _acked(stream.raw.sock)
    return _acked(stream.raw)


#: A write that waits on its peer looks at it this many times per ``max_wait``: a peer
#: must take bytes at least once per ``max_wait``, and one that takes none is cut then.
_CHECKS = 4


class _Progress:
    """Whether a peer that a blocked write waits on still takes bytes.

    A writer waits for room in the send buffer, and the kernel wakes it only when half
    the buffer is free: a peer reading slowly but steadily may take longer than a write
    timeout to free that much, so the wait is looked at every ``max_wait / _CHECKS``
    and goes on while the peer's acknowledged bytes grow. Nothing is measured before
    the first look (a write that does not wait pays nothing), and bytes still in
    flight then are not taken for reading: a peer that reads nothing is cut after
    ``max_wait`` from the last write that went out.
    """

    __slots__ = ("acked", "last", "max_wait", "sock")

    def __init__(self, sock: socket.socket, now: float, max_wait: float) -> None:
        self.sock = sock
        self.max_wait = max_wait
        self.last = now  # when bytes last went out or were last taken
        self.acked: int | None = None

    def next(self, now: float, deadline: float) -> float:
        """When to look next (``_INF``: never)."""
        return min(deadline, now + self.max_wait / _CHECKS, self.last + self.max_wait)

    def check(self, now: float, deadline: float) -> float | None:
        """Look now; the next time to look, or None: give up."""
        acked = _acked(self.sock)
        if acked is not None and self.acked is not None and acked > self.acked:
            self.last = now
        self.acked = acked
        if now >= deadline or now - self.last >= self.max_wait:
            return None
        return self.next(now, deadline)


class Timers:
    """The deadlines of the socket waits in progress, in slots of ``TICK`` seconds.

    Filing and withdrawing a wait is a set insertion and removal; the system task
    (:meth:`run`) ends the waits of every slot whose time has come. Get the run's
    instance with :func:`timers`.
    """

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self.slots: dict[int, set[_Expiring]] = {}
        self.done = int(trio.current_time() // tick)  # slots up to this one have fired
        self._wake = trio.Event()

    def add(self, sock: _Expiring, deadline: float) -> int:
        """File ``sock``'s wait until ``deadline``; returns the slot for :meth:`discard`."""
        slot = int(deadline // self.tick) + 1  # the first slot that starts after it
        if slot <= self.done:
            slot = self.done + 1
        waits = self.slots.get(slot)
        if waits is None:
            waits = self.slots[slot] = set()
            if len(self.slots) == 1:
                self._wake.set()
        waits.add(sock)
        return slot

    def discard(self, sock: _Expiring, slot: int) -> None:
        waits = self.slots.get(slot)
        if waits is not None:
            waits.discard(sock)

    async def run(self) -> None:
        tick = self.tick
        slots = self.slots
        while True:
            if not slots:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.sleep_until((self.done + 1) * tick)
            # (at least the slot slept for: the float division may land just below it)
            now = max(int(trio.current_time() // tick), self.done + 1)
            if len(slots) < now - self.done:
                due = sorted(k for k in slots if k <= now)  # a long jump of the clock
            else:
                due = list(range(self.done + 1, now + 1))
            self.done = now
            for slot in due:
                for sock in slots.pop(slot, ()):
                    sock.expire()


_TIMERS: trio.lowlevel.RunVar[Timers] = trio.lowlevel.RunVar("filtergate_timers")


def timers() -> Timers:
    """This trio run's :class:`Timers`, its task started on first use."""
    try:
        return _TIMERS.get()
    except LookupError:
        wheel = Timers()
        _TIMERS.set(wheel)
        trio.lowlevel.spawn_system_task(wheel.run, name="filtergate socket timers")
        return wheel


class RawSocket:
    """A connected non-blocking socket. Timeouts raise ``trio.TooSlowError``;
    resets raise ``OSError``; ``recv`` returns ``b""`` at EOF."""

    __slots__ = ("expired", "sock", "timers")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timers = timers()
        self.expired = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def expire(self) -> None:
        """End the wait in progress with ``trio.TooSlowError`` (a timeout, a shutdown)."""
        self.expired = True
        try:
            trio.lowlevel.notify_closing(self.sock)
        except (OSError, ValueError):
            pass  # closed already: no wait to end

    async def _wait(
        self, wait: Callable[[socket.socket], Awaitable[None]], deadline: float
    ) -> None:
        global parks
        parks += 1
        if deadline == _INF:
            await wait(self.sock)
            return
        wheel = self.timers
        self.expired = False
        slot = wheel.add(self, deadline)
        try:
            await wait(self.sock)
        except trio.ClosedResourceError:
            if self.expired:  # (every task waiting on this socket sees it)
                raise trio.TooSlowError from None
            raise
        finally:
            wheel.discard(self, slot)

    async def recv(self, max_wait: float, deadline: float = _INF) -> bytes:
        """Up to 64 KiB; waits at most ``max_wait`` seconds and never past ``deadline``."""
        sock = self.sock
        try:
            return sock.recv(READ_SIZE)
        except BlockingIOError:
            pass
        return await self.recv_until(min(deadline, trio.current_time() + max_wait))

    def recv_nowait(self) -> bytes | None:
        """What is readable now (``b""`` at EOF), or ``None`` when a wait is needed."""
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return None

    async def recv_until(self, deadline: float) -> bytes:
        """Wait until readable, then read; ``trio.TooSlowError`` at ``deadline`` or on
        :meth:`expire`."""
        sock = self.sock
        while True:
            await self._wait(trio.lowlevel.wait_readable, deadline)
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                continue

    async def send_all(self, data: bytes, max_wait: float, deadline: float = _INF) -> None:
        """All of ``data``; waits at most ``max_wait`` seconds for the peer to take more
        (each time it takes some, the wait starts again), and never past ``deadline``."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        now = trio.current_time()
        progress = _Progress(sock, now, max_wait)
        until = progress.next(now, deadline)
        while view:
            try:
                await self._wait(trio.lowlevel.wait_writable, until)
            except trio.TooSlowError:
                now = trio.current_time()
                if now < until:
                    raise  # ended from outside (a shutdown)
                looked = progress.check(now, deadline)
                if looked is None:
                    raise  # nothing taken for max_wait, or the call's own deadline
                until = looked
                continue
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            view = view[sent:]
            if sent:
                now = trio.current_time()
                progress.last = now
                until = progress.next(now, deadline)

    def shutdown_write(self) -> None:
        """Half-close: the peer reads EOF, this side can still receive."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class TlsSocket:
    """The :class:`RawSocket` interface with TLS, done here on :class:`ssl.SSLObject`
    memory buffers over a :class:`RawSocket` (the gateway's side of an upstream
    connection).

    Unlike trio's ``SSLStream``, reading and writing are independent: a write cut short
    (the upstream answered early, a timeout) leaves the reading whole, so the answer
    can still be read. What TLS holds but has not returned yet is visible
    (:meth:`holds_data`), so a pooled connection with bytes after its response is never
    reused. A close without TLS's close_notify reads as EOF, as Python's own TLS
    sockets do by default, and is noted in ``ragged_eof``: HTTP framing decides whether
    a message was whole, and a body that only the close delimits is not (RFC 9112 9.8).

    One task sends at a time (the lock): a read may make TLS queue bytes of its own
    (a renegotiation's handshake, a key update), which go out with the next send, or at
    once from the reading task when no send is under way.
    """

    __slots__ = ("_held", "_in", "_lock", "_out", "ragged_eof", "raw", "tls")

    def __init__(self, raw: RawSocket, context: ssl.SSLContext, server_name: str) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._held = b""  # decrypted before a half-close, not returned yet
        self._lock = trio.Lock()
        self.ragged_eof = False
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=server_name)

    async def handshake(self, deadline: float) -> None:
        """Run the TLS handshake by ``deadline``; raises ``ssl.SSLError`` (certificate
        errors included), ``OSError`` or ``trio.TooSlowError``."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush(_INF, deadline)
                data = await self.raw.recv_until(deadline)
                if not data:
                    raise OSError(
                        "the server closed the connection during the TLS handshake"
                    ) from None
                self._in.write(data)
                continue
            await self._flush(_INF, deadline)
            return

    async def _flush(self, max_wait: float, deadline: float) -> None:
        """Send everything TLS has queued, the lock held."""
        async with self._lock:
            while self._out.pending:
                await self.raw.send_all(self._out.read(), max_wait, deadline)

    def fileno(self) -> int:
        return self.raw.fileno()

    def holds_data(self) -> bool:
        """Whether TLS holds bytes not read yet (decrypted, or still encrypted)."""
        return self._in.pending > 0 or self.tls.pending() > 0 or bool(self._held)

    def _plain(self) -> bytes | None:
        """What TLS can return now; ``b""`` at EOF; ``None`` when it needs more input."""
        if self._held:
            held, self._held = self._held, b""
            return held
        try:
            return self.tls.read(READ_SIZE)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return b""
        except ssl.SSLEOFError:
            self.ragged_eof = True
            return b""

    def _feed(self, data: bytes) -> None:
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def recv_nowait(self) -> bytes | None:
        while True:
            plain = self._plain()
            if plain is not None:
                return plain
            if self._out.pending:
                return None  # TLS has something to say first: the waiting path sends it
            data = self.raw.recv_nowait()
            if data is None:
                return None
            self._feed(data)

    async def recv(self, max_wait: float, deadline: float = _INF) -> bytes:
        plain = self.recv_nowait()
        if plain is not None:
            return plain
        return await self.recv_until(min(deadline, trio.current_time() + max_wait))

    async def recv_until(self, deadline: float) -> bytes:
        while True:
            plain = self._plain()
            if plain is not None:
                return plain
            if self._out.pending and not self._lock.locked():
                # Reading made TLS queue bytes (a renegotiation asked by the server): the
                # server waits for them. A send under way sends them when it ends.
                await self._flush(_INF, deadline)
            self._feed(await self.raw.recv_until(deadline))

    async def send_all(self, data: bytes, max_wait: float, deadline: float = _INF) -> None:
        # In slices: a large body is encrypted a piece at a time, so neither the loop nor
        # the memory buffer (which keeps its largest size) holds all of it at once.
        view = memoryview(data)
        for start in range(0, len(view), _TLS_SLICE):
            self.tls.write(view[start : start + _TLS_SLICE])
            await self._flush(max_wait, deadline)
        if not view:
            await self._flush(max_wait, deadline)

    async def shutdown_write(self, max_wait: float) -> None:
        """Half-close: TLS's close_notify, then the transport's; the peer reads EOF
        and this side can still receive (as TLS 1.3 allows, and OpenSSL for 1.2).

        Whole records already received are decrypted first and kept for ``recv``:
        ``unwrap`` looks for the peer's close_notify, and OpenSSL drops the
        application data it finds on the way."""
        held = [self._held]
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLError:  # wants more input, or the end: later reads say which
                break
            if not chunk:
                break
            held.append(chunk)
        self._held = b"".join(held)
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # (it would wait for the peer's close_notify: not asked for)
        except ssl.SSLError:
            pass
        await self._flush(max_wait, _INF)
        self.raw.shutdown_write()

    def expire(self) -> None:
        self.raw.expire()

    def close(self) -> None:
        self.raw.close()


_TLS_SLICE = 64 * 1024  # bytes encrypted and sent at a time: four full TLS records


class _SendGuard:
    """Cancels ``scope`` (a send through a trio stream) once the peer has taken nothing
    for ``max_wait`` seconds, or at ``deadline``; checked by :class:`Timers`."""

    __slots__ = ("deadline", "progress", "scope", "slot", "timers")

    def __init__(
        self, sock: socket.socket, scope: trio.CancelScope, max_wait: float, deadline: float
    ) -> None:
        now = trio.current_time()
        self.scope = scope
        self.deadline = deadline
        self.progress = _Progress(sock, now, max_wait)
        self.timers = timers()
        first = self.progress.next(now, deadline)
        # No limit at all (a tunnel's pump): nothing to watch.
        self.slot = self.timers.add(self, first) if first != _INF else None

    def expire(self) -> None:
        looked = self.progress.check(trio.current_time(), self.deadline)
        if looked is None:
            self.scope.cancel()
        else:
            self.slot = self.timers.add(self, looked)

    def disarm(self) -> None:
        if self.slot is not None:
            self.timers.discard(self, self.slot)


class StreamSocket:
    """The :class:`RawSocket` interface over a trio stream (used for TLS clients)."""

    __slots__ = ("_scope", "raw", "stream")

    def __init__(self, stream: trio.abc.Stream, raw: socket.socket) -> None:
        self.stream = stream
        self.raw = raw
        self._scope: trio.CancelScope | None = None

    def fileno(self) -> int:
        return self.raw.fileno()

    async def recv(self, max_wait: float, deadline: float = _INF) -> bytes:
        return await self.recv_until(min(deadline, trio.current_time() + max_wait))

    def recv_nowait(self) -> bytes | None:
        return None  # TLS records need the stream: always wait through it

    async def recv_until(self, deadline: float) -> bytes:
        with trio.CancelScope(deadline=deadline) as scope:
            self._scope = scope
            try:
                return bytes(await self.stream.receive_some(READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise OSError(str(e)) from None
            finally:
                self._scope = None
        raise trio.TooSlowError

    def expire(self) -> None:
        """End the wait of :meth:`recv_until` in progress with ``trio.TooSlowError``."""
        if self._scope is not None:
            self._scope.cancel()

    async def send_all(self, data: bytes, max_wait: float, deadline: float = _INF) -> None:
        """All of ``data``; ``trio.TooSlowError`` once the peer took nothing for
        ``max_wait`` seconds (as :meth:`RawSocket.send_all`), or at ``deadline``."""
        with trio.CancelScope() as scope:
            guard = _SendGuard(self.raw, scope, max_wait, deadline)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise OSError(str(e)) from None
            finally:
                guard.disarm()
            return
        raise trio.TooSlowError

    def close(self) -> None:
        self.raw.close()
