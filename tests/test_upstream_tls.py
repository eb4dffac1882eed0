"""TLS to upstreams (``tls = true``): hypercorn stubs serving HTTPS with trustme
certificates, the gateway in front of them over real sockets."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from engine.config import UpstreamConfig
from engine.schema import Invalid
from engine.sockets import StreamSocket
from engine.stubs import Stubs, open_stubs
from engine.testing import RunningGateway, http_request, open_gateway


@asynccontextmanager
async def https_echo(tmp_path: Path, ca: trustme.CA, *names: str) -> AsyncIterator[Stubs]:
    """The echo stub over HTTPS, its certificate for ``names`` issued by ``ca``."""
    cert = ca.issue_cert(*names)
    chain, key = tmp_path / "stub.pem", tmp_path / "stub.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    async with open_stubs(names=["echo"], tls=(str(chain), str(key))) as stubs:
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
            assert isinstance(idle[0].io, StreamSocket)


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
    # A bundle replaced under the same path is a new config: a reload builds new pools.
    path = ca_file(tmp_path, trustme.CA())
    before = UpstreamConfig(targets=target, tls=True, tls_ca_file=str(path))  # type: ignore[arg-type]
    ca_file(tmp_path, trustme.CA())
    assert before != UpstreamConfig(targets=target, tls=True, tls_ca_file=str(path))  # type: ignore[arg-type]
