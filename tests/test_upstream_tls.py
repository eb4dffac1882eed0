"""TLS to upstreams (``tls = true``): hypercorn stubs serving HTTPS with trustme
certificates, the gateway in front of them over real sockets."""

from __future__ import annotations

import json
import logging
import os
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import tomli_w
import trio
import trustme

from engine import cli
from engine.config import UpstreamConfig
from engine.schema import Invalid
from engine.sockets import TlsSocket
from engine.stubs import Stubs, StubTls, open_stubs
from engine.testing import RunningGateway, http_request, open_gateway


@asynccontextmanager
async def https_echo(
    tmp_path: Path, ca: trustme.CA, *names: str, client_ca: Path | None = None
) -> AsyncIterator[Stubs]:
    """The echo stub over HTTPS, its certificate for ``names`` issued by ``ca``; with
    ``client_ca``, it asks clients for a certificate of that CA."""
    cert = ca.issue_cert(*names)
    chain, key = tmp_path / "stub.pem", tmp_path / "stub.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    tls = StubTls(str(chain), str(key), str(client_ca) if client_ca else None)
    async with open_stubs(names=["echo"], tls=tls) as stubs:
        yield stubs


def config(stubs: Stubs, ca_file: Path | None, **upstream: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"targets": [stubs.target("echo")], "tls": True, **upstream}
    if ca_file is not None:
        table["tls_ca_file"] = str(ca_file)
    return {
        "upstreams": {"secure": table},
        "routes": [{"name": "r", "prefix": "/", "upstream": "secure"}],
    }


def ca_file(tmp_path: Path, ca: trustme.CA, name: str = "ca.pem") -> Path:
    path = tmp_path / name
    ca.cert_pem.write_to_path(str(path))
    return path


def idle_connections(gw: RunningGateway) -> list[Any]:
    return list(gw.gateway.runtime.pools["secure"].targets[0].idle)


async def test_requests_go_over_tls_on_one_kept_alive_connection(tmp_path: Path) -> None:
    ca = trustme.CA()
    with trio.fail_after(20):
        async with (
            https_echo(tmp_path, ca, "127.0.0.1") as stubs,
            open_gateway(config(stubs, ca_file(tmp_path, ca))) as gw,
        ):
            first = await http_request(gw.port, "GET", "/a?x=1")
            assert first.status == 200
            assert first.json()["path"] == "/a"
            # A body larger than one TLS record, sent while the answer is watched for.
            body = b"z" * 300_000
            second = await http_request(gw.port, "POST", "/b", body=body)
            assert second.status == 200
            assert len(second.json()["body"]) == len(body)
            third = await http_request(gw.port, "GET", "/c")
            assert third.status == 200
            # Three calls, one connection: it went back to the pool each time.
            idle = idle_connections(gw)
            assert len(idle) == 1
            assert isinstance(idle[0].io, TlsSocket)


async def test_a_certificate_the_ca_did_not_sign_is_a_502(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="filtergate")
    with trio.fail_after(20):
        async with (
            https_echo(tmp_path, trustme.CA(), "127.0.0.1") as stubs,
            open_gateway(config(stubs, ca_file(tmp_path, trustme.CA()))) as gw,
        ):
            resp = await http_request(gw.port, "GET", "/")
            assert resp.status == 502
            assert idle_connections(gw) == []
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_the_certificate_is_checked_against_tls_server_name(tmp_path: Path) -> None:
    """A certificate for the service's DNS name while the targets are addresses: the
    name to check is ``tls_server_name`` (also sent as SNI)."""
    ca = trustme.CA()
    with trio.fail_after(20):
        async with https_echo(tmp_path, ca, "orders.internal") as stubs:
            async with open_gateway(config(stubs, ca_file(tmp_path, ca))) as gw:
                assert (await http_request(gw.port, "GET", "/")).status == 502
            named = config(stubs, ca_file(tmp_path, ca), tls_server_name="orders.internal")
            async with open_gateway(named) as gw:
                resp = await http_request(gw.port, "GET", "/")
                assert resp.status == 200
                assert json.loads(resp.body)["path"] == "/"


