"""The ``filtergate`` command: run, check, init, plugins, stubs, hash-key.

Exit codes: 0 success, 2 a configuration (or plugin) error, 1 anything else.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w
import trio

from engine.config import Config, load_file
from engine.gateway import compile_runtime
from engine.plugins import PluginError, Registry, discover
from engine.schema import ConfigError, describe_fields

EXIT_CONFIG = 2

STARTER: dict[str, Any] = {
    "server": {"listen": ["127.0.0.1:8080"]},
    "admin": {"listen": "127.0.0.1:9901"},
    "upstreams": {"echo": {"targets": ["127.0.0.1:9004"]}},
    "routes": [{"name": "echo", "prefix": "/", "upstream": "echo"}],
}


def _load(path: str) -> tuple[Config, Registry]:
    config = load_file(path)
    registry = discover(config.discovery.blocked, entry_points=config.discovery.entry_points)
    compile_runtime(config, registry)  # every check `run` would make
    return config, registry


def _config_error(e: Exception, path: str) -> int:
    print(f"filtergate: {path}: {e}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config, registry = _load(args.config)
        runtime = compile_runtime(config, registry)
    except (ConfigError, PluginError) as e:
        return _config_error(e, args.config)
    print(f"{args.config}: ok, {len(runtime.routes)} routes, {len(runtime.pools)} upstreams")
    access = config.access_log
    if access.path is not None:
        where = "standard output" if access.path == "-" else access.path
        print(f"  access log: {where} ({access.format})")
    for r in runtime.routes:
        rc = r.config
        match = rc.path if rc.path is not None else f"{rc.pattern}*"
        hosts = ",".join(rc.hosts) or "*"
        methods = ",".join(rc.methods) or "ANY"
        target = rc.upstream or "(answered by a filter)"
        print(f"  route {rc.name}: {methods} {hosts}{match} -> {target}")
        if r.chain.filters:
            steps = " -> ".join(f"{f.name} [{f.stage.name.lower()}]" for f in r.chain.filters)
            print(f"    chain: {steps}")
        else:
            print("    chain: (no filters)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() and not args.force:
        print(f"filtergate: {path} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    path.write_text(tomli_w.dumps(STARTER))
    print(f"wrote {path}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
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

    return stubs.main(args.rest)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.app import Gateway

    try:
        config, registry = _load(args.config)
    except (ConfigError, PluginError) as e:
        return _config_error(e, args.config)
    workers: list[subprocess.Popen[bytes]] = []
    if config.server.workers > 1 and not args.worker:
        for _ in range(config.server.workers - 1):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "engine.cli", "run", "-c", args.config, "--worker"]
                )
            )

    async def main() -> None:
        gateway = Gateway(config, registry)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.serve)
            # Everything made so far (modules, config, compiled chains) lives as long as
            # the process: keep it out of the collector's full passes, which would walk
            # it again and again and show up as latency spikes. (A process-wide choice,
            # so it is made here and not by Gateway, which tests run many times over.)
            gc.freeze()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    for w in workers:
                        w.send_signal(signum)
                    if signum == signal.SIGHUP:
                        try:
                            await gateway.reload(load_file(args.config))
                        except (ConfigError, PluginError) as e:
                            logging.getLogger("filtergate").error(
                                "reload refused, the old configuration keeps serving: %s", e
                            )
                        except Exception:
                            logging.getLogger("filtergate").exception("reload failed")
                        continue
                    await gateway.shutdown()
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    finally:
        for w in workers:
            try:
                w.wait(timeout=config.server.shutdown_timeout + 5)
            except subprocess.TimeoutExpired:
                w.kill()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="filtergate",
        description="filtergate: an API gateway you extend in plain Python.",
    )
    p.add_argument("--log-level", default=os.environ.get("FILTERGATE_LOG", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (SIGHUP reloads, SIGTERM drains)")
    run.add_argument("-c", "--config", default="gateway.toml", help="config file")
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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

    stubs = sub.add_parser("stubs", help="serve the demo upstream services", add_help=False)
    stubs.add_argument("rest", nargs=argparse.REMAINDER)
    stubs.set_defaults(fn=cmd_stubs)

    hk = sub.add_parser("hash-key", help="print the SHA-256 of an API key for key-auth")
    hk.add_argument("key", nargs="?", help="the key (a new random one when omitted)")
    hk.set_defaults(fn=cmd_hash_key)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.fn(args)
    except BrokenPipeError:  # `filtergate plugins | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
