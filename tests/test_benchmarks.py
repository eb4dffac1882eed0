"""The benchmark harness's pure parts, and its load generator against the raw stub.

No timing is asserted: benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from benchmarks import jitter, loadgen, report, scenarios, servers, wrk
from benchmarks.report import Result
from benchmarks.servers import HOST, ROOT


def load_row(name: str, target: str, rps: float, **kw: object) -> Result:
    row = Result(name=name, title=name, target=target, rps=rps, **kw)  # type: ignore[arg-type]
    row.latency_ms = {"p50": 1.0, "p99": 3.0, "max": 9.0}
    return row


def test_ratios_use_the_matching_baseline() -> None:
    rows = [
        load_row("direct", "direct", 50_000.0),
        load_row("forwarder", "forwarder", 5_000.0, cpu_us_per_req=200.0),
        load_row("direct-c64", "direct", 40_000.0, connections=64),
        load_row("filtergate", "filtergate", 6_000.0, cpu_us_per_req=100.0),
        load_row("filtergate-c64", "filtergate", 8_000.0, connections=64),
    ]
    report.add_ratios(rows)
    gw, gw64 = rows[3], rows[4]
    assert gw.ratio_direct == pytest.approx(0.12)
    assert gw.ratio_forwarder == pytest.approx(1.2)
    assert gw.cpu_ratio_forwarder == pytest.approx(0.5)
    assert gw64.ratio_direct == pytest.approx(0.2)  # the c64 direct run
    assert gw64.ratio_forwarder == pytest.approx(1.6)  # no c64 forwarder: the c32 one


def test_table_lists_measured_rows_and_says_why_others_did_not_run() -> None:
    rows = [
        load_row("direct", "direct", 50_000.0),
        load_row("forwarder", "forwarder", 5_000.0),
        Result(
            name="nginx", title="nginx", target="nginx", status="skipped: nginx is not installed"
        ),
        Result(
            name="bodies",
            title="bodies",
            target="filtergate",
            kind="bodies",
            peak_rss_mb=40.0,
            extra={"size_mib": 1024, "up_mib_s": 500.0, "down_mib_s": 600.0},
        ),
    ]
    report.add_ratios(rows)
    text = report.render_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| scenario")
    assert any(line.startswith("| direct ") and "50,000" in line for line in lines)
    assert "nginx: skipped: nginx is not installed" in text
    assert "1,024 MiB up 500 MiB/s" in text


def test_median_result_keeps_the_middle_run_and_every_rate() -> None:
    runs = [load_row("x", "filtergate", rps) for rps in (300.0, 100.0, 200.0)]
    chosen = report.median_result(runs)
    assert chosen.rps == 200.0
    assert sorted(chosen.runs) == [100.0, 200.0, 300.0]


def test_target_checks_and_json() -> None:
    rows = [
        load_row("forwarder", "forwarder", 5_000.0),
        load_row("filtergate", "filtergate", 6_500.0),
        load_row("full-chain", "filtergate", 4_000.0),
    ]
    checks = {c.name: c for c in report.check_targets(rows)}
    assert checks["filtergate / forwarder req/s"].verdict == "PASS"
    assert checks["full chain / no filters req/s"].verdict == "FAIL"
    assert checks["filtergate p99 / p50"].value == pytest.approx(3.0)
    assert checks["10,000 routes / 10 routes req/s"].verdict == "not measured"
    data = json.loads(report.to_json(rows, {"load_tool": "wrk"}, list(checks.values())))
    assert data["meta"]["load_tool"] == "wrk"
    assert [r["name"] for r in data["results"]] == ["forwarder", "filtergate", "full-chain"]
    assert {t["verdict"] for t in data["targets"]} >= {"PASS", "FAIL", "not measured"}


def test_tail_target_takes_the_median_of_the_repeats() -> None:
    passes = []
    for rps, p99 in ((5_000.0, 5.0), (6_000.0, 2.5), (5_500.0, 3.5)):
        row = load_row("filtergate", "filtergate", rps)
        row.latency_ms = {"p50": 1.0, "p99": p99}
        passes.append(row)
    row = report.median_result(passes)
    assert row.rps == 5_500.0  # the median run by req/s...
    assert row.tails == [5.0, 2.5, 3.5]  # ...keeps every repeat's tail
    check = next(c for c in report.check_targets([row]) if c.name == "filtergate p99 / p50")
    assert check.value == pytest.approx(3.5)
    assert check.note == "median of the repeats: 5.00, 2.50, 3.50"
    assert "median of the repeats" in report.render_checks([check])


def test_window_tail_is_p99_over_p50_of_consecutive_work() -> None:
    steady = [0.001] * 2_000
    assert jitter.window_tail([steady], 0.01) == pytest.approx(1.0)
    # Every 1,000 units, a stretch of 20 units runs 5x slower.
    bursty = ([0.005] * 20 + [0.001] * 980) * 10
    assert jitter.window_tail([bursty], 0.001) == pytest.approx(5.0)  # 2% of units are slow
    # 11 of every 1,000 windows of 10 units fall wholly inside a stretch: still over 1%.
    assert jitter.window_tail([bursty], 0.01) == pytest.approx(5.0)
    # 100-unit windows dilute a 20-unit stretch: (20 * 5 + 80) / 100.
    assert jitter.window_tail([bursty], 0.1) == pytest.approx(1.8)
    # Fewer units than 100 disjoint windows need: no p99 to speak of.
    assert jitter.window_tail([steady], 0.1) is None
    assert jitter.window_tail([], 0.01) is None
    # Windows stay within a probe. Two steady probes 5x apart: 10-unit windows are
    # 10 ms or 50 ms, the slow ones one more than half, so p50 = p99 = 50 ms. Windows
    # across the seam would put values in between at the median.
    fast, slow = [0.001] * 2_000, [0.005] * 2_001
    assert jitter.window_tail([fast, slow], 0.05) == pytest.approx(1.0)
    assert (jitter.window_tail([fast + slow], 0.05) or 0.0) > 1.0


def test_machine_probe_sits_next_to_the_tail_checks_and_in_the_json() -> None:
    row = load_row("filtergate", "filtergate", 6_000.0)  # p50 1 ms
    machine = [([0.0005] * 2 + [0.0001] * 98) * 20]  # 0.1 ms units, 2% slow; one probe
    check = next(
        c for c in report.check_targets([row], machine) if c.name == row.name + " p99 / p50"
    )
    assert check.note == "machine alone 1.80"  # 10 units: (2 * 0.5 + 8 * 0.1) / 1.0
    assert next(c for c in report.check_targets([row]) if c.name == check.name).note == ""
    line = report.context([row], machine)[0]
    assert line.startswith("machine alone: fixed work on the gateway's CPU (2,000 units of 0.10 ms")
    assert "1.40 over 2 ms" in line  # 20 units: (2 * 0.5 + 18 * 0.1) / 2.0
    assert report.context([row]) == []
    data = json.loads(report.to_json([row], {}, [check], machine))
    assert data["machine"]["probes"] == 1
    assert data["machine"]["units"] == 2_000
    assert data["machine"]["p99_p50"]["2 ms"] == pytest.approx(1.4)
    assert data["context"] == [line]


@pytest.mark.timeout(60)
def test_machine_probe_times_units_on_the_given_cpu() -> None:
    units = servers.probe_machine(0.2, [0])
    assert len(units) >= 10
    assert all(u > 0 for u in units)


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    summary = loadgen.summarize_latencies(list(range(1000, 101_000, 1000)))  # 1..100 ms
    assert summary["p50"] == 51.0
    assert summary["p99"] == 100.0
    assert summary["max"] == 100.0
    assert loadgen.summarize_latencies([]) == {}


def test_browser_request_is_about_900_bytes_with_a_dozen_headers() -> None:
    raw = loadgen.request_bytes("127.0.0.1", 8080, "/api/v1/items?page=2", loadgen.BROWSER_HEADERS)
    assert 850 <= len(raw) <= 1000
    assert raw.count(b"\r\n") == 2 + 1 + len(loadgen.BROWSER_HEADERS)
    assert len(loadgen.BROWSER_HEADERS) >= 12


def test_wrk_script_and_summary_parsing() -> None:
    lua = wrk.script("/x", [("Authorization", 'Bearer "q"')])
    assert 'wrk.path = "/x"' in lua
    assert 'wrk.headers["Authorization"] = "Bearer \\"q\\""' in lua
    assert "done = function" in lua
    line = wrk.MARK + json.dumps(
        {
            "requests": 1000,
            "duration_us": 2_000_000,
            "connect": 0,
            "read": 2,
            "write": 0,
            "status": 1,
            "timeout": 0,
            "max_us": 9000,
            "mean_us": 1200.5,
            "percentiles_us": [1000, 1100, 1500, 4000, 8000],
        }
    )
    result = wrk.parse("Running 2s test\n" + line + "\n", connections=32)
    assert result.rps == pytest.approx(500.0)
    assert result.errors == 3
    assert result.latency_ms["p99"] == 4.0
    assert result.latency_ms["max"] == 9.0
    with pytest.raises(ValueError, match="no summary"):
        wrk.parse("garbage", connections=1)


def test_load_only_goes_to_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        loadgen.run_load("10.0.0.1", 80, b"GET / HTTP/1.1\r\n\r\n", 1, 0.1)


def test_scenarios_have_unique_names_and_plans_build_configs(tmp_path: Path) -> None:
    all_ = scenarios.all_scenarios(["jwt-auth", "rate-limit"])
    names = [s.name for s in all_]
    assert len(names) == len(set(names))
    assert {"direct", "forwarder", "filtergate", "full-chain", "routes-10000"} <= set(names)
    env = scenarios.Env(
        workdir=tmp_path,
        stub_port=1111,
        gateway_port=2222,
        available_filters=frozenset({"jwt-auth", "rate-limit"}),
        redis_port=lambda: 3333,
        noop_pythonpath=lambda: str(tmp_path),
    )
    by_name = {s.name: s for s in all_}
    full = by_name["full-chain"].plan
    assert full is not None
    plan = full(env)
    assert plan.config["server"]["listen"] == ["127.0.0.1:2222"]
    assert set(plan.config["routes"][0]["plugins"]) == {"jwt-auth", "rate-limit"}
    assert plan.headers[0][1].startswith("Bearer ")
    routes = by_name["routes-10000"].plan
    assert routes is not None
    plan = routes(env)
    assert len(plan.config["routes"]) == 10_000
    assert plan.path.startswith("/svc9999/")
    redis = by_name["rate-limit-redis"].plan
    assert redis is not None
    table = redis(env).config["routes"][0]["plugins"]["rate-limit"]
    assert table["redis"]["url"] == "redis://127.0.0.1:3333/0"


def test_noop_distribution_is_found_as_an_entry_point(tmp_path: Path) -> None:
    path = scenarios.noop_distribution(tmp_path)
    code = (
        "import sys; from importlib.metadata import entry_points; "
        "print([e.value for e in entry_points(group='filtergate')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": path},
        check=True,
    )
    assert "benchmarks.noop_plugin" in out.stdout


async def test_loadgen_against_the_raw_stub() -> None:
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "benchmarks.rawstub", "--port", "0"],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(100)
                assert chunk, "the raw stub exited"
                line += chunk
            port = int(line.split()[1])
            for headers, path in (((), "/"), (loadgen.BROWSER_HEADERS, "/x?y=1")):
                request = loadgen.request_bytes(HOST, port, path, headers)
                result = await trio.to_thread.run_sync(
                    partial(loadgen.run_load, HOST, port, request, 4, 0.3)
                )
                assert result.requests > 0
                assert result.errors == 0
                assert result.latency_ms["p50"] <= result.latency_ms["max"]
            close = loadgen.request_bytes(HOST, port, "/", [("Connection", "close")])
            result = await trio.to_thread.run_sync(
                partial(loadgen.run_load, HOST, port, close, 2, 0.3)
            )
            assert result.requests > 0
            assert result.errors == 0
        finally:
            proc.kill()
            await proc.wait()


def test_chaincost_measures_every_builtin_chain(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import chaincost

    assert chaincost.main(["-n", "50", "--baseline-us", "200"]) == 0
    out = capsys.readouterr().out
    for row in ("(no filters)", "rate-limit", "jwt-auth", "10 no-op filters", "full chain"):
        assert f"| {row}" in out


def test_proxypy_target_prefers_the_keepalive_row() -> None:
    both = [
        load_row("filtergate", "filtergate", 6_000.0),
        load_row("proxypy", "proxypy", 2_000.0),
        load_row("proxypy-keepalive", "proxypy-keepalive", 12_000.0),
    ]
    check = next(c for c in report.check_targets(both) if "proxy.py" in c.name)
    assert check.name == "filtergate / proxy.py req/s (keep-alive plugin)"
    assert check.value == pytest.approx(0.5)
    assert check.verdict == "FAIL"
    check = next(c for c in report.check_targets(both[:2]) if "proxy.py" in c.name)
    assert check.name == "filtergate / proxy.py req/s (Connection: close)"
    assert check.value == pytest.approx(3.0)
    check = next(c for c in report.check_targets(both[:1]) if "proxy.py" in c.name)
    assert check.verdict == "not measured"


def _established_to(port: int) -> int | None:
    """Established TCP connections to 127.0.0.1:port, from /proc/net/tcp (Linux)."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    remote = f"0100007F:{port:04X}"
    return sum(1 for line in lines if line.split()[2] == remote and line.split()[3] == "01")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("start", ["start_proxypy_keepalive", "start_proxypy_parsed"])