async def test_a_client_certificate_for_targets_that_ask(tmp_path: Path) -> None:
    """Mutual TLS: the targets accept only clients with a certificate of their CA."""
    ca = trustme.CA()
    client = ca.issue_cert("filtergate.gateway")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    ca_path = ca_file(tmp_path, ca)
    with trio.fail_after(20):
        async with https_echo(tmp_path, ca, "127.0.0.1", client_ca=ca_path) as stubs:
            with_cert = config(stubs, ca_path, tls_cert_file=str(tmp_path / "client.pem"))
            async with open_gateway(with_cert) as gw:
                assert (await http_request(gw.port, "GET", "/")).status == 200
            async with open_gateway(config(stubs, ca_path)) as gw:
                assert (await http_request(gw.port, "GET", "/")).status == 502


async def test_health_checks_speak_tls_too(tmp_path: Path) -> None:
    ca = trustme.CA()
    with trio.fail_after(20):
        async with https_echo(tmp_path, ca, "127.0.0.1") as stubs:
            health = {"path": "/health", "interval": "50ms", "timeout": "2s"}
            cfg = config(stubs, ca_file(tmp_path, ca), health_check=health)
            async with open_gateway(cfg) as gw:
                pool = gw.gateway.runtime.pools["secure"]
                target = pool.targets[0]
                for _ in range(200):  # probes every 50 ms: two pass well within 10 s
                    if target.hc_successes >= 2:
                        break
                    await trio.sleep(0.05)
                assert target.hc_successes >= 2
                assert target.healthy
                assert target.hc_failures == 0


