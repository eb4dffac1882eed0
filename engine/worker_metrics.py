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
_MAX_OUTBOX = 4 << 20  # bytes of asks a worker has not read: past this it is given up

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
                answers = [
                    _answer(seq) if kind == METRICS else _carry_out(seq, kind, payload, purge)
                    for i, (seq, kind, payload) in enumerate(asks)
                    if kind != METRICS or i == newest
                ]
                if answers:  # (one send for the batch)
                    await stream.send_all(b"".join(answers))
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
    """Main side: one worker's end of the pair, and the last metrics it gave.

    ``serve`` (run by the worker's supervisor for as long as it lives) writes the asks
    queued by ``ask`` and ``purge``, whole and in order, however long the worker takes
    to read them, and reads every answer as it comes, so that a worker never waits on
    its own answers. Callers wait for theirs up to ``timeout``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.last: dict[str, MetricDump] = {}
        self._seq = 0
        self._buffer = bytearray()
        self._asking: trio.Event | None = None  # set when the metrics ask in flight ends
        self._outbox = bytearray()  # asks not written yet
        self._queued = trio.Event()  # set when the outbox has something
        self._waiters: dict[int, trio.Event] = {}  # asks whose callers wait, by number
        self._answers: dict[int, bytes] = {}  # their answers, until they take them
        self._closed = False
        self.timeout = ASK_TIMEOUT

    async def serve(self) -> None:
        """Write the asks and read the answers until the worker or this side closes."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                await self._read()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            for waiter in self._waiters.values():
                waiter.set()  # no answer is coming

    async def _read(self) -> None:
        try:
            while True:
                seq, body = await self._read_answer()
                waiter = self._waiters.get(seq)
                if waiter is not None:  # (else a late answer nobody waits for)
                    self._answers[seq] = body
                    waiter.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the worker died (its supervisor retires it), or this side closed
        except ValueError as e:  # out of step: never asked again
            self._give_up(f"its answer could not be read: {e}")

    async def _write(self) -> None:
        try:
            while True:
                await self._queued.wait()
                self._queued = trio.Event()
                data = bytes(self._outbox)
                self._outbox.clear()
                await self.stream.send_all(data)  # whole: only the channel's end cuts it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # (the reader sees it too)

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
                    self._give_up(f"its metrics could not be read: {e}")
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
        """Queue one ask and wait up to ``self.timeout`` for its answer; None when it
        does not come in time or the worker is gone. The ask is written all the same:
        a worker that is slow to read gets every purge."""
        if self._closed:
            return None
        if len(self._outbox) > _MAX_OUTBOX:
            self._give_up(f"it has not read {len(self._outbox)} bytes of asks")
            return None
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self._outbox += _ASK.pack(seq, kind, len(payload)) + payload
        self._queued.set()
        waiter = self._waiters[seq] = trio.Event()
        try:
            with trio.move_on_after(self.timeout):
                await waiter.wait()
        finally:
            del self._waiters[seq]
        return self._answers.pop(seq, None)

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
        self._closed = True
        self.stream.socket.close()
        for waiter in self._waiters.values():
            waiter.set()


class Retired:
    """What the workers that are gone counted: their last metrics, without gauges."""

    def __init__(self) -> None:
        self.metrics: dict[str, MetricDump] = {}

    def add(self, last: Mapping[str, MetricDump]) -> None:
        self.metrics = metrics.merge([self.metrics, last], gauges=False)
