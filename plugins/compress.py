"""The ``compress`` filter: gzip responses at the edge for clients that accept it.

A response is compressed when all of these hold:

- the client accepts gzip (``Accept-Encoding``: ``gzip`` or ``*`` with a q-value above 0;
  ``gzip;q=0`` refuses it, as does a q-value that is not a number);
- its media type is one of ``types`` (``text/*`` and ``application/*+json`` patterns
  allowed);
- it is not encoded already (``Content-Encoding`` other than ``identity``), asks for no
  transformation (``Cache-Control: no-transform``), and is not a part (206,
  ``Content-Range``);
- it has a body: not a HEAD answer, nor 1xx, 204 or 304;
- its length is ``min_size`` or more, or unknown (a chunked or close-delimited body).

A compressed response gets ``Content-Encoding: gzip``, loses its ``Content-Length`` (it
is sent chunked, or close-delimited to an HTTP/1.0 client) and ``Accept-Ranges``, and a
strong ``ETag`` becomes weak (``W/"..."``, as nginx does: the bytes differ, the
representation does not). Every response whose compression depends on the client's
``Accept-Encoding`` says so in ``Vary``, compressed or not, so that a cache keeps the
two apart.

A streamed body is compressed as it arrives, chunk by chunk, and each chunk is flushed
(``Z_SYNC_FLUSH``): a response the upstream sends slowly (a long poll, a progress
stream) reaches the client as it comes, at a few bytes per chunk. Memory stays at
zlib's own state (about 256 KiB at level 6) whatever the body's size.

Stage EDGE: its response side runs after every other filter's, so ``transform`` edits
the JSON before it is compressed.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.chain import Filter, FilterContext, Stage
from engine.exchange import BodyStream, Exchange, Headers, Response
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Invalid

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
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0  # unreadable: not taken as a yes
        if coding == b"*":
            star = q if star is None else max(star, q)
        else:
            named = q if named is None else max(named, q)
    if named is not None:
        return named > 0
    return star is not None and star > 0


class _Gzipped:
    """A body stream, gzipped as it arrives; each chunk flushed."""

    __slots__ = ("_inner", "_it", "_z")

    def __init__(self, inner: BodyStream, level: int) -> None:
        self._inner = inner
        self._it: AsyncIterator[bytes] = inner.__aiter__()
        self._z: Any = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)

    def __aiter__(self) -> _Gzipped:
        return self

    async def __anext__(self) -> bytes:
        z = self._z
        if z is None:
            raise StopAsyncIteration
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            self._z = None
            tail: bytes = z.flush(zlib.Z_FINISH)
            return tail
        out: bytes = z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH)
        return out

    async def aclose(self) -> None:
        self._z = None
        await self._inner.aclose()


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

    def _compressible(self, content_type: bytes | None) -> bool:
        if content_type is None:
            return False
        mime = content_type.partition(b";")[0].strip().lower()
        if mime in self._exact:
            return True
        return self._wild is not None and self._wild.match(mime) is not None

    def on_response(self, exchange: Exchange, response: Response) -> None:
        status = response.status
        if status < 200 or status in _BODILESS or exchange.request.method == b"HEAD":
            return
        if response.body is None and response.stream is None:
            return
        headers = response.headers
        if not self._compressible(headers.get(b"content-type")):
            return
        if response.body is not None:
            size: int | None = len(response.body)
        else:
            declared = headers.get(b"content-length")
            size = int(declared) if declared is not None and declared.isdigit() else None
        if size is not None and size < self._min_size:
            return
        encoding = headers.get(b"content-encoding")
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            return
        if headers.get(b"content-range") is not None or _no_transform(headers):
            return
        _vary_on_accept_encoding(headers)
        accept = b",".join(v for n, v in exchange.request.headers.items if n == b"accept-encoding")
        if not accepts_gzip(accept):
            return
        if response.body is not None:
            z = zlib.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
            response.body = z.compress(response.body) + z.flush()
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


def _no_transform(headers: Headers) -> bool:
    for name, value in headers.items:
        if name == b"cache-control" and b"no-transform" in value.lower():
            return True
    return False


def _vary_on_accept_encoding(headers: Headers) -> None:
    for name, value in headers.items:
        if name == b"vary":
            named = {v.strip().lower() for v in value.split(b",")}
            if b"accept-encoding" in named or b"*" in named:
                return
    headers.items.append((b"vary", b"Accept-Encoding"))


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [Compress]
