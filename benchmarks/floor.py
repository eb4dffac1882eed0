"""The floor of this stack: a proxied request on trio + h11 with nothing else done.

Not a proxy to run anywhere but here. It does the least a proxy that parses HTTP with
h11 must do, the way filtergate's engine does it, and nothing more:

- one task per client connection, one upstream connection per client connection;
- h11 parses the request head, the response head and the response body's framing
  (h11's own readers, through ``engine.wire``, as in the gateway);
- the request head is sent on as h11 parsed it; the response head and body go back in
  one send;
- sockets are used raw: the non-blocking syscall first, trio's ``wait_readable`` or
  ``wait_writable`` only when the kernel says it would block.

No routing, no header handling, no timeouts, no pool, no error answers: a request with
a body, a response not framed by Content-Length, or anything h11 refuses ends the
connection. So every gateway that parses both heads with h11 on trio costs at least
this much per request; the benchmark table shows where filtergate and proxy.py (which
relays the response unparsed) sit against it.

Run it as ``python -m benchmarks.floor --upstream 127.0.0.1:PORT --port 0``; it prints
``READY <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import socket
import sys
from functools import partial

import h11
import trio
from trio.lowlevel import wait_readable, wait_writable

from benchmarks.forwarder import open_listener
from engine.wire import ContentLengthReader, ProtocolError, Reader

READ_SIZE = 65536
MAX_HEAD = 64 * 1024


async def recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(READ_SIZE)
        except BlockingIOError:
            await wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await wait_writable(sock)


def request_head(req: h11.Request) -> bytes:
    head = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    for name, value in req.headers.raw_items():
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return b"".join(head)


async def relay(client: socket.socket, upstream_address: tuple[str, int]) -> None:
    """Serve ``client`` until it closes, or until anything the floor does not do."""
    upstream = socket.create_connection(upstream_address)  # blocking: loopback only
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    upstream.setblocking(False)
    from_client = Reader(MAX_HEAD)
    from_upstream = Reader(MAX_HEAD)
    try:
        while True:
            req = from_client.request()
            if req is None:
                if from_client.eof:
                    return
                from_client.feed(await recv(client))
                continue
            keep_alive = True
            for name, value in req.headers:
                if name == b"content-length" or name == b"transfer-encoding":
                    return  # request bodies are not relayed
                if name == b"connection" and b"close" in value:
                    keep_alive = False
            await send_all(upstream, request_head(req))
            resp = from_upstream.response()
            while resp is None:
                from_upstream.feed(await recv(upstream))
                resp = from_upstream.response()
            if type(resp) is not h11.Response:
                return  # 1xx: not handled
            head = [b"HTTP/1.1 %d %s\r\n" % (resp.status_code, resp.reason)]
            length = None
            for name, value in resp.headers.raw_items():
                if name.lower() == b"content-length":
                    length = int(value)
                head += (name, b": ", value, b"\r\n")
            if length is None:
                return  # chunked and close-delimited bodies are not relayed
            head.append(b"\r\n")
            body = ContentLengthReader(length)
            while True:
                part = from_upstream.body(body)
                if part is None:
                    from_upstream.feed(await recv(upstream))
                elif type(part) is h11.Data:
                    head.append(bytes(part.data))
                else:
                    break
            await send_all(client, b"".join(head))
            if not keep_alive:
                return
            if len(from_client):
                await trio.lowlevel.checkpoint()  # pipelined: yield, as a wait would
    except (ProtocolError, OSError):
        return
    finally:
        upstream.close()
        client.close()


async def serve(listener: socket.socket, upstream: tuple[str, int]) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            await wait_readable(listener)
            while True:  # drain the accept queue on every wake-up
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(relay, client, upstream)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    args = parser.parse_args(argv)
    up_host, _, up_port = args.upstream.rpartition(":")
    listener = open_listener(args.host, args.port)
    listener.setblocking(False)
    sys.stdout.write(f"READY {listener.getsockname()[1]}\n")
    sys.stdout.flush()
    try:
        trio.run(partial(serve, listener, (up_host, int(up_port))))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
