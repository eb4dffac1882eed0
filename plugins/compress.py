"""The ``compress`` filter: gzip responses at the edge for clients that accept it.

A response is compressed when all of these hold:

- the client accepts gzip (``Accept-Encoding``: ``gzip`` or ``*`` with a q-value above 0;
  ``gzip;q=0`` refuses it, as does a q-value out of RFC 9110's grammar), over HTTP/1.1
  (an HTTP/1.0 body ends at the close: a compressed one cut midway would pass for whole);
- its media type is one of ``types`` (``text/*`` and ``application/*+json`` patterns
  allowed);
- it is not encoded already (a ``Content-Encoding`` other than ``identity`` in any
  field), neither it nor the request asks for no transformation (``Cache-Control:
  no-transform``), and it is not a part (206, ``Content-Range``);
- it has a body: not 1xx, 204 or 304;
- its length is ``min_size`` or more, or unknown (a chunked or close-delimited body).

A compressed response gets ``Content-Encoding: gzip``, loses its ``Content-Length`` and
``Accept-Ranges``, and a strong ``ETag`` becomes weak (``W/"..."``, as nginx does: the
bytes differ, the representation does not). Every response whose compression depends on
the client's ``Accept-Encoding`` says so in ``Vary``, compressed or not, so that a cache
keeps the two apart. A HEAD answer gets the fields of its GET, and a 304 to a request
that would get the compressed copy and holds it (its ``If-None-Match`` names the weak
tag) gets that copy's ``ETag`` and ``Vary`` (RFC 9110 15.4.5).

A streamed body is compressed as it arrives, at most ``_SLICE`` bytes per step, and
flushed (``Z_SYNC_FLUSH``) whenever the upstream has nothing more ready: a response the
upstream sends slowly reaches the client as it comes, one arriving in small pieces keeps
its ratio. Memory stays at zlib's own state (about 256 KiB at level 6) whatever the
body's size. A buffered body (another filter's) over ``_SLICE`` is sent the same way.
Above level 6 the slices are compressed in a worker thread (see ``_Gzipped``).

Stage EDGE: its response side runs after every other filter's, so ``transform`` edits
the JSON before it is compressed.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from engine.chain import Filter, FilterContext, Stage
from engine.exchange import END, BodyStream, Exchange, Headers, Request, Response
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Invalid
from plugins._threads import one_at_a_time

__all__ = ["DEFAULT_TYPES", "Compress", "CompressConfig", "accepts_gzip"]

#: Text formats worth compressing; images, video and archives are compressed already.
DEFAULT_TYPES = (
    "text/html",
    "text/plain",
    "text/css",
    "text/csv",
    "text/xml",
    "text/javascript",
    "application/javascript",
    "application/json",
    "application/*+json",
    "application/xml",
    "application/*+xml",
    "application/x-ndjson",
    "image/svg+xml",
)

_MEDIA_PATTERN = re.compile(r"[a-z0-9*][a-z0-9!#$&^_.+*-]*/[a-z0-9*][a-z0-9!#$&^_.+*-]*")
_BODILESS = frozenset({204, 206, 304})
#: The most compressed in one go before the engine passes to other tasks (at level 6,
#: about 2 ms on data chosen to be slow to compress, 0.1 ms on repetitive JSON).
_SLICE = 16 * 1024
#: The highest level compressed in the event loop; above it, in a worker thread.
_LOOP_LEVEL = 6

_QVALUE = re.compile(rb"0(\.[0-9]{0,3})?|1(\.0{0,3})?")
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream

_compressed = counter(
    "filtergate_compressed_responses_total",
    "Responses the compress filter gzipped, by route.",
    ("route",),
)


@dataclass(frozen=True)
class CompressConfig:
    types: list[str] = field(
        default_factory=lambda: list(DEFAULT_TYPES),
        metadata={"doc": 'media types compressed ("text/*" and "application/*+json" allowed)'},
    )
    min_size: ByteSize = field(
        default=ByteSize(1024),
        metadata={
            "doc": "smaller bodies are sent as they are (a body of unknown length is compressed)"
        },
    )
    level: int = field(default=6, metadata={"doc": "zlib level, 1 (fastest) to 9 (smallest)"})

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 9:
            raise Invalid("level", f"must be 1 to 9, got {self.level}")
        for i, pattern in enumerate(self.types):
            if not _MEDIA_PATTERN.fullmatch(pattern):
                raise Invalid(
                    f"types[{i}]",
                    f'expected a lower-case media type ("text/html", "text/*"), got {pattern!r}',
                )


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether an ``Accept-Encoding`` value (repeated fields joined by ``,``) accepts
    gzip (RFC 9110 12.5.3): named (or ``x-gzip``), else covered by ``*``, with q > 0."""
    named: float | None = None
    star: float | None = None
    for element in accept_encoding.split(b","):
        coding, _, params = element.partition(b";")
        coding = coding.strip().lower()
        if coding not in (b"gzip", b"x-gzip", b"*"):
            continue
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.partition(b"=")
            if key.strip().lower() == b"q":
                value = value.strip()
                # RFC 9110 12.4.2: 0 to 1, three decimals at most; anything else is no yes.
                q = float(value) if _QVALUE.fullmatch(value) else 0.0
        if coding == b"*":
            star = q if star is None else max(star, q)
        else:
            named = q if named is None else max(named, q)
    if named is not None:
        return named > 0
    return star is not None and star > 0


