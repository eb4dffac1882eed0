"""The ``compress`` filter: gzip at the edge, end to end over real sockets (the echo stub
for JSON bodies, raw upstreams for chunked, encoded and slow ones), and its rules."""

from __future__ import annotations

import gzip
import json
import zlib
from functools import partial
from typing import Any

import pytest
import trio

from engine.config import load
from engine.schema import ConfigError
from engine.testing import Stubs, http_request, open_gateway, raw_exchange
from plugins.compress import accepts_gzip

BIG = "x" * 4096  # an echoed body this long makes a JSON answer over min_size
GZIP = [("accept-encoding", "gzip")]


def _config(target: str, **plugin: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"targets": [target]}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "up", "plugins": {"compress": plugin}}],
    }


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b"gzip", True),
        (b"gzip, deflate, br", True),
        (b"GZIP;q=0.5", True),
        (b"x-gzip", True),
        (b"*", True),
        (b"br, *;q=0.1", True),
        (b"gzip;q=0", False),
        (b"gzip;q=0.0, *", False),  # named wins over the wildcard
        (b"*;q=0", False),
        (b"br", False),
        (b"", False),
        (b"gzip;q=abc", False),  # unreadable: not a yes
        (b"identity", False),
    ],
)
def test_accept_encoding_is_read_with_its_q_values(value: bytes, accepted: bool) -> None:
    assert accepts_gzip(value) is accepted


async def test_a_json_answer_is_gzipped_for_a_client_that_accepts_it(stubs: Stubs) -> None:
    with trio.fail_after(20):
        async with open_gateway(_config(stubs.target("echo"))) as gw:
            asked = [("accept-encoding", "gzip, br"), ("content-type", "text/plain")]
            resp = await http_request(gw.port, "POST", "/a", asked, BIG.encode())
            plain = await http_request(gw.port, "POST", "/a", [], BIG.encode())
    assert resp.status == 200
    assert resp.header("content-encoding") == "gzip"
    assert resp.header("vary") == "Accept-Encoding"
    assert resp.header("content-length") is None  # sent chunked
    assert len(resp.body) < 1000
    echoed = json.loads(gzip.decompress(resp.body))
    assert echoed["body"] == BIG
    # Not accepted: sent as it came, but Vary says it depends on the header.
    assert plain.header("content-encoding") is None
    assert plain.header("vary") == "Accept-Encoding"
    assert json.loads(plain.body)["body"] == BIG


async def test_small_answers_and_other_types_pass_unchanged(stubs: Stubs) -> None:
    with trio.fail_after(20):
        async with open_gateway(_config(stubs.target("echo"))) as gw:
            small = await http_request(gw.port, "GET", "/a", [("accept-encoding", "gzip")])
            head = await http_request(gw.port, "HEAD", "/a", [("accept-encoding", "gzip")])
        config = _config(stubs.target("echo"), types=["text/html"])
        async with open_gateway(config) as gw:
            big = await http_request(
                gw.port, "POST", "/a", [("accept-encoding", "gzip")], b"y" * 4096
            )
    for resp in (small, head, big):
        assert resp.header("content-encoding") is None
        assert resp.header("vary") is None  # never compressed, whatever the client sends
    assert small.header("content-length") == str(len(small.body))
    assert json.loads(big.body)["body"] == "y" * 4096


def _upstream_answering(head: bytes, body: bytes) -> Any:
    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        await stream.send_all(head + body)
        await stream.aclose()

    return answer