def test_proxypy_keepalive_plugins_serve_two_requests_on_one_connection(
    tmp_path: Path, start: str
) -> None:
    pytest.importorskip("proxy")

    stub = servers.start_rawstub(tmp_path, None)
    try:
        proxy = getattr(servers, start)(tmp_path, stub.port, None, timeout=10.0)
        try:
            with socket.create_connection((HOST, proxy.port), timeout=5) as sock:
                for path in ("/first", "/second?x=1"):
                    _get_ok(sock, path)
                    # One upstream connection for the client connection, kept open.
                    assert _established_to(stub.port) in (1, None)
                # A body that arrives in many reads comes through whole.
                sock.sendall(f"GET /bytes/300000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                head, body = _read_one(sock)
                assert head.startswith(b"HTTP/1.1 200 ")
                assert body == bytes(300_000)
        finally:
            proxy.stop()
    finally:
        stub.stop()


def _get_ok(sock: socket.socket, path: str) -> None:
    """One keep-alive GET on ``sock``, answered 200 with the raw stub's body."""
    from benchmarks.rawstub import BODY

    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, body = _read_one(sock)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == BODY


def _read_one(sock: socket.socket) -> tuple[bytes, bytes]:
    """One Content-Length framed response: (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response head"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return head, body


def test_context_places_the_floor_between_filtergate_and_proxypy() -> None:
    rows = [
        load_row("filtergate", "filtergate", 6_000.0, cpu_us_per_req=150.0),
        load_row("floor", "floor", 9_000.0, cpu_us_per_req=100.0),
        load_row("proxypy-keepalive", "proxypy-keepalive", 12_000.0),
        load_row("proxypy-parsed", "proxypy-parsed", 10_000.0),
    ]
    lines = report.context(rows)
    assert lines.pop(0) == (
        "p99 / p50 at 32 connections of every server in this run: filtergate 3.00, floor "
        "3.00, proxypy-keepalive 3.00, proxypy-parsed 3.00; the tail target's bound is 4"
    )
    assert lines[0].startswith("trio+h11 floor / proxy.py keep-alive req/s: 0.75;")
    assert "is behind proxy.py" in lines[0]
    assert lines[1].startswith("trio+h11 floor / proxy.py parsing both heads req/s: 0.90;")
    assert lines[2] == (
        "filtergate / trio+h11 floor req/s: 0.67; CPU 150 vs 100 us/req, 50 us/req above the floor"
    )
    assert report.context(rows[:1]) == []  # no floor row, no peers: nothing to say
    data = json.loads(report.to_json(rows, {}, []))
    assert data["context"][1:] == lines


@pytest.mark.timeout(20)
def test_floor_relays_keepalive_requests_and_ends_what_it_does_not_do(tmp_path: Path) -> None:
    from benchmarks.rawstub import BODY

    stub = servers.start_rawstub(tmp_path, None)
    try:
        floor = servers.start_floor(tmp_path, stub.port, None)
        try:
            with socket.create_connection((HOST, floor.port), timeout=5) as sock:
                for path in ("/first", "/second?x=1"):
                    _get_ok(sock, path)
                # A request body is not relayed: the floor ends the connection.
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
                assert sock.recv(100) == b""
            with socket.create_connection((HOST, floor.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head, body = _read_one(sock)
                assert head.startswith(b"HTTP/1.1 200 ")
                assert body == BODY
                assert sock.recv(100) == b""  # closed after the response, as asked
                assert floor.proc.poll() is None  # and still serving
        finally:
            floor.stop()
    finally:
        stub.stop()


def test_png_draws_every_row_or_says_why_not(tmp_path: Path) -> None:
    rows = [load_row(f"row-{i}", "filtergate", 1_000.0) for i in range(12)]
    path = tmp_path / "lat.png"
    why = report.write_png(rows, path)
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        assert why == "matplotlib is not installed (pip install matplotlib)"
        return
    assert why is None
    assert path.read_bytes().startswith(b"\x89PNG")
    assert report.write_png([], tmp_path / "none.png") == "no latency to draw"


def test_instruction_counts_are_read_from_the_dump_and_set_against_the_targets() -> None:
    from benchmarks import instructions
    from benchmarks.instructions import Count

    assert instructions.read_total("events: Ir\nsummary: 900\ntotals: 1000\n") == 1000
    assert instructions.read_total("events: Ir\nsummary: 900\n") == 900
    with pytest.raises(ValueError, match="no totals"):
        instructions.read_total("events: Ir\n")
    table = instructions.render(
        [
            Count("filtergate", 100, 40_000_000),
            Count("filtergate-full-request", 100, 45_000_000),
            Count("full-chain", 100, 60_000_000),
        ]
    )
    assert "| full-chain | 100 | 600,000 | 0.67 |" in table
    assert "full-chain / filtergate: 0.67 in instructions (the req/s target: >= 0.75)" in table
    assert "full-chain / filtergate-full-request: 0.75 in instructions" in table
    assert "routes-10000" not in table  # a pair not measured is not shown


def test_instructions_count_only_one_worker_load_scenarios() -> None:
    from benchmarks import instructions

    known = {s.name: s for s in scenarios.all_scenarios(["jwt-auth", "rate-limit"])}
    for name in ("filtergate", "full-chain", "full-chain-browser", "noop-10", "routes-10000"):
        assert instructions.countable(known[name]) is None, name
    assert instructions.countable(known["filtergate-2w"]) == (
        "more than one worker (valgrind follows one process)"
    )
    assert instructions.countable(known["bodies"]) == "not a load scenario"
    assert instructions.countable(known["nginx"]) == "not a filtergate scenario"
    with pytest.raises(SystemExit) as refused:
        instructions.main(["--scenarios", "filtergate,filtergate-2w,nope"])
    assert refused.value.code == 2


def test_a_failed_machine_probe_is_reported_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import run

    bench = run.Bench(run.parse_args(["--machine-probe", "0.1"]), tmp_path)
    bench.cpus = lambda which: [4096]  # type: ignore[method-assign]  # no such CPU
    bench.probe_machine()
    assert bench.machine == []
    assert "machine probe failed: CalledProcessError" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_instruction_client_sends_keepalive_requests_through_a_gateway(tmp_path: Path) -> None:
    from benchmarks import instructions

    stub = servers.start_rawstub(tmp_path, None)
    try:
        port = servers.free_port()
        config = {
            "server": {"listen": [f"{HOST}:{port}"]},
            "admin": {"enabled": False},
            "upstreams": {"stub": {"targets": [f"{HOST}:{stub.port}"]}},
            "routes": [{"name": "bench", "prefix": "/", "upstream": "stub"}],
        }
        gateway = servers.start_gateway(tmp_path, config, port, None)
        try:
            calls: list[str] = []

            async def mark(what: str) -> None:
                calls.append(what)

            sent = trio.run(
                instructions.drive,
                port,
                "/",
                [("X-Bench", "1")],
                3,
                (2, 4),
                partial(mark, "between"),
                partial(mark, "after"),
            )
            assert sent == 12  # the last round's requests
            assert calls == ["between", "after"]
            # A non-2xx answer stops the count: an encoded slash is refused (400).
            with pytest.raises(BaseExceptionGroup) as refused:
                trio.run(instructions.drive, port, "/a%2Fb", [], 1, (1,))
            assert refused.group_contains(RuntimeError, match="answered 400")
        finally:
            gateway.stop()
    finally:
        stub.stop()


@pytest.mark.timeout(240)
def test_instructions_counts_a_gateway_under_callgrind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import instructions

    out = tmp_path / "counts.json"
    args = ["--scenarios", "filtergate", "--requests", "3", "--warmup", "1", "--connections", "2"]
    assert instructions.main([*args, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    if "skipped" in text:  # no valgrind here: the command says so and succeeds
        assert not out.exists()
        return
    (row,) = json.loads(out.read_text())["counts"]
    assert row["scenario"] == "filtergate"
    assert row["requests"] == 6
    assert row["instructions"] > 6 * 10_000  # a proxied request is hundreds of thousands