class _Gzipped:
    """A body stream, gzipped as it arrives.

    Each call compresses at most ``_SLICE`` bytes, so the engine's pass to other tasks
    between chunks comes at least that often (zlib's cost per byte depends on the data,
    and a client may choose it). What was compressed is flushed (``Z_SYNC_FLUSH``) when
    the upstream has nothing more ready, not after every chunk: a body arriving in
    small pieces keeps its ratio, and a slow stream still reaches the client as it
    comes.
    """

    __slots__ = ("_dirty", "_inner", "_it", "_poll", "_rest", "_threaded", "_z")

    def __init__(self, inner: BodyStream, level: int) -> None:
        # Above level 6, zlib can take 50 ms and more per slice of data chosen to be slow
        # to compress (ten times level 6's worst): such slices go to a worker thread
        # (zlib lets go of the GIL while it works), so the event loop never waits on them.
        self._threaded = level > _LOOP_LEVEL
        self._inner = inner
        self._it: AsyncIterator[bytes] = inner.__aiter__()
        # What is already here (a stream's poll: a chunk, END, or None when it must wait).
        self._poll: Callable[[], Any] | None = getattr(inner, "poll", None)
        self._z: Any = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
        self._rest = memoryview(b"")
        self._dirty = False  # compressed input not flushed yet

    def __aiter__(self) -> _Gzipped:
        return self

    async def __anext__(self) -> bytes:
        while True:
            z = self._z
            if z is None:
                raise StopAsyncIteration
            if self._rest:
                piece, self._rest = self._rest[:_SLICE], self._rest[_SLICE:]
                self._dirty = True
                if self._threaded:
                    out: bytes = await trio.to_thread.run_sync(
                        z.compress, piece, limiter=one_at_a_time("compress")
                    )
                else:
                    out = z.compress(piece)
                if out:
                    return out
                # zlib kept it all (a very compressible body): let others run before
                # the next slice, as the engine does between the chunks it sends.
                await trio.lowlevel.checkpoint()
                continue
            chunk = self._poll() if self._poll is not None else None
            if chunk is None:  # nothing ready: what was compressed goes out first
                if self._dirty:
                    self._dirty = False
                    out = z.flush(zlib.Z_SYNC_FLUSH)
                    if out:
                        return out
                try:
                    chunk = await self._it.__anext__()
                except StopAsyncIteration:
                    chunk = END
            if chunk is END:
                self._z = None
                out = z.flush(zlib.Z_FINISH)
                return out
            self._rest = memoryview(chunk)  # (bytes: END was handled above)

    async def aclose(self) -> None:
        self._z = None
        await self._inner.aclose()


