"""TLS termination as filters see it: version, cipher and the server name the client asked for."""

from __future__ import annotations

import json
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from engine.chain import Filter, Stage
from engine.exchange import Exchange, Response
from engine.plugins import hookimpl
from engine.testing import open_gateway, raw_exchange


class TlsProbe(Filter):
    """Answers with what ``exchange.request.tls`` holds."""

    name = "tls-probe"
    stage = Stage.EDGE

    def on_request(self, exchange: Exchange) -> Response:
        tls = exchange.request.tls
        seen = None if tls is None else {"version": tls.version, "sni": tls.server_name}
        return Response(200, body=json.dumps(seen).encode())


class TlsProbePlugin:
    @hookimpl
    def filtergate_filters(self) -> list[type[Any]]:
        return [TlsProbe]


def _tls_config(tmp_path: Path, ca: trustme.CA, *names: str) -> dict[str, Any]:
    """A gateway config terminating TLS with a certificate of ``ca`` for ``names``."""
    cert = ca.issue_cert(*names)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {
        "server": {"tls": {"cert": str(cert_file), "key": str(key_file)}},
        "upstreams": {"unused": {"targets": ["127.0.0.1:9"]}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "unused"}],
    }


async def _ask(port: int, ca: trustme.CA, server_name: str | None) -> Any:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_NONE
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname=server_name)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return json.loads(data.partition(b"\r\n\r\n")[2])


async def test_filters_see_the_server_name_the_client_asked_for(tmp_path: Path) -> None:
    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test", "other.test")
    config["routes"][0]["plugins"] = {"tls-probe": {}}  # the probe answers
    with trio.fail_after(20):
        async with open_gateway(config, extra_plugins=[("tls-probe", TlsProbePlugin())]) as gw:
            first = await _ask(gw.port, ca, "gw.test")
            second = await _ask(gw.port, ca, "other.test")
            without = await _ask(gw.port, ca, None)  # no SNI sent
    assert first["sni"] == "gw.test"
    assert first["version"].startswith("TLSv1.")
    assert second["sni"] == "other.test"  # per connection, never the previous one's
    assert without["sni"] is None


async def test_plain_http_on_the_tls_port_gets_a_400_saying_so(tmp_path: Path) -> None:
    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    log = tmp_path / "access.log"
    config["access_log"] = {"path": str(log)}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            data = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            # The listener still speaks TLS to the next client.
            assert (await _ask_any(gw.port, ca)).startswith(b"HTTP/1.1 ")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert json.loads(body)["error"]["message"] == "a plain HTTP request was sent to an HTTPS port"
    # Logged as any request that could not be read (it was not, before), with its id.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [line for line in lines if line["status"] == 400]
    assert len(refused) == 1
    assert refused[0]["method"] == "-"
    assert refused[0]["bytes_sent"] == len(data)
    assert f"x-request-id: {refused[0]['request_id']}".encode() in head


async def _ask_any(port: int, ca: trustme.CA) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    await stream.aclose()
    return data


