"""Driving wrk: a generated Lua script sets the request and reports JSON from ``done()``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence

from benchmarks.loadgen import PERCENTILES, LoadResult

MARK = "FILTERGATE-BENCH "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  local out = string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"max_us":%d,"mean_us":%f',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.max, latency.mean)
  local pcts = {}
  for i, p in ipairs({PERCENTILES}) do
    pcts[i] = string.format("%d", latency:percentile(p))
  end
  io.write("{MARK}" .. out .. ',"percentiles_us":[' .. table.concat(pcts, ",") .. "]}\\n")
end
"""


def available() -> str | None:
    """Path of the wrk binary, or None."""
    return shutil.which("wrk")


def lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script(path: str, headers: Iterable[tuple[str, str]], method: str = "GET") -> str:
    """The Lua script: the request's method, path and headers, and the JSON summary."""
    lines = [f"wrk.method = {lua_string(method)}", f"wrk.path = {lua_string(path)}"]
    lines += [f"wrk.headers[{lua_string(n)}] = {lua_string(v)}" for n, v in headers]
    percentiles = "{" + ", ".join(repr(q * 100) for _, q in PERCENTILES) + "}"
    done = _DONE.replace("{PERCENTILES}", percentiles).replace("{MARK}", MARK)
    return "\n".join(lines) + "\n" + done


def parse(output: str, connections: int) -> LoadResult:
    """The LoadResult from wrk's output; ValueError when the summary line is missing."""
    for line in output.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            break
    else:
        raise ValueError(f"no summary in wrk output: {output[-500:]!r}")
    latency = {
        label: us / 1000.0
        for (label, _), us in zip(PERCENTILES, data["percentiles_us"], strict=True)
    }
    latency["max"] = data["max_us"] / 1000.0
    latency["mean"] = data["mean_us"] / 1000.0
    detail = {k: data[k] for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    return LoadResult(
        tool="wrk",
        connections=connections,
        duration=data["duration_us"] / 1e6,
        requests=data["requests"],
        errors=sum(detail.values()),
        latency_ms=latency,
        error_detail=detail,
    )


def run(
    host: str,
    port: int,
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    connections: int = 32,
    duration: float = 5.0,
    threads: int = 2,
    cpus: Iterable[int] | None = None,
) -> LoadResult:
    """Run wrk against a loopback address (ValueError otherwise)."""
    if not host.startswith("127."):
        raise ValueError(f"load only goes to loopback addresses, not {host!r}")
    binary = available()
    if binary is None:
        raise FileNotFoundError("wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script(path, headers))
        lua = f.name
    try:
        cmd = [
            binary,
            f"-t{max(1, min(threads, connections))}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            lua,
            f"http://{host}:{port}{path}",
        ]
        cpu_list = list(cpus) if cpus is not None else []
        if cpu_list and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, cpu_list)), *cmd]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    finally:
        os.unlink(lua)
    return parse(proc.stdout + proc.stderr, connections)
