"""The filtergate command: check, init, plugins, run with signals, workers, TLS."""

from __future__ import annotations

import copy
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio
import trustme

from engine.config import load
from engine.testing import Stubs, http_request, open_gateway, wait_listening
from engine.testing import free_port as _free_port

CLI = [sys.executable, "-m", "engine.cli"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(config))
    return path


def _config(port: int, echo: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"listen": [f"127.0.0.1:{port}"], **server},
        "admin": {"enabled": False},
        "upstreams": {"echo": {"targets": [echo]}},
        "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
    }


def test_check_accepts_the_default_config() -> None:
    r = _run("check", "-c", "gateway.toml")
    assert r.returncode == 0, r.stderr
    assert "route users:" in r.stdout
    assert "chain:" in r.stdout
    assert "  route echo: ANY */echo* -> echo (upgrades: websocket)" in r.stdout.splitlines()


def test_check_shows_the_access_log(tmp_path: Path) -> None:
    config = _config(_free_port(), "127.0.0.1:1")
    config["access_log"] = {"path": str(tmp_path / "access.log"), "format": "combined"}
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 0, r.stderr
    assert f"access log: {tmp_path / 'access.log'} (combined)" in r.stdout
    assert not (tmp_path / "access.log").exists()  # checking opens nothing


def test_check_shows_what_each_route_overrides_and_turns_off(tmp_path: Path) -> None:
    config = _config(_free_port(), "127.0.0.1:1")
    config["plugins"] = {"retry": {"attempts": 3}, "circuit-breaker": {}}
    config["routes"] = [
        {"name": "plain", "prefix": "/a", "upstream": "echo"},
        {
            "name": "tuned",
            "prefix": "/b",
            "upstream": "echo",
            "plugins": {
                "retry": {"attempts": 1, "methods": ["GET"]},
                "circuit-breaker": {"enabled": False},
            },
        },
    ]
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 0, r.stderr
    plain, tuned = r.stdout.split("route tuned:")
    assert "retry [edge] -> circuit-breaker [limit]\n" in plain
    assert "turned off" not in plain
    assert "retry [edge] (this route sets attempts, methods)\n" in tuned
    assert "turned off here: circuit-breaker" in tuned