class _Once:
    """A buffered body as a stream of one chunk (compressed in slices by _Gzipped)."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        body, self._body = self._body, None
        if body is None:
            raise StopAsyncIteration
        return body

    async def aclose(self) -> None:
        self._body = None


class Compress(Filter):
    """Gzips responses for clients that accept it (see the module docstring)."""

    name = "compress"
    stage = Stage.EDGE
    Config = CompressConfig

    def __init__(self, config: CompressConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: CompressConfig = config
        exact = [t for t in config.types if "*" not in t]
        wild = [t for t in config.types if "*" in t]
        self._exact = frozenset(t.encode() for t in exact)
        self._wild = (
            re.compile("|".join(fnmatch.translate(t) for t in wild).encode()) if wild else None
        )
        self._min_size = int(config.min_size)
        self._level = config.level
        # Above _LOOP_LEVEL even a small buffered body is compressed in a worker thread,
        # as a stream (_Gzipped).
        self._threaded = config.level > _LOOP_LEVEL

    def _compressible(self, content_type: bytes | None) -> bool:
        if content_type is None:
            return False
        mime = content_type.partition(b";")[0].strip().lower()
        if mime in self._exact:
            return True
        return self._wild is not None and self._wild.match(mime) is not None

    def on_response(self, exchange: Exchange, response: Response) -> None:
        status = response.status
        if status < 200 or status in _BODILESS:
            if status == 304:
                _revalidated(exchange, response.headers)
            return
        if response.body is None and response.stream is None:
            return
        headers = response.headers
        if not self._compressible(headers.get(b"content-type")):
            return
        head = exchange.request.method == b"HEAD"  # its fields are those of the GET
        body = response.body
        if body is not None and (body or not head):
            # (A HEAD answer buffered for a filter is empty: its length is the GET's.)
            size: int | None = len(body)
        else:
            declared = headers.get(b"content-length")
            size = int(declared) if declared is not None and declared.isdigit() else None
        if size is not None and size < self._min_size:
            return
        for name, value in headers.items:
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                return  # encoded already (in any of its fields)
        if headers.get(b"content-range") is not None or _no_transform(headers):
            return
        request = exchange.request
        if _no_transform(request.headers):
            return
        headers.add_vary(b"Accept-Encoding")
        if not _wants_gzip(request):
            return
        if head and not body:
            pass  # the fields only: no body goes out
        elif body is not None and len(body) <= _SLICE and not self._threaded:
            z = zlib.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
            response.body = z.compress(body) + z.flush()
        elif body is not None:  # larger, or a high level: a slice at a time as it is sent
            response.body = None
            response.stream = _Gzipped(_Once(body), self._level)  # (chunked)
        else:
            assert response.stream is not None
            response.stream = _Gzipped(response.stream, self._level)
        headers.remove(b"content-length")
        headers.remove(b"accept-ranges")
        headers.set(b"content-encoding", b"gzip")  # (in place of an "identity")
        etag = headers.get(b"etag")
        if etag is not None and not etag.startswith(b"W/"):
            headers.set(b"etag", b"W/" + etag)
        _compressed.inc(route=exchange.route.name if exchange.route is not None else "")


def _wants_gzip(request: Request) -> bool:
    """Whether ``request`` takes a gzipped answer: it accepts gzip, over HTTP/1.1 (an
    HTTP/1.0 body ends at the close, and a cut one would pass for whole; nginx's
    gzip_http_version 1.1)."""
    if request.http_version != b"1.1":
        return False
    return accepts_gzip(b",".join(v for n, v in request.headers.items if n == b"accept-encoding"))


def _revalidated(exchange: Exchange, headers: Headers) -> None:
    """A 304 to a client holding a compressed copy: its ETag and Vary as the 200 had
    them (RFC 9110 15.4.5), or the client's cache would not match it to that copy.
    Only when this request would have got the compressed copy itself."""
    etag = headers.get(b"etag")
    if etag is None or etag.startswith(b"W/"):
        return
    request = exchange.request
    if not _wants_gzip(request) or _no_transform(request.headers):
        return
    weak = b"W/" + etag
    for name, value in exchange.request.headers.items:
        if name == b"if-none-match" and weak in (v.strip() for v in value.split(b",")):
            headers.set(b"etag", weak)
            headers.add_vary(b"Accept-Encoding")
            return


def _no_transform(headers: Headers) -> bool:
    for name, value in headers.items:
        if name == b"cache-control" and b"no-transform" in value.lower():
            return True
    return False


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [Compress]
