"""The reference: a minimal, naive trio + h11 reverse proxy.

One task per client connection, one upstream keep-alive connection per client
connection (opened on its first request, reused after), bodies streamed both ways, no
features. It is what this stack does when used the obvious way: the ceiling a gateway
on trio + h11 must beat by doing less work per request, not more.

Run it as ``python -m benchmarks.forwarder --upstream 127.0.0.1:PORT --port 0``; it
prints ``READY <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from functools import partial

import h11
import trio

# Hop-by-hop headers (RFC 9110 7.6.1) are the connection's own, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
RECV_SIZE = 65536


class Forwarder:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)

    async def next_event(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await stream.receive_some(RECV_SIZE))

    async def handle(self, client: trio.SocketStream) -> None:
        server = h11.Connection(h11.SERVER)
        upstream: trio.SocketStream | None = None
        upconn = h11.Connection(h11.CLIENT)
        try:
            while True:
                event = await self.next_event(server, client)
                if not isinstance(event, h11.Request):
                    return
                if upstream is None:
                    upstream = await trio.open_tcp_stream(*self.upstream)
                headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
                await upstream.send_all(
                    upconn.send(
                        h11.Request(method=event.method, target=event.target, headers=headers)
                    )
                )
                while True:
                    body = await self.next_event(server, client)
                    if isinstance(body, h11.Data):
                        await upstream.send_all(upconn.send(body))
                    elif isinstance(body, h11.EndOfMessage):
                        await upstream.send_all(upconn.send(h11.EndOfMessage()))
                        break
                    else:
                        return
                response = await self.next_event(upconn, upstream)
                if not isinstance(response, h11.Response):
                    return
                headers = [(n, v) for n, v in response.headers if n not in HOP_BY_HOP]
                await client.send_all(
                    server.send(
                        h11.Response(
                            status_code=response.status_code,
                            headers=headers,
                            reason=response.reason,
                        )
                    )
                )
                while True:
                    body = await self.next_event(upconn, upstream)
                    if isinstance(body, h11.Data):
                        await client.send_all(server.send(body))
                    elif isinstance(body, h11.EndOfMessage):
                        await client.send_all(server.send(h11.EndOfMessage()))
                        break
                    else:
                        return
                if server.our_state is not h11.DONE or upconn.our_state is not h11.DONE:
                    return
                server.start_next_cycle()
                upconn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            if upstream is not None:
                await upstream.aclose()
            await client.aclose()


def open_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    return sock


async def serve(listener: socket.socket, forwarder: Forwarder) -> None:
    trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
    await trio.serve_listeners(forwarder.handle, [trio_listener])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.forwarder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    parser.add_argument("--procs", type=int, default=1, help="processes sharing the socket")
    args = parser.parse_args(argv)
    up_host, _, up_port = args.upstream.rpartition(":")
    listener = open_listener(args.host, args.port)
    is_parent = True
    for _ in range(args.procs - 1):
        if os.fork() == 0:
            is_parent = False
            break
    if is_parent:
        sys.stdout.write(f"READY {listener.getsockname()[1]}\n")
        sys.stdout.flush()
    try:
        trio.run(partial(serve, listener, Forwarder(up_host, int(up_port))))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
