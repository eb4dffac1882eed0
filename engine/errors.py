"""Typed gateway errors and the one place that renders them.

Every response the gateway makes itself goes through :func:`render_error`, so every one of
them has the same JSON body (``{"error": {"status", "code", "message", "request_id"}}``)
and a proper reason phrase. Foreign exceptions are converted to these types where they
enter the engine (a ``trio.TooSlowError`` from the upstream becomes :class:`UpstreamTimeout`).
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus

__all__ = [
    "BadGateway",
    "BadRequest",
    "CircuitOpen",
    "ClientGone",
    "Forbidden",
    "GatewayError",
    "HeaderTooLarge",
    "HttpVersionNotSupported",
    "MethodNotAllowed",
    "NoHealthyTarget",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamReset",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "reason_phrase",
    "render_error",
]


class ClientGone(Exception):
    """The client closed its connection while the upstream had not answered: the call
    is let go. No error of the upstream's, nor an answer to anyone."""


class GatewayError(Exception):
    """An answer the gateway gives itself instead of the upstream's.

    Subclasses fix ``status`` and ``code``; ``headers`` are added to the rendered response
    (``Retry-After``, ``WWW-Authenticate``, ``Allow`` ...). ``close`` asks the server to
    close the client connection after answering, for errors where the framing of the
    request can no longer be trusted.
    """

    status: int = 500
    code: str = "internal_error"
    close: bool = False

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool | None = None,
    ) -> None:
        self.message = message or reason_phrase(self.status).decode()
        self.headers = headers or []
        if close is not None:
            self.close = close
        super().__init__(self.message)


class BadRequest(GatewayError):
    status, code, close = 400, "bad_request", True


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"


class Forbidden(GatewayError):
    status, code = 403, "forbidden"


class NotFound(GatewayError):
    status, code = 404, "no_route"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(headers=[(b"allow", ", ".join(sorted(allowed)).encode())])


class RequestTimeout(GatewayError):
    status, code, close = 408, "request_timeout", True


class PayloadTooLarge(GatewayError):
    status, code, close = 413, "body_too_large", True


class UnsupportedMediaType(GatewayError):
    """A body in a form the gateway must read but cannot: not JSON, or compressed."""

    status, code = 415, "unsupported_media_type"


class HeaderTooLarge(GatewayError):
    status, code, close = 431, "header_too_large", True


class RateLimited(GatewayError):
    status, code = 429, "rate_limited"

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, headers=[(b"retry-after", str(seconds).encode())])
        self.retry_after = seconds


class BadGateway(GatewayError):
    status, code = 502, "bad_gateway"


class UpstreamUnreachable(BadGateway):
    code = "upstream_unreachable"


class UpstreamReset(BadGateway):
    """The upstream closed or reset the connection before any byte of a response."""

    code = "upstream_reset"


class ServiceUnavailable(GatewayError):
    status, code = 503, "service_unavailable"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        headers = []
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        super().__init__(message, headers=headers)


class NoHealthyTarget(ServiceUnavailable):
    code = "no_healthy_target"


class CircuitOpen(ServiceUnavailable):
    code = "circuit_open"


class UpstreamTimeout(GatewayError):
    status, code = 504, "upstream_timeout"


class HttpVersionNotSupported(GatewayError):
    status, code, close = 505, "http_version_not_supported", True


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (empty for unknown codes)."""
    return _REASONS.get(status, b"")


def render_error(
    err: GatewayError, request_id: str
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and JSON body of the response for ``err``.

    The headers include ``content-type``, ``content-length`` and ``err.headers``; the
    caller adds the request id and framing headers of its own.
    """
    body = json.dumps(
        {
            "error": {
                "status": err.status,
                "code": err.code,
                "message": err.message,
                "request_id": request_id,
            }
        },
        separators=(",", ":"),
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *err.headers,
    ]
    return err.status, headers, body
