"""The socket layer under the server and the upstream pools.

trio's ``SocketStream`` checkpoints (yields to the scheduler) on every send and receive
and wraps each in a cancel scope; on a proxy's hot path that is several scheduler
passes per request for sockets that are almost always ready. :class:`RawSocket` tries
the non-blocking syscall first and waits (``wait_readable``/``wait_writable`` under one
deadline) only when the kernel says it must. Callers checkpoint once per request
cycle, and once per chunk in body loops, so a busy connection cannot starve the rest.

TLS connections use :class:`StreamSocket`, the same interface over a trio stream.
"""

from __future__ import annotations

import errno
import logging
import socket

import trio

__all__ = ["READ_SIZE", "RESOURCE_ERRORS", "RawSocket", "StreamSocket", "accept_backoff"]

READ_SIZE = 64 * 1024
_INF = float("inf")

# accept() errors that mean "out of resources": wait for some to be freed, do not spin.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def accept_backoff(error: OSError, log: logging.Logger) -> None:
    """After a failed ``accept()``: back off when out of resources, else go on."""
    if error.errno in RESOURCE_ERRORS:
        log.warning("accept failed (%s); pausing accepts for 100 ms", error)
        await trio.sleep(0.1)


class RawSocket:
    """A connected non-blocking socket. Timeouts raise ``trio.TooSlowError``;
    resets raise ``OSError``; ``recv`` returns ``b""`` at EOF."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    async def recv(self, max_wait: float, deadline: float = _INF) -> bytes:
        """Up to 64 KiB; waits at most ``max_wait`` seconds and never past ``deadline``."""
        sock = self.sock
        try:
            return sock.recv(READ_SIZE)
        except BlockingIOError:
            pass
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + max_wait)):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
        raise trio.TooSlowError

    def recv_nowait(self) -> bytes | None:
        """What is readable now (``b""`` at EOF), or ``None`` when a wait is needed."""
        try:
            return self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return None

    async def recv_ready(self) -> bytes:
        """Wait until readable and read, with no deadline: the caller's scope bounds it."""
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                continue

    async def send_all(self, data: bytes, max_wait: float, deadline: float = _INF) -> None:
        """All of ``data``; waits at most ``max_wait`` seconds and never past ``deadline``."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + max_wait)):
            while view:
                await trio.lowlevel.wait_writable(sock)
                try:
                    view = view[sock.send(view) :]
                except BlockingIOError:
                    continue
            return
        raise trio.TooSlowError

    def shutdown_write(self) -> None:
        """Half-close: the peer reads EOF, this side can still receive."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class StreamSocket:
    """The :class:`RawSocket` interface over a trio stream (used for TLS)."""

    __slots__ = ("raw", "stream")

    def __init__(self, stream: trio.abc.Stream, raw: socket.socket) -> None:
        self.stream = stream
        self.raw = raw

    def fileno(self) -> int:
        return self.raw.fileno()

    async def recv(self, max_wait: float, deadline: float = _INF) -> bytes:
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + max_wait)):
            try:
                return bytes(await self.stream.receive_some(READ_SIZE))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise OSError(str(e)) from None
        raise trio.TooSlowError

    def recv_nowait(self) -> bytes | None:
        return None  # TLS records need the stream: always wait through it

    async def recv_ready(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise OSError(str(e)) from None

    async def send_all(self, data: bytes, max_wait: float, deadline: float = _INF) -> None:
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + max_wait)):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise OSError(str(e)) from None
            return
        raise trio.TooSlowError

    def close(self) -> None:
        self.raw.close()
