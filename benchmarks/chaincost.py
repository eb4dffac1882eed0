"""What each filter adds to a request, measured in-process: ``python -m benchmarks.chaincost``.

The load runs of ``python -m benchmarks`` compare whole processes on a noisy machine
(±20% between runs), which hides a cost of a few percent. This measures the chain alone:
each built-in filter with the benchmark's config, 10 no-op filters, and the full chain,
run through the engine's own phase runners on an in-memory exchange (no sockets), many
times, in one process. It prints microseconds per request and, given the CPU time a
proxied request costs without filters (``--baseline-us``, by default the ``filtergate``
row of ``benchmarks/results/latest.json``), the share of throughput each would cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from benchmarks import noop_plugin
from benchmarks.scenarios import NOT_IN_FULL_CHAIN, plugin_settings
from engine.chain import (
    compile_chain,
    run_log_phases,
    run_request_phases,
    run_response_phases,
    run_sync_request_phases,
    run_sync_response_phases,
    wrap_upstream,
)
from engine.exchange import Headers, Response, UpstreamCall
from engine.plugins import discover
from engine.testing import build_filter, make_exchange

RESULTS = Path(__file__).parent / "results" / "latest.json"


class _Env:
    stub_port = 0


def _filters(names: Sequence[str], registry: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    filters: list[Any] = []
    headers: list[tuple[str, str]] = []
    for name in names:
        if name.startswith("bench-noop-"):
            cls = next(c for c in noop_plugin.filtergate_filters() if c.name == name)
            filters.append(build_filter(cls, {}))
            continue
        settings = plugin_settings(name, _Env())  # type: ignore[arg-type]
        table, extra = settings if settings is not None else ({}, [])
        filters.append(build_filter(registry.filters[name].type, table, scope="route:bench"))
        headers += extra
    return filters, headers


Measured = tuple[list[Any], list[tuple[str, str]]]  # (filters, request headers)


def _runner(filters: list[Any], headers: list[tuple[str, str]]) -> Callable[[], Awaitable[None]]:
    """One request through ``filters`` as the engine runs it, on an in-memory exchange."""
    chain = compile_chain(filters)

    async def upstream(call: UpstreamCall) -> Response:
        return Response(
            status=200,
            headers=Headers([(b"content-type", b"application/json"), (b"content-length", b"2")]),
            body=b"{}",
        )

    async def one() -> None:
        ex = make_exchange("GET", "/items/1", headers, route_name="bench")
        ex.credential_headers = chain.credential_headers
        # The engine's own choice: a plain call when every request phase is one.
        if chain.sync_request:
            answer, depth = run_sync_request_phases(chain, ex)
        else:
            answer, depth = await run_request_phases(chain, ex)
        if answer is None:
            call = UpstreamCall(
                upstream="stub", method=b"GET", target=b"/items/1", headers=ex.request.headers
            )
            if chain.around:
                answer = await wrap_upstream(chain.around, ex, upstream)(call)
            else:
                answer = await upstream(call)
        if chain.sync_response:
            run_sync_response_phases(chain.response_for(depth), ex, answer)
        else:
            await run_response_phases(chain.response_for(depth), ex, answer)
        ex.response = answer
        await run_log_phases(chain, ex)

    return one


async def _measure(cases: list[Measured], n: int) -> list[float]:
    """Microseconds per request of each case, the exchange's own making subtracted.

    The best of 7 rounds, as timeit does, with the rounds of every case interleaved, so
    that a busy moment of the machine does not land on one case only; and in CPU time
    of this thread, so that what other processes do on a 2-core machine counts less.
    """
    runners = [_runner(filters, headers) for filters, headers in cases]
    for one in runners:
        for _ in range(min(n, 500)):  # warm caches (a verified token, limiter keys)
            await one()
    rounds, per = 7, max(1, n // 7)
    best = [float("inf")] * len(cases)
    empty = [float("inf")] * len(cases)
    for _ in range(rounds):
        for i, (one, (_filters, headers)) in enumerate(zip(runners, cases, strict=True)):
            start = time.thread_time()
            for _ in range(per):
                make_exchange("GET", "/items/1", headers, route_name="bench")
            empty[i] = min(empty[i], time.thread_time() - start)
            start = time.thread_time()
            for _ in range(per):
                await one()
            best[i] = min(best[i], time.thread_time() - start)
    return [max(0.0, (b - e) / per * 1e6) for b, e in zip(best, empty, strict=True)]


def _baseline() -> float | None:
    try:
        doc = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return None
    for row in doc.get("results", []):
        if row.get("name") == "filtergate" and row.get("cpu_us_per_req"):
            return float(row["cpu_us_per_req"])
    return None


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaincost", description=__doc__)
    parser.add_argument("-n", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--baseline-us", type=float, help="CPU us of a proxied request")
    args = parser.parse_args(argv)
    registry = discover(entry_points=False)
    names = sorted(n for n in registry.filters if plugin_settings(n, _Env()) is not None)  # type: ignore[arg-type]
    cases: list[tuple[str, list[str]]] = [("(no filters)", [])]
    cases += [(n, [n]) for n in names if n not in ("aggregate",)]
    cases.append(("10 no-op filters", [f"bench-noop-{i}" for i in range(noop_plugin.COUNT)]))
    full = ["jwt-auth", "rate-limit"]
    full += [n for n in names if n not in full and n not in NOT_IN_FULL_CHAIN]
    cases.append(("full chain: " + ", ".join(full), full))
    baseline = args.baseline_us or _baseline()
    measured = trio.run(_measure, [_filters(chain, registry) for _label, chain in cases], args.n)
    rows = [(label, us) for (label, _chain), us in zip(cases, measured, strict=True)]
    base_us = rows[0][1]
    out = sys.stdout
    out.write(
        "chain cost per request, in-process, CPU time, "
        f"best of 7 interleaved rounds of {args.n // 7}\n"
    )
    if baseline:
        out.write(f"baseline: a proxied request without filters costs {baseline:.0f} us of CPU\n")
    out.write("\n| chain | us/request | added us | est. throughput vs no filters |\n")
    out.write("|---|---|---|---|\n")
    for label, us in rows:
        added = max(0.0, us - base_us)
        est = f"{baseline / (baseline + added):.2f}" if baseline else "-"
        out.write(f"| {label} | {us:.1f} | {added:.1f} | {est} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
