"""Instructions per proxied request, counted by callgrind: ``python -m benchmarks.instructions``.

On a shared virtual machine the load runs of ``python -m benchmarks`` move by ±20%
between runs, and a row with more code (the full chain) moves more than a lean one, so a
ratio near its bound can pass in one run and fail in the next. Instructions executed do
not depend on the neighbours. This runs the gateway under valgrind's callgrind with a
scenario's own config (the plans of ``benchmarks/scenarios.py``), sends warm-up requests,
zeroes the counters (``callgrind_control -z``), sends ``--requests`` keep-alive requests
on ``--connections`` connections, dumps the counters (``callgrind_control -d``) and
divides by the requests sent. The ratio of two rows is what the slower one would keep
of the faster one's throughput if time followed instructions; it leaves out what
instructions do not show (cache misses, the kernel's share of a syscall).

Without valgrind it says so and exits 0 (``make bench`` runs it last).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h11
import tomli_w
import trio

from benchmarks import servers
from benchmarks.scenarios import Env, Scenario, all_scenarios
from benchmarks.servers import HOST, ROOT, Server, free_port

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("filtergate", "filtergate-full-request", "full-chain")


@dataclass
class Count:
    scenario: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def read_total(dump: str) -> int:
    """The instructions in a callgrind dump: its ``totals:`` line (else ``summary:``)."""
    for key in ("totals", "summary"):
        m = re.search(rf"^{key}: (\d+)", dump, re.MULTILINE)
        if m:
            return int(m.group(1))
    raise ValueError("no totals or summary line in the callgrind dump")


async def send_requests(
    port: int, path: str, headers: Sequence[tuple[str, str]], connections: int, each: int
) -> int:
    """``each`` keep-alive GETs on each of ``connections`` connections, one at a time per
    connection; every answer must be 2xx. Returns the number of requests answered."""
    answered = 0
    request = h11.Request(method="GET", target=path, headers=[("Host", f"{HOST}:{port}"), *headers])

    async def one_connection() -> None:
        nonlocal answered
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for _ in range(each):
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                status = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise RuntimeError("the gateway closed a keep-alive connection")
                if not 200 <= status < 300:
                    raise RuntimeError(f"the gateway answered {status}")
                answered += 1
                conn.start_next_cycle()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one_connection)
    return answered


def _control(command: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", command, str(pid)], check=True, capture_output=True, timeout=120
    )


def count(
    sc: Scenario, workdir: Path, stub_port: int, filters: frozenset[str], args: argparse.Namespace
) -> Count:
    """Run ``sc``'s gateway under callgrind and count its instructions per request."""
    assert sc.plan is not None
    port = free_port()
    env = Env(
        workdir=workdir,
        stub_port=stub_port,
        gateway_port=port,
        available_filters=filters,
        redis_port=lambda: 0,
        noop_pythonpath=lambda: "",
    )
    plan = sc.plan(env)
    missing = [n for n in plan.needs if n not in filters]
    if missing:
        raise RuntimeError(f"plugin {', '.join(missing)} not available")
    config = workdir / f"{sc.name}.toml"
    config.write_bytes(tomli_w.dumps(plan.config).encode())
    out = workdir / f"{sc.name}.callgrind"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}.%p",
        sys.executable,
        "-m",
        "engine.cli",
        "run",
        "-c",
        str(config),
    ]
    gateway: Server = servers.start(sc.name, cmd, port, workdir, timeout=args.start_timeout)
    try:
        path = plan.path
        trio.run(send_requests, port, path, plan.headers, args.connections, args.warmup)
        _control("-z", gateway.pid)
        sent = trio.run(send_requests, port, path, plan.headers, args.connections, args.requests)
        _control("-d", gateway.pid)
        dumps = sorted(workdir.glob(f"{out.name}.{gateway.pid}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        return Count(sc.name, sent, read_total(dumps[-1].read_text(errors="replace")))
    finally:
        gateway.stop()


#: The load targets that are ratios of two filtergate rows: (row, baseline row, bound).
TARGET_PAIRS = (
    ("full-chain", "filtergate", 0.75),
    ("full-chain", "filtergate-full-request", 0.75),
    ("routes-10000", "routes-10", 0.9),
)


def render(counts: Sequence[Count]) -> str:
    """The table (instructions per request, each row's ratio to the first), then the
    load targets' ratios counted in instructions, for the pairs that were measured."""
    lines = ["| scenario | requests | instructions / request | first row / this row |"]
    lines.append("|---|---|---|---|")
    base = counts[0].per_request if counts else 0.0
    for c in counts:
        lines.append(
            f"| {c.scenario} | {c.requests:,} | {c.per_request:,.0f} | {base / c.per_request:.2f} |"
        )
    by = {c.scenario: c.per_request for c in counts}
    pairs = [(a, b, bound) for a, b, bound in TARGET_PAIRS if a in by and b in by]
    if pairs:
        lines.append("")
    for row, baseline, bound in pairs:
        lines.append(
            f"{row} / {baseline}: {by[baseline] / by[row]:.2f} in instructions "
            f"(the req/s target: >= {bound:g})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated filtergate scenarios; the first is the baseline of the ratios",
    )
    parser.add_argument("--requests", type=int, default=60, help="per connection, counted")
    parser.add_argument("--warmup", type=int, default=10, help="per connection, not counted")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--start-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help="JSON file (default results/instructions-*)")
    args = parser.parse_args(argv)
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        sys.stdout.write(f"instructions: skipped, {' and '.join(missing)} not installed\n")
        return 0
    from engine.plugins import discover

    filters = frozenset(discover().filters)
    known = {s.name: s for s in all_scenarios(sorted(filters))}
    wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    bad = [n for n in wanted if n not in known or known[n].target != "filtergate"]
    if bad:
        parser.error(f"not a filtergate scenario: {', '.join(bad)}")
    workdir = Path(tempfile.mkdtemp(prefix="filtergate-instructions-"))
    stub = servers.start_rawstub(workdir, None)
    counts: list[Count] = []
    try:
        for name in wanted:
            sys.stderr.write(f"instructions: {name} under callgrind ...\n")
            counts.append(count(known[name], workdir, stub.port, filters, args))
    finally:
        stub.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(
        f"instructions per proxied request (callgrind, {args.connections} keep-alive "
        f"connections, {args.requests} counted requests each)\n\n{render(counts)}\n"
    )
    RESULTS.mkdir(exist_ok=True)
    out = args.output or RESULTS / f"instructions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = {"python": sys.version, "root": str(ROOT), "counts": [asdict(c) for c in counts]}
    out.write_text(json.dumps(data, indent=2))
    sys.stdout.write(f"results: {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