def test_check_shows_tls_upstreams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = ca_file(tmp_path, trustme.CA())
    client = tmp_path / "client.pem"
    trustme.CA().issue_cert("gw").private_key_and_cert_chain_pem.write_to_path(str(client))
    upstreams = {
        "plain": {"targets": ["127.0.0.1:1", "127.0.0.1:2"]},
        "secure": {
            "targets": ["127.0.0.1:3"],
            "tls": True,
            "tls_ca_file": str(ca),
            "tls_server_name": "orders.internal",
            "tls_cert_file": str(client),
        },
    }
    routes = [{"name": "r", "prefix": "/", "upstream": "secure"}]
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps({"upstreams": upstreams, "routes": routes}))
    assert cli.main(["check", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
        "  upstream plain: 2 targets, round_robin",
        "  upstream secure: 1 target, round_robin, tls (verified as orders.internal, "
        "client certificate)",
    ]


def test_tls_config_errors(tmp_path: Path) -> None:
    target = ["127.0.0.1:1"]
    with pytest.raises(Invalid) as info:
        UpstreamConfig(targets=target, tls_ca_file=str(tmp_path / "ca.pem"))  # type: ignore[arg-type]
    assert (info.value.key, info.value.message) == ("tls_ca_file", "only used with tls = true")
    with pytest.raises(Invalid) as info:
        UpstreamConfig(targets=target, tls=True, tls_ca_file=str(tmp_path / "missing.pem"))  # type: ignore[arg-type]
    assert info.value.key == "tls_ca_file"
    assert "cannot read" in info.value.message
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(Invalid) as info:
        UpstreamConfig(targets=target, tls=True, tls_ca_file=str(tmp_path / "junk.pem"))  # type: ignore[arg-type]
    assert info.value.key == "tls_ca_file"
    assert "cannot load" in info.value.message
    with pytest.raises(Invalid) as info:
        UpstreamConfig(targets=target, tls=True, tls_key_file=str(tmp_path / "junk.pem"))  # type: ignore[arg-type]
    assert info.value.key == "tls_key_file"
    with pytest.raises(Invalid) as info:
        UpstreamConfig(targets=target, tls=True, tls_cert_file=str(tmp_path / "junk.pem"))  # type: ignore[arg-type]
    assert (info.value.key, "cannot load" in info.value.message) == ("tls_cert_file", True)
    # A bundle replaced under the same path is a new config: a reload builds new pools.
    path = ca_file(tmp_path, trustme.CA())
    before = UpstreamConfig(targets=target, tls=True, tls_ca_file=str(path))  # type: ignore[arg-type]
    ca_file(tmp_path, trustme.CA())
    assert before != UpstreamConfig(targets=target, tls=True, tls_ca_file=str(path))  # type: ignore[arg-type]


# -- misbehaving TLS upstreams: a raw server of the test's own -------------------------


Handler = Callable[[trio.SSLStream[trio.SocketStream], trio.SocketStream, int], Awaitable[None]]


@asynccontextmanager
async def raw_tls_upstream(cert: trustme.LeafCert, handler: Handler) -> AsyncIterator[int]:
    """A TLS server on a free port running ``handler(tls, tcp, n)`` for its n-th
    connection (from 1); yields the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    count = 0

    async def one(tcp: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        try:
            await handler(trio.SSLStream(tcp, context, server_side=True), tcp, count)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            tcp.socket.close()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, one, 0)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_config(port: int, ca: Path, **server: Any) -> dict[str, Any]:
    upstream = {"targets": [f"127.0.0.1:{port}"], "tls": True, "tls_ca_file": str(ca)}
    return {
        "server": server,
        "upstreams": {"secure": {**upstream, "read_timeout": "5s"}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "secure"}],
    }


async def test_bytes_after_a_response_inside_tls_are_never_the_next_answer(
    tmp_path: Path,
) -> None:
    """A second TLS record after the response, in the same TCP segment: TLS holds it
    where a poll of the socket cannot see it. The connection must not be reused, or the
    next call would get the forged answer."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def handler(_tls: Any, tcp: trio.SocketStream, n: int) -> None:
        # TLS done here on memory buffers, to put two records in one TCP write.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await tcp.send_all(outgoing.read())
                incoming.write(await tcp.receive_some(65536))
        await tcp.send_all(outgoing.read())
        while True:
            try:
                if b"\r\n\r\n" in obj.read(65536):
                    break
            except ssl.SSLWantReadError:
                incoming.write(await tcp.receive_some(65536))
        obj.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nconn%d" % n)
        obj.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        await tcp.send_all(outgoing.read())
        await trio.sleep(30)

    with trio.fail_after(20):
        async with (
            raw_tls_upstream(ca.issue_cert("127.0.0.1"), handler) as port,
            open_gateway(raw_config(port, ca_file(tmp_path, ca))) as gw,
        ):
            first = await http_request(gw.port, "GET", "/one")
            await trio.sleep(0.1)  # the forged record is in by now
            second = await http_request(gw.port, "GET", "/two")
    assert (first.status, first.body) == (200, b"conn1")
    assert (second.status, second.body) == (200, b"conn2")


async def test_an_early_answer_over_tls_reaches_the_client(tmp_path: Path) -> None:
    """The upstream answers 413 while the request body is still being sent, and never
    reads it: the cut write must leave the answer readable, body included."""
    ca = trustme.CA()
    answer = b'{"error":"too large"}'

    async def handler(tls: Any, _tcp: trio.SocketStream, _n: int) -> None:
        await read_head(tls)
        head = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: %d\r\n\r\n" % len(answer)
        await tls.send_all(head)
        await trio.sleep(0.3)
        await tls.send_all(answer)
        await trio.sleep(30)

    with trio.fail_after(30):
        async with (
            raw_tls_upstream(ca.issue_cert("127.0.0.1"), handler) as port,
            open_gateway(raw_config(port, ca_file(tmp_path, ca), max_body_size="64MiB")) as gw,
        ):
            resp = await http_request(gw.port, "POST", "/upload", body=b"x" * 30_000_000)
    assert (resp.status, resp.body) == (413, answer)


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("POST", 502)])
async def test_a_reused_tls_connection_closed_without_close_notify(
    tmp_path: Path, method: str, status: int
) -> None:
    """The server reads the second request and drops the TCP connection without TLS's
    close_notify: as over plain TCP, a GET goes again on a new connection, a POST (it
    may have been acted on) gets 502 upstream_reset."""
    ca = trustme.CA()
    methods: list[bytes] = []

    async def handler(tls: Any, tcp: trio.SocketStream, n: int) -> None:
        while True:
            head = await read_head(tls)
            if not head:
                return
            methods.append(head.split(b" ", 1)[0])
            if n == 1 and len(methods) == 2:
                tcp.socket.close()  # no close_notify, no answer
                return
            await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nconn%d" % n)

    with trio.fail_after(20):
        async with (
            raw_tls_upstream(ca.issue_cert("127.0.0.1"), handler) as port,
            open_gateway(raw_config(port, ca_file(tmp_path, ca))) as gw,
        ):
            assert (await http_request(gw.port, "GET", "/")).body == b"conn1"
            resp = await http_request(gw.port, method, "/", body=b"x" if method == "POST" else None)
    assert resp.status == status
    if status == 200:
        assert resp.body == b"conn2"
        assert methods == [b"GET", b"GET", b"GET"]
    else:
        assert resp.json()["error"]["code"] == "upstream_reset"
        assert methods == [b"GET", b"POST"]  # sent once, never replayed


