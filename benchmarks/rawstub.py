"""The throughput upstream: a minimal HTTP/1.1 server on raw epoll sockets.

It must be much faster than any gateway it sits behind, so it does almost nothing: one
precomputed keep-alive response for every request, a plain scan for the end of the
head, and a look at the head only for the few headers that change the framing
(Content-Length, chunked Transfer-Encoding, Connection: close). Two targets differ:

- ``/bytes/N`` answers N zero bytes (``Content-Length: N``), streamed from one shared
  buffer: the download half of the big-body scenario.
- a request with a body is read and discarded, and answered ``{"received": N}``: the
  upload half.

Several processes can share the listening socket (``--procs``; each waits on it with
EPOLLEXCLUSIVE). Run it as ``python -m benchmarks.rawstub --port 0``: it prints
``READY <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, field

BODY = b'{"id":1,"name":"Ada Lovelace","email":"ada@example.com","tier":"gold"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
ZEROS = bytes(1 << 20)
RECV_SIZE = 1 << 18
# A head larger than this is not a benchmark request: drop the connection.
MAX_HEAD = 64 * 1024


def _json_response(body: bytes, close: bool = False) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
        + body
    )


RESPONSE_CLOSE = _json_response(BODY, close=True)


@dataclass
class Conn:
    """One client connection: unparsed input, pending output, body-reading state."""

    sock: socket.socket
    buf: bytes = b""
    # Output: bytes to send, and then a count of zero bytes still to stream.
    out: deque[bytes] = field(default_factory=deque)
    zeros_left: int = 0
    body_left: int = 0  # Content-Length bytes of the current request still to discard
    chunked: bool = False
    chunk_left: int = -1  # -1: expecting a chunk-size line; else data (+CRLF) left
    received: int = 0
    close_after: bool = False
    writing: bool = False


class RawStub:
    """The epoll loop of one process."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.ep = select.epoll()
        flags = select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)
        self.ep.register(listener.fileno(), flags)
        self.conns: dict[int, Conn] = {}

    def serve_forever(self) -> None:
        lfd = self.listener.fileno()
        conns = self.conns
        while True:
            for fd, events in self.ep.poll():
                if fd == lfd:
                    self.accept_all()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & select.EPOLLOUT:
                    self.flush(conn)
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self.read(conn)

    def accept_all(self) -> None:
        # Drain the whole accept queue on each wake-up: a burst of connections must not
        # wait one loop pass each.
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = Conn(sock)
            self.ep.register(sock.fileno(), select.EPOLLIN)

    def close(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        conn.sock.close()

    def read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        if not conn.buf and not conn.body_left and not conn.chunked and not conn.out:
            # The fast path: one whole bodiless keep-alive request in one read.
            end = data.find(b"\r\n\r\n")
            if end == len(data) - 4:
                low = data.lower()
                if b"content-length" not in low and b"transfer-encoding" not in low:
                    if data.startswith(b"GET /bytes/") or b"connection: close" in low:
                        self.on_data(conn, data)
                        return
                    try:
                        sent = conn.sock.send(RESPONSE)
                    except OSError:
                        self.close(conn)
                        return
                    if sent < len(RESPONSE):
                        conn.out.append(RESPONSE[sent:])
                        self.want_write(conn)
                    return
        self.on_data(conn, data)

    def on_data(self, conn: Conn, data: bytes) -> None:
        buf = conn.buf + data if conn.buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            if conn.body_left:
                take = min(conn.body_left, n - pos)
                pos += take
                conn.body_left -= take
                conn.received += take
                if conn.body_left:
                    break
                self.answer_upload(conn)
                continue
            if conn.chunked:
                advanced = self.read_chunks(conn, buf, pos)
                if advanced < 0:
                    self.close(conn)
                    return
                if advanced == pos:
                    break
                pos = advanced
                continue
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if n - pos > MAX_HEAD:
                    self.close(conn)
                    return
                break
            head = buf[pos:end]
            pos = end + 4
            self.on_head(conn, head)
        conn.buf = buf[pos:] if pos < n else b""
        self.flush(conn)

    def on_head(self, conn: Conn, head: bytes) -> None:
        low = head.lower()
        conn.close_after = b"\r\nconnection: close" in low
        conn.received = 0
        if b"\r\ntransfer-encoding:" in low and b"chunked" in low:
            conn.chunked = True
            conn.chunk_left = -1
            return
        i = low.find(b"\r\ncontent-length:")
        if i >= 0:
            j = low.find(b"\r\n", i + 2)
            length = int(low[i + 17 : j if j >= 0 else len(low)].strip())
            if length:
                conn.body_left = length
                return
        if head.startswith(b"GET /bytes/"):
            target = head.split(b" ", 2)[1]
            size = int(target[len(b"/bytes/") :].split(b"?", 1)[0] or b"0")
            conn.out.append(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: " + str(size).encode() + b"\r\n\r\n"
            )
            conn.zeros_left = size
            return
        conn.out.append(RESPONSE_CLOSE if conn.close_after else RESPONSE)

    def read_chunks(self, conn: Conn, buf: bytes, pos: int) -> int:
        """Consume chunked body bytes from ``pos``; the new position, or -1 on garbage."""
        n = len(buf)
        while pos < n:
            if conn.chunk_left < 0:
                line_start = pos
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return pos
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    return -1
                pos = eol + 2
                if size == 0:
                    # The last chunk: the body ends after the (usually empty) trailers.
                    if buf.startswith(b"\r\n", pos):
                        end = pos + 2
                    else:
                        trailers_end = buf.find(b"\r\n\r\n", pos)
                        if trailers_end < 0:
                            return line_start  # parse the last chunk again with more data
                        end = trailers_end + 4
                    conn.chunked = False
                    self.answer_upload(conn)
                    return end
                conn.chunk_left = size + 2  # the data and its CRLF
            take = min(conn.chunk_left, n - pos)
            conn.received += max(0, min(take, conn.chunk_left - 2))
            conn.chunk_left -= take
            pos += take
            if conn.chunk_left == 0:
                conn.chunk_left = -1
        return pos

    def answer_upload(self, conn: Conn) -> None:
        body = b'{"received":' + str(conn.received).encode() + b"}"
        conn.out.append(_json_response(body, close=conn.close_after))

    def want_write(self, conn: Conn) -> None:
        if not conn.writing:
            conn.writing = True
            self.ep.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def flush(self, conn: Conn) -> None:
        sock = conn.sock
        try:
            while conn.out or conn.zeros_left:
                if conn.out:
                    chunk = conn.out[0]
                    sent = sock.send(chunk)
                    if sent < len(chunk):
                        conn.out[0] = chunk[sent:]
                        self.want_write(conn)
                        return
                    conn.out.popleft()
                else:
                    sent = sock.send(memoryview(ZEROS)[: min(conn.zeros_left, len(ZEROS))])
                    conn.zeros_left -= sent
        except BlockingIOError:
            self.want_write(conn)
            return
        except OSError:
            self.close(conn)
            return
        if conn.writing:
            conn.writing = False
            self.ep.modify(sock.fileno(), select.EPOLLIN)
        if conn.close_after and not conn.body_left and not conn.chunked:
            self.close(conn)


def open_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rawstub")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the socket")
    args = parser.parse_args(argv)
    listener = open_listener(args.host, args.port)
    children: list[int] = []
    for _ in range(args.procs - 1):
        pid = os.fork()
        if pid == 0:
            children.clear()
            break
        children.append(pid)
    if children or args.procs == 1:
        sys.stdout.write(f"READY {listener.getsockname()[1]}\n")
        sys.stdout.flush()

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        RawStub(listener).serve_forever()
    except SystemExit:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
