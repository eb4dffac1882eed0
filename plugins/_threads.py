"""Worker threads for a filter's CPU-heavy work, one at a time per process.

A large JSON edit (``transform``) or a slow compression step (``compress``) goes to a
worker thread so that the event loop keeps serving. More than one such thread at once
would take the CPU the event loop needs, and fill trio's default thread limiter, which
name lookups share. Each kind of work has its own limiter of one per trio run.
"""

from __future__ import annotations

import trio
from trio.lowlevel import RunVar

__all__ = ["one_at_a_time"]

_LIMITERS: dict[str, RunVar[trio.CapacityLimiter]] = {}


def one_at_a_time(kind: str) -> trio.CapacityLimiter:
    """The limiter of ``kind``'s worker threads in this trio run: one thread."""
    var = _LIMITERS.get(kind)
    if var is None:
        var = _LIMITERS[kind] = RunVar(f"filtergate.threads.{kind}")
    try:
        return var.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        var.set(limiter)
        return limiter
