"""The ``compress`` filter: gzip at the edge, end to end over real sockets (the echo stub
for JSON bodies, raw upstreams for chunked, encoded and slow ones), and its rules."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from typing import Any

import pytest
import trio

from engine.config import load
from engine.schema import ConfigError
from engine.testing import Stubs, http_request, open_gateway, raw_exchange
from plugins.compress import accepts_gzip
from tests.upstreams import serve_raw

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
        (b"gzip;q=1.5", False),  # out of range (RFC 9110 12.4.2)
        (b"gzip;q=inf", False),
        (b"gzip;q=1_0", False),
        (b"gzip;q=0.001", True),
        (b"gzip; q=1.000", True),
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
        (resp,) = await _through(head, body, [("GET", GZIP)])
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
        async with serve_raw(slow) as port:
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


async def test_an_http_10_client_gets_no_gzip(stubs: Stubs) -> None:
    """Its body ends at the close, so a compressed one cut midway would pass for whole
    (curl took 61 bytes of 100,000 for a complete answer): not compressed, as nginx's
    gzip_http_version 1.1."""
    with trio.fail_after(20):
        async with open_gateway(_config(stubs.target("echo"))) as gw:
            data = await raw_exchange(
                gw.port,
                b"POST / HTTP/1.0\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
                b"Content-Length: 4096\r\n\r\n" + b"z" * 4096,
            )
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-encoding" not in head.lower()
    assert b"vary: accept-encoding" in head.lower()
    assert json.loads(body)["body"] == "z" * 4096


async def _through(
    head: bytes, body: bytes, requests: list[tuple[str, list[Any]]], **plugins: Any
) -> list[Any]:
    """The gateway's answers to ``requests`` (method, headers) in front of an upstream
    answering each with ``head`` and ``body`` (none to a HEAD); ``plugins``: more
    plugin tables on the route."""

    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        await stream.send_all(head if data.startswith(b"HEAD") else head + body)
        await stream.aclose()

    answers = []
    async with serve_raw(answer) as port:
        config = _config(f"127.0.0.1:{port}")
        config["routes"][0]["plugins"] |= plugins
        async with open_gateway(config) as gw:
            for method, headers in requests:
                answers.append(await http_request(gw.port, method, "/", headers))
    return answers


async def test_head_and_304_carry_the_fields_of_the_compressed_get() -> None:
    """HEAD said no Content-Encoding, a strong ETag and no Vary, where the GET is gzipped
    (RFC 9110 9.3.2); a 304 to a client holding the gzipped copy (W/"v1") gave back "v1"
    and no Vary, so its cache could not match the stored copy (15.4.5)."""
    body = b'{"k": "' + b"v" * 5000 + b'"}'
    head = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: "v1"\r\n'
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with trio.fail_after(20):
        get, head_answer = await _through(head, body, [("GET", GZIP), ("HEAD", GZIP)])
        not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'
        (revalidated,) = await _through(
            not_modified, b"", [("GET", [*GZIP, ("if-none-match", 'W/"v1"')])]
        )
        (other,) = await _through(not_modified, b"", [("GET", [("if-none-match", '"v1"')])])
    assert get.header("content-encoding") == "gzip"
    for name in ("content-encoding", "vary", "etag", "content-length"):
        assert head_answer.header(name) == get.header(name), name
    assert head_answer.body == b""
    assert revalidated.status == 304
    assert revalidated.header("etag") == 'W/"v1"'
    assert revalidated.header("vary") == "Accept-Encoding"
    assert other.header("etag") == '"v1"'  # a client holding the upstream's own copy


async def test_any_content_encoding_field_keeps_the_body_as_it_is() -> None:
    """An upstream's second Content-Encoding field (after an identity one) was not
    read: its gzip body was gzipped again, and the client got gzip bytes as JSON."""
    noise = random.Random(1).randbytes(4000).hex().encode()  # over min_size once gzipped
    body = gzip.compress(b'{"k": "' + noise + b'"}')
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with trio.fail_after(20):
        (resp,) = await _through(head, body, [("GET", GZIP)])
    assert resp.body == body
    assert resp.header("vary") is None


async def test_small_chunks_arriving_together_are_compressed_together() -> None:
    """Every chunk was flushed on its own: 10,000 lines of 85 bytes sent one per chunk
    came out 30 times larger than gzip makes them. Now a flush waits until the
    upstream has nothing more ready."""
    line = b'{"id": 1, "name": "a record like the others", "tags": ["x", "y"], "n": 0}\n'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for _ in range(10_000))
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with trio.fail_after(20):
        (resp,) = await _through(head, chunks + b"0\r\n\r\n", [("GET", GZIP)])
    assert gzip.decompress(resp.body) == line * 10_000
    assert len(resp.body) < 20 * len(gzip.compress(line * 10_000))


async def test_a_body_past_a_filter_s_buffer_keeps_its_ratio() -> None:
    """A JSON body over the buffer a transform edit asks for passes unedited, streamed
    on from what was buffered: it flushed after every chunk (35 times gzip's size)."""
    line = b'{"id": 1, "name": "a record like the others", "tags": ["x", "y"], "n": 0}\n'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for _ in range(15_000))
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    edit = {"transform": {"response": {"json": {"set": {"e": 1}}}}}
    with trio.fail_after(20):
        (resp,) = await _through(head, chunks + b"0\r\n\r\n", [("GET", GZIP)], **edit)
    assert gzip.decompress(resp.body) == line * 15_000
    assert len(resp.body) < 20 * len(gzip.compress(line * 15_000))


