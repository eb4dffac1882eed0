"""engine.wire: h11's readers on h11's buffer, without h11's connection state machine.

These pin the behaviour of h11's private modules that the engine relies on, so an h11
upgrade that changes them fails here first.
"""

from __future__ import annotations

import h11
import pytest

from engine.wire import (
    MAX_BLANK_LINES,
    ChunkedReader,
    ContentLengthReader,
    Http10Reader,
    ProtocolError,
    Reader,
)


def test_request_heads_pipelined_in_one_read() -> None:
    wire = Reader(1024)
    wire.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo")
    first = wire.request()
    assert first is not None
    assert first.target == b"/a"
    assert wire.request() is None  # the second head is not complete yet
    wire.feed(b"st: x\r\nX-A: 1\r\n\r\n")
    second = wire.request()
    assert second is not None
    assert second.target == b"/b"
    assert [(n, v) for _, n, v in second.headers._full_items] == [(b"host", b"x"), (b"x-a", b"1")]
    assert len(wire) == 0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00", 400),  # a TLS hello on a plain-text port
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    ],
)
def test_malformed_heads_raise_with_h11s_status(data: bytes, status: int) -> None:
    wire = Reader(1024)
    wire.feed(data)
    with pytest.raises(ProtocolError) as info:
        wire.request()
    assert info.value.status == status


def test_empty_lines_before_a_request_line_are_skipped() -> None:
    # RFC 9112 2.2; some clients send a CRLF after a POST body.
    wire = Reader(1024)
    wire.feed(b"\r\n\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n\r")
    first = wire.request()
    assert first is not None
    assert first.target == b"/a"
    assert wire.request() is None  # a lone CR: the LF may follow
    wire.feed(b"\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    second = wire.request()
    assert second is not None
    assert second.target == b"/b"
    blank = Reader(1024)
    blank.feed(b"\r\n" * (MAX_BLANK_LINES + 1) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ProtocolError):  # a bounded number only
        blank.request()


def test_an_incomplete_head_over_the_limit_is_431() -> None:
    wire = Reader(64)
    wire.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100)
    with pytest.raises(ProtocolError) as info:
        wire.request()
    assert info.value.status == 431


def test_end_of_stream_between_requests_and_inside_one() -> None:
    wire = Reader(1024)
    wire.feed(b"")
    assert wire.request() is None
    assert wire.eof
    cut = Reader(1024)
    cut.feed(b"GET / HTTP/1.1\r\nHo")
    cut.feed(b"")
    with pytest.raises(ProtocolError):
        cut.request()


def test_response_heads_informational_then_final() -> None:
    wire = Reader(1024)
    wire.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first = wire.response()
    assert type(first) is h11.InformationalResponse
    assert first.status_code == 100
    final = wire.response()
    assert type(final) is h11.Response
    assert final.status_code == 200
    assert wire.take() == b"ok"
    assert wire.take() == b""


def test_chunked_body_with_trailers() -> None:
    wire = Reader(1024)
    reader = ChunkedReader()
    wire.feed(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-T: 1\r\n\r\nNEXT")
    parts = []
    while True:
        ev = wire.body(reader)
        assert ev is not None
        if type(ev) is h11.EndOfMessage:
            break
        assert type(ev) is h11.Data
        parts.append(bytes(ev.data))
    assert b"".join(parts) == b"abcde"
    assert wire.take() == b"NEXT"


def test_chunked_body_garbage_and_early_end() -> None:
    wire = Reader(1024)
    wire.feed(b"zz\r\n")
    with pytest.raises(ProtocolError):
        wire.body(ChunkedReader())
    cut = Reader(1024)
    reader = ChunkedReader()
    cut.feed(b"5\r\nab")
    assert type(cut.body(reader)) is h11.Data
    cut.feed(b"")
    with pytest.raises(ProtocolError):
        cut.body(reader)


def test_a_chunk_size_line_that_never_ends_is_bounded() -> None:
    wire = Reader(64)
    wire.feed(b"1" * 100)
    with pytest.raises(ProtocolError) as info:
        wire.body(ChunkedReader())
    assert info.value.status == 431


def test_content_length_body_and_early_close() -> None:
    wire = Reader(1024)
    reader = ContentLengthReader(4)
    wire.feed(b"ab")
    ev = wire.body(reader)
    assert type(ev) is h11.Data
    assert bytes(ev.data) == b"ab"
    assert wire.body(reader) is None
    wire.feed(b"")
    with pytest.raises(ProtocolError):
        wire.body(reader)


def test_close_delimited_body_ends_at_eof() -> None:
    wire = Reader(1024)
    reader = Http10Reader()
    wire.feed(b"all of it")
    ev = wire.body(reader)
    assert type(ev) is h11.Data
    assert bytes(ev.data) == b"all of it"
    assert wire.body(reader) is None
    wire.feed(b"")
    assert type(wire.body(reader)) is h11.EndOfMessage
