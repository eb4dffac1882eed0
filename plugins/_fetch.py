"""A tiny HTTP(S) GET client on trio + h11, for fetching small documents (a JWKS).

One request per connection (``Connection: close``), no redirects, no proxies: an
identity provider's key set is a small JSON document at a fixed URL, and following a
redirect would let whoever controls the first host pick where keys come from.
Everything that can go wrong is raised as :class:`FetchError`, with a message fit for
a log line.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["FetchError", "FetchResult", "check_url", "fetch"]

USER_AGENT = b"filtergate-jwks/1"


class FetchError(Exception):
    """The document could not be fetched; the message says why (no secrets in it)."""


@dataclass(frozen=True, slots=True)
class FetchResult:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def check_url(url: str) -> str | None:
    """An error message if ``url`` is not an absolute http(s) URL we can fetch."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("http", "https"):
        return f"expected an http:// or https:// URL, got {url!r}"
    if not parts.hostname:
        return f"URL has no host: {url!r}"
    if port == 0:
        return f"URL has port 0: {url!r}"
    if parts.username or parts.password:
        return "credentials in the URL are not supported"
    return None


_default_ssl_context: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _default_ssl_context
    if _default_ssl_context is None:
        _default_ssl_context = ssl.create_default_context()
    return _default_ssl_context


async def fetch(
    url: str,
    *,
    time_limit: float,
    max_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> FetchResult:
    """GET ``url`` and return the whole response, within ``time_limit`` seconds overall.

    Raises :class:`FetchError` on a bad URL, connection or TLS failure, timeout, a
    malformed response, or a body longer than ``max_bytes``. Any status is returned;
    the caller decides what a non-200 means.
    """
    problem = check_url(url)
    if problem:
        raise FetchError(problem)
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        with trio.fail_after(time_limit):
            return await _get(host, port, https, host_header, target, max_bytes, ssl_context)
    except trio.TooSlowError:
        raise FetchError(f"no complete answer from {host}:{port} within {time_limit:g}s") from None
    except OSError as e:
        # ssl.SSLError and trio.BrokenResourceError's causes are OSErrors too.
        raise FetchError(f"cannot fetch from {host}:{port}: {e}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        # trio wraps the reason (a TLS verification failure ...) as the cause.
        reason = e.__cause__ or e
        raise FetchError(f"connection to {host}:{port} broke: {reason}") from None
    except h11.ProtocolError as e:
        raise FetchError(f"malformed HTTP response from {host}:{port}: {e}") from None


async def _get(
    host: str,
    port: int,
    https: bool,
    host_header: str,
    target: str,
    max_bytes: int,
    ssl_context: ssl.SSLContext | None,
) -> FetchResult:
    stream: trio.abc.Stream
    if https:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context or _ssl_context(), https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target.encode("ascii"),
            headers=[
                (b"host", host_header.encode("ascii")),
                (b"user-agent", USER_AGENT),
                (b"accept", b"application/json, application/jwk-set+json"),
                (b"connection", b"close"),
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = list(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise FetchError(f"answer from {host}:{port} is over {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if isinstance(event, h11.ConnectionClosed) or not status:
                    raise FetchError(f"{host}:{port} closed the connection before answering")
                return FetchResult(status, headers, bytes(body))
