"""The access log: a line per response, JSON or combined, batched, rotated, never in the way.

Every test runs a gateway in front of a real upstream and reads the file it wrote.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from engine.config import load
from engine.metrics import counter
from engine.schema import ConfigError
from engine.testing import Stubs, http_request, open_gateway, raw_exchange
from plugins.key_auth import hash_key
from tests.upstreams import open_truncating_upstream


def _config(stubs: Stubs, **access_log: Any) -> dict[str, Any]:
    return {
        "access_log": access_log,
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [{"name": "echo", "prefix": "/echo", "upstream": "echo"}],
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_json_lines_say_what_happened(stubs: Stubs, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    headers = [("User-Agent", 'curl/8 "quoted"'), ("Referer", "https://example.com/")]
    with trio.fail_after(20):
        async with open_gateway(_config(stubs, path=str(path))) as gw:
            raw = await raw_exchange(
                gw.port, b"GET /echo/a?q=1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            ok = await http_request(gw.port, "GET", "/echo/b", headers)
            missing = await http_request(gw.port, "POST", "/nowhere?apikey=k", body=b"x")
            assert _lines(path) == []  # batched: nothing written while under the buffer
    assert (ok.status, missing.status) == (200, 404)
    first, second, third = (json.loads(line) for line in _lines(path))
    assert first["method"] == "GET"
    assert first["target"] == "/echo/a?q=1"
    assert first["protocol"] == "HTTP/1.1"
    assert first["status"] == 200
    assert first["bytes_sent"] == len(raw)  # head and body, as the client received them
    assert first["client"] == "127.0.0.1"
    assert first["route"] == "echo"
    assert first["upstream"] == stubs.target("echo")
    assert first["duration_ms"] >= first["upstream_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["user_agent"] == 'curl/8 "quoted"'
    assert second["referer"] == "https://example.com/"
    assert second["request_id"] == ok.header("x-request-id")
    assert third["status"] == 404
    assert third["target"] == "/nowhere"  # not routed: its query is not logged
    assert [third[k] for k in ("route", "upstream", "upstream_ms")] == [None, None, None]


async def test_a_hidden_query_credential_is_not_logged(stubs: Stubs, tmp_path: Path) -> None:
    key = "alice-key-0123456789abcdef0123456789"
    path = tmp_path / "access.log"
    config = _config(stubs, path=str(path))
    config["routes"][0]["plugins"] = {
        "key-auth": {
            "query_param": "apikey",
            "hide_credentials": True,
            "consumers": [{"id": "alice", "key_sha256": hash_key(key)}],
        }
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            ok = await http_request(gw.port, "GET", f"/echo/k?apikey={key}&a=1")
            old_key = await http_request(gw.port, "GET", "/echo/k?apikey=rotated-old-key-0123&b=2")
            twice = await http_request(gw.port, "GET", f"/echo/k?apikey={key}&apikey={key}")
            refused = await raw_exchange(
                gw.port, f"GET /echo?apikey={key} HTTP/1.1\r\nHost: a b\r\n\r\n".encode()
            )
    assert (ok.status, old_key.status, twice.status) == (200, 401, 400)
    assert refused.startswith(b"HTTP/1.1 400 ")  # an invalid Host: refused before any filter
    logged = path.read_text()
    assert key not in logged
    assert "rotated-old-key" not in logged  # a refused key is not logged either
    lines = [json.loads(line) for line in logged.splitlines()]
    assert (lines[0]["target"], lines[0]["consumer"]) == ("/echo/k?a=1", "alice")
    # Refused before going upstream: the path alone, whatever the query held.
    assert [line["target"] for line in lines[1:]] == ["/echo/k", "/echo/k", "/echo"]


async def test_combined_format_and_a_malformed_request(stubs: Stubs, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with open_gateway(_config(stubs, path=str(path), format="combined")) as gw:
            await http_request(gw.port, "GET", "/echo/c", [("User-Agent", 'a "b" \\c')])
            garbage = await raw_exchange(gw.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ")
    good, bad = _lines(path)
    stamp = r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000\]"
    assert re.fullmatch(
        rf'127\.0\.0\.1 - - {stamp} "GET /echo/c HTTP/1\.1" 200 \d+ "-" "a \\"b\\" \\\\c"', good
    ), good
    assert re.fullmatch(rf'127\.0\.0\.1 - - {stamp} "-" 400 {len(garbage)} "-" "-"', bad), bad


async def test_a_consumer_with_spaces_keeps_the_combined_fields_apart(
    stubs: Stubs, tmp_path: Path
) -> None:
    """The user field is not quoted: 'bob [x] "GET' shifted every field after it."""
    path = tmp_path / "access.log"
    secret = "s" * 32
    config = _config(stubs, path=str(path), format="combined")
    issuer = {"issuer": "t", "algorithms": ["HS256"], "secret": secret}
    config["routes"][0]["plugins"] = {"jwt-auth": {"issuers": [issuer]}}
    token = jwt.encode({"iss": "t", "sub": 'bob [x] "GET', "exp": 2**31}, secret, "HS256")
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            auth = [("Authorization", f"Bearer {token}")]
            resp = await http_request(gw.port, "GET", "/echo/c", auth)
            assert resp.status == 200
    (line,) = _lines(path)
    assert line.split(" ")[2] == 'bob\\x20[x]\\x20\\"GET'
    assert line.split(" ")[3].startswith("[")  # the time is still the fourth field


async def test_lines_are_written_every_flush_interval(
    stubs: Stubs, tmp_path: Path, autojump_clock: Any
) -> None:
    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with open_gateway(_config(stubs, path=str(path), flush="2s")) as gw:
            await http_request(gw.port, "GET", "/echo/1")
            assert _lines(path) == []
            await trio.sleep(2.5)
            assert len(_lines(path)) == 1


async def test_a_full_buffer_is_written_at_once(stubs: Stubs, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with open_gateway(_config(stubs, path=str(path), buffer=1, flush="1h")) as gw:
            for i in range(3):
                await http_request(gw.port, "GET", f"/echo/{i}")
                assert len(_lines(path)) == i + 1


async def test_a_rotated_file_is_reopened(
    stubs: Stubs, tmp_path: Path, autojump_clock: Any
) -> None:
    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with open_gateway(_config(stubs, path=str(path))) as gw:
            await http_request(gw.port, "GET", "/echo/before")
            await trio.sleep(1.5)
            os.rename(path, tmp_path / "access.log.1")  # what logrotate does
            await http_request(gw.port, "GET", "/echo/after")
            await trio.sleep(1.5)
            rotated = _lines(tmp_path / "access.log.1")
            current = _lines(path)
    assert [json.loads(line)["target"] for line in rotated] == ["/echo/before"]
    assert [json.loads(line)["target"] for line in current] == ["/echo/after"]


async def test_a_reload_keeps_an_unchanged_log_and_switches_a_changed_one(
    stubs: Stubs, tmp_path: Path, autojump_clock: Any
) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    config = _config(stubs, path=str(first))
    config["server"] = {"listen": ["127.0.0.1:0"]}
    config["admin"] = {"listen": "127.0.0.1:0"}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            log = gw.gateway.runtime.access_log
            await http_request(gw.port, "GET", "/echo/1")
            await gw.gateway.reload(load(config))  # the same [access_log]: the same log
            assert gw.gateway.runtime.access_log is log
            await http_request(gw.port, "GET", "/echo/2")
            config["access_log"] = {"path": str(second)}
            await gw.gateway.reload(load(config))
            await trio.sleep(0.1)  # the replaced log's task ends: it writes what it held
            assert [json.loads(line)["target"] for line in _lines(first)] == ["/echo/1", "/echo/2"]
            await http_request(gw.port, "GET", "/echo/3")
    assert [json.loads(line)["target"] for line in _lines(second)] == ["/echo/3"]


async def test_a_response_cut_off_is_logged_and_measured(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with open_truncating_upstream(declared=100_000, sent=10) as up:
            config = {
                "access_log": {"path": str(path)},
                "upstreams": {"u": {"targets": [up.target]}},
                "routes": [{"name": "cut-route", "prefix": "/", "upstream": "u"}],
            }
            async with open_gateway(config) as gw:
                data = await raw_exchange(gw.port, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")
                assert gw.admin_port is not None
                metrics = (await http_request(gw.admin_port, "GET", "/metrics")).body.decode()
    (line,) = [json.loads(text) for text in _lines(path)]
    assert line["status"] == 200
    assert line["bytes_sent"] == len(data) < 100_000  # what did go out
    assert 'filtergate_request_duration_seconds_count{route="cut-route",code="2xx"} 1' in metrics


async def test_a_failing_log_never_fails_a_request(stubs: Stubs) -> None:
    dropped = counter("filtergate_access_log_dropped_lines_total", "")
    before = dropped.value()
    with trio.fail_after(20):
        # /dev/full: every write fails with ENOSPC.
        async with open_gateway(_config(stubs, path="/dev/full", buffer=1)) as gw:
            for i in range(3):
                assert (await http_request(gw.port, "GET", f"/echo/{i}")).status == 200
    assert dropped.value() - before == 3


@pytest.mark.parametrize(
    ("access_log", "where"),
    [
        ({"path": "/no/such/dir/access.log"}, "access_log.path"),
        ({"path": "-", "format": "apache"}, "access_log.format"),
        ({"path": "-", "flush": "0s"}, "access_log.flush"),
    ],
)
def test_bad_access_log_config_names_the_key(access_log: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load({"access_log": access_log})
    assert e.value.path == where


def test_an_access_log_path_that_cannot_be_a_log_file_is_a_config_error(tmp_path: Path) -> None:
    """A directory as the path: check said ok, and run dropped every line."""
    base = {
        "upstreams": {"u": {"targets": ["127.0.0.1:1"]}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
    }
    cases = [
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "no" / "a.log"), "no such directory"),
    ]
    for path, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            load({**base, "access_log": {"path": path}})
        assert info.value.path == "access_log.path"


async def test_a_client_that_resets_mid_upload_is_logged_as_gone(tmp_path: Path) -> None:
    """It left no line, no duration and no on_log: the abort skipped them all."""
    import socket
    import struct

    from tests.upstreams import UpstreamConn, serve_upstream

    relayed = trio.Event()

    async def swallow(conn: UpstreamConn) -> None:
        while await conn.stream.receive_some(65536):
            relayed.set()

    path = tmp_path / "access.log"
    with trio.fail_after(20):
        async with serve_upstream(swallow) as up:
            config = {
                "access_log": {"path": str(path)},
                "upstreams": {"u": {"targets": [up.target]}},
                "routes": [{"name": "upload", "prefix": "/", "upstream": "u"}],
            }
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n0123456789"
                )
                await relayed.wait()  # the upload is under way
                sock = stream.socket
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await stream.aclose()  # a reset
                # Until the gateway has let it go (no event says so: looked at).
                while gw.gateway.server._open:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    (line,) = [json.loads(text) for text in _lines(path)]
    assert line["status"] == 499
    assert line["route"] == "upload"
    assert line["target"] == "/up"


async def test_on_log_of_a_reset_mid_upload_sees_client_gone() -> None:
    """It saw error None, where the guide says a 499's error is ClientGone."""
    import socket
    import struct

    from engine.chain import Filter, Stage
    from engine.errors import ClientGone
    from engine.exchange import Exchange
    from tests.test_chain import FilterSet
    from tests.upstreams import UpstreamConn, serve_upstream

    seen: list[tuple[bool, type[BaseException] | None]] = []
    logged = trio.Event()

    class Recorder(Filter):
        name, stage = "recorder", Stage.EDGE

        def on_log(self, exchange: Exchange) -> None:
            seen.append((exchange.aborted, type(exchange.error) if exchange.error else None))
            logged.set()

    relayed = trio.Event()

    async def swallow(conn: UpstreamConn) -> None:
        while await conn.stream.receive_some(65536):
            relayed.set()

    with trio.fail_after(20):
        async with serve_upstream(swallow) as up:
            config = {
                "upstreams": {"u": {"targets": [up.target]}},
                "plugins": {"recorder": {}},
                "routes": [{"name": "upload", "prefix": "/", "upstream": "u"}],
            }
            async with open_gateway(config, extra_plugins=[("r", FilterSet(Recorder))]) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(
                    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n0123"
                )
                await relayed.wait()
                linger = struct.pack("ii", 1, 0)
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await stream.aclose()  # a reset
                await logged.wait()
    assert seen == [(True, ClientGone)]
