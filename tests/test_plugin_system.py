"""The plugin system from the outside: discovery, config, merge rule, CLI, reload.

In-process tests register plugins with ``open_gateway(..., extra_plugins=...)``. The CLI
tests run ``filtergate`` in a subprocess that finds a test plugin through the
``filtergate`` entry-point group: a module and a ``.dist-info`` written to a temporary
directory on ``PYTHONPATH`` (what pip would install, without a build).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pluggy
import pytest
import trio

from engine.app import Gateway
from engine.chain import Filter, FilterContext, Stage
from engine.config import load
from engine.exchange import Exchange, Response
from engine.plugins import PluginError, discover, hookimpl
from engine.schema import ConfigError, Duration
from engine.testing import Stubs, http_request, open_gateway


class FilterSet:
    """A plugin object providing ``types``, as a test registers it."""

    def __init__(self, *types: type[Any]) -> None:
        self.types = types

    @hookimpl
    def filtergate_filters(self) -> Sequence[type[Any]]:
        return list(self.types)


@dataclass(frozen=True)
class ProbeConfig:
    label: str = field(metadata={"doc": "what the probe stamps"})
    limit: int = 10
    window: Duration = Duration(60.0)
    mode: Literal["fast", "slow"] = "fast"


class Probe(Filter):
    """Stamps ``x-probe: LABEL/LIMIT/SERIAL``; SERIAL tells instances apart."""

    name, stage, Config = "probe", Stage.LIMIT, ProbeConfig
    made = 0
    by_serial: ClassVar[dict[str, Probe]] = {}
    config: ProbeConfig

    def __init__(self, config: ProbeConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        Probe.made += 1
        self.serial = str(Probe.made)
        Probe.by_serial[self.serial] = self
        self.count = 0  # state that must survive a reload when the config is unchanged
        self.setups = 0
        self.background_cancelled = False

    async def setup(self) -> None:
        self.setups += 1

    async def background(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.background_cancelled = True

    def on_request(self, exchange: Exchange) -> None:
        self.count += 1
        exchange.request.headers.add("x-probe", f"{self.config.label}/{self.config.limit}")

    async def on_response(self, exchange: Exchange, response: Response) -> None:
        response.headers.add("x-probe-instance", f"{self.serial}:{self.count}")


class Tagger(Filter):
    """An EDGE filter with no options."""

    name, stage = "tagger", Stage.EDGE

    def on_request(self, exchange: Exchange) -> None:
        exchange.request.headers.add("x-tagger", "1")


PROBE_PLUGIN = ("probe-plugin", FilterSet(Probe, Tagger))


def gateway_config(stubs: Stubs | None = None) -> dict[str, Any]:
    target = stubs.target("echo") if stubs else "127.0.0.1:9"
    return {
        "upstreams": {"echo": {"targets": [target]}},
        "routes": [
            {"name": "plain", "prefix": "/plain", "upstream": "echo"},
            {
                "name": "override",
                "prefix": "/override",
                "upstream": "echo",
                "plugins": {"probe": {"limit": 5}},
            },
            {
                "name": "off",
                "prefix": "/off",
                "upstream": "echo",
                "plugins": {"probe": {"enabled": False}},
            },
            {
                "name": "tagged",
                "prefix": "/tagged",
                "upstream": "echo",
                "plugins": {"tagger": {}},
            },
        ],
        "plugins": {"probe": {"label": "g"}},
    }


# -- bad configs: the same errors from `filtergate check` and at start-up ----------------

BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    # (what, changes to gateway_config(), expected "path: message" start)
    ("unknown key", {"plugins": {"probe": {"label": "g", "colour": 1}}}, "plugins.probe.colour"),
    ("bad type", {"plugins": {"probe": {"label": "g", "limit": "ten"}}}, "plugins.probe.limit"),
    (
        "bad duration",
        {"plugins": {"probe": {"label": "g", "window": "soon"}}},
        "plugins.probe.window",
    ),
    ("bad literal", {"plugins": {"probe": {"label": "g", "mode": "warp"}}}, "plugins.probe.mode"),
    ("missing key", {"plugins": {"probe": {"limit": 3}}}, "plugins.probe.label"),
    ("unknown plugin", {"plugins": {"probe": {"label": "g"}, "prob": {}}}, "plugins.prob"),
    (
        "bad enabled",
        {"plugins": {"probe": {"label": "g", "enabled": "no"}}},
        "plugins.probe.enabled",
    ),
    ("route override", {"route_probe": {"limit": "five"}}, "routes[1].plugins.probe.limit"),
    ("route unknown", {"route_probe": {"limt": 5}}, "routes[1].plugins.probe.limt"),
    ("route plugin", {"route_tagger": {"x": 1}}, "routes[3].plugins.tagger.x"),
]


def bad_config(changes: dict[str, Any], stubs: Stubs | None = None) -> dict[str, Any]:
    config = gateway_config(stubs)
    if "plugins" in changes:
        config["plugins"] = changes["plugins"]
    if "route_probe" in changes:
        config["routes"][1]["plugins"]["probe"] = changes["route_probe"]
    if "route_tagger" in changes:
        config["routes"][3]["plugins"]["tagger"] = changes["route_tagger"]
    return config


@pytest.mark.parametrize(("what", "changes", "path"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
async def test_a_bad_plugin_config_stops_start_up(
    what: str, changes: dict[str, Any], path: str
) -> None:
    with trio.fail_after(5), pytest.raises(ConfigError) as info:
        async with open_gateway(bad_config(changes), extra_plugins=[PROBE_PLUGIN]):
            pytest.fail("the gateway started")
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")


# -- the merge rule and instance sharing -------------------------------------------------


async def test_global_config_route_overrides_and_enabled_false(stubs: Stubs) -> None:
    config = gateway_config(stubs)
    config["routes"].append({"name": "plain2", "prefix": "/plain2", "upstream": "echo"})
    config["routes"].append(
        {
            "name": "same",
            "prefix": "/same",
            "upstream": "echo",
            "plugins": {"probe": {"label": "g"}},  # equal to the global table
        }
    )
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[PROBE_PLUGIN]) as gw:
            got = {}
            for route in ("plain", "plain2", "override", "off", "tagged", "same"):
                resp = await http_request(gw.port, "GET", f"/{route}")
                assert resp.status == 200
                echoed = resp.json()["headers"]
                got[route] = (
                    echoed.get("x-probe"),
                    echoed.get("x-tagger"),
                    (resp.header("x-probe-instance") or ":").split(":")[0],
                )
    # Global keys everywhere; a route's keys override key by key; enabled = false
    # switches it off; a route-only plugin runs on that route only.
    assert got["plain"][:2] == ("g/10", None)
    assert got["override"][:2] == ("g/5", None)
    assert got["off"] == (None, None, "")
    assert got["tagged"][:2] == ("g/10", "1")
    assert got["same"][:2] == ("g/10", None)
    # Routes on the global config share one instance (one set of counters); a route with
    # overrides has its own.
    assert got["plain"][2] == got["plain2"][2] == got["tagged"][2]
    assert got["override"][2] != got["plain"][2]


async def test_a_route_restating_the_global_config_shares_the_global_instance(
    stubs: Stubs,
) -> None:
    config = gateway_config(stubs)
    config["routes"].append(
        {
            "name": "same",
            "prefix": "/same",
            "upstream": "echo",
            "plugins": {"probe": {"label": "g"}},
        }
    )
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[PROBE_PLUGIN]) as gw:
            plain = await http_request(gw.port, "GET", "/plain")
            same = await http_request(gw.port, "GET", "/same")
    serial = (plain.header("x-probe-instance") or ":").split(":")[0]
    assert same.header("x-probe-instance") == f"{serial}:2"


async def test_a_global_plugin_with_enabled_false_runs_only_where_a_route_enables_it(
    stubs: Stubs,
) -> None:
    config = gateway_config(stubs)
    config["plugins"] = {"probe": {"label": "g", "enabled": False}}
    # routes[1] has {"limit": 5}: it enables the plugin there, on top of the defaults.
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[PROBE_PLUGIN]) as gw:
            plain = await http_request(gw.port, "GET", "/plain")
            override = await http_request(gw.port, "GET", "/override")
    assert plain.json()["headers"].get("x-probe") is None
    assert override.json()["headers"].get("x-probe") == "g/5"


# -- discovery errors ---------------------------------------------------------------------


class OldFilter(Filter):
    name, stage = "old", Stage.EDGE
    api_version = 99

    def on_request(self, exchange: Exchange) -> None:
        pass


async def test_an_api_version_mismatch_is_a_start_up_error_naming_the_plugin() -> None:
    with trio.fail_after(5), pytest.raises(PluginError) as info:
        async with open_gateway(
            gateway_config(), extra_plugins=[PROBE_PLUGIN, ("old-plugin", FilterSet(OldFilter))]
        ):
            pytest.fail("the gateway started")
    message = str(info.value)
    assert "'old-plugin'" in message
    assert "'old'" in message
    assert "99" in message


async def test_a_blocked_plugin_is_not_loaded() -> None:
    config = gateway_config()
    config["discovery"] = {"blocked": ["old-plugin"]}
    plugins = [PROBE_PLUGIN, ("old-plugin", FilterSet(OldFilter))]
    with trio.fail_after(5):
        async with open_gateway(config, extra_plugins=plugins) as gw:
            assert gw.gateway.registry.get("old") is None
            assert gw.gateway.registry.get("probe") is not None
        config["discovery"] = {"blocked": ["probe-plugin", "old-plugin"]}
        with pytest.raises(ConfigError, match=r"^plugins\.probe: no filter type named 'probe'"):
            async with open_gateway(config, extra_plugins=plugins):
                pytest.fail("the gateway started")


def test_a_built_in_plugin_can_be_blocked_by_name() -> None:
    everything = discover(entry_points=False)
    assert everything.get("key-auth") is not None
    assert everything.filters["key-auth"].distribution == "filtergate (built-in)"
    registry = discover(blocked=["key-auth"], entry_points=False)
    assert registry.get("key-auth") is None
    assert set(everything.filters) - set(registry.filters) == {"key-auth"}


def test_duplicate_filter_names_are_refused() -> None:
    class OtherProbe(Probe):
        pass

    with pytest.raises(PluginError) as info:
        discover(
            extra=[PROBE_PLUGIN, ("copycat", FilterSet(OtherProbe))],
            entry_points=False,
        )
    assert "'copycat'" in str(info.value)
    assert "'probe'" in str(info.value)
    assert "'probe-plugin'" in str(info.value)


@pytest.mark.parametrize(
    ("attrs", "complaint"),
    [
        ({"name": "no-stage"}, "has no 'stage'"),
        ({"name": "bad-stage", "stage": 20}, "no valid stage"),
        ({"name": "no-phase", "stage": Stage.EDGE, "api_version": 1}, "defines no phase"),
    ],
)
def test_malformed_filter_types_are_refused(attrs: dict[str, Any], complaint: str) -> None:
    cls = type("Malformed", (), dict(attrs))
    with pytest.raises(PluginError, match=complaint):
        discover(extra=[("malformed", FilterSet(cls))], entry_points=False)


class MisspelledHook:
    @hookimpl
    def filtergate_filter(self) -> Sequence[type[Any]]:
        return [Tagger]


def test_a_misspelled_hook_is_a_plugin_error_naming_the_plugin() -> None:
    with pytest.raises(PluginError, match="'typo-plugin'"):
        discover(extra=[("typo-plugin", MisspelledHook())], entry_points=False)


def test_a_misspelled_hook_is_caught_at_start_up() -> None:
    # check_pending() runs at discovery, so a typo never goes unnoticed.
    with pytest.raises((PluginError, pluggy.PluginValidationError), match="filtergate_filter"):
        discover(extra=[("typo-plugin", MisspelledHook())], entry_points=False)


# -- reload -------------------------------------------------------------------------------


async def test_reload_keeps_unchanged_instances_and_replaces_changed_ones(stubs: Stubs) -> None:
    config = gateway_config(stubs)
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[PROBE_PLUGIN]) as gw:
            gateway: Gateway = gw.gateway

            async def instance(route: str) -> tuple[str, str]:
                resp = await http_request(gw.port, "GET", f"/{route}")
                serial, count = (resp.header("x-probe-instance") or ":").split(":")
                return serial, count

            plain = await instance("plain")
            override = await instance("override")
            assert plain[1] == "1"
            old_override = Probe.by_serial[override[0]]

            # Change only the override route's table: the global instance and its state
            # stay, the override instance is replaced (its state starts again).
            new = gateway_config(stubs)
            new["routes"][1]["plugins"]["probe"] = {"limit": 6}
            await gateway.reload(load(_listen_anywhere(new)))
            assert await instance("plain") == (plain[0], "2")
            new_override = await instance("override")
            assert new_override[0] != override[0]
            assert new_override[1] == "1"
            await trio.testing.wait_all_tasks_blocked()
            assert old_override.background_cancelled  # a dropped instance's task ends

            # A bad new config is refused; the old one keeps serving.
            bad = gateway_config(stubs)
            bad["plugins"]["probe"]["limit"] = "many"
            with pytest.raises(ConfigError, match=r"^plugins\.probe\.limit: "):
                await gateway.reload(load(_listen_anywhere(bad)))
            resp = await http_request(gw.port, "GET", "/override")
            assert resp.json()["headers"]["x-probe"] == "g/6"
            assert await instance("plain") == (plain[0], "3")


async def test_reload_does_not_set_up_a_carried_over_instance_again(stubs: Stubs) -> None:
    config = gateway_config(stubs)
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[PROBE_PLUGIN]) as gw:
            gateway: Gateway = gw.gateway
            resp = await http_request(gw.port, "GET", "/plain")
            serial = (resp.header("x-probe-instance") or ":").split(":")[0]
            instance = Probe.by_serial[serial]
            assert instance.setups == 1
            await gateway.reload(load(_listen_anywhere(gateway_config(stubs))))
            resp = await http_request(gw.port, "GET", "/plain")
            assert resp.header("x-probe-instance") == f"{serial}:2"  # carried over
            assert instance.setups == 1


def _listen_anywhere(config: dict[str, Any]) -> dict[str, Any]:
    config.setdefault("server", {})["listen"] = ["127.0.0.1:0"]
    config.setdefault("admin", {})["listen"] = "127.0.0.1:0"
    return config


# -- the CLI, with a plugin found through its entry point ------------------------------

PROBE_MODULE = '''
"""A test plugin installed as distribution fgtest-probe 2.5.0."""

from dataclasses import dataclass, field
from typing import Literal

from engine.chain import Filter, Stage
from engine.plugins import hookimpl
from engine.schema import Duration


@dataclass(frozen=True)
class ProbeConfig:
    label: str = field(metadata={"doc": "what the probe stamps"})
    limit: int = 10
    window: Duration = Duration(60.0)
    mode: Literal["fast", "slow"] = "fast"


class Probe(Filter):
    """Stamps x-probe."""

    name, stage, Config = "probe", Stage.LIMIT, ProbeConfig

    def on_request(self, exchange):
        pass


class Tagger(Filter):
    """An EDGE filter with no options."""

    name, stage = "tagger", Stage.EDGE

    def on_request(self, exchange):
        pass


@hookimpl
def filtergate_filters():
    return [Probe, Tagger]
'''

OLD_MODULE = """
from engine.chain import Filter, Stage
from engine.plugins import hookimpl


