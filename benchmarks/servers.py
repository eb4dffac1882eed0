"""Starting and stopping the processes under test: stubs, references, filtergate, redis.

Each runs in its own session (process group), pinned with taskset when asked, its
output in a log file; ``stop()`` ends the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class StartError(Exception):
    """A server did not come up; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cmd: Sequence[str], cpus: Iterable[int] | None) -> list[str]:
    cpu_list = list(cpus) if cpus is not None else []
    if cpu_list and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, cpu_list)), *cmd]
    return list(cmd)


@dataclass
class Server:
    """A running server process (and its process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cleanup: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            # The leader exited: make sure no worker of its group lingers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This environment with ``env`` on top; PYTHONPATH is ``env``'s, then the
    repository, then this environment's."""
    full_env = dict(os.environ)
    extra = dict(env or {})
    paths = (extra.pop("PYTHONPATH", ""), str(ROOT), full_env.get("PYTHONPATH", ""))
    full_env.update(extra)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return full_env


def _spawn(
    name: str, cmd: Sequence[str], env: Mapping[str, str] | None, log: Path
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(env),
            cwd=ROOT,
            start_new_session=True,
        )


def probe_machine(seconds: float, cpus: Iterable[int] | None) -> list[float]:
    """``benchmarks.jitter``'s unit durations, measured on ``cpus`` for ``seconds``."""
    cmd = [sys.executable, "-m", "benchmarks.jitter", "--seconds", str(seconds)]
    done = subprocess.run(
        pinned(cmd, cpus),
        capture_output=True,
        text=True,
        check=True,
        env=_env(None),
        cwd=ROOT,
        timeout=seconds + 60,
    )
    units: list[float] = json.loads(done.stdout)
    return units


def wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Wait until ``port`` accepts connections; False if the process exited or timed out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return True
        time.sleep(0.05)
    return False


def start(
    name: str,
    cmd: Sequence[str],
    port: int,
    workdir: Path,
    cpus: Iterable[int] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    cleanup: Sequence[Path] = (),
) -> Server:
    """Start ``cmd`` and wait until it listens on ``port``; StartError otherwise."""
    log = workdir / f"{name}.log"
    proc = _spawn(name, pinned(cmd, cpus), env, log)
    server = Server(name, proc, port, log, list(cleanup))
    if not wait_port(proc, port, timeout):
        server.stop()
        raise StartError(f"{name} did not start listening on {port}:\n{server.log_tail()}")
    return server


def start_rawstub(workdir: Path, cpus: Iterable[int] | None, procs: int = 1) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.rawstub", "--port", str(port)]
    return start("rawstub", [*cmd, "--procs", str(procs)], port, workdir, cpus)


def _start_reference(name: str, workdir: Path, upstream: int, cpus: Iterable[int] | None) -> Server:
    """``python -m benchmarks.<name> --port P --upstream HOST:PORT``."""
    port = free_port()
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--port", str(port)]
    return start(name, [*cmd, "--upstream", f"{HOST}:{upstream}"], port, workdir, cpus)


def start_forwarder(workdir: Path, upstream: int, cpus: Iterable[int] | None) -> Server:
    return _start_reference("forwarder", workdir, upstream, cpus)


def start_floor(workdir: Path, upstream: int, cpus: Iterable[int] | None) -> Server:
    return _start_reference("floor", workdir, upstream, cpus)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def start_nginx(
    workdir: Path, upstream: int | None, cpus: Iterable[int] | None, name: str = "nginx"
) -> Server:
    """nginx with one worker: a reverse proxy to ``upstream`` (keep-alive pool), or,
    with ``upstream=None``, serving the raw stub's fixed JSON body itself."""
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx is not installed")
    from benchmarks.rawstub import BODY

    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir()
    if upstream is not None:
        location = (
            "proxy_pass http://up; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; proxy_buffering on;'
        )
        upstream_block = f"upstream up {{ server {HOST}:{upstream}; keepalive 64; }}"
    else:
        body = BODY.decode().replace("\\", "\\\\").replace("'", "\\'")
        location = f"default_type application/json; return 200 '{body}';"
        upstream_block = ""
    conf = f"""
worker_processes 1;
master_process off;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    {upstream_block}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{ {location} }}
    }}
}}
"""
    (prefix / "nginx.conf").write_text(conf)
    cmd = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    return start(name, cmd, port, workdir, cpus, cleanup=[prefix])


