"""The ``filtergate`` command: run, check, init, plugins, stubs, hash-key.

Exit codes: 0 success, 2 a configuration (or plugin) error, 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.schema import ConfigError

# Only the standard library above (and engine.schema, which is light): the rest
# is imported where it is used, so that `run` blocks its signals a few hundred
# milliseconds sooner after exec (see SIGNALS).
if TYPE_CHECKING:
    import trio

    from engine.app import Gateway
    from engine.config import Config
    from engine.metrics import MetricDump
    from engine.plugins import Registry
    from engine.worker_metrics import WorkerChannel

EXIT_CONFIG = 2
log = logging.getLogger("filtergate")

# Written as text, not by tomli-w: its inline `routes = [{...}]` cannot take the
# `[[routes]]` and `[routes.plugins.NAME]` tables the README adds (TOML refuses to
# extend an inline array), and comments point to what to add next.
STARTER = """\
# filtergate configuration: every key is in the README's configuration reference.
# `filtergate check -c FILE` validates it and prints each route's chain.

[server]
listen = ["127.0.0.1:8080"]

[admin]
listen = "127.0.0.1:9901"   # /healthz, /readyz, /metrics, /routes: keep it on loopback

# `filtergate stubs` serves a demo echo service on 127.0.0.1:9004.
[upstreams.echo]
targets = ["127.0.0.1:9004"]

[[routes]]
name = "echo"
prefix = "/"
upstream = "echo"

