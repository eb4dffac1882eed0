"""The access log: one line per response, as JSON or in the combined log format.

Lines are kept in memory and written in batches, as nginx's ``buffer=`` and ``flush=``
do: when ``buffer`` bytes are pending, or ``flush`` seconds after the last write, by the
task :meth:`AccessLog.serve` (which also writes what is left when it ends). A write is
one ``write(2)`` of whole lines to a file opened with ``O_APPEND``, so several workers
can share one file. Before each timed write the path is checked: a file that was moved
or deleted (log rotation) is reopened, so ``logrotate`` needs no ``copytruncate``. A
failed write drops its lines, counts them, warns once, and never fails a request.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import trio

from engine.config import AccessLogConfig
from engine.metrics import counter

if TYPE_CHECKING:
    import h11

    from engine.exchange import Exchange

__all__ = ["AccessLog"]

log = logging.getLogger("filtergate.accesslog")

_dropped = counter(
    "filtergate_access_log_dropped_lines_total", "Access log lines lost to failed writes."
)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class AccessLog:
    """Formats and writes access log lines for one :class:`AccessLogConfig`."""

    def __init__(self, config: AccessLogConfig) -> None:
        assert config.path is not None
        self.config = config
        self.path = config.path
        self._json = config.format == "json"
        self._pending: list[bytes] = []
        self._size = 0
        self._fd: int | None = None
        self._failing = False
        self._closed = False
        self._second = -1  # the wall-clock second the cached stamps were made for
        self._iso = ""
        self._clf = ""

    # -- formatting ---------------------------------------------------------------------

    def _stamps(self, now: float) -> tuple[str, str]:
        """ISO 8601 (without the milliseconds) and combined-format times of ``now``, UTC:
        made once per second."""
        second = int(now)
        if second != self._second:
            t = time.gmtime(second)
            self._second = second
            self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)
            self._clf = (
                f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
            )
        return self._iso, self._clf

    def record(
        self,
        client: str,
        req: h11.Request | None,
        exchange: Exchange | None,
        status: int,
        request_id: str | None,
        duration: float,
        bytes_sent: int,
    ) -> None:
        """Log one response to ``req`` (``None`` when no request could be read, as for a
        malformed head; ``exchange`` is ``None`` when it was refused before one was made)."""
        now = time.time()
        iso, clf = self._stamps(now)
        ua = referer = None
        if req is None:
            method = target = version = "-"
        else:
            for name, value in req.headers:
                if name == b"user-agent":
                    ua = value
                elif name == b"referer":
                    referer = value
            method = req.method.decode("ascii", "replace")
            # The target as forwarded, after every filter ran: a query credential that
            # an auth filter hides from the upstream is not written here either. A
            # request answered before it went upstream (refused, no route, answered by
            # a filter) is logged by its path alone: no filter may have looked at its
            # query yet.
            if exchange is not None and exchange.timings.upstream_start is not None:
                raw = exchange.request.target
            elif exchange is not None:
                raw = exchange.request.path.encode()
            else:
                raw = req.target.partition(b"?")[0]
            target = raw.decode("utf-8", "backslashreplace")
            version = "HTTP/" + req.http_version.decode("ascii", "replace")
        if self._json:
            route = upstream = consumer = upstream_ms = None
            if exchange is not None:
                if exchange.route is not None:
                    route = exchange.route.name
                upstream = exchange.upstream_target
                if exchange.identity is not None:
                    consumer = exchange.identity.consumer
                t = exchange.timings
                if t.upstream_start is not None and t.upstream_headers is not None:
                    upstream_ms = round((t.upstream_headers - t.upstream_start) * 1000, 3)
            line = json.dumps(
                {
                    "time": f"{iso}.{int(now * 1000) % 1000:03d}Z",
                    "request_id": request_id,
                    "client": client,
                    "method": method,
                    "target": target,
                    "protocol": version,
                    "status": status,
                    "bytes_sent": bytes_sent,
                    "duration_ms": round(duration * 1000, 3),
                    "upstream_ms": upstream_ms,
                    "route": route,
                    "upstream": upstream,
                    "consumer": consumer,
                    "user_agent": _text(ua),
                    "referer": _text(referer),
                },
                ensure_ascii=False,
            )
        else:
            # Apache's and nginx's "combined": %h %l %u %t "%r" %>s %b "Referer" "UA".
            user = "-"
            if exchange is not None and exchange.identity is not None:
                # Unquoted in the format: a space would shift every field after it.
                user = _escape(exchange.identity.consumer).replace(" ", "\\x20") or "-"
            request_line = "-" if req is None else _escape(f"{method} {target} {version}")
            line = (
                f'{client} - {user} [{clf}] "{request_line}" '
                f'{status} {bytes_sent} "{_escape(_text(referer) or "-")}" '
                f'"{_escape(_text(ua) or "-")}"'
            )
        data = (line + "\n").encode("utf-8", "backslashreplace")
        self._pending.append(data)
        self._size += len(data)
        if self._size >= self.config.buffer or self._closed:
            self.write()

    # -- writing ------------------------------------------------------------------------

    def _open(self) -> int:
        if self.path == "-":
            return sys.stdout.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _reopen_if_moved(self) -> None:
        """Close the file when its path no longer names it (rotated or deleted)."""
        if self._fd is None or self.path == "-":
            return
        try:
            on_disk = os.stat(self.path)
        except OSError:
            on_disk = None
        mine = os.fstat(self._fd)
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(self._fd)
            self._fd = None

    def write(self) -> None:
        """Write every pending line now (one ``write(2)`` per 64 KiB or so)."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        lines = len(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            if self._fd is None:
                self._fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            _dropped.inc(lines)
            if not self._failing:
                log.warning("access log %s: %s; dropping lines until it works again", self.path, e)
            self._failing = True
            return
        if self._failing:
            log.warning("access log %s: writing again", self.path)
            self._failing = False
        if self._closed and self._fd is not None and self.path != "-":
            os.close(self._fd)  # a line after close (a request of a replaced config)
            self._fd = None

    async def serve(self) -> None:
        """Write pending lines every ``flush`` seconds while in use; the rest at the end."""
        try:
            while True:
                await trio.sleep(self.config.flush)
                try:
                    self._reopen_if_moved()
                except OSError:
                    self._fd = None
                self.write()
        finally:
            self.close()

    def close(self) -> None:
        """Write what is pending and close the file; later lines are written at once."""
        self._closed = True
        self.write()
        if self._fd is not None and self.path != "-":
            os.close(self._fd)
        self._fd = None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "backslashreplace")


def _escape(text: str) -> str:
    """``"`` and ``\\`` escaped, unprintable characters as ``\\xhh`` (nginx does the same)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif not c.isprintable():
            out.append(c.encode("unicode_escape").decode("ascii"))  # \x1b, \u200b
        else:
            out.append(c)
    return "".join(out)
