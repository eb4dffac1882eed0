"""The bundled load generator, for machines without wrk.

Closed-loop like wrk: each connection sends its next request as soon as the previous
response is complete. Keep-alive, precomputed request bytes, raw epoll sockets, and
optionally several processes (each with its share of the connections). It records the
latency of every request and reports percentiles.

A request with ``Connection: close`` reconnects after each response (as proxy.py's
reverse-proxy mode needs). Responses may be framed by Content-Length or chunked; the
chunked end is recognised by its ``0\\r\\n\\r\\n`` terminator, which is enough for the
small bodies a benchmark uses.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import pickle
import select
import socket
import sys
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

#: The percentiles every load result reports, as (label, fraction).
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p75", 0.75),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
)

#: A browser-like request's headers (with Host, about 900 bytes): real clients send
#: many, and the parser's cost grows with their count.
BROWSER_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
    ),
    (
        "Accept",
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
        "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    ),
    ("Accept-Language", "en-US,en;q=0.9,de;q=0.8,fr;q=0.7"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Referer", "http://127.0.0.1/app/dashboard/orders?view=compact&page=3"),
    (
        "Cookie",
        "session=8f14e45fceea167a5a36dedd4bea2543d3b4c2c1e2f3a4b5; "
        "_ga=GA1.1.1234567890.1700000000; _gid=GA1.1.987654321.1700000000; "
        "prefs=theme%3Ddark%26lang%3Den; csrftoken=Zq3xV9pLk2mN8rT5wY7uB1cD4eF6gH0j",
    ),
    ("Sec-Ch-Ua", '"Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"'),
    ("Sec-Ch-Ua-Platform", '"Linux"'),
    ("Sec-Fetch-Dest", "empty"),
    ("Sec-Fetch-Mode", "cors"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Cache-Control", "no-cache"),
)


def request_bytes(
    host: str,
    port: int,
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    method: str = "GET",
) -> bytes:
    """A whole bodiless HTTP/1.1 request, as sent on the wire."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class LoadResult:
    """What one load run measured. Latencies are in milliseconds."""

    tool: str
    connections: int
    duration: float
    requests: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    error_detail: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["rps"] = self.rps
        return data


def summarize_latencies(latencies_us: Sequence[int] | array[int]) -> dict[str, float]:
    """Percentiles (nearest rank), mean and max of latencies in µs, as milliseconds."""
    if not len(latencies_us):
        return {}
    ordered = sorted(latencies_us)
    n = len(ordered)
    out = {label: ordered[min(n - 1, int(q * n))] / 1000.0 for label, q in PERCENTILES}
    out["max"] = ordered[-1] / 1000.0
    out["mean"] = sum(ordered) / n / 1000.0
    return out


@dataclass
class _Conn:
    sock: socket.socket
    connected: bool = False
    buf: bytes = b""
    sent_at: int = 0