@pytest.mark.parametrize(
    ("extra", "compressed"),
    [
        (b"", True),
        (b"Content-Encoding: br\r\n", False),  # encoded already
        (b"Content-Encoding: identity\r\n", True),
        (b"Cache-Control: public, no-transform\r\n", False),
        (b"Content-Range: bytes 0-4999/9999\r\n", False),
    ],
)
async def test_what_the_upstream_says_is_respected(extra: bytes, compressed: bool) -> None:
    body = b'{"k": "' + b"v" * 5000 + b'"}'
    head = (
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: "v1"\r\n'
        b"Accept-Ranges: bytes\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n"
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, _upstream_answering(head, body), 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            async with open_gateway(_config(f"127.0.0.1:{port}")) as gw:
                resp = await http_request(gw.port, "GET", "/", [("accept-encoding", "gzip")])
            nursery.cancel_scope.cancel()
    if compressed:
        assert resp.header("content-encoding") == "gzip"
        assert gzip.decompress(resp.body) == body
        assert resp.header("etag") == 'W/"v1"'  # the bytes differ: no longer strong
        assert resp.header("accept-ranges") is None  # ranges of what?
    else:
        assert resp.body == body
        assert resp.header("etag") == '"v1"'


async def test_a_slow_stream_reaches_the_client_as_it_comes() -> None:
    """Each chunk is flushed: the first part of a long poll arrives before the upstream
    has sent the rest (zlib alone would hold it until its buffer fills)."""
    go_on = trio.Event()

    async def slow(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        line = b'{"event": "first"}\n'
        await stream.send_all(b"%x\r\n%s\r\n" % (len(line), line))
        await go_on.wait()
        line = b'{"event": "second"}\n'
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, slow, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            async with open_gateway(_config(f"127.0.0.1:{port}")) as gw:
                client = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await client.send_all(
                    b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
                    b"Connection: close\r\n\r\n"
                )
                unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                received, text = b"", b""
                while b"first" not in text:
                    received += await client.receive_some(65536)
                    if b"\r\n\r\n" in received:
                        head, _, chunked = received.partition(b"\r\n\r\n")
                        text = unzip.decompress(_dechunk(chunked)) if chunked else b""
                        unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
                assert b"content-encoding: gzip" in head.lower()
                go_on.set()
                while data := await client.receive_some(65536):
                    received += data
                await client.aclose()
            nursery.cancel_scope.cancel()
    body = gzip.decompress(_dechunk(received.partition(b"\r\n\r\n")[2]))
    assert body == b'{"event": "first"}\n{"event": "second"}\n'


def _dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (as far as it came)."""
    out = b""
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0 or len(rest) < size:
            out += rest[:size] if size else b""
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


async def test_an_http_10_client_gets_a_close_delimited_gzip_body(stubs: Stubs) -> None:
    with trio.fail_after(20):
        async with open_gateway(_config(stubs.target("echo"))) as gw:
            data = await raw_exchange(
                gw.port,
                b"POST / HTTP/1.0\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
                b"Content-Length: 4096\r\n\r\n" + b"z" * 4096,
            )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert json.loads(gzip.decompress(body))["body"] == "z" * 4096


async def test_transform_edits_the_json_before_it_is_compressed(stubs: Stubs) -> None:
    config = _config(stubs.target("echo"))
    config["routes"][0]["plugins"]["transform"] = {
        "response": {"json": {"remove": ["header_list"], "set": {"edited": "yes"}}}
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            resp = await http_request(
                gw.port, "POST", "/a", [("accept-encoding", "gzip")], BIG.encode()
            )
    assert resp.header("content-encoding") == "gzip"
    echoed = json.loads(gzip.decompress(resp.body))
    assert echoed["edited"] == "yes"
    assert "header_list" not in echoed


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"level": 0}, "level"),
        ({"level": 10}, "level"),
        ({"types": ["text/html", "Text/Plain"]}, "types[1]"),
        ({"types": ["json"]}, "types[0]"),
    ],
)
def test_a_bad_setting_names_its_key(table: dict[str, Any], where: str) -> None:
    from engine.gateway import compile_runtime
    from engine.plugins import discover

    config = load(_config("127.0.0.1:1", **table))
    with pytest.raises(ConfigError) as err:
        compile_runtime(config, discover(entry_points=False))
    assert err.value.path == f"routes[0].plugins.compress.{where}"