#: proxy.py's documented reverse-proxy route (new upstream connection per request).
PROXYPY_PLUGIN = "benchmarks.proxypy_plugin.BenchReverseProxy"
#: One upstream connection per client connection, response bytes relayed unparsed.
PROXYPY_KEEPALIVE_PLUGIN = "benchmarks.proxypy_keepalive.BenchKeepAliveRelay"
#: The same, every response parsed and rebuilt by proxy.py's own parser.
PROXYPY_PARSED_PLUGIN = "benchmarks.proxypy_keepalive.BenchKeepAliveParsed"
#: proxy.py's single-worker settings of the keep-alive scenario: threadless, one
#: acceptor handing connections to one worker process (``--local-executor 0``; with
#: the default local executor the acceptor serves its connections in a thread of its
#: own, which was ~15% slower here).
PROXYPY_KEEPALIVE_ARGS = (
    "--threadless",
    "--local-executor",
    "0",
    "--num-acceptors",
    "1",
    "--num-workers",
    "1",
    "--enable-web-server",
)


def _start_proxypy(
    name: str,
    workdir: Path,
    upstream: int,
    cpus: Iterable[int] | None,
    args: Sequence[str],
    timeout: float = 20.0,
) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "--hostname",
        HOST,
        "--port",
        str(port),
        *args,
        "--log-level",
        "ERROR",
    ]
    env = {"FILTERGATE_BENCH_UPSTREAM": f"http://{HOST}:{upstream}/"}
    return start(name, cmd, port, workdir, cpus, env=env, timeout=timeout)


def start_proxypy(workdir: Path, upstream: int, cpus: Iterable[int] | None) -> Server:
    """proxy.py 2.x as a reverse proxy with one worker (its documented reverse-proxy
    route; keep-alive clients break it, so the scenario sends Connection: close)."""
    args = [
        "--num-workers",
        "1",
        "--num-acceptors",
        "1",
        "--enable-reverse-proxy",
        "--plugins",
        PROXYPY_PLUGIN,
    ]
    return _start_proxypy("proxypy", workdir, upstream, cpus, args)


def start_proxypy_keepalive(
    workdir: Path, upstream: int, cpus: Iterable[int] | None, timeout: float = 20.0
) -> Server:
    """proxy.py 2.x with one worker and the keep-alive relay plugin
    (``benchmarks/proxypy_keepalive.py``): keep-alive clients work."""
    args = [*PROXYPY_KEEPALIVE_ARGS, "--plugins", PROXYPY_KEEPALIVE_PLUGIN]
    return _start_proxypy("proxypy-keepalive", workdir, upstream, cpus, args, timeout)


def start_proxypy_parsed(
    workdir: Path, upstream: int, cpus: Iterable[int] | None, timeout: float = 20.0
) -> Server:
    """The keep-alive relay with every response parsed and rebuilt by proxy.py
    (``BenchKeepAliveParsed``): proxy.py parsing both heads, as the floor does."""
    args = [*PROXYPY_KEEPALIVE_ARGS, "--plugins", PROXYPY_PARSED_PLUGIN]
    return _start_proxypy("proxypy-parsed", workdir, upstream, cpus, args, timeout)


def start_redis(workdir: Path, cpus: Iterable[int] | None) -> Server:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    return start("redis", cmd, port, workdir, cpus)


def gateway_command() -> list[str]:
    venv = ROOT / ".venv" / "bin" / "filtergate"
    if venv.exists():
        return [str(venv)]
    return [sys.executable, "-m", "engine.cli"]


def gateway_available() -> str | None:
    """Why filtergate cannot run yet, or None when ``filtergate run`` should work."""
    if not (ROOT / "engine" / "cli.py").exists():
        return "engine/cli.py does not exist yet"
    return None


def start_gateway(
    workdir: Path,
    config: dict[str, Any],
    port: int,
    cpus: Iterable[int] | None,
    name: str = "filtergate",
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """Write ``config`` as gateway.toml and run ``filtergate run -c FILE`` (``command``
    in place of ``filtergate``, e.g. under valgrind)."""
    path = workdir / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    cmd = [*(command or gateway_command()), "run", "-c", str(path)]
    return start(name, cmd, port, workdir, cpus, env=env, timeout=timeout)