class Old(Filter):
    name, stage, api_version = "old", Stage.EDGE, 99

    def on_request(self, exchange):
        pass


@hookimpl
def filtergate_filters():
    return [Old]
"""


def install_fake_dist(root: Path, dist: str, version: str, ep: str, module: str, src: str) -> None:
    """What pip leaves behind: the module and a .dist-info with the entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(src))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[filtergate]\n{ep} = {module}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    install_fake_dist(root, "fgtest-probe", "2.5.0", "probe-plugin", "fgtest_probe", PROBE_MODULE)
    return root


def filtergate(
    site: Path, *args: str, extra_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``filtergate`` command with ``site`` (and ``extra_path``) on PYTHONPATH."""
    script = Path(sys.executable).parent / "filtergate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]
    paths = [str(site)] + ([str(extra_path)] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        [*command, "--log-level", "warning", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def write_toml(path: Path, config: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(config))
    return path


def test_check_prints_the_effective_chain_of_every_route(site: Path, tmp_path: Path) -> None:
    config = gateway_config()
    config["plugins"] = {"probe": {"label": "g"}, "tagger": {"enabled": False}}
    config["routes"][3]["plugins"]["tagger"] = {}
    file = write_toml(tmp_path / "gateway.toml", config)
    result = filtergate(site, "check", "-c", str(file))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{file}: ok, 4 routes, 1 upstream"
    chains = [line.strip() for line in lines if line.strip().startswith("chain:")]
    assert chains == [
        "chain: probe [limit]",
        "chain: probe [limit] (this route sets limit)",
        "chain: (no filters)",
        # Execution order: the EDGE filter first although probe comes first in the file.
        "chain: tagger [edge] -> probe [limit]",
    ]
    assert "  route plain: ANY */plain* -> echo" in lines
    assert "    turned off here: probe" in lines  # route "off"; tagger was never on
    assert sum("turned off" in line for line in lines) == 1
    assert lines[-1] == "  upstream echo: 1 target, round_robin"


# Start-up covers every case; the CLI (a subprocess each) the kinds of mistake.
CLI_CASES = ("unknown key", "bad type", "missing key", "unknown plugin", "route override")
BAD_CONFIGS_CLI = [c for c in BAD_CONFIGS if c[0] in CLI_CASES]


@pytest.mark.parametrize(
    ("what", "changes", "path"), BAD_CONFIGS_CLI, ids=[c[0] for c in BAD_CONFIGS_CLI]
)
def test_check_reports_a_bad_plugin_config(
    site: Path, tmp_path: Path, what: str, changes: dict[str, Any], path: str
) -> None:
    file = write_toml(tmp_path / "gateway.toml", bad_config(changes))
    result = filtergate(site, "check", "-c", str(file))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"{path}: " in result.stderr
    assert "Traceback" not in result.stderr


def test_plugins_lists_name_distribution_version_stage_and_config_keys(site: Path) -> None:
    result = filtergate(site, "plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    probe = out[out.index("probe  [limit]") :]
    probe = probe[: probe.index("\n", probe.index("mode:"))]
    assert probe.splitlines() == [
        "probe  [limit]  from fgtest-probe 2.5.0",
        "    Stamps x-probe.",
        "    label: a string = (required)  # what the probe stamps",
        "    limit: an integer = 10",
        # Defaults as gateway.toml writes them (they were Python reprs: 60.0, 'fast').
        '    window: a duration like "1m" = "1m"',
        "    mode: one of 'fast', 'slow' = \"fast\"",
    ]
    assert "tagger  [edge]  from fgtest-probe 2.5.0" in out
    assert "from filtergate (built-in)" in out  # the built-ins beside it


def test_an_installed_plugin_with_the_wrong_api_version(site: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    install_fake_dist(old, "fgtest-old", "0.1.0", "old-plugin", "fgtest_old", OLD_MODULE)
    file = write_toml(tmp_path / "gateway.toml", gateway_config())
    result = filtergate(site, "check", "-c", str(file), extra_path=old)
    assert result.returncode == 2
    assert "plugin 'old-plugin'" in result.stderr
    assert "version 99" in result.stderr
    assert "Traceback" not in result.stderr

    # Blocking it by its entry-point name lets the gateway start without it.
    config = gateway_config()
    config["discovery"] = {"blocked": ["old-plugin"]}
    write_toml(file, config)
    result = filtergate(site, "check", "-c", str(file), extra_path=old)
    assert result.returncode == 0, result.stderr


def test_an_installed_plugin_that_fails_to_import(site: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    source = "import fgtest_a_dependency_that_is_not_installed\n"
    install_fake_dist(broken, "fgtest-broken", "0.1.0", "broken-plugin", "fgtest_broken", source)
    file = write_toml(tmp_path / "gateway.toml", gateway_config())
    result = filtergate(site, "check", "-c", str(file), extra_path=broken)
    assert result.returncode == 2
    assert "plugin 'broken-plugin'" in result.stderr
    assert "Traceback" not in result.stderr
    # Where it broke, and how to start without it.
    assert "ModuleNotFoundError" in result.stderr
    assert f"at {broken / 'fgtest_broken.py'}:1" in result.stderr
    assert '"broken-plugin" in [discovery] blocked' in result.stderr


def test_an_installed_plugin_that_exits_on_import(site: Path, tmp_path: Path) -> None:
    """A module that runs argparse (or calls sys.exit) at import: SystemExit is no
    Exception, and check exited 0 with no word (or with the plugin's usage line)."""
    exits = tmp_path / "exits"
    exits.mkdir()
    install_fake_dist(
        exits, "fgtest-exits", "0.1.0", "exits-plugin", "fgtest_exits", "raise SystemExit(0)\n"
    )
    file = write_toml(tmp_path / "gateway.toml", gateway_config())
    result = filtergate(site, "check", "-c", str(file), extra_path=exits)
    assert result.returncode == 2
    assert "plugin 'exits-plugin'" in result.stderr
    assert "SystemExit" in result.stderr


class _Broken(Filter):
    """A filter type whose instances cannot start, or whose around_upstream is sync."""

    name = "broken"
    stage = Stage.EDGE

    def __init__(self, config: Any, context: Any) -> None:
        super().__init__(config, context)
        raise RuntimeError("boom in __init__")

    def on_request(self, exchange: Any) -> None:
        pass


class _SyncAround(Filter):
    name = "sync-around"
    stage = Stage.EDGE

    def around_upstream(self, exchange: Any, call: Any, call_next: Any) -> Any:  # not async
        return call_next(call)


class _BrokenPlugin:
    @hookimpl
    def filtergate_filters(self) -> list[type[Any]]:
        return [_Broken, _SyncAround]


@pytest.mark.parametrize(
    ("plugin", "path", "message"),
    [
        ("broken", "plugins.broken", "failed to start: RuntimeError: boom in __init__"),
        ("sync-around", "routes[0]", "around_upstream must be async"),
    ],
)
async def test_a_filter_that_cannot_start_is_a_config_error(
    plugin: str, path: str, message: str
) -> None:
    """A traceback and exit 1 before: a plugin's bug is named, with exit 2."""
    config = {
        "upstreams": {"u": {"targets": ["127.0.0.1:1"]}},
        "plugins": {plugin: {}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
    }
    with trio.fail_after(5), pytest.raises(ConfigError, match=message) as info:
        async with open_gateway(config, extra_plugins=[("broken-plugin", _BrokenPlugin())]):
            pytest.fail("the gateway started")
    assert info.value.path == path


class _SetupFails(Filter):
    """A filter whose ``setup`` raises (e.g. a resource it cannot do without)."""

    name = "setup-fails"
    stage = Stage.EDGE

    async def setup(self) -> None:
        raise RuntimeError("cannot reach the policy server")

    def on_request(self, exchange: Any) -> None:
        pass


class _SetupExits(Filter):
    """A setup that calls sys.exit: on a reload it ended the whole gateway."""

    name = "setup-exits"
    stage = Stage.EDGE

    async def setup(self) -> None:
        raise SystemExit(3)

    def on_request(self, exchange: Any) -> None:
        pass


class _SetupFailsPlugin:
    @hookimpl
    def filtergate_filters(self) -> list[type[Any]]:
        return [_SetupFails, _SetupExits]


@pytest.mark.parametrize(
    ("where", "path"),
    [("global", "plugins.setup-fails"), ("route", "routes[1].plugins.setup-fails")],
)
async def test_a_setup_that_fails_names_its_table(where: str, path: str) -> None:
    """A traceback and exit 1 before: the failure is named by the table's key path."""
    config: dict[str, Any] = {
        "upstreams": {"u": {"targets": ["127.0.0.1:1"]}},
        "routes": [
            {"name": "a", "prefix": "/a", "upstream": "u"},
            {"name": "b", "prefix": "/", "upstream": "u"},
        ],
    }
    if where == "global":
        config["plugins"] = {"setup-fails": {}}
    else:
        config["routes"][1]["plugins"] = {"setup-fails": {}}
    errors: list[ConfigError] = []
    with trio.fail_after(5):
        try:
            async with open_gateway(config, extra_plugins=[("p", _SetupFailsPlugin())]):
                pytest.fail("the gateway started")
        except* ConfigError as group:  # from within open_gateway's nursery
            errors += [e for e in group.exceptions if isinstance(e, ConfigError)]
    (error,) = errors
    assert error.path == path
    assert "failed to set up: RuntimeError: cannot reach the policy server" in str(error)


async def test_a_reload_whose_setup_fails_is_refused(stubs: Stubs) -> None:
    """The old config keeps serving; the error names the new table."""
    config: dict[str, Any] = {
        "upstreams": {"echo": {"targets": [stubs.target("echo")]}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "echo"}],
    }
    with trio.fail_after(10):
        async with open_gateway(config, extra_plugins=[("p", _SetupFailsPlugin())]) as gw:
            gateway: Gateway = gw.gateway
            before = gateway.runtime
            broken = _listen_anywhere({**config, "plugins": {"setup-fails": {}}})
            with pytest.raises(ConfigError, match=r"^plugins\.setup-fails: filter 'setup-fails'"):
                await gateway.reload(load(broken))
            assert gateway.runtime is before
            exits = _listen_anywhere({**config, "plugins": {"setup-exits": {}}})
            with pytest.raises(ConfigError, match="failed to set up: SystemExit: 3"):
                await gateway.reload(load(exits))
            assert gateway.runtime is before
            assert (await http_request(gw.port, "GET", "/still")).status == 200


SETUP_FAILS_MODULE = """
from engine.chain import Filter, Stage
from engine.plugins import hookimpl


class SetupFails(Filter):
    name = "setup-fails"
    stage = Stage.EDGE

    async def setup(self):
        raise RuntimeError("cannot reach the policy server")

    def on_request(self, exchange):
        pass


@hookimpl
def filtergate_filters():
    return [SetupFails]
"""


def test_run_exits_2_naming_a_failed_setup(tmp_path: Path) -> None:
    """`filtergate check` cannot see it (setup runs only when serving): `run` names it."""
    extra = tmp_path / "site"
    extra.mkdir()
    module = SETUP_FAILS_MODULE
    install_fake_dist(extra, "fgtest-setup", "1.0", "setup-plugin", "fgtest_setup", module)
    config = {
        "server": {"listen": ["127.0.0.1:0"]},
        "admin": {"enabled": False},
        "upstreams": {"u": {"targets": ["127.0.0.1:1"]}},
        "plugins": {"setup-fails": {}},
        "routes": [{"name": "r", "prefix": "/", "upstream": "u"}],
    }
    file = write_toml(tmp_path / "gateway.toml", config)
    result = filtergate(extra, "run", "-c", str(file))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        f"{file}: plugins.setup-fails: filter 'setup-fails' failed to set up: "
        "RuntimeError: cannot reach the policy server"
    ) in result.stderr


CLASH_MODULE = """
from engine.chain import Filter, Stage
from engine.plugins import hookimpl


class Another(Filter):
    name, stage = "another", Stage.EDGE

    def on_request(self, exchange):
        pass


@hookimpl
def filtergate_filters():
    return [Another]
"""


@pytest.mark.parametrize(
    ("ep", "taken_by"),
    [("rate-limit", "the built-in plugin"), ("probe-plugin", "fgtest-probe 2.5.0")],
)
def test_an_entry_point_name_already_taken_is_an_error(
    site: Path, tmp_path: Path, ep: str, taken_by: str
) -> None:
    """The second of two plugins with one name was skipped without a word: installed,
    listed nowhere, and its filters unknown."""
    extra = tmp_path / "site"
    extra.mkdir()
    install_fake_dist(extra, "fgtest-clash", "3.0", ep, "fgtest_clash", CLASH_MODULE)
    file = write_toml(tmp_path / "gateway.toml", gateway_config())
    result = filtergate(site, "check", "-c", str(file), extra_path=extra)
    assert result.returncode == 2
    assert f"plugin {ep!r} (fgtest-clash 3.0): the name is taken by {taken_by}" in result.stderr


def test_a_filter_name_two_distributions_provide_names_both(site: Path, tmp_path: Path) -> None:
    extra = tmp_path / "site"
    extra.mkdir()
    copy = CLASH_MODULE.replace('"another"', '"probe"')
    install_fake_dist(extra, "fgtest-copy", "1.1", "copy-plugin", "fgtest_copy", copy)
    file = write_toml(tmp_path / "gateway.toml", gateway_config())
    result = filtergate(site, "check", "-c", str(file), extra_path=extra)
    assert result.returncode == 2
    message = result.stderr
    assert "filter name 'probe'" in message
    assert "fgtest-copy 1.1" in message
    assert "fgtest-probe 2.5.0" in message


@dataclass(frozen=True)
class _SetConfig:
    tags: set[str] = field(default_factory=set)


class _SetFilter(Filter):
    name, stage, Config = "set-config", Stage.EDGE, _SetConfig

    def on_request(self, exchange: Any) -> None:
        pass


class _Misspelled(Filter):
    name, stage = "misspelled", Stage.EDGE

    def on_response(self, exchange: Any, response: Any) -> None:
        pass

    def on_requets(self, exchange: Any) -> None:  # never called
        pass


def test_a_config_field_toml_cannot_fill_is_the_plugin_s_error() -> None:
    """A set[str] field passed discovery, and every user's config then failed with
    'expected set' at a key they had written right."""
    with pytest.raises(PluginError, match=r"Config field tags: set\[str\] cannot be read"):
        discover(extra=[("sets", FilterSet(_SetFilter))], entry_points=False)


def test_a_misspelled_phase_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="filtergate.plugins")
    registry = discover(extra=[("typo", FilterSet(_Misspelled))], entry_points=False)
    assert registry.get("misspelled") is not None
    (warning,) = [r.getMessage() for r in caplog.records if "misspelled" in r.getMessage()]
    assert "on_requets, which no phase is" in warning


def test_a_blocked_name_no_plugin_has_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """blocked = ["rate-limt"] blocked nothing, without a word."""
    caplog.set_level(logging.WARNING, logger="filtergate.plugins")
    registry = discover(blocked=["rate-limt", "key-auth"], entry_points=False)
    assert registry.get("key-auth") is None
    assert registry.get("rate-limit") is not None
    (warning,) = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert warning.startswith("[discovery] blocked names no plugin: rate-limt (plugins: ")
