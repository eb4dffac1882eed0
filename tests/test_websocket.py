"""Protocol upgrades (WebSocket) through the gateway, end to end.

The upstream is the ``echo`` stub served by hypercorn (a real WebSocket server), or a
raw trio server where the upstream must misbehave; the client is wsproto over a trio
socket, the way a browser's handshake and frames look on the wire.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from engine.config import load
from engine.schema import ConfigError
from engine.testing import Stubs, open_gateway, raw_exchange
from plugins.key_auth import hash_key
from tests.upstreams import serve_raw


class WsClient:
    """A WebSocket client connection: wsproto's state machine on a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []

    async def next_event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
            if not data and not self.pending:
                raise EOFError("the connection closed")
        return self.pending.pop(0)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def message(self) -> str | bytes:
        event = await self.next_event()
        if isinstance(event, TextMessage):
            return event.data
        assert isinstance(event, BytesMessage), event
        return bytes(event.data)

    async def close(self) -> None:
        await self.send(CloseConnection(code=1000))
        while not isinstance(await self.next_event(), CloseConnection):
            pass


async def handshake(
    port: int, path: str = "/ws", headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[WsClient, Event]:
    """Open a connection and send the handshake; the client and the first event
    (``AcceptConnection`` or ``RejectConnection``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WsClient(stream)
    await client.send(Request(host="api.test", target=path, extra_headers=headers or []))
    return client, await client.next_event()


@asynccontextmanager
async def connected(
    port: int, path: str = "/ws", headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WsClient]:
    client, event = await handshake(port, path, headers)
    assert isinstance(event, AcceptConnection), event
    try:
        yield client
    finally:
        await client.stream.aclose()


def _config(target: str, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": [target], "read_timeout": "5s"}},
        "routes": [
            {"name": "ws", "prefix": "/", "upstream": "up", "upgrades": ["websocket"]} | route
        ],
    }


async def test_a_websocket_is_relayed_both_ways(stubs: Stubs, tmp_path: Path) -> None:
    """The handshake goes upstream with its Upgrade and the gateway's forwarding
    headers, the upstream's 101 comes back, and then frames cross both ways until the
    close handshake; the access log has one line, status 101, once it ended."""
    log = tmp_path / "access.log"
    config = _config(stubs.target("echo"))
    config["access_log"] = {"path": str(log), "format": "json"}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            async with connected(gw.port, "/chat?room=1") as ws:
                seen = json.loads(await ws.message())
                assert seen["path"] == "/chat"
                assert seen["query"] == "room=1"
                assert seen["headers"]["upgrade"] == "websocket"
                assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
                assert seen["headers"]["via"] == "1.1 filtergate"
                assert "sec-websocket-key" in seen["headers"]
                await ws.send(TextMessage(data="hello"))
                assert await ws.message() == "hello"
                big = bytes(range(256)) * 1000  # several reads and writes each way
                await ws.send(BytesMessage(data=big))
                received = b""
                while len(received) < len(big):
                    chunk = await ws.message()
                    assert isinstance(chunk, bytes)
                    received += chunk
                assert received == big
                await ws.close()
            # The close handshake done, the upstream closes; the tunnel ends and logs.
            for _ in range(100):
                if log.exists() and log.read_text():
                    break
                await trio.sleep(0.05)
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["status"] == 101
    assert line["route"] == "ws"
    assert line["upstream"] == stubs.target("echo")
    assert line["bytes_sent"] > len(big)


async def test_without_upgrades_on_the_route_the_upgrade_is_not_passed_on(stubs: Stubs) -> None:
    """As before: Upgrade is hop-by-hop, so the upstream sees a plain GET and answers it."""
    config = _config(stubs.target("echo"), upgrades=[])
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            client, event = await handshake(gw.port)
            assert isinstance(event, RejectConnection)
            assert event.status_code == 200
            body = b""
            while True:
                data = await client.next_event()
                assert isinstance(data, RejectData)
                body += data.data
                if data.body_finished:
                    break
            assert "upgrade" not in json.loads(body)["headers"]
            await client.stream.aclose()


async def test_an_upstream_that_refuses_the_switch_leaves_plain_http(stubs: Stubs) -> None:
    """hypercorn's users service refuses WebSockets (403). The bytes the client sends
    next are its next HTTP request, read and routed by the gateway: never tunnelled to
    the upstream (the "WebSocket smuggling" of proxies that believe the client)."""
    config = _config(stubs.target("users"))
    guard = {"key-auth": {"consumers": [{"id": "ops", "key_sha256": hash_key("k")}]}}
    config["routes"].insert(0, {"name": "admin", "path": "/admin", "upstream": "up"})
    config["routes"][0]["plugins"] = guard
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(
                b"GET /ws HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                b"GET /admin HTTP/1.1\r\nHost: api.test\r\n\r\n"
            )
            data = b""
            while data.count(b"HTTP/1.1 ") < 2:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
            await stream.aclose()
    first, second = data.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"403 ")
    # The gateway read it and routed it: /admin asks for a key (not the users 404).
    assert second.startswith(b"401 ")


async def test_a_101_to_a_protocol_not_asked_is_502() -> None:
    """An upstream switching to what the client did not ask (or without saying to
    what) would make the connection a tunnel to it for any bytes: refused."""

    async def switcher(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )
            await trio.sleep_forever()

    with trio.fail_after(20):
        async with serve_raw(switcher) as port:
            async with open_gateway(_config(f"127.0.0.1:{port}")) as gw:
                data = await raw_exchange(
                    gw.port,
                    b"GET /ws HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade, close\r\n"
                    b"Upgrade: websocket\r\n\r\n",
                )
                assert data.startswith(b"HTTP/1.1 502 ")


async def _recorded_upgrade(request: bytes) -> bytes:
    """The head an upstream received for ``request`` sent through the gateway (which
    answers it with a plain 200)."""
    heads: list[bytes] = []

    async def recorder(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            heads.append(data.split(b"\r\n\r\n")[0])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with serve_raw(recorder) as port:
        async with open_gateway(_config(f"127.0.0.1:{port}")) as gw:
            data = await raw_exchange(gw.port, request)
            assert data.startswith(b"HTTP/1.1 200 "), data
    (head,) = heads
    return head.lower()


@pytest.mark.parametrize(
    ("request_head", "upgrade"),
    [
        # Only the protocols the route allows are asked for, in the client's order.
        (b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\nUpgrade: foo, WebSocket", b"websocket"),
        # An Upgrade that Connection does not name is not for this hop.
        (b"GET / HTTP/1.1\r\nConnection: close\r\nUpgrade: websocket", None),
        # HTTP/1.0 has no upgrades (RFC 9110 7.8).
        (b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket", None),
        # A request with a body does not switch: its body would run into the tunnel.
        (
            b"POST / HTTP/1.1\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\n"
            b"Content-Length: 2",
            None,
        ),
    ],
)
async def test_what_is_asked_upstream(request_head: bytes, upgrade: bytes | None) -> None:
    request = request_head + b"\r\nHost: api.test\r\n\r\n"
    if request.startswith(b"POST"):
        request += b"hi"
    with trio.fail_after(20):
        head = await _recorded_upgrade(request)
    lines = head.split(b"\r\n")
    if upgrade is None:
        assert not any(line.startswith(b"upgrade:") for line in lines)
    else:
        assert b"upgrade: " + upgrade in lines
        assert b"connection: upgrade" in lines


async def test_the_route_s_filters_run_before_the_switch(stubs: Stubs) -> None:
    """A WebSocket is no way around authentication: without the key, 401 and the
    upstream never sees the handshake; with it, the switch happens."""
    config = _config(stubs.target("echo"))
    consumer = {"id": "alice", "key_sha256": hash_key("s3cret")}
    config["routes"][0]["plugins"] = {
        "key-auth": {"consumers": [consumer], "hide_credentials": True}
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            client, event = await handshake(gw.port)
            assert isinstance(event, RejectConnection)
            assert event.status_code == 401
            await client.stream.aclose()
            async with connected(gw.port, headers=[(b"x-api-key", b"s3cret")]) as ws:
                seen = json.loads(await ws.message())
                assert seen["headers"]["x-consumer-id"] == "alice"
                assert "x-api-key" not in seen["headers"]  # hide_credentials applies too
                await ws.close()


async def test_an_idle_websocket_ends_after_read_timeout(stubs: Stubs, autojump_clock: Any) -> None:
    """No byte either way for read_timeout ends it, as for a CONNECT tunnel (keep it
    alive with pings); traffic in either direction keeps it open."""
    config = _config(stubs.target("echo"))
    with trio.fail_after(60):
        async with open_gateway(config) as gw, connected(gw.port) as ws:
            await ws.message()
            opened = trio.current_time()
            for _ in range(3):  # 12 s of traffic every 4 s: past read_timeout (5 s)
                await trio.sleep(4)
                await ws.send(TextMessage(data="ping"))
                assert await ws.message() == "ping"
            ended = await ws.next_event()  # the connection closed, no close frame
            assert isinstance(ended, CloseConnection)
            assert ended.code == 1006
            assert trio.current_time() - opened == pytest.approx(17, abs=0.5)


@pytest.mark.parametrize(
    ("upgrades", "message"),
    [
        (["h2c"], "bypass routing"),
        (["web socket"], "expected a protocol name"),
    ],
)
def test_upgrades_are_checked_at_load(upgrades: list[str], message: str) -> None:
    raw = {
        "upstreams": {"up": {"targets": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/", "upstream": "up", "upgrades": upgrades}],
    }
    with pytest.raises(ConfigError) as err:
        load(raw)
    assert err.value.path == "routes[0].upgrades[0]"
    assert message in err.value.message


def test_upgrades_need_an_upstream() -> None:
    with pytest.raises(ConfigError) as err:
        load({"routes": [{"prefix": "/", "upgrades": ["websocket"]}]})
    assert err.value.path == "routes[0].upgrades"


async def test_the_whole_chain_around_a_websocket(stubs: Stubs) -> None:
    """Limits, the breaker, retries and header edits apply to the handshake as to any
    request, and the 101 carries the response side's headers."""
    config = _config(stubs.target("echo"))
    config["routes"][0]["plugins"] = {
        "rate-limit": {"limits": [{"limit": 2, "window": "1m"}]},
        "circuit-breaker": {},
        "retry": {},
        "transform": {
            "request": {"headers": {"set": {"x-via-gateway": "1"}}},
            "response": {"headers": {"set": {"x-served-by": "filtergate"}}},
        },
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            for _ in range(2):
                client, event = await handshake(gw.port)
                assert isinstance(event, AcceptConnection)
                headers = dict(event.extra_headers)
                assert headers[b"x-served-by"] == b"filtergate"
                assert headers[b"ratelimit-limit"] == b"2"
                seen = json.loads(await client.message())
                assert seen["headers"]["x-via-gateway"] == "1"
                await client.close()
                await client.stream.aclose()
            client, event = await handshake(gw.port)
            assert isinstance(event, RejectConnection)
            assert event.status_code == 429
            await client.stream.aclose()


_HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
_ACCEPT = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


async def _head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """A head read from ``stream``, and the bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


async def test_a_drain_that_cuts_a_websocket_or_a_tunnel_still_logs_it(
    stubs: Stubs, tmp_path: Path
) -> None:
    """At shutdown_timeout the open connections are cut; their lines were lost (trio
    raised the cut as a group the tunnel's handler did not look for)."""
    log = tmp_path / "access.log"
    config = _config(stubs.target("echo"))
    config["routes"].append(
        {"name": "tunnel", "hosts": ["tun.test"], "upstream": "up", "allow_connect": True}
    )
    config["access_log"] = {"path": str(log), "format": "json"}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            ws = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await ws.send_all(_HANDSHAKE)
            assert (await _head(ws))[0].startswith(b"HTTP/1.1 101 ")
            tunnel = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await tunnel.send_all(b"CONNECT tun.test:443 HTTP/1.1\r\nHost: tun.test:443\r\n\r\n")
            assert (await _head(tunnel))[0].startswith(b"HTTP/1.1 200 ")
            await gw.gateway.shutdown(grace=0.2)
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert sorted((line["method"], line["status"]) for line in lines) == [
        ("CONNECT", 200),
        ("GET", 101),
    ]


async def test_a_half_close_passes_through_a_tls_upstream(tmp_path: Path) -> None:
    """The client half-closes and the upstream answers after it: over a TLS upstream
    the whole connection ended at the half-close, and the answer was lost."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def upstream(plain: trio.SocketStream) -> None:
        stream = trio.SSLStream(plain, context, server_side=True, https_compatible=True)
        _, said = await _head(stream)
        await stream.send_all(_ACCEPT)
        while data := await stream.receive_some(65536):  # to the client's half-close
            said += data
        await stream.send_all(b"after the half-close: " + said)
        await stream.aclose()

    with trio.fail_after(20):
        async with serve_raw(upstream) as port:
            config = _config(f"127.0.0.1:{port}")
            config["upstreams"]["up"] |= {"tls": True, "tls_ca_file": str(ca_file)}
            async with open_gateway(config) as gw:
                client = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await client.send_all(_HANDSHAKE + b"hello")
                await client.send_eof()
                head, received = await _head(client)
                assert head.startswith(b"HTTP/1.1 101 ")
                while data := await client.receive_some(65536):
                    received += data
                await client.aclose()
    assert received == b"after the half-close: hello"


async def test_a_slow_steady_reader_is_not_idle(autojump_clock: Any) -> None:
    """A client reading 200 KB/s without a pause was cut at read_timeout: a relay write
    blocked on it is woken only when half the send buffer is free, and only a finished
    write counted as bytes crossing. Bytes its kernel takes count now."""
    closed: list[float] = []

    async def flood(stream: trio.SocketStream) -> None:
        await _head(stream)
        await stream.send_all(_ACCEPT)
        try:
            while True:
                await stream.send_all(b"x" * 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            closed.append(trio.current_time())

    with trio.fail_after(60):
        async with serve_raw(flood) as port:
            config = _config(f"127.0.0.1:{port}")
            config["upstreams"]["up"]["read_timeout"] = "2s"
            async with open_gateway(config) as gw:
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", gw.port))
                client = trio.SocketStream(sock)
                await client.send_all(_HANDSHAKE)
                start = trio.current_time()
                received = 0
                while trio.current_time() - start < 8:  # 4x read_timeout
                    data = await client.receive_some(20_000)
                    assert data, "cut while reading"
                    received += len(data)
                    await trio.sleep(len(data) / 200_000)
                assert not closed
                await client.aclose()
    assert received > 1_000_000