@pytest.mark.parametrize("close", ["close_notify", "ragged"])
async def test_a_body_the_close_ends_needs_tls_close_notify(tmp_path: Path, close: str) -> None:
    """A response without Content-Length or chunking ends when the server closes. Over
    TLS that end is proven only by close_notify (RFC 9112 9.8): a bare TCP close may be a
    cut, and the client must not get it as a whole body."""
    ca = trustme.CA()

    async def handler(tls: Any, tcp: trio.SocketStream, _n: int) -> None:
        await read_head(tls)
        await tls.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
        await tls.send_all(b'{"balance": 100')
        await trio.sleep(0.1)
        if close == "close_notify":
            await tls.aclose()
        else:
            tcp.socket.close()

    with trio.fail_after(20):
        async with (
            raw_tls_upstream(ca.issue_cert("127.0.0.1"), handler) as port,
            open_gateway(raw_config(port, ca_file(tmp_path, ca))) as gw,
        ):
            if close == "close_notify":
                resp = await http_request(gw.port, "GET", "/")
                assert (resp.status, resp.body) == (200, b'{"balance": 100')
            else:
                # The head went out already: the client's connection is cut, so it never
                # sees the end of the chunked body.
                with pytest.raises(h11.RemoteProtocolError):
                    await http_request(gw.port, "GET", "/")


async def test_pooled_connections_past_descriptor_1023_are_reused(tmp_path: Path) -> None:
    """The liveness check before reuse must work for any descriptor: select() fails past
    1023, which a gateway with thousands of clients reaches, and every reuse then
    became a new connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.fail(f"the open-files hard limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    ballast = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        ca = trustme.CA()
        with trio.fail_after(20):
            async with (
                https_echo(tmp_path, ca, "127.0.0.1") as stubs,
                open_gateway(config(stubs, ca_file(tmp_path, ca))) as gw,
            ):
                assert (await http_request(gw.port, "GET", "/1")).status == 200
                (first,) = idle_connections(gw)
                assert first.io.fileno() > 1023
                assert (await http_request(gw.port, "GET", "/2")).status == 200
                assert idle_connections(gw) == [first]
    finally:
        for fd in ballast:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_keys_and_names_refused_at_load(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    leaf = trustme.CA().issue_cert("gw")
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    target = ["127.0.0.1:1"]
    # An encrypted key is a config error, never a pass-phrase prompt on the terminal.
    with pytest.raises(Invalid) as info:
        UpstreamConfig(
            targets=target,  # type: ignore[arg-type]
            tls=True,
            tls_cert_file=str(tmp_path / "cert.pem"),
            tls_key_file=str(tmp_path / "key.pem"),
        )
    assert info.value.key == "tls_cert_file"
    assert "encrypted" in info.value.message
    for name in ("a..b", ".internal", "x" * 64 + ".example"):
        with pytest.raises(Invalid) as info:
            UpstreamConfig(targets=target, tls=True, tls_server_name=name)  # type: ignore[arg-type]
        assert info.value.key == "tls_server_name"