# Plugins for one route go under it, e.g.:
# [routes.plugins.rate-limit]
# limits = [{ limit = 100, window = "1m" }]
"""


def _load(path: str, raw: bytes | None = None) -> tuple[Config, Registry]:
    """The config of ``path`` (of ``raw``, its bytes, when given), checked as ``run`` does."""
    from engine.app import check_addresses, load_ssl_context
    from engine.config import load_bytes, read_file
    from engine.gateway import compile_runtime
    from engine.plugins import discover

    config = load_bytes(read_file(path) if raw is None else raw, path)
    registry = discover(config.discovery.blocked, entry_points=config.discovery.entry_points)
    # Every check `run` makes before it binds.
    compile_runtime(config, registry)
    check_addresses(config)
    load_ssl_context(config)
    return config, registry


def _config_error(e: Exception, path: str) -> int:
    print(f"filtergate: {path}: {e}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check(args: argparse.Namespace) -> int:
    from engine.gateway import compile_runtime, route_notes
    from engine.plugins import PluginError

    try:
        config, registry = _load(args.config)
        runtime = compile_runtime(config, registry)
    except (ConfigError, PluginError) as e:
        return _config_error(e, args.config)
    routes, pools = len(runtime.routes), len(runtime.pools)
    print(
        f"{args.config}: ok, {routes} route{'s' * (routes != 1)}, "
        f"{pools} upstream{'s' * (pools != 1)}"
    )
    access = config.access_log
    if access.path is not None:
        where = "standard output" if access.path == "-" else access.path
        print(f"  access log: {where} ({access.format})")
    notes = route_notes(runtime)
    for r in runtime.routes:
        rc = r.config
        match = rc.path if rc.path is not None else f"{rc.pattern}*"
        hosts = ",".join(rc.hosts) or "*"
        methods = ",".join(rc.methods) or "ANY"
        target = rc.upstream or "(answered by a filter)"
        if rc.allow_connect:
            target += " (CONNECT tunnels)"
        if rc.upgrades:
            target += f" (upgrades: {', '.join(rc.upgrades)})"
        print(f"  route {rc.name}: {methods} {hosts}{match} -> {target}")
        if r.chain.filters:
            steps = " -> ".join(
                f"{f.name} [{f.stage.name.lower()}]{_own_keys(rc.plugins.get(f.name))}"
                for f in r.chain.filters
            )
            print(f"    chain: {steps}")
        else:
            print("    chain: (no filters)")
        off = [
            name
            for name, table in config.plugins.items()
            if table.get("enabled", True) and rc.plugins.get(name, {}).get("enabled") is False
        ]
        if off:
            print(f"    turned off here: {', '.join(off)}")
        if r.strip_identity is not None:
            print("    identity headers stripped: an authenticated route reaches its services")
        for note in notes.get(rc.name, []):
            print(f"    warning: {note}")
    for name, pool in runtime.pools.items():
        uc = pool.config
        count = len(uc.targets)
        tls = ""
        if uc.tls:
            checked = f" as {uc.tls_server_name}" if uc.tls_server_name else ""
            client = ", client certificate" if uc.tls_cert_file else ""
            tls = f", tls (verified{checked}{client})"
        print(f"  upstream {name}: {count} target{'s' * (count != 1)}, {uc.balance}{tls}")
    return 0


def _own_keys(table: dict[str, Any] | None) -> str:
    """What a route's own ``[routes.plugins.NAME]`` table sets, for ``check``."""
    if table is None:
        return ""
    keys = [k for k in table if k != "enabled"]
    return f" (this route sets {', '.join(keys)})" if keys else ""


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() and not args.force:
        print(f"filtergate: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    try:
        path.write_text(STARTER)
    except OSError as e:  # no such directory, a directory there, no permission
        print(f"filtergate: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from engine.config import load_file
    from engine.plugins import PluginError, discover
    from engine.schema import describe_fields

    blocked: list[str] = []
    entry_points = True
    if args.config:
        try:
            config = load_file(args.config)
        except ConfigError as e:
            return _config_error(e, args.config)
        blocked, entry_points = config.discovery.blocked, config.discovery.entry_points
    try:
        registry = discover(blocked, entry_points=entry_points)
    except PluginError as e:
        print(f"filtergate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not registry.filters:
        print("no filter types found")
    for name in sorted(registry.filters):
        info = registry.filters[name]
        cls = info.type
        print(f"{name}  [{cls.stage.name.lower()}]  from {info.distribution} {info.version}")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        for key, typ, default, kdoc in describe_fields(cls.Config):
            line = f"    {key}: {typ} = {default}"
            print(line + (f"  # {kdoc}" if kdoc else ""))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from plugins.key_auth import hash_key, new_key

    key = args.key or new_key()
    if not args.key:
        print(f"key:        {key}")
    print(f"key_sha256: {hash_key(key)}")
    return 0


def cmd_stubs(args: argparse.Namespace) -> int:
    from engine import stubs

    rest: list[str] = args.rest
    return stubs.main(rest)


# The signals `run` acts on. They are blocked from the start of `run` (and so in the
# workers it spawns, which inherit the mask across exec) until trio's receiver is open:
# a SIGHUP during start-up is then queued, not fatal.
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# Supervision: a worker that dies sooner than this after its start counts as a failure
# of start-up; this many in a row, before the slot ever ran longer, is a crash loop,
# and the gateway gives up (exit 1).
QUICK_DEATH = 5.0
CRASH_LOOP = 5
# The first respawn waits this long, each quick death in a row doubles it, up to the
# longest (a slot that has served is never given up on).
RESPAWN_DELAY = 0.1
MAX_RESPAWN_DELAY = 30.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("no parent-death signal: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        raise SystemExit(0)


def _bind(config: Config, admin: bool) -> tuple[list[socket.socket], socket.socket | None]:
    """The listening sockets; raises :class:`BindError` naming the address that failed."""
    from engine.server import open_listeners

    socks: list[socket.socket] = []
    wanted = [(f"server.listen[{i}]", a) for i, a in enumerate(config.server.listen)]
    if admin:
        wanted.append(("admin.listen", config.admin.listen))
    reuse_port = config.server.workers > 1
    for key, address in wanted:
        try:
            socks += open_listeners([address], reuse_port=reuse_port and key != "admin.listen")
        except OSError as e:
            for sock in socks:
                sock.close()
            raise BindError(f"{key}: cannot listen on {address}: {e.strerror or e}") from None
    return (socks[:-1], socks[-1]) if admin else (socks, None)


class BindError(Exception):
    """A listener could not be bound: the port is taken, the address is not this host's.

    Exit 1, not 2: the config is valid (``check`` accepts it), the host is not ready for it.
    """


class Workers:
    """The parent's worker processes: spawn, reap, respawn with a backoff, stop.

    A slot whose workers keep dying right after their start, none of them ever serving,
    is a crash loop: the supervisor raises :class:`CrashLoop` and the gateway stops, so
    that whatever runs filtergate (systemd, Kubernetes) sees that it cannot start. Once a
    worker of the slot has served, one that cannot start again (a file its config names
    is gone) is retried ever less often, and the other processes serve on.
    """

    def __init__(self, argv: list[str], count: int, config: bytes = b"") -> None:
        from engine.worker_metrics import Retired

        self.argv = argv
        self.count = count
        # The config the main process runs, handed to every worker it starts: a worker
        # respawned while the file is broken (a refused reload, an editor mid-save) runs
        # what the others run, as nginx's master does, instead of dying in a loop.
        self.config = config
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        # Each live worker's end of the pair its metrics are asked for on, and what the
        # dead ones counted (see engine.worker_metrics).
        self.metrics: dict[int, WorkerChannel] = {}
        self.retired = Retired()
        self.stopping = False
        # Where each channel is served (the gateway's nursery: a worker draining after
        # the supervisors are cancelled is still asked for its metrics).
        self.nursery: Any = None

    def restart_only_kept(self, raw: bytes) -> bytes:
        """``raw`` (a reloaded config) with the keys a reload cannot apply as the
        processes started with them: a worker respawned after a reload that changed
        ``server.listen`` or ``server.workers`` must bind what the others bound."""
        import tomli_w

        started = tomllib.loads(self.config.decode()).get("server", {})
        doc = tomllib.loads(raw.decode())
        server = doc.setdefault("server", {})
        for key in ("listen", "workers"):
            if key in started:
                server[key] = started[key]
            else:
                server.pop(key, None)
        return tomli_w.dumps(doc).encode()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], WorkerChannel, int]:
        """A new worker, the main side of its metrics channel, and the read end of the
        pipe it writes one byte to once it serves."""
        from engine.worker_metrics import WorkerChannel

        # The config goes in a memory file the worker reads (a pipe could fill up and
        # block this loop until the worker reads it).
        fd = os.memfd_create("filtergate-config", os.MFD_CLOEXEC)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            os.close(fd)
            raise
        try:
            ready, told = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            os.close(fd)
            ours.close()
            theirs.close()
            raise
        try:
            os.write(fd, self.config)
            os.lseek(fd, 0, os.SEEK_SET)
            passed = ["--config-fd", str(fd), "--metrics-fd", str(theirs.fileno())]
            passed += ["--ready-fd", str(told)]
            # In its own process group: Ctrl-C in a terminal reaches the parent only,
            # which forwards it once (as SIGTERM).
            with _blocked(SIGNALS):
                proc = subprocess.Popen(
                    [*self.argv, *passed],
                    process_group=0,
                    pass_fds=(fd, theirs.fileno(), told),
                )
        except BaseException:
            ours.close()
            os.close(ready)
            raise
        finally:
            os.close(fd)
            os.close(told)
            theirs.close()
        return proc, WorkerChannel(ours), ready

    async def supervise(self, slot: int) -> None:
        import trio

        quick_deaths = 0
        served = False  # a worker of this slot has served: its deaths are no failure to start

        async def note_ready(fd: int) -> None:
            nonlocal served
            await trio.lowlevel.wait_readable(fd)
            try:
                if os.read(fd, 1) == b"r":
                    served = True
            except OSError:
                pass

        while not self.stopping:
            proc, self.metrics[slot], ready = self._spawn()
            if self.nursery is not None:
                self.nursery.start_soon(self.metrics[slot].serve)
            self.live[slot] = proc
            started = trio.current_time()
            # Cancelled here when the gateway stops: the worker still drains, and is
            # asked for its metrics, until stop() sees it exit.
            try:
                async with trio.open_nursery() as watch:
                    watch.start_soon(note_ready, ready)
                    code = await _wait_exit(proc)
                    watch.cancel_scope.cancel()
                if not served:  # written just before it exited, and not read yet
                    try:
                        served = os.read(ready, 1) == b"r"
                    except OSError:
                        pass  # nothing written (BlockingIOError), or it never ran
            finally:
                os.close(ready)
            self._retire(slot)
            self.live.pop(slot, None)  # (stop() may have reaped it first)
            if self.stopping:
                return
            lived = trio.current_time() - started
            quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH else 0
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if quick_deaths >= CRASH_LOOP and not served:
                log.error("worker %d (pid %d) exited with %s: crash loop", slot, proc.pid, how)
                raise CrashLoop(f"worker {slot} died {quick_deaths} times in a row")
            # Once the gateway has served, a worker that cannot start again (a file
            # its config names is gone, a bad certificate on disk) must not take the
            # other processes down with it: it is tried again, less and less often.
            delay = min(RESPAWN_DELAY * 2 ** max(quick_deaths - 1, 0), MAX_RESPAWN_DELAY)
            log_at = log.error if quick_deaths >= CRASH_LOOP else log.warning
            log_at(
                "worker %d (pid %d) exited with %s; respawning in %.1fs", slot, proc.pid, how, delay
            )
            await trio.sleep(delay)

    def _retire(self, slot: int) -> None:
        """The worker of ``slot`` exited: what it counted stays in the totals."""
        channel = self.metrics.pop(slot, None)
        if channel is not None:
            self.retired.add(channel.last)
            channel.close()

    async def gather_metrics(self) -> list[dict[str, MetricDump]]:
        """The metrics of every live worker (asked all at once) and of the dead ones,
        in slot order (float sums must not change with the order answers came in)."""
        import trio

        answers: dict[int, dict[str, MetricDump]] = {}
        asked = dict(self.metrics)

        async def ask(slot: int, channel: WorkerChannel) -> None:
            answers[slot] = await channel.ask()

        async with trio.open_nursery() as nursery:
            for slot, channel in asked.items():
                nursery.start_soon(ask, slot, channel)
        # A worker that died meanwhile is in the retired totals now, with its last
        # answer: counted there, its answer here would count it twice.
        live = [s for s in sorted(answers) if self.metrics.get(s) is asked[s]]
        return [self.retired.metrics, *(answers[slot] for slot in live)]

    async def purge(self, selector: dict[str, Any]) -> tuple[int, int]:
        """Have every live worker purge its caches (all at once): how many answers they
        dropped, and how many workers did not say within the ask timeout."""
        import trio

        dropped: list[int | None] = []

        async def purge(channel: WorkerChannel) -> None:
            dropped.append(await channel.purge(selector))

        async with trio.open_nursery() as nursery:
            for channel in list(self.metrics.values()):
                nursery.start_soon(purge, channel)
        return sum(n for n in dropped if n is not None), dropped.count(None)

    def signal(self, signum: int) -> None:
        for proc in self.live.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    async def stop(self, deadline: float) -> None:
        """SIGTERM every worker, SIGKILL those still alive after ``deadline`` seconds."""
        import trio

        self.stopping = True
        self.signal(signal.SIGTERM)
        with trio.move_on_after(deadline):
            while self.live:
                await _wait_exit(next(iter(self.live.values())))
                self._reap()
        for proc in self.live.values():
            if proc.poll() is None:  # (one that exited meanwhile was not "killed")
                log.error("worker pid %d did not stop in time: killed", proc.pid)
                proc.kill()
            proc.wait()
        self._reap()

    def _reap(self) -> None:
        """Forget the workers that exited (reaped by a wait), keeping their counts."""
        for slot, proc in list(self.live.items()):
            if proc.poll() is not None:
                self._retire(slot)
                del self.live[slot]


class CrashLoop(Exception):
    """Workers keep dying as soon as they start."""


@contextlib.contextmanager
def _blocked(signals: set[signal.Signals]) -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


async def _wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` to exit (on its pidfd, no polling) and reap it."""
    import trio

    if proc.returncode is None:
        fd = os.pidfd_open(proc.pid)
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
    return proc.wait()


def _raise_descriptor_limit() -> None:
    """Lift the soft limit on open files to the hard one (as Traefik does, and nginx's
    worker_rlimit_nofile): every client and upstream connection is a descriptor, and
    a soft limit of 1024 is common."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # a container may forbid it: the soft limit stays


def cmd_run(args: argparse.Namespace) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # until the receiver is open
    import trio

    from engine.app import Gateway
    from engine.plugins import PluginError

    if args.worker_of is not None:
        _die_with_parent(args.worker_of)
    _raise_descriptor_limit()
    raw: bytes | None = None
    if args.config_fd is not None:  # a worker: the main process's config
        with os.fdopen(args.config_fd, "rb") as handed:
            raw = handed.read()
    try:
        if raw is None:
            from engine.config import read_file

            raw = read_file(args.config)
        config, registry = _load(args.config, raw)
        sockets, admin_socket = _bind(config, admin=args.worker_of is None and config.admin.enabled)
    except (ConfigError, PluginError) as e:
        return _config_error(e, args.config)
    except BindError as e:
        print(f"filtergate: {args.config}: {e}", file=sys.stderr)
        return 1
    workers = Workers(
        [
            *[sys.executable, "-m", "engine.cli", "--log-level", args.log_level],
            *["run", "-c", args.config, "--worker-of", str(os.getpid())],
        ],
        config.server.workers - 1 if args.worker_of is None else 0,
        raw,
    )
    failed = False
    setup_error: ConfigError | None = None

    async def main() -> None:
        nonlocal failed, setup_error
        stopped = trio.Event()
        with trio.open_signal_receiver(*SIGNALS) as sigs:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            try:
                async with trio.open_nursery() as nursery:
                    gateway = Gateway(
                        config,
                        registry,
                        admin=args.worker_of is None,
                        worker_metrics=workers.gather_metrics if workers.count else None,
                        worker_purge=workers.purge if workers.count else None,
                    )
                    await nursery.start(partial(gateway.serve, sockets, admin_socket=admin_socket))
                    if args.metrics_fd is not None:  # a worker: the main process asks
                        from engine.worker_metrics import answer

                        channel = socket.socket(fileno=args.metrics_fd)
                        nursery.start_soon(answer, channel, gateway.purge)
                    if args.ready_fd is not None:  # a worker: tell the main one it serves
                        os.write(args.ready_fd, b"r")
                        os.close(args.ready_fd)
                    # Signals that came while starting waited in the receiver until now.
                    nursery.start_soon(_serve_signals, sigs, gateway, workers, nursery, stopped)
                    # Everything made so far (modules, config, compiled chains) lives as long
                    # as the process: keep it out of the collector's full passes, which would
                    # walk it again and again and show up as latency spikes. (A process-wide
                    # choice, so it is made here and not by Gateway, which tests run many
                    # times over.)
                    gc.freeze()
                    workers.nursery = nursery
                    async with trio.open_nursery() as supervisors:
                        for slot in range(1, workers.count + 1):
                            supervisors.start_soon(workers.supervise, slot)
                        await stopped.wait()
                        supervisors.cancel_scope.cancel()
            except* CrashLoop:
                failed = True
                with trio.CancelScope(shield=True):
                    await workers.stop(config.server.shutdown_timeout)
            except* ConfigError as group:  # a plugin's setup failed, before serving
                setup_error = next(e for e in group.exceptions if isinstance(e, ConfigError))
            # Anything still queued would be re-raised by trio on closing the receiver.
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    trio.run(main)
    if setup_error is not None:
        return _config_error(setup_error, args.config)
    return 1 if failed else 0


async def _serve_signals(
    sigs: AsyncIterator[int],
    gateway: Gateway,
    workers: Workers,
    nursery: trio.Nursery,
    stopped: trio.Event,
) -> None:
    """SIGHUP reloads; SIGTERM/SIGINT drain; a second SIGTERM/SIGINT cuts the drain short."""
    import trio

    drain: trio.CancelScope | None = None
    # A reload runs in a task of its own, so that a SIGTERM is acted on at once even
    # while a slow reload (an identity provider that does not answer) is under way:
    # the drain abandons it. A SIGHUP during a reload makes one more once it ends.
    reloading: trio.CancelScope | None = None
    again = False

    async def reload_while_asked(scope: trio.CancelScope) -> None:
        nonlocal reloading, again
        with scope:
            while True:
                again = False
                # A SIGTERM that came with the SIGHUP (both queued at start-up) has
                # cancelled this already: a reload with nothing to wait for would
                # otherwise run whole, after "reload abandoned" was logged.
                await trio.lowlevel.checkpoint()
                await _reload(gateway, workers)
                if not again:
                    break
        reloading = None

    async for signum in sigs:
        if signum == signal.SIGHUP:
            if drain is not None:
                log.info("SIGHUP while draining: ignored")
                continue
            workers.signal(signal.SIGHUP)
            if reloading is not None:
                again = True  # the file may have changed since this reload read it
                continue
            reloading = trio.CancelScope()
            nursery.start_soon(reload_while_asked, reloading)
            continue
        if reloading is not None:
            log.warning("reload abandoned: the gateway is draining")
            reloading.cancel()
            reloading = None
        if drain is not None:
            name = signal.Signals(signum).name
            log.warning("second %s: not waiting for requests in flight", name)
            workers.signal(signal.SIGTERM)
            drain.cancel()
            continue
        log.info(
            "%s: draining, requests in flight have %gs (send it again to stop at once)",
            signal.Signals(signum).name,
            gateway.runtime.config.server.shutdown_timeout,
        )
        drain = trio.CancelScope()
        nursery.start_soon(_drain, gateway, workers, nursery, stopped, drain)


async def _drain(
    gateway: Gateway,
    workers: Workers,
    nursery: trio.Nursery,
    stopped: trio.Event,
    scope: trio.CancelScope,
) -> None:
    import trio

    stopped.set()  # no more respawns
    server = gateway.runtime.config.server
    grace = server.drain_delay + server.shutdown_timeout  # the workers drain alike
    with scope:
        async with trio.open_nursery() as both:
            both.start_soon(workers.stop, grace + 5)
            both.start_soon(gateway.shutdown)
    if scope.cancelled_caught:
        await workers.stop(1)
    nursery.cancel_scope.cancel()


async def _reload(gateway: Gateway, workers: Workers) -> None:
    from engine.config import load_bytes, read_file
    from engine.plugins import PluginError

    path = gateway.runtime.config.source
    try:
        raw = read_file(path)
        await gateway.reload(load_bytes(raw, path))
        try:
            workers.config = workers.restart_only_kept(raw)  # for workers started from now on
        except Exception:
            log.exception("workers respawned from now on run the previous configuration")
    except (ConfigError, PluginError) as e:
        log.error("reload refused, the old configuration keeps serving: %s: %s", path, e)
    except Exception:
        log.exception("reload failed")


LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def _version() -> str:
    from engine.plugins import _own_version

    return _own_version()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="filtergate",
        description="filtergate: an API gateway you extend in plain Python.",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("FILTERGATE_LOG", "info").lower(),
        type=str.lower,
        choices=LOG_LEVELS,
        help="debug, info, warning, error or critical (default: $FILTERGATE_LOG, else info)",
    )
    p.add_argument("--version", action="version", version=f"filtergate {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (SIGHUP reloads, SIGTERM drains)")
    run.add_argument("-c", "--config", default="gateway.toml", help="config file")
    # A worker process of the gateway whose pid this is (spawned by `run` itself).
    run.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--config-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--metrics-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(fn=cmd_run)

    check = sub.add_parser("check", help="validate a config and print every route's chain")
    check.add_argument("-c", "--config", default="gateway.toml", help="config file")
    check.set_defaults(fn=cmd_check)

    init = sub.add_parser("init", help="write a starter gateway.toml")
    init.add_argument("file", nargs="?", default="gateway.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(fn=cmd_init)

    plugins = sub.add_parser("plugins", help="list discovered filter types and their config")
    plugins.add_argument(
        "-c", "--config", default=None, help="apply this config's [discovery] settings"
    )
    plugins.set_defaults(fn=cmd_plugins)

    # Its options (and --help) belong to engine.stubs.main: main() hands them over.
    stubs = sub.add_parser("stubs", help="serve the demo upstream services", add_help=False)
    stubs.set_defaults(fn=cmd_stubs)

    hk = sub.add_parser("hash-key", help="print the SHA-256 of an API key for key-auth")
    hk.add_argument("key", nargs="?", help="the key (a new random one when omitted)")
    hk.set_defaults(fn=cmd_hash_key)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "stubs":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if args.log_level not in LOG_LEVELS:  # a default from FILTERGATE_LOG is not checked
        parser.error(f"FILTERGATE_LOG={args.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        # The pid tells the processes of `workers > 1` apart.
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    try:
        result: int = args.fn(args)
    except BrokenPipeError:  # `filtergate plugins | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