async def test_head_and_get_agree_on_a_body_the_gateway_made() -> None:
    """The gateway's own error body (or a breaker's fallback) has no Content-Length of
    the upstream's: HEAD said gzip with the plain length where GET sent it compressed."""
    config = _config("127.0.0.1:1", min_size="0")
    guard = {"consumers": [{"id": "a", "key_sha256": "0" * 64}]}
    config["routes"][0]["plugins"]["key-auth"] = guard  # a 401, made by the gateway
    # One request id for both (the error body shows it), from a trusted proxy.
    config["server"] = {"trusted_proxies": ["127.0.0.1/32"]}
    asked = [*GZIP, ("x-request-id", "same-id")]
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            get = await http_request(gw.port, "GET", "/", asked)
            head = await http_request(gw.port, "HEAD", "/", asked)
    assert get.status == head.status == 401
    assert get.header("content-encoding") == head.header("content-encoding") == "gzip"
    assert head.header("content-length") == get.header("content-length") == str(len(get.body))
    assert json.loads(gzip.decompress(get.body))["error"]["code"]


@pytest.mark.parametrize(
    "asked",
    [
        [],  # no Accept-Encoding
        [("accept-encoding", "gzip;q=0")],
        [*GZIP, ("cache-control", "no-transform")],
    ],
)
async def test_a_304_to_a_request_that_would_get_no_gzip_keeps_its_tag(asked: list[Any]) -> None:
    """The weak tag and Vary went on every 304 whose If-None-Match held the weak tag,
    also to a request whose 200 would be plain (with the strong tag)."""
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'
    with trio.fail_after(20):
        (resp,) = await _through(
            not_modified, b"", [("GET", [*asked, ("if-none-match", '"v1", W/"v1"')])]
        )
    assert resp.status == 304
    assert resp.header("etag") == '"v1"'
    assert resp.header("vary") is None


@pytest.mark.parametrize("level", [6, 9])
async def test_every_level_makes_the_same_bytes_back(stubs: Stubs, level: int) -> None:
    """Above level 6 slices go to a worker thread, small buffered bodies included."""
    config = _config(stubs.target("echo"), level=level)
    config["routes"][0]["plugins"]["transform"] = {"response": {"json": {"set": {"edited": "yes"}}}}
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            resp = await http_request(gw.port, "POST", "/a", GZIP, BIG.encode())
    assert json.loads(gzip.decompress(resp.body))["body"] == BIG


async def test_an_empty_buffered_body_is_not_compressed(stubs: Stubs) -> None:
    """It is under min_size (it was taken for a body of unknown length: 20 bytes of
    gzip for none)."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    edit = {"transform": {"response": {"json": {"set": {"e": 1}}}}}
    with trio.fail_after(20):
        (resp,) = await _through(head, b"0\r\n\r\n", [("GET", GZIP)], **edit)
    assert resp.header("content-encoding") is None
    assert resp.body == b""


async def test_a_client_asking_for_no_transform_gets_none(stubs: Stubs) -> None:
    with trio.fail_after(20):
        async with open_gateway(_config(stubs.target("echo"))) as gw:
            asked = [*GZIP, ("cache-control", "no-transform")]
            resp = await http_request(gw.port, "POST", "/a", asked, BIG.encode())
    assert resp.header("content-encoding") is None
    assert json.loads(resp.body)["body"] == BIG


@pytest.mark.parametrize("size", [4096, 200_000])
async def test_transform_edits_the_json_before_it_is_compressed(stubs: Stubs, size: int) -> None:
    """A small edited body is compressed at once (with its Content-Length); a large one
    is sent compressed a slice at a time, so that no other client waits for all of it."""
    config = _config(stubs.target("echo"))
    config["routes"][0]["plugins"]["transform"] = {
        "response": {"json": {"remove": ["header_list"], "set": {"edited": "yes"}}}
    }
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            resp = await http_request(gw.port, "POST", "/a", GZIP, b"q" * size)
    assert resp.header("content-encoding") == "gzip"
    echoed = json.loads(gzip.decompress(resp.body))
    assert echoed["edited"] == "yes"
    assert echoed["body"] == "q" * size
    assert "header_list" not in echoed
    if size < 16384:
        assert resp.header("content-length") == str(len(resp.body))
    else:
        assert resp.header("content-length") is None


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
