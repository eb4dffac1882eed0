"""``python -m benchmarks``: run the scenarios and print the table.

Pinning (when taskset exists): the server under test on CPU 0, the load and the stub
on CPU 1 (2 workers: the gateway on both). Each scenario starts its server, warms it
up, measures CPU time and peak RSS of its process tree around the measured run, and
stops it. ``--repeat N`` interleaves N passes over the scenarios and keeps each row's
median run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import loadgen, procstat, report, scenarios, servers, wrk
from benchmarks.report import MiB, Result
from benchmarks.scenarios import Env, Scenario
from benchmarks.servers import HOST, Server, StartError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GATEWAY_CPUS = [0]
LOAD_CPUS = [1]
GiB = 1024 * MiB


def progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class Bench:
    """One benchmark session: the stub, lazily a redis, the load tool, the results."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
        self.tool = "wrk" if (wrk.available() and not args.loadgen) else "loadgen"
        self.stub: Server | None = None
        self.redis: Server | None = None
        self.noop_path: str | None = None
        self.filters: frozenset[str] = frozenset()
        self.filter_error: str | None = None
        self.machine: list[list[float]] = []  # benchmarks.jitter's units, one list a pass

    def probe_machine(self) -> None:
        """Time fixed work on the gateway's CPU, nothing else running there, while the
        load drives the stub directly on the other CPU as during the rows (the tail
        the machine adds by itself; see ``benchmarks/jitter.py``)."""
        seconds = self.args.machine_probe
        if seconds <= 0:
            return
        progress(f"machine probe: {seconds:g}s of fixed work on the gateway's CPU ...")
        neighbour = None
        if self.stub is not None:
            port = self.stub.port
            neighbour = threading.Thread(
                target=self._neighbour_load, args=(port, seconds + 1.0), daemon=True
            )
            neighbour.start()
        try:
            self.machine.append(servers.probe_machine(seconds, self.cpus(GATEWAY_CPUS)))
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            progress(f"    machine probe failed: {type(exc).__name__}: {exc}")
        finally:
            if neighbour is not None:
                neighbour.join()

    def _neighbour_load(self, port: int, seconds: float) -> None:
        try:
            self.load(port, "/", [], 32, seconds)
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            progress(f"    machine probe: no load beside it ({type(exc).__name__}: {exc})")

    def cpus(self, which: list[int]) -> list[int] | None:
        return which if self.pin else None

    # -- shared services --------------------------------------------------------------

    def start_stub(self) -> Server:
        if self.args.upstream == "nginx" and servers.nginx_binary():
            stub = servers.start_nginx(self.workdir, None, self.cpus(LOAD_CPUS), name="nginx-stub")
        else:
            stub = servers.start_rawstub(self.workdir, self.cpus(LOAD_CPUS), self.args.stub_procs)
        self.stub = stub
        return stub

    def redis_port(self) -> int:
        if self.redis is None:
            self.redis = servers.start_redis(self.workdir, self.cpus(LOAD_CPUS))
        return self.redis.port

    def noop_pythonpath(self) -> str:
        if self.noop_path is None:
            self.noop_path = scenarios.noop_distribution(self.workdir)
        return self.noop_path

    def discover(self) -> None:
        try:
            from engine.plugins import discover

            self.filters = frozenset(discover().filters)
        except Exception as exc:  # any failure means: no plugin scenarios this run
            self.filter_error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        for server in (self.stub, self.redis):
            if server is not None:
                server.stop()

    # -- one scenario -------------------------------------------------------------------

    def run(self, sc: Scenario) -> Result:
        result = Result(
            name=sc.name,
            title=sc.title,
            target=sc.target,
            kind=sc.kind,
            connections=sc.connections,
            request=sc.request,
            workers=sc.workers,
        )
        try:
            with self.server_for(sc, result) as (server, path, headers):
                if sc.kind == "bodies":
                    self.measure_bodies(server, result)
                elif sc.kind == "idle":
                    self.measure_idle(server, result, path, headers)
                else:
                    self.measure_load(server, result, path, headers)
        except Skip as exc:
            result.status = f"skipped: {exc}"
        except (StartError, OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
            result.status = f"failed: {type(exc).__name__}: {exc}".strip()
        return result

    @contextlib.contextmanager
    def server_for(
        self, sc: Scenario, result: Result
    ) -> Iterator[tuple[Server, str, list[tuple[str, str]]]]:
        assert self.stub is not None
        path, headers = scenarios.request_for(sc)
        gateway_cpus = self.cpus(GATEWAY_CPUS if sc.workers == 1 else [0, 1])
        if sc.target == "direct":
            yield self.stub, path, headers
            return
        if sc.target == "forwarder":
            server = servers.start_forwarder(self.workdir, self.stub.port, gateway_cpus)
        elif sc.target == "floor":
            server = servers.start_floor(self.workdir, self.stub.port, gateway_cpus)
        elif sc.target == "nginx":
            if servers.nginx_binary() is None:
                raise Skip("nginx is not installed")
            server = servers.start_nginx(self.workdir, self.stub.port, gateway_cpus)
        elif sc.target in ("proxypy", "proxypy-keepalive", "proxypy-parsed"):
            version = proxypy_version()
            if version is None:
                raise Skip("proxy.py is not installed (pip install proxy.py)")
            result.extra["proxypy"] = version
            if sc.target == "proxypy":
                server = servers.start_proxypy(self.workdir, self.stub.port, gateway_cpus)
                # Its documented reverse-proxy route breaks on a keep-alive connection's
                # second request (see proxypy_plugin.py): clients close after each one.
                headers.append(("Connection", "close"))
                result.extra["client"] = PROXYPY_CLIENT
                result.extra["plugin"] = servers.PROXYPY_PLUGIN
            else:
                if sc.target == "proxypy-parsed":
                    start, plugin = servers.start_proxypy_parsed, servers.PROXYPY_PARSED_PLUGIN
                    client = PROXYPY_PARSED_CLIENT
                else:
                    start, plugin = (
                        servers.start_proxypy_keepalive,
                        servers.PROXYPY_KEEPALIVE_PLUGIN,
                    )
                    client = PROXYPY_KEEPALIVE_CLIENT
                server = start(self.workdir, self.stub.port, gateway_cpus)
                result.extra["client"] = client
                result.extra["plugin"] = plugin
                result.extra["proxypy_args"] = " ".join(servers.PROXYPY_KEEPALIVE_ARGS)
                result.extra["writes"] = proxypy_keepalive_writes()
        else:
            why = servers.gateway_available()
            if why is not None:
                raise Skip(why)
            assert sc.plan is not None
            port = servers.free_port()
            env = Env(
                workdir=self.workdir,
                stub_port=self.stub.port,
                gateway_port=port,
                available_filters=self.filters,
                redis_port=self.redis_port,
                noop_pythonpath=self.noop_pythonpath,
            )
            plan = sc.plan(env)
            missing = [n for n in plan.needs if n not in self.filters]
            if missing:
                raise Skip(f"plugin {', '.join(missing)} not available")
            path, headers = scenarios.request_for(sc, plan)
            server = servers.start_gateway(
                self.workdir, plan.config, port, gateway_cpus, name=sc.name, env=plan.env
            )
            result.extra["filters"] = sorted(plan.config["routes"][0].get("plugins", {}))
        try:
            yield server, path, headers
        finally:
            server.stop()

    def load(
        self, port: int, path: str, headers: Sequence[tuple[str, str]], conns: int, secs: float
    ) -> loadgen.LoadResult:
        if self.tool == "wrk":
            return wrk.run(
                HOST, port, path, headers, conns, secs, threads=2, cpus=self.cpus(LOAD_CPUS)
            )
        request = loadgen.request_bytes(HOST, port, path, headers)
        return loadgen.run_load(
            HOST, port, request, conns, secs, processes=1, cpus=self.cpus(LOAD_CPUS)
        )

    def measure_load(
        self, server: Server, result: Result, path: str, headers: list[tuple[str, str]]
    ) -> None:
        check = probe(server.port, path, headers)
        if check is not None:
            result.extra["probe"] = check
        self.load(server.port, path, headers, result.connections, self.args.warmup)
        before = procstat.cpu_seconds(server.pid)
        measured = self.load(server.port, path, headers, result.connections, self.args.duration)
        after = procstat.cpu_seconds(server.pid)
        if server.proc.poll() is not None and server is not self.stub:
            raise RuntimeError(f"{server.name} exited during the run:\n{server.log_tail()}")
        result.tool = measured.tool
        result.requests = measured.requests
        result.duration = measured.duration
        result.rps = measured.rps
        result.errors = measured.errors
        result.error_detail = measured.error_detail
        result.latency_ms = measured.latency_ms
        if measured.requests:
            result.cpu_us_per_req = (after - before) / measured.requests * 1e6
        result.peak_rss_mb = procstat.peak_rss_bytes(server.pid) / MiB

    def measure_bodies(self, server: Server, result: Result) -> None:
        size = self.args.body_mib * MiB
        result.tool = "bundled client"
        errors: list[str] = []
        up_s = down_s = 0.0
        try:
            up_s = upload(server.port, size)
        except (OSError, ValueError) as exc:
            errors.append(f"upload: {exc}")
        try:
            down_s = download(server.port, size)
        except (OSError, ValueError) as exc:
            errors.append(f"download: {exc}")
        result.errors = len(errors)
        result.extra.update(
            size_mib=self.args.body_mib,
            up_mib_s=self.args.body_mib / up_s if up_s else 0.0,
            down_mib_s=self.args.body_mib / down_s if down_s else 0.0,
            error="; ".join(errors),
        )
        result.peak_rss_mb = procstat.peak_rss_bytes(server.pid) / MiB

    def measure_idle(
        self, server: Server, result: Result, path: str, headers: list[tuple[str, str]]
    ) -> None:
        result.tool = "bundled client"
        base_rss = procstat.rss_bytes(server.pid)
        conns = open_idle(server.port, self.args.idle)
        try:
            result.extra["open"] = len(conns)
            result.extra["rss_mb"] = procstat.rss_bytes(server.pid) / MiB
            result.extra["rss_before_mb"] = base_rss / MiB
            started = time.perf_counter()
            status = one_request(server.port, path)
            result.extra["served_ms"] = (time.perf_counter() - started) * 1000
            result.extra["served_status"] = status
            if conns:
                started = time.perf_counter()
                reuse_status = request_on(conns[len(conns) // 2], path)
                result.extra["reused_ms"] = (time.perf_counter() - started) * 1000
                result.extra["reused_status"] = reuse_status
        finally:
            for sock in conns:
                sock.close()
        result.peak_rss_mb = procstat.peak_rss_bytes(server.pid) / MiB


class Skip(Exception):
    """The scenario cannot run here; the message says why."""


PROXYPY_CLIENT = "Connection: close (its reverse-proxy route fails on keep-alive)"
PROXYPY_KEEPALIVE_CLIENT = (
    "keep-alive; plugin keeps one upstream connection per client connection and relays "
    "the response bytes unparsed"
)
PROXYPY_PARSED_CLIENT = (
    "keep-alive; plugin keeps one upstream connection per client connection, parses "
    "every response with proxy.py's HttpParser and sends the response rebuilt from it"
)


def proxypy_keepalive_writes() -> str:
    """How the keep-alive plugin writes (``FILTERGATE_BENCH_PROXYPY_FLUSH``)."""
    if os.environ.get("FILTERGATE_BENCH_PROXYPY_FLUSH") == "loop":
        return "when proxy.py's loop finds the socket writable"
    return "sent at once, the rest when proxy.py's loop finds the socket writable"


def proxypy_version() -> str | None:
    """The installed proxy.py's version, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("proxy.py")
    except metadata.PackageNotFoundError:
        return None


# -- the bundled clients of the bodies and idle scenarios ------------------------------


def _read_response(sock: socket.socket) -> tuple[int, int]:
    """Read one response; (status, body bytes). Content-Length framing only."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value)
    got = len(rest)
    while got < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ValueError(f"connection closed after {got} of {length} body bytes")
        got += len(chunk)
    return status, got


def upload(port: int, size: int) -> float:
    """POST ``size`` zero bytes; seconds taken. ValueError unless answered 200."""
    zeros = memoryview(bytes(1 << 20))
    with socket.create_connection((HOST, port), timeout=60) as sock:
        started = time.perf_counter()
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        left = size
        while left:
            n = min(left, len(zeros))
            sock.sendall(zeros[:n])
            left -= n
        status, _ = _read_response(sock)
        if status != 200:
            raise ValueError(f"answered {status}")
        return time.perf_counter() - started


def download(port: int, size: int) -> float:
    """GET ``size`` bytes; seconds taken. ValueError on a short or failed answer."""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status, got = _read_response(sock)
        if status != 200 or got != size:
            raise ValueError(f"answered {status} with {got} of {size} bytes")
        return time.perf_counter() - started


def request_on(sock: socket.socket, path: str) -> int:
    sock.settimeout(30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    return _read_response(sock)[0]


def one_request(port: int, path: str) -> int:
    with socket.create_connection((HOST, port), timeout=30) as sock:
        return request_on(sock, path)


def open_idle(port: int, count: int, batch: int = 500) -> list[socket.socket]:
    """``count`` keep-alive connections that each completed one request, then idle."""
    conns: list[socket.socket] = []
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    try:
        while len(conns) < count:
            group = []
            for _ in range(min(batch, count - len(conns))):
                sock = socket.create_connection((HOST, port), timeout=30)
                sock.sendall(request)
                group.append(sock)
            for sock in group:
                _read_response(sock)
            conns += group
    except (OSError, ValueError):
        pass  # report how many were open; the caller shows the count
    return conns


def probe(port: int, path: str, headers: Sequence[tuple[str, str]]) -> str | None:
    """One request before the load: a non-2xx answer is worth a note in the results."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}:{port}", *(f"{n}: {v}" for n, v in headers)]
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status, _ = _read_response(sock)
    except (OSError, ValueError) as exc:
        return f"probe failed: {exc}"
    return None if 200 <= status < 300 else f"probe answered {status}"


# -- the command ------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs of a few scenarios")
    parser.add_argument("--scenarios", help="comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--duration", type=float, help="seconds per measured run (default 5, quick 2)"
    )
    parser.add_argument(
        "--warmup", type=float, help="seconds of unmeasured load first (default 1, quick 0.5)"
    )
    parser.add_argument(
        "--repeat", type=int, help="interleaved passes; median kept (default 3, quick 1)"
    )
    parser.add_argument(
        "--png", action="store_true", help="also draw latency percentiles (matplotlib)"
    )
    parser.add_argument(
        "--loadgen", action="store_true", help="use the bundled load generator even if wrk exists"
    )
    parser.add_argument(
        "--upstream", choices=("raw", "nginx"), default="raw", help="throughput upstream"
    )
    parser.add_argument("--stub-procs", type=int, default=1, help="raw stub processes")
    parser.add_argument(
        "--machine-probe",
        type=float,
        help="seconds of fixed work timed on the gateway's CPU before each pass, "
        "the tail the machine adds by itself (default 4, quick 2; 0 skips it)",
    )
    parser.add_argument(
        "--body-mib", type=int, help="body size of the bodies scenario (default 1024, quick 128)"
    )
    parser.add_argument("--idle", type=int, help="idle connections (default 10000, quick 2000)")
    parser.add_argument(
        "--output", type=Path, help="JSON file (default benchmarks/results/bench-<time>.json)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (2.0 if quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.repeat = args.repeat or (1 if quick else 3)
    args.body_mib = args.body_mib or (128 if quick else 1024)
    args.idle = args.idle or (2000 if quick else 10_000)
    if args.machine_probe is None:
        args.machine_probe = 2.0 if quick else 4.0
    return args


def select(all_: list[Scenario], args: argparse.Namespace) -> list[Scenario]:
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        known = {s.name: s for s in all_}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)} (see --list)")
        return [known[n] for n in wanted]
    if args.quick:
        return [s for s in all_ if s.quick]
    return all_


def raise_fd_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    bench_filters: list[str] = []
    bench = None
    workdir = Path(tempfile.mkdtemp(prefix="filtergate-bench-"))
    try:
        bench = Bench(args, workdir)
        bench.discover()
        bench_filters = sorted(bench.filters)
        chosen = select(scenarios.all_scenarios(bench_filters), args)
        if args.list:
            for s in scenarios.all_scenarios(bench_filters):
                sys.stdout.write(f"{s.name:<24} {s.title}{'  (quick)' if s.quick else ''}\n")
            return 0
        raise_fd_limit(args.idle * 2 + 1024)
        stub = bench.start_stub()
        progress(
            f"upstream: {stub.name} on {HOST}:{stub.port}; load: {bench.tool}; "
            f"pinning: {'taskset (server CPU 0, load + stub CPU 1)' if bench.pin else 'none'}; "
            f"{len(chosen)} scenarios x {args.repeat} pass(es) of {args.duration:g}s"
        )
        if bench.filter_error:
            progress(f"plugin discovery failed: {bench.filter_error}")
        runs: dict[str, list[Result]] = {s.name: [] for s in chosen}
        total = len(chosen) * args.repeat
        step = 0
        for rep in range(args.repeat):
            if any(sc.kind == "load" for sc in chosen):
                bench.probe_machine()
            for sc in chosen:
                step += 1
                if rep and (runs[sc.name][0].status.startswith("skipped") or sc.kind != "load"):
                    continue  # skips and one-shot measurements need no repeat
                progress(f"[{step}/{total}] {sc.name}: {sc.title} ...")
                res = bench.run(sc)
                runs[sc.name].append(res)
                progress(f"    {summary_line(res)}")
        results = [report.median_result(runs[s.name]) for s in chosen]
        report.add_ratios(results)
        checks = report.check_targets(results, bench.machine)
        meta = metadata(bench, args, stub)
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = args.output or RESULTS_DIR / f"bench-{stamp}.json"
        json_text = report.to_json(results, meta, checks, bench.machine)
        out.write_text(json_text)
        (RESULTS_DIR / "latest.json").write_text(json_text)
        sys.stdout.write(header_text(meta) + "\n\n" + report.render_table(results) + "\n\n")
        sys.stdout.write(report.render_checks(checks) + "\n\n")
        for line in report.context(results, bench.machine):
            sys.stdout.write(line + "\n")
        sys.stdout.write(f"results: {out}\n")
        if args.png:
            png = out.with_suffix(".png")
            why = report.write_png(results, png)
            sys.stdout.write(f"latency plot: {png}\n" if why is None else f"no PNG: {why}\n")
        return 0
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(workdir, ignore_errors=True)


def summary_line(r: Result) -> str:
    if not r.ok:
        return r.status
    if r.kind != "load":
        return report.describe_extra(r)
    lat = r.latency_ms
    return (
        f"{r.rps:,.0f} req/s, p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms, "
        f"errors {r.errors}, CPU {r.cpu_us_per_req or 0:.0f} us/req"
        + (f", {r.extra['probe']}" if r.extra.get("probe") else "")
    )


def metadata(bench: Bench, args: argparse.Namespace, stub: Server) -> dict[str, Any]:
    wrk_version = ""
    if bench.tool == "wrk":
        wrk_bin = wrk.available() or "wrk"
        out = subprocess.run([wrk_bin, "--version"], capture_output=True, text=True, check=False)
        wrk_version = (out.stdout + out.stderr).splitlines()[0] if (out.stdout + out.stderr) else ""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": (
            f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
        ),
        "python_build": " ".join(platform.python_build()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_tool": bench.tool + (f" ({wrk_version})" if wrk_version else ""),
        "upstream": f"{stub.name}"
        + (
            f" x{args.stub_procs} processes"
            if args.stub_procs > 1 and stub.name == "rawstub"
            else ""
        ),
        "pinning": "server CPU 0, load + stub CPU 1" if bench.pin else "none",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        "proxypy_client": PROXYPY_CLIENT,
        "proxypy_plugin": servers.PROXYPY_PLUGIN,
        "proxypy_keepalive_client": PROXYPY_KEEPALIVE_CLIENT,
        "proxypy_keepalive_plugin": servers.PROXYPY_KEEPALIVE_PLUGIN,
        "proxypy_parsed_plugin": servers.PROXYPY_PARSED_PLUGIN,
        "proxypy_keepalive_args": " ".join(servers.PROXYPY_KEEPALIVE_ARGS),
        "proxypy_keepalive_writes": proxypy_keepalive_writes(),
        "proxypy_version": proxypy_version() or "not installed",
        "filters": sorted(bench.filters),
    }


def header_text(meta: dict[str, Any]) -> str:
    keys = ("python", "machine", "load_tool", "upstream", "pinning", "duration_s", "repeat")
    return "\n".join(f"{k}: {meta[k]}" for k in keys)
