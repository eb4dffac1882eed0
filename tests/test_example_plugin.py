"""examples/filtergate-header-stamp, installed with pip and used as a user would.

The example is a separate distribution. It is built from a copy of its source (so no
``build/`` or ``*.egg-info`` is left in the work tree) and installed with pip into a
temporary ``--target`` directory, offline (``--no-deps --no-build-isolation --no-index``).
Subprocesses of ``filtergate`` get that directory on ``PYTHONPATH`` and must find the
plugin through its ``filtergate`` entry point: nothing registers it by hand. The virtual
environment itself is left untouched, so parallel workers (pytest-xdist) each install
their own copy without interfering.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio

from engine.testing import free_port as _free_port
from engine.testing import http_request, open_stubs
from engine.testing import wait_listening as _wait_for

pytestmark = pytest.mark.xdist_group("example-plugin")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "filtergate-header-stamp"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Installed:
    source: Path  # the copy that was built
    target: Path  # pip's --target: the package and its .dist-info

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.target)}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "src"
    shutil.copytree(
        EXAMPLE,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    target = root / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(
            "pip could not build the example plugin offline; the dev environment needs "
            "setuptools and wheel (or setuptools>=70.1):\n" + result.stderr
        )
    yield Installed(source, target)
    shutil.rmtree(root, ignore_errors=True)


def filtergate(installed: Installed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "filtergate"), "--log-level", "warning", *args],
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_pip_installed_it_with_its_entry_point(installed: Installed) -> None:
    (info,) = installed.target.glob("filtergate_header_stamp-1.0.0.dist-info")
    entry_points = (info / "entry_points.txt").read_text()
    assert "[filtergate]" in entry_points
    assert "header-stamp = filtergate_header_stamp" in entry_points
    assert (installed.target / "filtergate_header_stamp" / "__init__.py").exists()


def test_listed_by_filtergate_plugins(installed: Installed) -> None:
    result = filtergate(installed, "plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("header-stamp  [transform]  from filtergate-header-stamp 1.0.0")
    listing = lines[start + 1 : start + 6]
    assert (
        listing[0] == "    Stamp a configurable header on upstream requests and client responses."
    )
    keys = [line.split(":")[0].strip() for line in listing[1:]]
    assert keys == ["value", "request_header", "response_header", "count_header"]
    assert "value: a string = (required)" in listing[1]


def _config(port: int, echo: str, **stamp: Any) -> dict[str, Any]:
    return {
        "server": {"listen": [f"127.0.0.1:{port}"]},
        "admin": {"enabled": False},
        "upstreams": {"echo": {"targets": [echo]}},
        "routes": [
            {"name": "echo", "prefix": "/", "upstream": "echo"},
            {
                "name": "quiet",
                "prefix": "/quiet",
                "upstream": "echo",
                "plugins": {"header-stamp": {"enabled": False}},
            },
        ],
        "plugins": {"header-stamp": {"value": "edge {route}", **stamp}},
    }


def test_configured_from_gateway_toml_and_checked(installed: Installed, tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    file.write_text(tomli_w.dumps(_config(8080, "127.0.0.1:9")))
    result = filtergate(installed, "check", "-c", str(file))
    assert result.returncode == 0, result.stderr
    chains = [line.strip() for line in result.stdout.splitlines() if "chain:" in line]
    assert chains == ["chain: header-stamp [transform]", "chain: (no filters)"]

    # Its own config validation, with the full key path, before anything serves.
    file.write_text(tomli_w.dumps(_config(8080, "127.0.0.1:9", response_header="X Bad")))
    result = filtergate(installed, "check", "-c", str(file))
    assert result.returncode == 2
    assert "plugins.header-stamp.response_header: expected a lower-case header" in result.stderr

    # Blocked by its entry-point name, it is unknown.
    config = _config(8080, "127.0.0.1:9")
    config["discovery"] = {"blocked": ["header-stamp"]}
    file.write_text(tomli_w.dumps(config))
    result = filtergate(installed, "check", "-c", str(file))
    assert result.returncode == 2
    assert "plugins.header-stamp: no filter type named 'header-stamp'" in result.stderr


async def test_running_in_the_chain_of_a_running_gateway(
    installed: Installed, tmp_path: Path
) -> None:
    file = tmp_path / "gateway.toml"
    log = tmp_path / "gateway.log"
    port = _free_port()
    with trio.fail_after(20):
        async with open_stubs(names=["echo"]) as stubs:
            config = _config(port, stubs.target("echo"), count_header="x-stamp-count")
            file.write_text(tomli_w.dumps(config))
            with log.open("wb") as log_file:
                process = await trio.lowlevel.open_process(
                    [str(BIN / "filtergate"), "run", "-c", str(file)],
                    env=installed.env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            try:
                await _wait_for(port, process)
                resp = await http_request(port, "GET", "/hello")
                assert resp.status == 200, log.read_text()
                assert resp.header("x-stamp") == "edge echo"
                assert resp.json()["headers"]["x-stamp"] == "edge echo"  # request side
                assert resp.header("x-stamp-count") == "1"
                resp = await http_request(port, "GET", "/quiet")
                assert resp.header("x-stamp") is None  # enabled = false on this route

                # SIGHUP with an unchanged plugin config: the instance and its count stay.
                config["routes"].append({"name": "new", "prefix": "/new", "upstream": "echo"})
                file.write_text(tomli_w.dumps(config))
                process.send_signal(signal.SIGHUP)
                stamped = 1
                while True:  # until the new config serves; "/new" hits route "echo" before
                    resp = await http_request(port, "GET", "/new")
                    stamped += 1
                    assert resp.header("x-stamp-count") == str(stamped)
                    if resp.header("x-stamp") == "edge new":
                        break
                    await trio.sleep(0.05)
            finally:
                process.terminate()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def test_its_own_test_suite_passes(installed: Installed) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=installed.source,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
