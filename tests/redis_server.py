"""A private ``redis-server`` for tests: a free port on 127.0.0.1, a temp dir, no disk.

::

    async with open_redis_server() as redis:
        redis.url          # "redis://127.0.0.1:PORT/0"
        await redis.stop() # and later: await redis.start() (same port, empty data)

    async with open_redis_server(tls=trustme.CA()) as redis:
        redis.url          # "rediss://127.0.0.1:PORT/0": TLS only, a cert of that CA

    async with open_sentinel_group("fg") as group:
        group.master, group.replica, group.sentinel   # RedisServer each
        await group.failover()                         # the replica is the master now

    async with open_redis_cluster(3) as cluster:
        cluster.nodes                  # RedisServer each, slots split evenly, no replicas
        cluster.url                    # the first node's: "redis://127.0.0.1:PORT/0"

A missing ``redis-server`` fails the test (``make test`` installs it): a skipped Redis
test would hide that the shared store is untested.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trustme

from engine.testing import free_port as _free_port
from plugins.rate_limit.redis import RedisAddress, RedisPool, RedisReplyError

__all__ = [
    "RedisCluster",
    "RedisServer",
    "SentinelGroup",
    "open_redis_cluster",
    "open_redis_server",
    "open_sentinel_group",
]


class RedisServer:
    """One redis-server process that can be stopped and started again on its port."""

    def __init__(
        self,
        binary: str,
        directory: str,
        password: str | None,
        tls: trustme.CA | None = None,
        client_certs: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self.args = list(args)
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
            *self.args,
            *(ports or ["--port", str(self.port)]),
            *self.tls_args,
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
            *_NO_SHUTDOWN_WAIT,
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


def _no_shutdown_wait() -> list[str]:
    """From Redis 7, a master waits up to 10 s on SIGTERM for its replicas to catch up
    (``shutdown-timeout``); a test's servers are thrown away, so they do not wait."""
    binary = shutil.which("redis-server")
    if binary is None:
        return []
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    version = re.search(r"v=(\d+)\.", out.stdout)
    return ["--shutdown-timeout", "0"] if version and int(version.group(1)) >= 7 else []


_NO_SHUTDOWN_WAIT = _no_shutdown_wait()


def _binary() -> str:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin")
    if binary is None:
        pytest.fail("redis-server is not installed (`make test` installs it)")
    return binary


@asynccontextmanager
async def open_redis_server(
    password: str | None = None,
    tls: trustme.CA | None = None,
    client_certs: bool = False,
    args: Sequence[str] = (),
) -> AsyncIterator[RedisServer]:
    """A running private redis-server, stopped on exit; with ``tls``, it speaks TLS only,
    with a certificate for 127.0.0.1 issued by that CA, and with ``client_certs`` it
    also asks clients for a certificate of that CA (redis-server's own default).
    ``args`` go to redis-server first (e.g. ``--replicaof``)."""
    binary = _binary()
    with tempfile.TemporaryDirectory(prefix="filtergate-redis-") as directory:
        server = RedisServer(binary, directory, password, tls, client_certs, args)
        await server.start()
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()


async def command(port: int, *args: str | int) -> Any:
    """One command to 127.0.0.1:``port`` on a connection of its own; an error reply
    raises :class:`~plugins.rate_limit.redis.RedisReplyError`."""
    pool = RedisPool(RedisAddress("127.0.0.1", port, 0), timeout=5.0, pool_size=1)
    try:
        return await pool.execute(*args)
    finally:
        await pool.aclose()


async def _replication(port: int, field: str) -> int:
    info = (await command(port, "INFO", "replication")).decode()
    match = re.search(rf"^{field}:(\d+)", info, re.MULTILINE)
    return int(match.group(1)) if match else -1