async def test_a_tls_client_that_reads_slowly_but_steadily_gets_the_whole_body(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """As over plain TCP (test_timeouts, which shows the kernel's late wake-up of a
    writer cutting such a client before): a client that takes bytes steadily is never
    cut, through the TLS stream's own send path."""
    from tests.upstreams import open_streaming_upstream

    size = 24 * 1024 * 1024
    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    config["server"]["write_timeout"] = "1s"
    with trio.fail_after(120):
        async with open_streaming_upstream(size) as big:
            config["upstreams"] = {"big": {"targets": [big.target]}}
            config["routes"] = [{"name": "r", "prefix": "/", "upstream": "big"}]
            async with open_gateway(config) as gw:
                context = ssl.create_default_context()
                ca.configure_trust(context)
                tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
                tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 32 * 1024)
                stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
                await stream.send_all(b"GET /big HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                received = 0
                while chunk := await stream.receive_some(32 * 1024):  # 640 KiB/s
                    received += len(chunk)
                    await trio.sleep(0.05)
                await stream.aclose()
    assert received > size


@pytest.mark.parametrize("tls", [False, True])
async def test_a_client_that_reads_nothing_is_cut_at_write_timeout(
    tmp_path: Path, tls: bool
) -> None:
    """Bytes still in flight when the write blocked are no sign of reading: the cut
    comes write_timeout after the last write, not twice that (real time: the kernel's
    acknowledgements are what is measured)."""
    from tests.upstreams import open_streaming_upstream

    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    if not tls:
        del config["server"]["tls"]
    config["server"]["write_timeout"] = "1s"
    with trio.fail_after(20):
        async with open_streaming_upstream(64 * 1024 * 1024) as big:
            config["upstreams"] = {"big": {"targets": [big.target]}}
            config["routes"] = [{"name": "r", "prefix": "/", "upstream": "big"}]
            async with open_gateway(config) as gw:
                tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
                tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 32 * 1024)
                stream: trio.abc.Stream = tcp
                if tls:
                    context = ssl.create_default_context()
                    ca.configure_trust(context)
                    stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
                await stream.send_all(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n")
                await big.wait_requests(1)
                start = trio.current_time()
                while True:  # reads nothing, until the gateway gives up
                    if big.closed_at:
                        break
                    await trio.sleep(0.05)
                assert 0.9 <= big.closed_at[0] - start <= 1.6
                await trio.aclose_forcefully(stream)


async def test_a_tunnel_through_a_tls_listener_carries_bytes_both_ways(tmp_path: Path) -> None:
    """The tunnel's pump writes with no time limit: the TLS stream's send guard took
    that limit as a deadline (int(inf)), and a 500 went into the open tunnel."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data)

    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            config["upstreams"] = {"tcp": {"targets": [f"127.0.0.1:{port}"]}}
            config["routes"] = [
                {"name": "t", "hosts": ["db.internal"], "allow_connect": True, "upstream": "tcp"}
            ]
            async with open_gateway(config) as gw:
                context = ssl.create_default_context()
                ca.configure_trust(context)
                tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
                stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
                await stream.send_all(
                    b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nping"
                )
                data = b""
                while not data.endswith(b"ping"):
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200 ")
                await stream.send_all(b"pong")
                assert await stream.receive_some(65536) == b"pong"
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_a_tls_client_that_closes_cleanly_has_its_call_let_go(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Its close_notify sits unread before the FIN: a peek saw those bytes, took the
    client for present, and the call ran to read_timeout (60 s). The kernel says the
    peer closed whatever is unread (POLLRDHUP)."""
    from tests.upstreams import UpstreamConn, serve_upstream

    async def never_answers(conn: UpstreamConn) -> None:
        if await conn.read_request() is not None:
            while await conn.stream.receive_some(65536):
                pass  # until the gateway lets the call go

    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    with trio.fail_after(120):
        async with serve_upstream(never_answers) as up:
            config["upstreams"] = {"slow": {"targets": [up.target], "read_timeout": "60s"}}
            config["routes"] = [{"name": "r", "prefix": "/", "upstream": "slow"}]
            async with open_gateway(config) as gw:
                context = ssl.create_default_context()
                ca.configure_trust(context)
                tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
                stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
                await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
                await up.wait_requests(1)
                left = trio.current_time()
                await stream.aclose()  # close_notify, then FIN
                while True:
                    if up.closed_at:
                        break
                    await trio.sleep(0.05)
                assert up.closed_at[0] - left <= 2.1


async def test_a_tls_client_that_sends_its_body_before_reading_gets_the_413(
    tmp_path: Path,
) -> None:
    """http.client sends the whole body, then reads: over plain TCP the lingering close
    let it read the 413; over TLS the connection was closed with the body unread, the
    kernel reset it, and the client got an SSL EOF error instead of the answer."""
    import http.client
    import socket

    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    config["server"]["max_body_size"] = "1KiB"

    def post(port: int) -> int:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = http.client.HTTPSConnection("gw.test", port, context=context, timeout=20)
        client.sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=20),
            server_hostname="gw.test",
        )
        try:
            client.request("POST", "/", body=b"x" * (4 << 20))
            return client.getresponse().status
        finally:
            client.close()

    with trio.fail_after(60):
        async with open_gateway(config) as gw:
            for _ in range(2):
                assert await trio.to_thread.run_sync(post, gw.port) == 413


async def test_head_timeout_counts_from_the_connection_not_the_handshake(tmp_path: Path) -> None:
    """The handshake ran under head_timeout, then the head got a whole head_timeout
    of its own: a slow client held its connection (and a max_connections slot) for
    twice as long. Real time: what is measured is when the gateway closes."""
    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    config["server"]["head_timeout"] = "1s"
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            start = trio.current_time()
            tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await trio.sleep(0.7)  # a slow start
            stream = trio.SSLStream(tcp, context, server_hostname="gw.test")
            await stream.do_handshake()
            try:  # then no head at all: the 408, or the close, comes at 1 s from the start
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            assert trio.current_time() - start < 1.5
            await trio.aclose_forcefully(stream)


def _client_hello(server_name: bytes) -> bytes:
    """A TLS ClientHello asking for ``server_name`` as raw bytes (not IDNA-encoded, as
    a Python client would): one made for a name of the same length, patched."""
    stand_in = b"x" * len(server_name)
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=stand_in.decode())
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello.count(stand_in) == 1
    return hello.replace(stand_in, server_name)


async def test_a_server_name_that_is_not_ascii_prints_no_traceback(tmp_path: Path) -> None:
    """CPython decodes the client's server name before the SNI callback; a non-ASCII
    one failed there and went to sys.unraisablehook: a traceback on stderr per
    connection, for any anonymous client. The handshake is still refused."""
    import sys

    import tomli_w

    from engine.testing import free_port, wait_listening

    ca = trustme.CA()
    config = _tls_config(tmp_path, ca, "gw.test")
    port = free_port()
    config["server"]["listen"] = [f"127.0.0.1:{port}"]
    config["admin"] = {"enabled": False}
    (tmp_path / "g.toml").write_text(tomli_w.dumps(config))
    log = tmp_path / "err.log"
    with trio.fail_after(30), log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "engine.cli", "run", "-c", str(tmp_path / "g.toml")],
            stderr=err,
        )
        try:
            await wait_listening(port, proc)
            for _ in range(3):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(_client_hello("éx.test".encode()))
                with trio.move_on_after(5):
                    while await stream.receive_some(65536):
                        pass  # an alert, then the close
                await stream.aclose()
            # A well-formed name still works.
            context = ssl.create_default_context()
            ca.configure_trust(context)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            tls = trio.SSLStream(tcp, context, server_hostname="gw.test")
            await tls.do_handshake()
            await trio.aclose_forcefully(tls)
        finally:
            proc.terminate()
            await proc.wait()
    assert proc.returncode is not None
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "UnicodeDecodeError" not in text, text
