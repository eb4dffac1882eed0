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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import h11
import trio

from benchmarks import servers
from benchmarks.scenarios import Env, Scenario, all_scenarios, noop_distribution, request_for
from benchmarks.servers import HOST, ROOT, Server, free_port

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCENARIOS = ("filtergate", "filtergate-full-request", "full-chain")
CONTROL_TIMEOUT = 60.0  # seconds for callgrind_control to zero or dump the counters


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


class _Client:
    """One keep-alive connection sending one request at a time, read with h11."""

    def __init__(self, stream: trio.SocketStream, request: h11.Request) -> None:
        self.stream = stream
        self.request = request
        self.conn = h11.Connection(h11.CLIENT)

    async def requests(self, count: int) -> None:
        """``count`` requests; every answer must be 2xx."""
        conn = self.conn
        for _ in range(count):
            await self.stream.send_all(conn.send(self.request) + conn.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise RuntimeError("the gateway closed a keep-alive connection")
            if not 200 <= status < 300:
                raise RuntimeError(f"the gateway answered {status}")
            conn.start_next_cycle()


Between = Callable[[], Awaitable[None]]


async def drive(
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]],
    connections: int,
    rounds: Sequence[int],
    between: Between | None = None,
    after: Between | None = None,
) -> int:
    """Open ``connections`` keep-alive connections and send ``rounds[i]`` requests on
    each in round i, awaiting ``between()`` after every round but the last and
    ``after()`` after the last one, before the connections close; the same connections
    serve every round. Returns the requests of the last round."""
    request = h11.Request(method="GET", target=path, headers=[("Host", f"{HOST}:{port}"), *headers])
    clients = []
    try:
        for _ in range(connections):
            clients.append(_Client(await trio.open_tcp_stream(HOST, port), request))
        for i, count in enumerate(rounds):
            if i and between is not None:
                await between()
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.requests, count)
        if after is not None:
            await after()
    finally:
        for client in clients:
            await client.stream.aclose()
    return connections * rounds[-1] if rounds else 0


_CONTROL_ERRORS = ("not detected", "No active callgrind runs", "Error")


async def _control(command: str, pid: int) -> None:
    """``callgrind_control COMMAND PID``, which exits 0 even when it found no run."""
    try:
        with trio.fail_after(CONTROL_TIMEOUT):
            done = await trio.run_process(
                ["callgrind_control", command, str(pid)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise RuntimeError(
            f"callgrind_control {command} got no answer in {CONTROL_TIMEOUT:g}s (it wakes "
            "an idle process through ptrace: see kernel.yama.ptrace_scope)"
        ) from None
    out = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0 or any(e in out for e in _CONTROL_ERRORS):
        raise RuntimeError(f"callgrind_control {command}: {out.strip()}")


def count(
    sc: Scenario, workdir: Path, stub_port: int, filters: frozenset[str], args: argparse.Namespace
) -> Count:
    """Run ``sc``'s gateway under callgrind and count its instructions per request."""
    assert sc.plan is not None
    port = free_port()

    def no_redis() -> int:
        raise RuntimeError("needs a redis-server, which this count does not start")

    env = Env(
        workdir=workdir,
        stub_port=stub_port,
        gateway_port=port,
        available_filters=filters,
        redis_port=no_redis,
        noop_pythonpath=lambda: noop_distribution(workdir),
    )
    plan = sc.plan(env)
    missing = [n for n in plan.needs if n not in filters]
    if missing:
        raise RuntimeError(f"plugin {', '.join(missing)} not available")
    path, headers = request_for(sc, plan)
    out = workdir / f"{sc.name}.callgrind"
    under_valgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}.%p",
        sys.executable,
        "-m",
        "engine.cli",
    ]
    gateway: Server = servers.start_gateway(
        workdir,
        plan.config,
        port,
        None,
        name=sc.name,
        env=plan.env,
        command=under_valgrind,
        timeout=args.start_timeout,
    )
    try:
        pid = gateway.pid
        zero, dump = partial(_control, "-z", pid), partial(_control, "-d", pid)
        # Zeroed after the warm-up, dumped before the connections close: the count is
        # the counted requests and the gateway's idle waits between them, nothing else.
        rounds = (args.warmup, args.requests)
        sent = trio.run(drive, port, path, headers, args.connections, rounds, zero, dump)
        dumps = sorted(workdir.glob(f"{out.name}.{pid}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        return Count(sc.name, sent, read_total(dumps[-1].read_text(errors="replace")))
    finally:
        gateway.stop()


def countable(sc: Scenario) -> str | None:
    """Why ``sc`` cannot be counted here, or None: one gateway process under load."""
    if sc.target != "filtergate" or sc.plan is None:
        return "not a filtergate scenario"
    if sc.kind != "load":
        return "not a load scenario"
    if sc.workers != 1:
        return "more than one worker (valgrind follows one process)"
    return None


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


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description=__doc__,
        formatter_class=_Help,
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated one-worker filtergate load scenarios (python -m benchmarks "
        "--list); the first is the baseline of the ratios",
    )
    parser.add_argument("--requests", type=int, default=60, help="counted, per connection")
    parser.add_argument(
        "--warmup", type=int, default=10, help="per connection, before the counters are zeroed"
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections, one request at a time"
    )
    parser.add_argument("--start-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file; when None, benchmarks/results/instructions-<time>.json",
    )
    args = parser.parse_args(argv)
    from engine.plugins import discover

    filters = frozenset(discover().filters)
    known = {s.name: s for s in all_scenarios(sorted(filters))}
    wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    bad = [
        f"{n} ({why})" for n in wanted if (why := countable(known[n]) if n in known else "unknown")
    ]
    if bad:
        parser.error(f"cannot count: {', '.join(bad)}")
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        sys.stdout.write(f"instructions: skipped, {' and '.join(missing)} not installed\n")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="filtergate-instructions-"))
    counts: list[Count] = []
    failed: list[str] = []
    try:
        stub = servers.start_rawstub(workdir, None)
        try:
            for name in wanted:
                sys.stderr.write(f"instructions: {name} under callgrind ...\n")
                try:
                    counts.append(count(known[name], workdir, stub.port, filters, args))
                except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
                    failed.append(f"{name}: failed: {type(e).__name__}: {e}")
        finally:
            stub.stop()
    except servers.StartError as e:
        failed.append(f"the stub did not start: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(
        f"instructions per proxied request (callgrind, {args.connections} keep-alive "
        f"connections, {args.requests} counted requests each)\n\n{render(counts)}\n"
    )
    for line in failed:
        sys.stdout.write(line + "\n")
    RESULTS.mkdir(exist_ok=True)
    out = args.output or RESULTS / f"instructions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = {
        "python": sys.version,
        "root": str(ROOT),
        "counts": [asdict(c) for c in counts],
        "failed": failed,
    }
    out.write_text(json.dumps(data, indent=2))
    sys.stdout.write(f"results: {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