class SentinelGroup:
    """A master, its replica and one sentinel watching them as ``name`` (quorum 1)."""

    def __init__(
        self, name: str, master: RedisServer, replica: RedisServer, sentinel: RedisServer
    ) -> None:
        self.name = name
        self.master = master
        self.replica = replica
        self.sentinel = sentinel

    async def master_port(self) -> int:
        reply = await command(self.sentinel.port, "SENTINEL", "get-master-addr-by-name", self.name)
        return int(reply[1])

    async def wait_replica_known(self) -> None:
        """Until the sentinel has seen the replica in sync: a failover needs one."""
        while True:
            replicas = await command(self.sentinel.port, "SENTINEL", "REPLICAS", self.name)
            for flat in replicas:
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                if fields.get(b"flags") == b"slave" and fields.get(b"master-link-status") == b"ok":
                    return
            await trio.sleep(0.05)

    async def wait_replicated(self) -> None:
        """Until the replica has everything the master has. (``WAIT`` would not do: it
        waits for what the connection it is sent on wrote.)"""
        while True:
            master = await _replication(self.master.port, "master_repl_offset")
            if await _replication(self.replica.port, "slave_repl_offset") >= master:
                return
            await trio.sleep(0.02)

    async def failover(self) -> None:
        """Make the replica the master (``SENTINEL FAILOVER``), and wait until the
        sentinel names it. The old master is made a replica about 10 s later."""
        old = await self.master_port()
        while True:
            try:
                await command(self.sentinel.port, "SENTINEL", "FAILOVER", self.name)
                break
            except RedisReplyError as e:  # NOGOODSLAVE, INPROG: the sentinel is not ready
                if "NOGOODSLAVE" not in str(e) and "INPROG" not in str(e):
                    raise
                await trio.sleep(0.1)
        while True:
            if await self.master_port() != old:
                return
            await trio.sleep(0.05)


@asynccontextmanager
async def open_sentinel_group(name: str) -> AsyncIterator[SentinelGroup]:
    """A master, a replica of it and a sentinel monitoring them as ``name``, all on
    127.0.0.1; waits (within 10 s) until the sentinel knows the replica."""
    async with open_redis_server() as master:
        replica_of = ["--replicaof", "127.0.0.1", str(master.port)]
        async with open_redis_server(args=replica_of) as replica:
            with tempfile.TemporaryDirectory(prefix="filtergate-sentinel-") as directory:
                conf = f"{directory}/sentinel.conf"  # the sentinel rewrites it
                await trio.Path(conf).write_text(
                    f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {name} 1000\n"
                    f"sentinel failover-timeout {name} 3000\n"
                    # Known at once: found through the master's INFO, it takes seconds.
                    f"sentinel known-replica {name} 127.0.0.1 {replica.port}\n"
                )
                sentinel = RedisServer(_binary(), directory, None, args=[conf, "--sentinel"])
                await sentinel.start()
                try:
                    group = SentinelGroup(name, master, replica, sentinel)
                    with trio.fail_after(10):
                        await group.wait_replica_known()
                    yield group
                finally:
                    with trio.CancelScope(shield=True):
                        await sentinel.stop()


class RedisCluster:
    """Masters of a Redis Cluster on 127.0.0.1, the slots split evenly between them."""

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return self.nodes[0].url

    async def node_id(self, node: RedisServer) -> str:
        return (await command(node.port, "CLUSTER", "MYID")).decode()  # type: ignore[no-any-return]

    async def owner(self, slot: int) -> RedisServer:
        """The node serving ``slot``, as the first node sees it."""
        for entry in await command(self.nodes[0].port, "CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                port = int(entry[2][1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(slot)

    async def wait_ok(self) -> None:
        """Until every node sees every other and the whole slot range served."""
        for node in self.nodes:
            while True:
                info = (await command(node.port, "CLUSTER", "INFO")).decode()
                if "cluster_state:ok" in info and (
                    f"cluster_known_nodes:{len(self.nodes)}" in info
                ):
                    break
                await trio.sleep(0.05)


@asynccontextmanager
async def open_redis_cluster(
    size: int = 3, args: Sequence[str] = ()
) -> AsyncIterator[RedisCluster]:
    """``size`` masters of one Redis Cluster (no replicas), each with its own directory
    and a free port for the cluster bus, ``args`` given to each; waits (within 20 s)
    until the cluster is ok."""
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(size):
            bus = str(_free_port())
            node_args = ["--cluster-enabled", "yes", "--cluster-port", bus]
            node_args += ["--cluster-node-timeout", "2000", *args]
            nodes.append(await stack.enter_async_context(open_redis_server(args=node_args)))
        cluster = RedisCluster(nodes)
        per = 16384 // size
        with trio.fail_after(20):
            for i, node in enumerate(nodes):
                last = 16383 if i == size - 1 else (i + 1) * per - 1
                await command(node.port, "CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for node in nodes[1:]:
                await command(nodes[0].port, "CLUSTER", "MEET", "127.0.0.1", node.port, _bus(node))
            await cluster.wait_ok()
        yield cluster


def _bus(node: RedisServer) -> int:
    return int(node.args[node.args.index("--cluster-port") + 1])