def test_check_warns_of_skip_if_authenticated_that_never_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the first auth plugin of a chain, skip_if_authenticated can never apply (the
    route then needs both credentials): check says so, and so does the log at load."""
    config = _config(_free_port(), "127.0.0.1:1")
    jwt = {"issuers": [{"algorithms": ["HS256"], "secret": "0123456789abcdef" * 2}]}
    keys = {"consumers": [{"id": "app", "key_sha256": "0" * 64}]}
    config["routes"] = [
        {
            "name": "misordered",
            "prefix": "/a",
            "upstream": "echo",
            "plugins": {
                "key-auth": {**keys, "skip_if_authenticated": True},
                "jwt-auth": {**jwt, "allow_anonymous": True},
            },
        },
        {
            "name": "either",
            "prefix": "/b",
            "upstream": "echo",
            "plugins": {
                "jwt-auth": {**jwt, "allow_anonymous": True},
                "key-auth": {**keys, "skip_if_authenticated": True},
            },
        },
    ]
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 0, r.stderr
    misordered, either = r.stdout.split("route either:")
    assert (
        "warning: key-auth: skip_if_authenticated never applies, no authentication runs "
        "before it" in misordered
    )
    assert "warning" not in either
    from engine.app import Gateway

    caplog.set_level(logging.WARNING, logger="filtergate")
    Gateway(load(config))
    assert [r.getMessage()[:48] for r in caplog.records] == [
        "route misordered: key-auth: skip_if_authenticate"
    ]


def test_check_names_the_key_path_and_exits_2(tmp_path: Path) -> None:
    bad = {
        "upstreams": {"orders": {"targets": ["127.0.0.1:1"]}},
        "routes": [{"prefix": "/a", "upstream": "orders"}, {"prefix": "/b", "upstream": "ordrs"}],
    }
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", bad)))
    assert r.returncode == 2
    assert 'routes[1].upstream: no upstream named "ordrs"' in r.stderr.replace("'", '"')
    cases: dict[str, dict[str, Any]] = {
        "server.head_timeout": {"server": {"head_timeout": "soon"}},
        "server.bogus": {"server": {"bogus": 1}},
        "upstreams.u.targets[0]": {"upstreams": {"u": {"targets": ["no-port"]}}},
        "access_log.path": {"access_log": {"path": str(tmp_path / "none" / "access.log")}},
    }
    for path, config in cases.items():
        r = _run("check", "-c", str(_write(tmp_path / "c.toml", config)))
        assert r.returncode == 2, path
        assert f"{path}:" in r.stderr, r.stderr


def test_check_reports_invalid_toml_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten = 1")
    r = _run("check", "-c", str(broken))
    assert r.returncode == 2
    assert "not valid TOML" in r.stderr
    assert _run("check", "-c", str(tmp_path / "missing.toml")).returncode == 2


def test_init_writes_a_config_that_checks(tmp_path: Path) -> None:
    r = _run("init", str(tmp_path / "new.toml"))
    assert r.returncode == 0
    assert _run("check", "-c", str(tmp_path / "new.toml")).returncode == 0
    assert _run("init", str(tmp_path / "new.toml")).returncode == 1  # never overwrites


def test_the_starter_config_takes_routes_added_as_the_readme_writes_them(
    tmp_path: Path,
) -> None:
    """init wrote routes = [{...}] inline, which TOML cannot extend with [[routes]]."""
    path = tmp_path / "new.toml"
    assert _run("init", str(path)).returncode == 0
    with path.open("a") as f:
        f.write(
            '\n[[routes]]\nname = "users"\nprefix = "/users"\nupstream = "echo"\n'
            '[routes.plugins.rate-limit]\nlimits = [{ limit = 5, window = "1s" }]\n'
        )
    r = _run("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert "2 routes" in r.stdout


def test_log_level_and_version(tmp_path: Path) -> None:
    """A misspelled level was taken as info without a word."""
    bad = _run("--log-level", "verbose", "check")
    assert bad.returncode == 2
    assert "invalid choice: 'verbose'" in bad.stderr
    env_bad = subprocess.run(
        [*CLI, "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FILTERGATE_LOG": "loud"},
        check=False,
    )
    assert env_bad.returncode == 2
    assert "FILTERGATE_LOG='loud'" in env_bad.stderr
    version = _run("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("filtergate ")


def test_a_missing_or_broken_file_is_named_once(tmp_path: Path) -> None:
    missing = _run("check", "-c", str(tmp_path / "gone.toml"))
    assert missing.returncode == 2
    assert missing.stderr.count("gone.toml") == 1
    assert "filtergate init" in missing.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    r = _run("check", "-c", str(broken))
    assert r.stderr.count("broken.toml") == 1


def test_help_lists_every_verb() -> None:
    out = _run("--help").stdout
    for verb in ("run", "check", "init", "plugins", "stubs", "hash-key"):
        assert verb in out


@asynccontextmanager
async def _gateway_process(
    config_path: Path, port: int, log: Path | None = None
) -> AsyncIterator[trio.Process]:
    """``filtergate run`` on ``config_path``, its stderr in ``log`` when given."""
    argv = [*CLI, "run", "-c", str(config_path)]
    if log is None:
        proc = await trio.lowlevel.open_process(argv)
    else:
        with log.open("wb") as err:
            proc = await trio.lowlevel.open_process(argv, stderr=err)
    try:
        with trio.fail_after(20):
            await wait_listening(port, proc)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigterm_lets_the_request_in_flight_finish(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("slow")))
    with trio.fail_after(40):
        async with _gateway_process(cfg, port) as proc:
            results: list[int] = []

            async def slow_request() -> None:
                results.append((await http_request(port, "GET", "/?delay=1")).status)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_request)
                await stubs.slow.wait_started(1)
                proc.send_signal(signal.SIGTERM)
            assert results == [200]
            assert await proc.wait() == 0


async def test_sighup_reloads_and_refuses_a_bad_config(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    config = _config(port, stubs.target("echo"))
    cfg = _write(tmp_path / "g.toml", config)
    with trio.fail_after(40):
        log = tmp_path / "err.log"
        async with _gateway_process(cfg, port, log) as proc:
            assert (await http_request(port, "GET", "/new")).status == 200
            config["routes"].append(
                {"name": "gone", "path": "/gone", "methods": ["GET"], "upstream": "echo"}
            )
            config["routes"][0]["methods"] = ["POST"]
            _write(cfg, config)
            proc.send_signal(signal.SIGHUP)
            for _ in range(200):
                if (await http_request(port, "GET", "/new")).status == 405:
                    break
                await trio.sleep(0.05)
            assert (await http_request(port, "GET", "/new")).status == 405
            cfg.write_text("[server\n")  # broken: refused, the last good config serves
            proc.send_signal(signal.SIGHUP)
            for _ in range(400):  # until the signal was acted on (a log file: no event)
                if "reload refused" in log.read_text():
                    break
                await trio.sleep(0.05)
            assert "reload refused" in log.read_text()
            assert (await http_request(port, "GET", "/gone")).status == 200
            assert proc.returncode is None


async def test_two_workers_share_the_port(stubs: Stubs, tmp_path: Path) -> None:
    port = _free_port()
    cfg = _write(tmp_path / "g.toml", _config(port, stubs.target("echo"), workers=2))
    with trio.fail_after(40):
        async with _gateway_process(cfg, port) as proc:
            ids = set()
            for _ in range(40):
                r = await http_request(port, "GET", "/")
                assert r.status == 200
                rid = r.header("x-request-id")
                assert rid is not None
                ids.add(rid.split("-")[0])  # the per-process prefix
                if len(ids) == 2:
                    break
                await trio.sleep(0.05)
            assert len(ids) == 2, "both worker processes answered"
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0


async def test_tls_termination(stubs: Stubs, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("gateway.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = {
        "server": {"tls": {"cert": str(cert_file), "key": str(key_file)}},
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
    }
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(20):
        async with open_gateway(config) as gw:
            tcp = await trio.open_tcp_stream("127.0.0.1", gw.port)
            stream = trio.SSLStream(tcp, client_ctx, server_hostname="gateway.test")
            await stream.send_all(
                b"GET /tls HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b'"x-forwarded-proto":"https"' in data
            await stream.aclose()


def test_make_run_uses_only_files_in_the_repo() -> None:
    makefile = Path("Makefile").read_text()
    assert "filtergate stubs" in makefile
    assert "filtergate run -c $(CONFIG)" in makefile
    assert os.access(".ci/run", os.X_OK)


def test_stubs_takes_its_options_through_the_command() -> None:
    r = _run("stubs", "--help")
    assert r.returncode == 0, r.stderr
    assert "--base-port" in r.stdout
    assert "--host" in r.stdout
    r = _run("check", "--base-port", "1")
    assert r.returncode == 2
    assert "unrecognized arguments: --base-port 1" in r.stderr


async def test_stubs_serve_on_the_base_port() -> None:
    # Base port 0 picks free ports (six fixed ones could collide with parallel tests);
    # the options reaching engine.stubs is what is tested here.
    argv = [*CLI, "stubs", "--host", "127.0.0.1", "--base-port", "0"]
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            out = b""
            while b"stub users" not in out or not out.endswith(b"\n"):
                out += await proc.stdout.receive_some(4096)
            line = next(x for x in out.decode().splitlines() if x.startswith("stub users"))
            port = int(line.rsplit(":", 1)[1])
            assert (await http_request(port, "GET", "/users/1")).status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("gateway.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def test_check_and_run_refuse_bad_tls_files_alike(tmp_path: Path) -> None:
    cert_file, key_file = _tls_files(tmp_path)
    cases = {
        "server.tls.key:": (cert_file, tmp_path / "missing.pem"),
        "server.tls.cert:": (tmp_path / "missing.pem", key_file),
    }
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key\n")
    cases["server.tls.key: "] = (cert_file, bad_key)
    for path, (cert, key) in cases.items():
        config = _config(_free_port(), "127.0.0.1:1")
        config["server"]["tls"] = {"cert": str(cert), "key": str(key)}
        cfg = _write(tmp_path / "g.toml", config)
        for verb in ("check", "run"):
            r = _run(verb, "-c", str(cfg))
            assert r.returncode == 2, (verb, r.stderr)
            assert path in r.stderr, (verb, r.stderr)
            assert "Traceback" not in r.stderr


def test_listeners_that_cannot_work_are_named_in_one_line(tmp_path: Path) -> None:
    port = _free_port()
    config = _config(port, "127.0.0.1:1")
    config["admin"] = {"listen": f"127.0.0.1:{port}"}
    cfg = _write(tmp_path / "g.toml", config)
    for verb in ("check", "run"):  # the same address twice: a config error, exit 2
        r = _run(verb, "-c", str(cfg))
        assert r.returncode == 2, r.stderr
        assert f"admin.listen: 127.0.0.1:{port} is server.listen[0]" in r.stderr
    # Also by another name of the address, or one serving address listed twice (which
    # binds with several workers, SO_REUSEPORT, and not with one): `check` said ok.
    config["admin"] = {"listen": f"localhost:{port}"}
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 2, r.stderr
    assert f"admin.listen: localhost:{port} is server.listen[0]" in r.stderr
    config["admin"] = {"enabled": False}
    config["server"]["listen"] = [f"127.0.0.1:{port}", f"0.0.0.0:{port}"]
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 2, r.stderr
    assert f"server.listen[1]: 0.0.0.0:{port} is server.listen[0]" in r.stderr
    # One address however it is written.
    config["server"]["listen"] = [f"127.0.0.1:{port}", f"127.1:{port}"]
    r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
    assert r.returncode == 2, r.stderr
    assert f"server.listen[1]: 127.1:{port} is server.listen[0]" in r.stderr
    # Each family apart (IPv6 listeners are IPv6-only): dual stack is fine (checked only,
    # never bound here).
    for pair in ([f"0.0.0.0:{port}", f"[::]:{port}"], [f"localhost:{port}", f"[::1]:{port}"]):
        config["server"]["listen"] = pair
        r = _run("check", "-c", str(_write(tmp_path / "g.toml", config)))
        assert r.returncode == 0, (pair, r.stderr)
    # Valid, but not an address of this host: `check` passes, `run` cannot bind (exit 1).
    config = _config(port, "127.0.0.1:1")
    config["server"]["listen"] = ["192.0.2.1:8080"]  # TEST-NET-1
    cfg = _write(tmp_path / "g.toml", config)
    assert _run("check", "-c", str(cfg)).returncode == 0
    r = _run("run", "-c", str(cfg))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"filtergate: {cfg}: server.listen[0]: cannot listen on 192.0.2.1:8080: "
        "Cannot assign requested address"
    ]


async def test_the_admin_listener_answers_head_and_refuses_other_methods() -> None:
    config = {"upstreams": {"u": {"targets": ["127.0.0.1:1"]}}, "routes": []}
    with trio.fail_after(10):
        async with open_gateway(config) as gw:
            assert gw.admin_port is not None
            ok = await http_request(gw.admin_port, "GET", "/healthz")
            assert (ok.status, ok.reason, ok.body) == (200, b"OK", b"ok\n")
            head = await http_request(gw.admin_port, "HEAD", "/healthz")
            assert (head.status, head.reason, head.body) == (200, b"OK", b"")
            assert head.header("content-length") == "3"
            missing = await http_request(gw.admin_port, "HEAD", "/nope")
            assert (missing.status, missing.reason) == (404, b"Not Found")
            for method in ("POST", "DELETE"):
                r = await http_request(gw.admin_port, method, "/healthz", body=b"")
                assert (r.status, r.reason) == (405, b"Method Not Allowed")
                assert r.header("allow") == "GET, HEAD"


async def test_reload_names_what_only_a_restart_applies(caplog: pytest.LogCaptureFixture) -> None:
    config = {"upstreams": {"u": {"targets": ["127.0.0.1:1"]}}, "routes": []}
    with trio.fail_after(10):
        async with open_gateway(config) as gw:
            changed = copy.deepcopy(config) | {
                "server": {"listen": ["127.0.0.1:0", "127.0.0.1:1"], "workers": 2},
                "admin": {"listen": "127.0.0.1:1"},
            }
            caplog.set_level(logging.WARNING, logger="filtergate")
            await gw.gateway.reload(load(changed))
            warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            for key in ("server.listen", "server.workers", "admin.listen"):
                assert (
                    f"{key} changed: it takes effect at the next restart, not on reload" in warned
                )
            # Put back to what is running: nothing to restart for, so no word (it said
            # "changed" again, comparing with the last file rather than what is bound).
            caplog.clear()
            await gw.gateway.reload(gw.gateway._started)
            assert not [r for r in caplog.records if "next restart" in r.getMessage()]


def test_init_where_it_cannot_write_says_so(tmp_path: Path) -> None:
    r = _run("init", str(tmp_path / "no" / "such" / "gateway.toml"))
    assert r.returncode == 1
    assert "cannot write" in r.stderr
    assert "Traceback" not in r.stderr
