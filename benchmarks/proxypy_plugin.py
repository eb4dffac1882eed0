"""proxy.py's documented reverse-proxy route, pointed at the benchmark upstream.

proxy.py loads this class by its dotted name (``--plugins``); the upstream URL comes
from the environment variable ``FILTERGATE_BENCH_UPSTREAM``. It opens a new upstream
connection per request and fails on a keep-alive connection's second request, so the
``proxypy`` scenario sends ``Connection: close``; ``proxypy_keepalive`` is the plugin
that serves keep-alive clients.
"""

from __future__ import annotations

import os
from typing import Any

from proxy.http.server import ReverseProxyBasePlugin  # type: ignore[import-not-found,unused-ignore]


class BenchReverseProxy(ReverseProxyBasePlugin):  # type: ignore[misc,unused-ignore]
    def routes(self) -> list[Any]:
        upstream = os.environ.get("FILTERGATE_BENCH_UPSTREAM", "http://127.0.0.1:9001/")
        return [(r"/.*", [upstream.encode()])]
