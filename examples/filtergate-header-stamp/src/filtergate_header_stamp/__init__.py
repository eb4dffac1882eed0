"""filtergate-header-stamp: a complete third-party filtergate plugin, as an example.

It provides one filter type, ``header-stamp`` (stage ``transform``), that stamps a
configurable header on the request sent upstream and on the response sent to the client::

    [plugins.header-stamp]
    value = "edge-1 {route}"          # required; {route} and {request_id} are filled in
    request_header = "x-stamp"        # on the upstream request ("" = leave requests alone)
    response_header = "x-stamp"       # on the client's response ("" = leave responses alone)
    count_header = "x-stamp-count"    # optional: how many responses this instance stamped

filtergate finds it through the entry point declared in ``pyproject.toml``::

    [project.entry-points.filtergate]
    header-stamp = "filtergate_header_stamp"

and calls the :func:`filtergate_filters` hook below once at start-up (and on reload).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.chain import FILTER_API_VERSION, Filter, FilterContext, Stage
from engine.exchange import Exchange, Response
from engine.plugins import hookimpl
from engine.schema import Invalid

__all__ = ["HeaderStamp", "HeaderStampConfig", "filtergate_filters"]

__version__ = "1.0.0"

_TOKEN = re.compile(r"^[-!#$%&'*+.^_`|~0-9a-z]+$")


def _check_header_name(key: str, name: str) -> None:
    # Checked at load, so that a typo is a config error naming the key, not a 500 at the
    # first request (Headers.set would raise ValueError then).
    if name and not _TOKEN.match(name):
        raise Invalid(key, f"expected a lower-case header name like 'x-stamp', got {name!r}")


@dataclass(frozen=True)
class HeaderStampConfig:
    """The ``[plugins.header-stamp]`` section. Field names are the TOML keys."""

    value: str = field(
        metadata={"doc": "the stamp; {route} and {request_id} are replaced per request"}
    )
    request_header: str = field(
        default="x-stamp",
        metadata={"doc": 'header set on the request sent upstream ("" = none)'},
    )
    response_header: str = field(
        default="x-stamp",
        metadata={"doc": 'header set on the response sent to the client ("" = none)'},
    )
    count_header: str = field(
        default="",
        metadata={"doc": 'response header with the count of responses stamped ("" = none)'},
    )

    def __post_init__(self) -> None:
        # Invalid(key, message) becomes a ConfigError naming the full key path, e.g.
        # "routes[0].plugins.header-stamp.value: must not contain CR, LF or NUL".
        if re.search(r"[\x00\r\n]", self.value):
            raise Invalid("value", "must not contain CR, LF or NUL")
        _check_header_name("request_header", self.request_header)
        _check_header_name("response_header", self.response_header)
        _check_header_name("count_header", self.count_header)
        if not (self.request_header or self.response_header):
            raise Invalid(None, "set request_header or response_header (or both)")


class HeaderStamp(Filter):
    """Stamp a configurable header on upstream requests and client responses."""

    name = "header-stamp"
    stage = Stage.TRANSFORM
    Config = HeaderStampConfig
    # The filter API this class was written for: filtergate refuses to load it, naming
    # this plugin, if it implements another one.
    api_version = FILTER_API_VERSION

    config: HeaderStampConfig

    def __init__(self, config: HeaderStampConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        # State on the instance survives a config reload as long as this filter's
        # effective config is unchanged (the engine reuses the instance).
        self.stamped = 0

    def stamp(self, exchange: Exchange) -> str:
        """The configured value with ``{route}`` and ``{request_id}`` filled in."""
        route = exchange.route.name if exchange.route is not None else ""
        return self.config.value.replace("{route}", route).replace(
            "{request_id}", exchange.request_id
        )

    # A sync phase: called directly, nothing to await.
    def on_request(self, exchange: Exchange) -> None:
        if self.config.request_header:
            exchange.request.headers.set(self.config.request_header, self.stamp(exchange))

    # An async phase: the engine sees the coroutine function once, at load, and awaits
    # it per request. It runs for every response, including a 401 or 429 that an
    # earlier filter made, and error responses of the gateway itself.
    async def on_response(self, exchange: Exchange, response: Response) -> None:
        if self.config.response_header:
            response.headers.set(self.config.response_header, self.stamp(exchange))
        self.stamped += 1
        if self.config.count_header:
            response.headers.set(self.config.count_header, str(self.stamped))


@hookimpl
def filtergate_filters() -> Sequence[type[Any]]:
    """The filter types this plugin provides."""
    return [HeaderStamp]
