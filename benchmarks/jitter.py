"""How evenly this machine runs fixed work: the tail the gateway's CPU adds by itself.

The tail target (p99 at most 4x p50) is about the gateway: no event-loop stalls, no
starved connections. On a shared virtual machine the CPU itself is not steady: the same
work can take several times longer for a few milliseconds while the host serves someone
else, and no counter inside the guest (steal time, run-queue wait, page faults) shows it.
A request at concurrency 32 waits for one pass of the event loop over all connections,
so such a stretch lands in its latency whatever the gateway does.

This probe measures that on the CPU the gateway is pinned to, with nothing else running
there: it times back-to-back units of the gateway's own kind of work (h11 parsing a
request and a response head through ``engine.wire``, in pure Python with no I/O and no
allocation that outlives a unit). :func:`window_tail` then answers: how much longer than
usual did the p99 stretch of ``window`` seconds of this work take? The report sets that
next to each tail check, at the check's own p50, so a machine that alone adds 3.5x is
not mistaken for a gateway that stalls (nor the other way round).

Run it as ``python -m benchmarks.jitter --seconds 4``; it prints the unit durations
(seconds) as a JSON list.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence

from engine.wire import Reader

REQUEST = b"GET /api/v1/items HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"
    b"date: Sun, 22 Nov 2026 19:30:00 GMT\r\n\r\nok"
)
HEADS_PER_UNIT = 10  # about 0.27 ms on this machine's CPython 3.11


def unit() -> None:
    """One unit of gateway-like work: parse a request head and a response head, 10 times."""
    for _ in range(HEADS_PER_UNIT):
        reader = Reader(65536)
        reader.feed(REQUEST)
        reader.request()
        reader = Reader(65536)
        reader.feed(RESPONSE)
        reader.response()


WARMUP_SECONDS = 0.1  # the first units run cold (imports, caches): not kept


def measure(seconds: float) -> list[float]:
    """Durations of back-to-back units for about ``seconds``, after a short warm-up."""
    clock = time.perf_counter
    durations: list[float] = []
    warm = clock() + WARMUP_SECONDS
    while clock() < warm:
        unit()
    end = clock() + seconds
    start = clock()
    while start < end:
        unit()
        now = clock()
        durations.append(now - start)
        start = now
    return durations


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def window_tail(runs: Sequence[Sequence[float]], window: float) -> float | None:
    """p99 / p50 of the time taken by ``window`` seconds' worth of consecutive units.

    ``runs`` are separate probes: every run of k consecutive units within one probe is
    a sample, k being ``window`` over the median unit; the time a request waits for that
    much of the gateway's work. Overlapping samples are far from independent, so there
    must be units for at least 100 disjoint windows, else ``None``."""
    units = [u for run in runs for u in run]
    if not units or window <= 0:
        return None
    median_unit = sorted(units)[len(units) // 2]
    k = max(1, round(window / median_unit)) if median_unit > 0 else 1
    if len(units) < 100 * k:
        return None
    samples: list[float] = []
    for run in runs:
        sums = list(itertools.accumulate(run, initial=0.0))
        samples += (sums[i + k] - sums[i] for i in range(len(run) - k + 1))
    if not samples:
        return None
    samples.sort()
    p50 = _quantile(samples, 0.5)
    return _quantile(samples, 0.99) / p50 if p50 > 0 else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jitter", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="how long to measure")
    args = parser.parse_args(argv)
    sys.stdout.write(json.dumps(measure(args.seconds)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
