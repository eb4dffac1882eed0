"""The main process asks its workers for their metrics, over a socket pair per worker.

With ``workers > 1`` only the main process serves the admin listener, and every process
counts its own requests. On each scrape of ``/metrics`` the main process asks every live
worker for its metrics (:func:`engine.metrics.dump`), waits up to :data:`ASK_TIMEOUT`
for each (all at once), and renders the sum (:func:`engine.metrics.merge`).

The protocol, both ways on one ``AF_UNIX`` stream: the main process sends a 4-byte
sequence number; the worker answers with that number, a 4-byte length and its metrics as
JSON (an empty answer: it could not encode them; its last ones stand). A worker too busy
to answer in time is shown with the metrics it gave last; its late answer is read and
dropped on the next ask (the number tells it apart), and asks that queued up while it
was busy get one answer, to the newest. Scrapes at the same time share one ask, so
each returns within :data:`ASK_TIMEOUT` however many there are.

What a dead worker counted still counts: its last answer is kept (:class:`Retired`),
without its gauges, so counters summed over the workers never go down when one dies
and is respawned (Prometheus would read that as a reset). Only what it counted after
the last scrape is lost.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Mapping

import trio

from engine import metrics
from engine.metrics import MetricDump

__all__ = ["ASK_TIMEOUT", "Retired", "WorkerMetrics", "answer"]

log = logging.getLogger("filtergate.workers")

ASK_TIMEOUT = 1.0  # seconds a scrape waits for a worker before it shows its last answer
_HEAD = struct.Struct(">II")  # sequence number, length of the JSON that follows
_MAX_ANSWER = 64 << 20  # bytes; a bigger length means the stream is out of step


async def answer(sock: socket.socket) -> None:
    """Worker side: answer the main process's asks on ``sock`` until it closes."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    pending = b""
    async with stream:
        try:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return  # the main process is gone (and so will this one be)
                pending += data
                if len(pending) < 4:
                    continue
                # Asks that queued up while this process was busy: answer the newest.
                whole = len(pending) - len(pending) % 4
                seq = int.from_bytes(pending[whole - 4 : whole], "big")
                pending = pending[whole:]
                await stream.send_all(_answer(seq))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _answer(seq: int) -> bytes:
    try:
        body = json.dumps(metrics.dump(), separators=(",", ":")).encode()
    except Exception as e:  # a backstop: the worker must outlive any plugin value
        log.error("this worker's metrics cannot be sent to the main process: %s", e)
        body = b""
    return _HEAD.pack(seq, len(body)) + body


class WorkerMetrics:
    """Main side: one worker's end of the pair, and the last metrics it gave."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.last: dict[str, MetricDump] = {}
        self._seq = 0
        self._buffer = bytearray()
        self._asking: trio.Event | None = None  # set when the ask in flight ends
        self.timeout = ASK_TIMEOUT

    async def ask(self) -> dict[str, MetricDump]:
        """The worker's metrics now, or the last ones it gave if it does not answer in
        ``self.timeout`` seconds (or is gone). A scrape that comes while another one's
        ask is in flight waits for that answer, within its own ``self.timeout``."""
        if self._asking is not None:
            with trio.move_on_after(self.timeout):
                await self._asking.wait()
            return self.last
        self._asking = done = trio.Event()
        try:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            with trio.move_on_after(self.timeout):
                await self.stream.send_all(self._seq.to_bytes(4, "big"))
                while not await self._read_answer():
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker died: its supervisor retires it
        except ValueError as e:  # out of step, or not JSON: never asked again
            log.error("a worker's metrics could not be read: %s", e)
            self.close()
        finally:
            self._asking = None
            done.set()
        return self.last

    async def _read_answer(self) -> bool:
        """Read one answer; True when it was the one asked for (then kept in ``last``)."""
        buffer = self._buffer
        while len(buffer) < _HEAD.size:
            await self._fill()
        seq, length = _HEAD.unpack_from(buffer)
        if length > _MAX_ANSWER:
            raise ValueError(f"an answer of {length} bytes: out of step")
        while len(buffer) < _HEAD.size + length:
            await self._fill()
        body = bytes(buffer[_HEAD.size : _HEAD.size + length])
        del buffer[: _HEAD.size + length]
        if seq != self._seq:
            return False  # a late answer to an ask that gave up on it
        if body:  # empty: the worker could not encode its metrics, the last ones stand
            self.last = json.loads(body)
        return True

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 16)
        if not data:
            raise trio.BrokenResourceError("the worker closed its end")
        self._buffer += data

    def close(self) -> None:
        self.stream.socket.close()


class Retired:
    """What the workers that are gone counted: their last metrics, without gauges."""

    def __init__(self) -> None:
        self.metrics: dict[str, MetricDump] = {}

    def add(self, last: Mapping[str, MetricDump]) -> None:
        self.metrics = metrics.merge([self.metrics, last], gauges=False)
