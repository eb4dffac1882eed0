"""h11's parser without h11's connection state machine.

The gateway writes every head and frames every body it sends itself (``server`` and
``upstream``), so of h11 it needs only the reading side: splitting heads into lines,
validating the request or status line and every field, and decoding chunked bodies.
h11's ``Connection`` wraps that in a state machine that, on every event, walks
transition tables, rescans the fields for framing, keep-alive and ``Expect``, and
(for a client role) must be told the request it did not send. On a proxied request
that bookkeeping cost as much as the parsing itself.

:class:`Reader` calls h11's own readers on h11's own receive buffer instead: every byte
is still parsed and validated by h11, by the same code ``Connection`` runs. The
framing decisions ``Connection`` would make (which body reader, keep-alive, 100
Continue) are the caller's, made from fields it scans anyway.

This reaches into h11's private modules (``_readers``, ``_receivebuffer``); the h11
pin in ``pyproject.toml`` is narrow for that reason, and ``tests/test_wire.py`` checks
the behaviour this relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import h11
from h11._readers import (
    ChunkedReader,
    ContentLengthReader,
    Http10Reader,
    maybe_read_from_IDLE_client,
    maybe_read_from_SEND_RESPONSE_server,
)
from h11._receivebuffer import ReceiveBuffer

__all__ = [
    "BodyReader",
    "ChunkedReader",
    "ContentLengthReader",
    "Http10Reader",
    "ProtocolError",
    "Reader",
]


#: Empty lines skipped before a request line; more are an error (400).
MAX_BLANK_LINES = 8
_CR_LF = (b"\r", b"\n")


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status`` is the answer h11 suggests (400, 431, 501)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyReader(Protocol):
    """One of h11's body readers (chunked, Content-Length, read-until-close)."""

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None: ...

    def read_eof(self) -> h11.EndOfMessage: ...


class Reader:
    """The bytes read from one connection and h11's parse of them.

    Each method returns the next parsed item, or ``None`` when more bytes are needed
    (``feed`` them, or ``feed(b"")`` at the end of the stream). An incomplete item
    larger than ``max_incomplete`` bytes is refused (431), as h11's ``Connection``
    does with ``max_incomplete_event_size``.
    """

    __slots__ = ("buf", "eof", "max_incomplete")

    def __init__(self, max_incomplete: int) -> None:
        self.buf = ReceiveBuffer()
        self.eof = False
        self.max_incomplete = max_incomplete

    def feed(self, data: bytes) -> None:
        if data:
            self.buf += data
        else:
            self.eof = True

    def __len__(self) -> int:
        return len(self.buf)

    def take(self) -> bytes:
        """Everything buffered and not parsed yet (a body's start, a tunnel's bytes)."""
        data = self.buf.maybe_extract_at_most(len(self.buf))
        return bytes(data) if data else b""

    def request(self) -> h11.Request | None:
        """The next request head; at the end of the stream with nothing buffered,
        ``None`` with ``eof`` set (the client is gone).

        Empty lines before the request line are skipped (up to ``MAX_BLANK_LINES``), as
        RFC 9112 2.2 asks: some clients send a CRLF after a POST body. h11 refuses them.
        """
        if self.buf._data[:1] in _CR_LF and not self._skip_blank_lines():
            return None
        req: h11.Request | None = self._head(maybe_read_from_IDLE_client)
        return req

    def _skip_blank_lines(self) -> bool:
        """Drop leading empty lines; ``False`` when a lone CR needs the next byte."""
        buf = self.buf
        for _ in range(MAX_BLANK_LINES):
            data = buf._data
            if data[:2] == b"\r\n":
                buf.maybe_extract_at_most(2)
            elif data[:1] == b"\n":
                buf.maybe_extract_at_most(1)
            else:
                return not (data == b"\r" and not self.eof)
        return True  # still blank: h11 refuses the rest

    def response(self) -> h11.Response | h11.InformationalResponse | None:
        """The next response head (1xx included). One larger than ``max_incomplete`` is
        refused (431) also when it came whole, in the read that crossed the limit."""
        data = self.buf._data  # (h11 extracts from this bytearray in place)
        buffered = len(data)
        resp: h11.Response | h11.InformationalResponse | None = self._head(
            maybe_read_from_SEND_RESPONSE_server
        )
        if resp is not None and buffered - len(data) > self.max_incomplete:
            raise ProtocolError(f"a response head over {self.max_incomplete} bytes", 431)
        return resp

    def _head(self, read: Callable[[ReceiveBuffer], Any]) -> Any:
        try:
            head = read(self.buf)
        except h11.ProtocolError as e:
            raise ProtocolError(str(e), e.error_status_hint) from None
        if head is None:
            self._incomplete()
        return head

    def body(self, reader: BodyReader) -> h11.Data | h11.EndOfMessage | None:
        """The next piece of a body that ``reader`` frames."""
        try:
            ev = reader(self.buf)
            if ev is None and self.eof and not self.buf:
                return reader.read_eof()  # a close-delimited body ends here; others raise
        except h11.ProtocolError as e:
            raise ProtocolError(str(e), e.error_status_hint) from None
        if ev is None:
            self._incomplete()
        return ev

    def _incomplete(self) -> None:
        if len(self.buf) > self.max_incomplete:
            raise ProtocolError("Receive buffer too long", 431)
        if self.eof and self.buf:
            raise ProtocolError("peer unexpectedly closed connection")
