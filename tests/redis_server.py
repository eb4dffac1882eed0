"""A private ``redis-server`` for tests: a free port on 127.0.0.1, a temp dir, no disk.

::

    async with open_redis_server() as redis:
        redis.url          # "redis://127.0.0.1:PORT/0"
        await redis.stop() # and later: await redis.start() (same port, empty data)

    async with open_redis_server(tls=trustme.CA()) as redis:
        redis.url          # "rediss://127.0.0.1:PORT/0": TLS only, a cert of that CA

A missing ``redis-server`` fails the test (``make test`` installs it): a skipped Redis
test would hide that the shared store is untested.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme

from engine.testing import free_port as _free_port

__all__ = ["RedisServer", "open_redis_server"]


class RedisServer:
    """One redis-server process that can be stopped and started again on its port."""

    def __init__(
        self,
        binary: str,
        directory: str,
        password: str | None,
        tls: trustme.CA | None = None,
        client_certs: bool = False,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self.process: trio.Process | None = None
        self.tls_args: list[str] = []
        if tls is not None:
            cert = tls.issue_cert("127.0.0.1", "localhost")
            paths = {n: f"{directory}/{n}.pem" for n in ("cert", "key", "ca")}
            cert.cert_chain_pems[0].write_to_path(paths["cert"])
            cert.private_key_pem.write_to_path(paths["key"])
            tls.cert_pem.write_to_path(paths["ca"])
            self.tls_args = [
                "--tls-cert-file", paths["cert"],
                "--tls-key-file", paths["key"],
                "--tls-ca-cert-file", paths["ca"],
                "--tls-auth-clients", "yes" if client_certs else "no",
            ]  # fmt: skip

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls_args else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start the server and wait until it accepts connections (within 10 s)."""
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls_args else []
        args = [
            self.binary,
            *(ports or ["--port", str(self.port)]),
            *self.tls_args,
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = await trio.lowlevel.open_process(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return

    async def stop(self) -> None:
        """Stop the server (its data is lost: it never saves)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
            return
        process.kill()
        await process.wait()


@asynccontextmanager
async def open_redis_server(
    password: str | None = None, tls: trustme.CA | None = None, client_certs: bool = False
) -> AsyncIterator[RedisServer]:
    """A running private redis-server, stopped on exit; with ``tls``, it speaks TLS only,
    with a certificate for 127.0.0.1 issued by that CA, and with ``client_certs`` it
    also asks clients for a certificate of that CA (redis-server's own default)."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if binary is None:
        pytest.fail("redis-server is not installed (`make test` installs it)")
    with tempfile.TemporaryDirectory(prefix="filtergate-redis-") as directory:
        server = RedisServer(binary, directory, password, tls, client_certs)
        await server.start()
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()
