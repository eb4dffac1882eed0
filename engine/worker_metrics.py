"""The main process asks its workers for their metrics, and has them purge their caches,
over a socket pair per worker.

With ``workers > 1`` only the main process serves the admin listener, and every process
counts its own requests and keeps its own cache. On each scrape of ``/metrics`` the main
process asks every live worker for its metrics (:func:`engine.metrics.dump`), waits up
to :data:`ASK_TIMEOUT` for each (all at once), and renders the sum
(:func:`engine.metrics.merge`). A ``DELETE /cache`` on the admin listener is passed on to
every worker the same way, and answered with the sum of what they dropped.

The protocol, on one ``AF_UNIX`` stream: the main process sends asks (a 4-byte sequence
number, a 1-byte kind, a 4-byte length and a JSON payload); the worker answers each with
its number, a 4-byte length and JSON (for metrics, an empty answer: it could not encode
them; its last ones stand). A worker too busy to answer in time is shown with the
metrics it gave last; its late answer is read and dropped on the next ask (the number
tells it apart), and metrics asks that queued up while it was busy get one answer, to
the newest; every purge is carried out, late or not. Scrapes at the same time share one
ask, so each returns within :data:`ASK_TIMEOUT` however many there are.

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
from collections.abc import Callable, Mapping
from typing import Any

import trio

from engine import metrics
from engine.metrics import MetricDump

__all__ = ["ASK_TIMEOUT", "METRICS", "PURGE", "Retired", "WorkerChannel", "answer"]

log = logging.getLogger("filtergate.workers")

ASK_TIMEOUT = 1.0  # seconds a scrape waits for a worker before it shows its last answer
METRICS = 0  # ask for the worker's metrics (no payload)
PURGE = 1  # have it purge its caches (payload: the selector, see Gateway.purge)
_ASK = struct.Struct(">IBI")  # sequence number, kind, length of the JSON that follows
_HEAD = struct.Struct(">II")  # sequence number, length of the JSON that follows
_MAX_ASK = 1 << 20  # bytes; a bigger length means the stream is out of step
_MAX_ANSWER = 64 << 20

#: What a worker does with a purge: the selector in, how many answers it dropped out.
Purger = Callable[[dict[str, Any]], int]


async def answer(sock: socket.socket, purge: Purger | None = None) -> None:
    """Worker side: answer the main process's asks on ``sock`` until it closes."""
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    pending = bytearray()
    async with stream:
        try:
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    return  # the main process is gone (and so will this one be)
                pending += data
                asks: list[tuple[int, int, bytes]] = []
                while len(pending) >= _ASK.size:
                    seq, kind, length = _ASK.unpack_from(pending)
                    if length > _MAX_ASK:
                        log.error("an ask of %d bytes from the main process: out of step", length)
                        return
                    if len(pending) < _ASK.size + length:
                        break
                    asks.append((seq, kind, bytes(pending[_ASK.size : _ASK.size + length])))
                    del pending[: _ASK.size + length]
                # Metrics asks that queued up while this process was busy: the newest only.
                newest = max((i for i, a in enumerate(asks) if a[1] == METRICS), default=-1)
                for i, (seq, kind, payload) in enumerate(asks):
                    if kind == METRICS:
                        if i == newest:
                            await stream.send_all(_answer(seq))
                    else:
                        await stream.send_all(_carry_out(seq, kind, payload, purge))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _answer(seq: int) -> bytes:
    try:
        body = json.dumps(metrics.dump(), separators=(",", ":")).encode()
    except Exception as e:  # a backstop: the worker must outlive any plugin value
        log.error("this worker's metrics cannot be sent to the main process: %s", e)
        body = b""
    return _HEAD.pack(seq, len(body)) + body


def _carry_out(seq: int, kind: int, payload: bytes, purge: Purger | None) -> bytes:
    body = b""
    try:
        if kind == PURGE and purge is not None:
            body = json.dumps({"purged": purge(json.loads(payload))}).encode()
    except Exception:  # a plugin's purge: never the worker's end
        log.exception("a purge asked by the main process failed")
    return _HEAD.pack(seq, len(body)) + body


class WorkerChannel:
    """Main side: one worker's end of the pair, and the last metrics it gave."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._sock = sock  # (non-blocking now): asks are written with one plain send
        self.last: dict[str, MetricDump] = {}
        self._seq = 0
        self._buffer = bytearray()
        self._asking: trio.Event | None = None  # set when the metrics ask in flight ends
        self._reading = trio.Lock()  # one reader of the answers at a time
        self._waiting: set[int] = set()  # asks whose callers wait for their answer
        self._answers: dict[int, bytes] = {}  # answers read for another waiting caller
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
            body = await self._call(METRICS, b"")
            if body:  # empty: the worker could not encode its metrics, the last ones stand
                try:
                    self.last = json.loads(body)
                except ValueError as e:  # not JSON: never asked again
                    log.error("a worker's metrics could not be read: %s", e)
                    self.close()
        finally:
            self._asking = None
            done.set()
        return self.last

    async def purge(self, selector: dict[str, Any]) -> int | None:
        """Have the worker purge its caches; how many answers it dropped, or None when
        it did not answer in ``self.timeout`` seconds (it purges once it reads the ask,
        unless it is gone)."""
        body = await self._call(PURGE, json.dumps(selector).encode())
        try:
            return int(json.loads(body)["purged"]) if body else None
        except (ValueError, KeyError, TypeError):
            return None

    async def _call(self, kind: int, payload: bytes) -> bytes | None:
        """Send one ask at once and wait up to ``self.timeout`` for its answer; None
        when it does not come in time or the worker is gone. The ask is written whole
        whatever the wait: a worker that is slow to read gets every purge."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        if not self._send(_ASK.pack(seq, kind, len(payload)) + payload):
            return None
        self._waiting.add(seq)
        try:
            with trio.move_on_after(self.timeout):
                while seq not in self._answers:
                    async with self._reading:
                        if seq in self._answers:
                            break
                        got, body = await self._read_answer()
                        if got in self._waiting:  # (else a late answer nobody waits for)
                            self._answers[got] = body
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker died: its supervisor retires it
        except ValueError as e:  # out of step: never asked again
            self._give_up(f"its answer could not be read: {e}")
        finally:
            self._waiting.discard(seq)
        return self._answers.pop(seq, None)

    def _send(self, frame: bytes) -> bool:
        """Write ``frame`` now, whole, without waiting; False when it cannot be (the
        worker is gone, or has not read for so long that its socket buffer is full:
        the channel is closed then, a frame may have been cut)."""
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False  # gone (or closed already)
        if sent == len(frame):
            return True
        self._give_up(f"it has not read its asks for too long ({sent} of {len(frame)} bytes)")
        return False

    def _give_up(self, why: str) -> None:
        log.error("a worker's channel is closed, no more metrics or purges reach it: %s", why)
        self.close()

    async def _read_answer(self) -> tuple[int, bytes]:
        """The next answer on the stream: its number and its body."""
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
        return seq, body

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
