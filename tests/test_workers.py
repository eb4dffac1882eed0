"""`filtergate run` as a process tree: workers, supervision, signals, reload of TLS."""

from __future__ import annotations

import os
import resource
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import tomli_w
import trio
import trustme

from engine.testing import Stubs, http_request, wait_listening
from engine.testing import free_port as _free_port

CLI = [sys.executable, "-m", "engine.cli"]


def _config(port: int, echo: str, admin_port: int | None = None, **server: Any) -> dict[str, Any]:
    admin = {"listen": f"127.0.0.1:{admin_port}"} if admin_port else {"enabled": False}
    return {
        "server": {"listen": [f"127.0.0.1:{port}"], **server},
        "admin": admin,
        "upstreams": {"echo": {"targets": [echo]}},
        "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
    }


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path


def _children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (from /proc: the workers of a gateway)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def _blocks(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


async def _until(predicate: Any) -> None:
    """Poll ``predicate`` (process state has no event to await); put it under a deadline."""
    while True:
        if predicate():
            return
        await trio.sleep(0.02)


async def _wait_gone(pid: int) -> None:
    """Return once process ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


@asynccontextmanager
async def _process(argv: list[str], log: Path) -> AsyncIterator[trio.Process]:
    """A process (stderr to ``log``) killed on the way out, with any worker it left."""
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(argv, stderr=err)
    try:
        yield proc
    finally:
        pids = _children(proc.pid)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        for pid in pids:  # never leave a worker behind, whatever the test did
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@asynccontextmanager
async def _gateway(
    config_path: Path, port: int, log: Path, workers: int = 1, *options: str
) -> AsyncIterator[trio.Process]:
    """A running `filtergate run` whose ``workers - 1`` worker processes are started."""
    async with _process([*CLI, *options, "run", "-c", str(config_path)], log) as proc:
        with trio.fail_after(20):
            await wait_listening(port, proc)
            await _until(lambda: len(_children(proc.pid)) == workers - 1)
        yield proc


async def _prefixes(port: int, want: int) -> set[str]:
    """Request-id prefixes (one per process) seen over new connections, until ``want``."""
    seen: set[str] = set()
    while len(seen) < want:
        r = await http_request(port, "GET", "/")
        assert r.status == 200
        rid = r.header("x-request-id")
        assert rid is not None
        seen.add(rid.split("-")[0])
    return seen


async def test_two_workers_with_the_admin_listener(stubs: Stubs, tmp_path: Path) -> None:
    port, admin = _free_port(), _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), admin, workers=2))
    with trio.fail_after(30):
        async with _gateway(cfg, port, tmp_path / "err.log", 2) as proc:
            (worker,) = _children(proc.pid)
            await _prefixes(port, 2)  # both processes answer
            assert (await http_request(admin, "GET", "/healthz")).status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    text = (tmp_path / "err.log").read_text()
    assert "Traceback" not in text
    for pid in (proc.pid, worker):  # each line says which process wrote it
        assert f"filtergate[{pid}]: filtergate serving on" in text


def _sample(metrics: str, series: str) -> float:
    """The value of one series of a /metrics text (0 when it is not there)."""
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


async def test_metrics_add_up_the_workers_and_outlive_a_dead_one(
    stubs: Stubs, tmp_path: Path
) -> None:
    """/metrics on the main process counts the requests every worker served, and a
    worker killed and respawned takes nothing back from the counters."""
    port, admin = _free_port(), _free_port()
    config = _config(port, stubs.target("echo"), admin, workers=2, drain_delay="2s")
    cfg = _write(tmp_path / "g.toml", config)
    ok = 'filtergate_responses_total{code="2xx"}'
    calls = 'filtergate_upstream_requests_total{upstream="echo",result="response"}'
    durations = 'filtergate_request_duration_seconds_count{route="echo",code="2xx"}'

    async def serve(n: int) -> set[str]:
        served_by = set()
        for _ in range(n):  # each on a new connection, which the kernel spreads
            r = await http_request(port, "GET", "/")
            assert r.status == 200
            served_by.add(str(r.header("x-request-id")).split("-")[0])
        return served_by

    async def scrape() -> str:
        r = await http_request(admin, "GET", "/metrics")
        assert r.status == 200
        return r.body.decode()

    with trio.fail_after(40):
        async with _gateway(cfg, port, tmp_path / "err.log", 2) as proc:
            await _prefixes(port, 2)  # both processes are serving
            before = _sample(await scrape(), ok)
            assert len(await serve(40)) == 2, "both processes served some"
            text = await scrape()
            assert _sample(text, ok) == before + 40
            assert _sample(text, calls) == before + 40
            assert _sample(text, durations) == before + 40

            (worker,) = _children(proc.pid)
            os.kill(worker, signal.SIGKILL)
            await _until(lambda: _children(proc.pid) - {worker})
            assert _sample(await scrape(), ok) == before + 40  # the dead one's count stays
            await _prefixes(port, 2)  # the respawned worker is serving
            before = _sample(await scrape(), ok)
            assert len(await serve(40)) == 2, "both processes served some"
            text = await scrape()
            assert _sample(text, ok) == before + 40
            assert _sample(text, durations) == before + 40

            # Draining (drain_delay): every process still serves, and still counts.
            proc.send_signal(signal.SIGTERM)
            before = _sample(await scrape(), ok)
            assert len(await serve(40)) == 2, "both processes served some"
            assert _sample(await scrape(), ok) == before + 40
            assert await proc.wait() == 0
    assert "Traceback" not in (tmp_path / "err.log").read_text()


async def test_the_log_level_reaches_the_workers(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=2))
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, 2, "--log-level", "warning") as proc:
            await _prefixes(port, 2)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert " INFO " not in log.read_text()


async def test_a_killed_worker_is_reaped_logged_and_respawned(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=2))
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, workers=2) as proc:
            (old,) = _children(proc.pid)
            os.kill(old, signal.SIGKILL)
            assert (await http_request(port, "GET", "/")).status == 200
            await _until(lambda: _children(proc.pid) - {old})
            await _prefixes(port, 2)  # the new worker serves
            assert f"pid {old}) exited with signal 9; respawning" in log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_workers_that_keep_dying_stop_the_gateway(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=2))
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, workers=2) as proc:
            # Every worker dies as soon as it appears (as under an OOM killer's loop).
            while proc.returncode is None:
                for pid in _children(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                await trio.sleep(0.02)
            assert await proc.wait() == 1
    assert "crash loop" in log.read_text()


async def test_a_respawned_worker_runs_the_config_of_the_main_process(
    stubs: Stubs, tmp_path: Path
) -> None:
    # The file is broken now (a refused reload, an editor mid-save): a worker started
    # again runs what the main process runs, instead of exiting 2 in a loop.
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=2))
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, workers=2) as proc:
            cfg.write_text("[server\n")
            for _ in range(3):
                (worker,) = _children(proc.pid)
                os.kill(worker, signal.SIGKILL)
                await _until(lambda w=worker: _children(proc.pid) - {w})
                await _prefixes(port, 2)  # the new worker serves
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert "crash loop" not in log.read_text()


async def test_workers_exit_when_the_parent_is_killed(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=3))
    with trio.fail_after(30):
        async with _gateway(cfg, port, tmp_path / "err.log", workers=3) as proc:
            workers = _children(proc.pid)
            proc.kill()
            for pid in workers:
                await _wait_gone(pid)


async def test_sighup_while_starting_is_queued_not_fatal(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=3))
    with trio.fail_after(30):
        async with _process([*CLI, "run", "-c", str(cfg)], tmp_path / "err.log") as proc:
            # Python's own start-up cannot be covered; from the moment `run` blocks the
            # signals (before loading the config), a SIGHUP must wait for the gateway.
            await _until(lambda: _blocks(proc.pid, signal.SIGHUP) or proc.returncode)
            proc.send_signal(signal.SIGHUP)
            await wait_listening(port, proc)
            # Forwarded to workers that are still starting: queued there too.
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: len(_children(proc.pid)) == 2)
            await _prefixes(port, 3)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_sighup_and_sigterm_while_starting_reload_nothing(
    stubs: Stubs, tmp_path: Path
) -> None:
    """Both queued at start-up: the log said "reload abandoned" and then
    "configuration reloaded", since a reload with nothing to wait for ran whole."""
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo")))
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _process([*CLI, "run", "-c", str(cfg)], log) as proc:
            await _until(lambda: _blocks(proc.pid, signal.SIGHUP) or proc.returncode)
            proc.send_signal(signal.SIGHUP)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    text = log.read_text()
    assert "reload abandoned" in text
    assert "configuration reloaded" not in text


async def test_a_second_signal_cuts_the_drain_short(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("slow"), workers=2))
    log = tmp_path / "err.log"

    async def slow_request() -> None:
        try:
            await http_request(port, "GET", "/?delay=30")
        except (ConnectionError, trio.BrokenResourceError, h11.RemoteProtocolError):
            pass  # cut off: that is the point

    started = 0
    for first, then in [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT)]:
        with trio.fail_after(20):
            async with _gateway(cfg, port, log, workers=2) as proc:
                workers = _children(proc.pid)
                async with trio.open_nursery() as nursery:
                    for _ in range(4):  # over new connections: both processes get some
                        nursery.start_soon(slow_request)
                    started += 4
                    await stubs.slow.wait_started(started)
                    # One at a time: pending signals are coalesced, and delivered by number.
                    proc.send_signal(first)
                    await _until(lambda: "draining" in log.read_text())
                    proc.send_signal(signal.SIGHUP)
                    await _until(lambda: "SIGHUP while draining: ignored" in log.read_text())
                    proc.send_signal(then)
                    assert await proc.wait() == 0
                    nursery.cancel_scope.cancel()
                for pid in workers:
                    await _wait_gone(pid)
        text = log.read_text()
        assert "Traceback" not in text
        assert "not waiting for requests in flight" in text


async def test_sighup_rotates_the_tls_certificate(stubs: Stubs, tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue() -> trustme.CA:
        ca = trustme.CA()
        cert = ca.issue_cert("gateway.test")
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return ca

    async def handshake(ca: trustme.CA) -> bool:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="gateway.test")
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return False
        finally:
            await tcp.aclose()
        return True

    port = _free_port()
    old_ca = issue()
    config = _config(port, stubs.target("echo"))
    config["server"]["tls"] = {"cert": str(cert_file), "key": str(key_file)}
    cfg = _write(tmp_path / "g.toml", config)
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log) as proc:
            assert await handshake(old_ca)
            new_ca = issue()
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: "configuration reloaded" in log.read_text())
            assert await handshake(new_ca)
            assert not await handshake(old_ca)
            key_file.write_text("not a key\n")  # refused: the new certificate keeps serving
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: "reload refused" in log.read_text())
            assert "server.tls.key:" in log.read_text()
            assert await handshake(new_ca)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


async def test_run_lifts_the_soft_descriptor_limit(stubs: Stubs, tmp_path: Path) -> None:
    # Every connection is a descriptor; a soft limit of 256 must not cap the gateway.
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo")))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    argv = ["sh", "-c", 'ulimit -Sn 256 && exec "$@"', "sh", *CLI, "run", "-c", str(cfg)]
    with trio.fail_after(30):
        async with _process(argv, tmp_path / "err.log") as proc:
            await wait_listening(port, proc)
            expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
            assert _soft_nofile(proc.pid) == expected > 256
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_a_worker_respawned_after_a_reload_binds_what_the_others_bound(
    stubs: Stubs, tmp_path: Path
) -> None:
    """server.listen and server.workers take effect at the next restart, not on a
    reload: a worker respawned after one that changed them got them anyway, and bound
    the new address (or, with workers 2 -> 1, bound without SO_REUSEPORT and failed in
    a loop that ended the gateway)."""
    port, other = _free_port(), _free_port()
    config = _config(port, stubs.target("echo"), workers=2)
    cfg = _write(tmp_path / "g.toml", config)
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, workers=2) as proc:
            _write(cfg, _config(other, stubs.target("echo"), workers=1))
            proc.send_signal(signal.SIGHUP)
            await _until(lambda: log.read_text().count("configuration reloaded") == 2)
            for _ in range(2):
                (worker,) = _children(proc.pid)
                os.kill(worker, signal.SIGKILL)
                await _until(lambda w=worker: _children(proc.pid) - {w})
                await _prefixes(port, 2)  # both processes serve the address they had
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", other)
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert "Address already in use" not in log.read_text()


async def test_a_worker_that_served_and_cannot_start_again_leaves_the_gateway_up(
    stubs: Stubs, tmp_path: Path
) -> None:
    """A worker killed (an OOM kill) whose respawns fail (the access log's directory
    was removed meanwhile): the other processes serve on, and the slot is tried again
    less and less often, where the gateway used to end as in a crash loop at start."""
    port = _free_port()
    config = _config(port, stubs.target("echo"), workers=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    config["access_log"] = {"path": str(logs / "access.log")}
    cfg = _write(tmp_path / "g.toml", config)
    log = tmp_path / "err.log"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log, workers=2) as proc:
            await _prefixes(port, 2)  # the worker serves
            for entry in logs.iterdir():
                entry.unlink()
            logs.rmdir()
            (worker,) = _children(proc.pid)
            os.kill(worker, signal.SIGKILL)
            await _until(lambda: log.read_text().count("exited with status 2") >= 5)
            assert proc.returncode is None
            assert (await http_request(port, "GET", "/")).status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert "crash loop" not in log.read_text()


async def test_sigterm_during_a_slow_reload_drains_at_once(stubs: Stubs, tmp_path: Path) -> None:
    """The reload waits on an identity provider that never answers (jwks_timeout 20 s):
    SIGTERM used to wait for it, /readyz still 200 meanwhile. It drains at once now,
    and the reload is abandoned."""
    port = _free_port()
    config = _config(port, stubs.target("echo"), shutdown_timeout="1s")
    cfg = _write(tmp_path / "g.toml", config)
    log = tmp_path / "err.log"
    silent = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]  # never accepts
    jwks = f"http://127.0.0.1:{silent.socket.getsockname()[1]}/jwks.json"
    with trio.fail_after(30):
        async with _gateway(cfg, port, log) as proc:
            config["plugins"] = {
                "jwt-auth": {
                    "issuers": [{"algorithms": ["RS256"], "jwks_url": jwks, "jwks_timeout": "20s"}]
                }
            }
            _write(cfg, config)
            proc.send_signal(signal.SIGHUP)
            await trio.sleep(0.5)  # the reload is waiting on the key set
            start = trio.current_time()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            assert trio.current_time() - start < 5
    await silent.aclose()
    text = log.read_text()
    assert "reload abandoned: the gateway is draining" in text
    assert "configuration reloaded" not in text


async def test_a_purge_reaches_every_worker(stubs: Stubs, tmp_path: Path) -> None:
    """``DELETE /cache`` on the main process's admin listener empties the cache of every
    process, each of which keeps its own."""
    port, admin = _free_port(), _free_port()
    config = _config(port, stubs.target("echo"), admin, workers=2)
    config["routes"][0]["plugins"] = {"cache": {"ttl": "1h"}}
    cfg = _write(tmp_path / "g.toml", config)

    async def until_each_says(status: str) -> dict[str, str]:
        """The cache status each process gave on its first answer seen, over new
        connections, until both were seen saying ``status`` at least once."""
        first: dict[str, str] = {}
        said: set[str] = set()
        while len(said) < 2:
            r = await http_request(port, "GET", "/cached")
            assert r.status == 200
            process = str(r.header("x-request-id")).split("-")[0]
            first.setdefault(process, str(r.header("x-cache-status")))
            if r.header("x-cache-status") == status:
                said.add(process)
        return first

    with trio.fail_after(40):
        async with _gateway(cfg, port, tmp_path / "err.log", 2):
            await until_each_says("HIT")  # both processes hold the answer
            purged = await http_request(admin, "DELETE", "/cache?route=echo&target=/cached")
            after = await until_each_says("HIT")
    assert purged.status == 200
    assert purged.json() == {"purged": 2, "processes": 2, "processes_not_answering": 0}
    assert after == {process: "MISS" for process in after}, "each process fetched it again"
    assert "Traceback" not in (tmp_path / "err.log").read_text()


async def test_purges_to_a_stopped_worker_reach_it_once_it_runs_again(
    stubs: Stubs, tmp_path: Path
) -> None:
    """More purges than a socket buffer holds, while a worker is stopped: each comes
    back within its second, and the worker carries out every one when it runs again;
    its channel stays open (a later purge and /metrics still reach it)."""
    port, admin = _free_port(), _free_port()
    config = _config(port, stubs.target("echo"), admin, workers=2)
    config["routes"][0]["plugins"] = {"cache": {"ttl": "1h"}}
    cfg = _write(tmp_path / "g.toml", config)
    with trio.fail_after(40):
        async with _gateway(cfg, port, tmp_path / "err.log", 2) as proc:
            (worker,) = _children(proc.pid)
            await _prefixes(port, 2)
            os.kill(worker, signal.SIGSTOP)
            try:
                silent: list[int] = []

                async def purge(i: int) -> None:
                    r = await http_request(admin, "DELETE", f"/cache?target=/t{i}")
                    silent.append(r.json()["processes_not_answering"])

                async with trio.open_nursery() as nursery:
                    for i in range(400):
                        nursery.start_soon(purge, i)
            finally:
                os.kill(worker, signal.SIGCONT)
            last = await http_request(admin, "DELETE", "/cache")
    assert silent == [1] * 400
    # Each process had stored "/" (the requests that found them both): both dropped it.
    assert last.json() == {"purged": 2, "processes": 2, "processes_not_answering": 0}
    assert "channel is closed" not in (tmp_path / "err.log").read_text()
