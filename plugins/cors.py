"""The ``cors`` filter: Cross-Origin Resource Sharing, answered at the edge.

A browser lets a page of one origin read an answer from another only when the answer
says so (``Access-Control-Allow-Origin``), and asks first (a preflight: ``OPTIONS`` with
``Origin`` and ``Access-Control-Request-Method``) before a request a form could not send.
This filter answers the preflights of its routes itself, and adds the fields to every
other answer (the upstream's, another filter's, the gateway's own errors), for the
origins it is told to allow; the upstream's own ``Access-Control-*`` fields are replaced,
so one place decides.

- A preflight never reaches the upstream, nor the filters after this one (it carries no
  credentials: authentication would refuse it). It is answered ``204``: for an allowed
  origin with the methods (``methods``, by default the route's), the request fields
  (``headers``, by default those asked for), ``max_age`` and ``credentials``; for another
  origin with none of them, so the browser refuses the request.
- The engine routes a preflight by the method it announces: a route that lists only
  ``GET`` gets the preflights of its ``GET`` requests (see ``handles_preflight``).
- Other requests from an allowed origin get ``Access-Control-Allow-Origin`` (``*`` when any
  origin is allowed without credentials, else the origin itself),
  ``Access-Control-Allow-Credentials`` and ``Access-Control-Expose-Headers``; requests from
  other origins are served without them (CORS is the browser's to enforce: a
  non-browser client is not stopped by it).
- Every answer that depends on the request's ``Origin`` says so in ``Vary``, so that a
  cache keeps the origins apart.

Stage EDGE: it runs before authentication and limits, so a refusal (401, 429) still
carries the fields and the page can read why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.chain import Filter, FilterContext, Stage
from engine.exchange import Exchange, Headers, Response, checked_field, preflight_method
from engine.plugins import hookimpl
from engine.router import allowed_methods
from engine.schema import Duration, Invalid

__all__ = ["Cors", "CorsConfig"]

_ORIGIN = b"origin"
_REQUEST_HEADERS = b"access-control-request-headers"
_REQUEST_PRIVATE = b"access-control-request-private-network"
#: The upstream's own CORS fields: replaced by this filter's on its routes.
_ANSWER_FIELDS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-allow-private-network",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# scheme://host[:port], the host possibly "*." and a domain: an origin has no path.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_ORIGIN_SYNTAX = re.compile(
    rf"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<any>\*\.)?(?P<host>{_LABEL}(?:\.{_LABEL})*)"
    r"(?::(?P<port>\d{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True)
class CorsConfig:
    origins: list[str] = field(
        metadata={
            "doc": 'origins allowed to read answers: "https://app.example.com", '
            '"https://*.example.com" (any subdomain), "null", or "*" (any)'
        }
    )
    methods: list[str] = field(
        default_factory=list,
        metadata={"doc": "methods a preflight allows; [] (default): the route's methods"},
    )
    headers: list[str] = field(
        default_factory=list,
        metadata={
            "doc": "request fields a preflight allows; [] (default): those the preflight asks for"
        },
    )
    exposed_headers: list[str] = field(
        default_factory=list,
        metadata={"doc": "answer fields a page may read beside the CORS-safelisted ones"},
    )
    credentials: bool = field(
        default=False,
        metadata={"doc": "whether pages may send cookies and credentials, and read the answer"},
    )
    max_age: Duration = field(
        default=Duration(0.0),
        metadata={"doc": "how long a browser may keep a preflight's answer; 0: not said"},
    )
    private_network: bool = field(
        default=False,
        metadata={
            "doc": "answer Private Network Access preflights (a public page calling this "
            "gateway on a private network) with Access-Control-Allow-Private-Network"
        },
    )

    def __post_init__(self) -> None:
        if not self.origins:
            raise Invalid("origins", 'list the origins allowed (or "*" for any)')
        for i, origin in enumerate(self.origins):
            if origin in ("*", "null"):
                continue
            if origin != origin.lower():
                raise Invalid(f"origins[{i}]", f"an origin is in lower case: {origin!r}")
            parts = _ORIGIN_SYNTAX.fullmatch(origin)
            if parts is None:
                raise Invalid(
                    f"origins[{i}]",
                    f"not an origin (scheme://host[:port], no path): {origin!r}",
                )
            port = parts["port"]
            if port is not None and not 0 < int(port) < 65536:
                raise Invalid(f"origins[{i}]", f"no such port: {origin!r}")
            if port is not None and int(port) == _DEFAULT_PORTS.get(parts["scheme"]):
                raise Invalid(
                    f"origins[{i}]",
                    f"browsers leave the default port out of Origin: {origin!r} never matches",
                )
            if parts["any"] and "." not in parts["host"]:
                raise Invalid(
                    f"origins[{i}]", f"a wildcard over a whole top-level domain: {origin!r}"
                )
        if self.credentials and "*" in self.origins:
            raise Invalid(
                "origins",
                'with credentials = true, "*" would let every site read your users\' answers '
                "with their cookies: list the origins",
            )
        for i, method in enumerate(self.methods):
            if _METHOD.fullmatch(method.encode()) is None or method != method.upper():
                raise Invalid(f"methods[{i}]", f"not a method in upper case: {method!r}")
        for key in ("headers", "exposed_headers"):
            for i, name in enumerate(getattr(self, key)):
                if name == "*" and self.credentials:
                    raise Invalid(
                        f"{key}[{i}]",
                        'with credentials, browsers read "*" as a field named "*": list them',
                    )
                if name == "*":
                    continue
                try:
                    checked_field(name, "")
                except ValueError:
                    raise Invalid(f"{key}[{i}]", f"not a header name: {name!r}") from None
        if self.max_age < 0 or 0 < self.max_age < 1:
            raise Invalid("max_age", "whole seconds: 0 (none said), or 1s and more")


class Cors(Filter):
    """Cross-Origin Resource Sharing: preflights answered at the edge, fields added."""

    name = "cors"
    stage = Stage.EDGE
    Config = CorsConfig
    # The engine routes an OPTIONS preflight by the method it announces on the routes
    # where a filter says so: their preflights reach this filter, not a 405.
    handles_preflight: ClassVar[bool] = True

    def __init__(self, config: CorsConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: CorsConfig = config
        self._any = "*" in config.origins
        self._exact = frozenset(o.encode() for o in config.origins if "*." not in o)
        patterns = [_pattern(o) for o in config.origins if "*." in o]
        self._patterns = re.compile(b"|".join(patterns)) if patterns else None
        # An answer that names the origin (or none) depends on it: Vary says so.
        self._varies = not self._any
        self._methods = ", ".join(config.methods).encode() if config.methods else None
        # The route's methods as Access-Control-Allow-Methods, by its methods list (the
        # routes of a reload are other objects; their lists are few).
        self._route_methods: dict[tuple[str, ...], bytes] = {}
        self._headers = ", ".join(h.lower() for h in config.headers).encode() or None
        self._common: list[tuple[bytes, bytes]] = []  # on every answer to an allowed origin
        if config.credentials:
            self._common.append((b"access-control-allow-credentials", b"true"))
        self._exposed: tuple[bytes, bytes] | None = None
        if config.exposed_headers:
            value = ", ".join(h.lower() for h in config.exposed_headers).encode()
            self._exposed = (b"access-control-expose-headers", value)
        self._max_age = (
            (b"access-control-max-age", b"%d" % int(config.max_age)) if config.max_age else None
        )

    def _allowed(self, origin: bytes | None) -> bytes | None:
        """What ``Access-Control-Allow-Origin`` says to ``origin``, or None: not allowed."""
        if self._any:  # (never with credentials: refused at load)
            return b"*"  # to every request, Origin or none: the answer does not vary
        if origin is None:
            return None
        low = origin.lower()  # (scheme and host are case-insensitive)
        if low in self._exact or (self._patterns is not None and self._patterns.fullmatch(low)):
            return origin
        return None

    def on_request(self, exchange: Exchange) -> Response | None:
        request = exchange.request
        if request.method != b"OPTIONS":
            return None
        if preflight_method(request.headers.items) is None:
            return None  # an OPTIONS of the upstream's own
        headers = Headers([(b"content-length", b"0")])
        items = headers.items
        allowed = self._allowed(request.headers.get(_ORIGIN))
        vary = [b"Origin", b"Access-Control-Request-Method"]
        if allowed is not None:
            items.append((b"access-control-allow-origin", allowed))
            items += self._common
            items.append((b"access-control-allow-methods", self._allow_methods(exchange)))
            asked = request.headers.get(_REQUEST_HEADERS)
            if self._headers is not None:
                items.append((b"access-control-allow-headers", self._headers))
            elif asked:
                items.append((b"access-control-allow-headers", asked))
                vary.append(b"Access-Control-Request-Headers")
            if self._max_age is not None:
                items.append(self._max_age)
            if self.config.private_network and request.headers.get(_REQUEST_PRIVATE) == b"true":
                items.append((b"access-control-allow-private-network", b"true"))
        items.append((b"vary", b", ".join(vary)))
        return Response(204, headers)

    def _allow_methods(self, exchange: Exchange) -> bytes:
        if self._methods is not None:
            return self._methods
        route = exchange.route
        key = tuple(route.methods) if route is not None else ()
        value = self._route_methods.get(key)
        if value is None:
            value = ", ".join(allowed_methods(key)).encode()
            if len(self._route_methods) < 4096:  # (a bound all the same)
                self._route_methods[key] = value
        return value

    def on_response(self, exchange: Exchange, response: Response) -> None:
        request = exchange.request
        if request.method == b"OPTIONS" and preflight_method(request.headers.items) is not None:
            return  # this filter's own answer
        headers = response.headers
        for name, _ in headers.items:
            if name in _ANSWER_FIELDS:  # the upstream's own: this filter decides
                headers.items = [(n, v) for n, v in headers.items if n not in _ANSWER_FIELDS]
                break
        allowed = self._allowed(request.headers.get(_ORIGIN))
        if allowed is not None:
            headers.items.append((b"access-control-allow-origin", allowed))
            headers.items += self._common
            if self._exposed is not None:
                headers.items.append(self._exposed)
        if self._varies:
            headers.add_vary(b"Origin")


def _pattern(origin: str) -> bytes:
    """A regex for ``scheme://*.domain[:port]``: one subdomain or more of ``domain``."""
    scheme, rest = origin.split("://*.", 1)
    return re.escape(f"{scheme}://").encode() + rb"(?:[a-z0-9-]+\.)+" + re.escape(rest).encode()


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [Cors]