class _Worker:
    """The epoll loop of one load process."""

    def __init__(self, host: str, port: int, request: bytes, connections: int) -> None:
        self.addr = (host, port)
        self.request = request
        self.close_each = b"\r\nconnection: close" in request.lower()
        self.connections = connections
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.latencies: array[int] = array("q")
        self.errors: dict[str, int] = {}
        self.sending = True

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(self.addr)
        if code not in (0, errno.EINPROGRESS):
            self.error("connect")
            sock.close()
            return
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def drop(self, conn: _Conn, reopen: bool) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        self.ep.unregister(fd)
        conn.sock.close()
        if reopen and self.sending:
            self.open()

    def send(self, conn: _Conn) -> None:
        conn.sent_at = time.perf_counter_ns()
        try:
            conn.sock.send(self.request)
        except OSError:
            self.error("write")
            self.drop(conn, reopen=True)

    def run(self, duration: float) -> None:
        for _ in range(self.connections):
            self.open()
        deadline = time.perf_counter() + duration
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            for fd, events in self.ep.poll(min(0.1, deadline - now)):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if not conn.connected:
                    if events & (select.EPOLLERR | select.EPOLLHUP):
                        self.error("connect")
                        self.drop(conn, reopen=False)
                        continue
                    conn.connected = True
                    self.ep.modify(fd, select.EPOLLIN)
                    self.send(conn)
                    continue
                self.on_readable(conn)
        self.sending = False
        for conn in list(self.conns.values()):
            self.drop(conn, reopen=False)

    def on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.error("read")
            self.drop(conn, reopen=True)
            return
        buf = conn.buf + data if conn.buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            conn.buf = buf
            return
        head = buf[:end].lower()
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else len(head)])
            complete = len(buf) >= end + 4 + length
        elif b"\r\ntransfer-encoding:" in head:
            complete = buf.endswith(b"0\r\n\r\n")
        else:
            complete = False  # framed by close: wait for it
        if not complete:
            conn.buf = buf
            return
        conn.buf = b""
        self.latencies.append((time.perf_counter_ns() - conn.sent_at) // 1000)
        status = buf[9:12]
        if not (status.startswith(b"2") or status.startswith(b"3")):
            self.error(f"status {status.decode('latin-1')}")
        if self.close_each or b"\r\nconnection: close" in head:
            self.drop(conn, reopen=True)
        else:
            self.send(conn)


def _worker_main(
    host: str, port: int, request: bytes, connections: int, duration: float, out: Connection
) -> None:
    worker = _Worker(host, port, request, connections)
    worker.run(duration)
    out.send_bytes(pickle.dumps((worker.latencies.tobytes(), worker.errors)))
    out.close()


def run_load(
    host: str,
    port: int,
    request: bytes,
    connections: int = 32,
    duration: float = 5.0,
    processes: int = 1,
    cpus: Iterable[int] | None = None,
) -> LoadResult:
    """Drive ``connections`` closed-loop connections for ``duration`` seconds.

    Only loopback targets are allowed (ValueError otherwise). ``cpus`` pins the load
    processes (``os.sched_setaffinity``).
    """
    if not host.startswith("127.") and host not in ("localhost", "::1"):
        raise ValueError(f"load only goes to loopback addresses, not {host!r}")
    processes = max(1, min(processes, connections))
    ctx = multiprocessing.get_context("fork")
    jobs = []
    cpu_set = set(cpus) if cpus is not None else None
    for k in range(processes):
        share = connections // processes + (1 if k < connections % processes else 0)
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_pinned_worker,
            args=(cpu_set, host, port, request, share, duration, sender),
            daemon=True,
        )
        proc.start()
        sender.close()
        jobs.append((proc, receiver))
    latencies: array[int] = array("q")
    errors: dict[str, int] = {}
    for proc, receiver in jobs:
        if receiver.poll(duration + 30):
            raw, errs = pickle.loads(receiver.recv_bytes())
            latencies.frombytes(raw)
            for kind, count in errs.items():
                errors[kind] = errors.get(kind, 0) + count
        else:
            errors["load process hung"] = errors.get("load process hung", 0) + 1
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return LoadResult(
        tool="loadgen",
        connections=connections,
        duration=duration,
        requests=len(latencies),
        errors=sum(errors.values()),
        latency_ms=summarize_latencies(latencies),
        error_detail=errors,
    )


def _pinned_worker(
    cpus: set[int] | None,
    host: str,
    port: int,
    request: bytes,
    connections: int,
    duration: float,
    out: Connection,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    _worker_main(host, port, request, connections, duration, out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("url", help="http://127.0.0.1:PORT/path")
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("-p", "--processes", type=int, default=1)
    parser.add_argument("--browser", action="store_true", help="send browser-like headers")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    request = request_bytes(host, port, path, BROWSER_HEADERS if args.browser else ())
    result = run_load(host, port, request, args.connections, args.duration, args.processes)
    sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
