"""Plugin discovery with pluggy: built-ins by name, third parties by entry point.

pluggy is used at start-up and reload only; per request the engine runs the compiled
chains of :mod:`engine.chain`. A plugin is any module or object with hook
implementations; the one hook that matters is :func:`HookSpec.filtergate_filters`.

A third-party package declares itself in its ``pyproject.toml``::

    [project.entry-points.filtergate]
    header-stamp = "filtergate_header_stamp"

and its module implements::

    from engine.plugins import hookimpl

    @hookimpl
    def filtergate_filters():
        return [HeaderStamp]
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from engine.chain import FILTER_API_VERSION, Stage
from engine.schema import unsupported_field

log = logging.getLogger("filtergate.plugins")

__all__ = [
    "PluginError",
    "Registry",
    "discover",
    "hookimpl",
    "hookspec",
]

PROJECT = "filtergate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpec:
    """The hooks a filtergate plugin may implement."""

    @hookspec
    def filtergate_filters(self) -> Sequence[type[Any]]:  # type: ignore[empty-body]
        """Return the filter types this plugin provides.

        Each is a class with ``name`` (unique, kebab-case), ``stage`` (a
        :class:`~engine.chain.Stage`), ``Config`` (a dataclass: the config schema),
        ``api_version`` (the filter API it was written for) and any phase methods.
        """


class PluginError(Exception):
    """A plugin cannot be used: wrong API version, duplicate name, bad filter type."""


@dataclass(frozen=True)
class FilterInfo:
    """A discovered filter type and where it came from."""

    type: type[Any]
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class Registry:
    """Filter types by name, as discovered."""

    filters: dict[str, FilterInfo]
    blocked: tuple[str, ...]

    def get(self, name: str) -> FilterInfo | None:
        return self.filters.get(name)


_PHASES = ("on_request", "on_response", "around_upstream", "on_log")


def _validate_type(cls: Any, plugin: str) -> None:
    for attr in ("name", "stage"):
        if not hasattr(cls, attr):
            raise PluginError(f"plugin {plugin!r}: filter type {cls!r} has no {attr!r}")
    if not isinstance(cls.stage, Stage):
        raise PluginError(f"plugin {plugin!r}: filter {cls.name!r} has no valid stage")
    version = getattr(cls, "api_version", None)
    if version != FILTER_API_VERSION:
        raise PluginError(
            f"plugin {plugin!r}: filter {cls.name!r} was written for filter API "
            f"version {version!r}, this filtergate implements version {FILTER_API_VERSION}"
        )
    if not any(hasattr(cls, p) for p in _PHASES):
        raise PluginError(f"plugin {plugin!r}: filter {cls.name!r} defines no phase")
    config = getattr(cls, "Config", None)
    if not isinstance(config, type) or not dataclasses.is_dataclass(config):
        raise PluginError(f"plugin {plugin!r}: filter {cls.name!r}: Config must be a dataclass")
    bad = unsupported_field(config)
    if bad is not None:
        raise PluginError(
            f"plugin {plugin!r}: filter {cls.name!r}: Config field {bad} cannot be read "
            "from TOML (use str, int, float, bool, Duration, ByteSize, Literal, list, "
            "tuple, dict, a dataclass, or an Optional of one)"
        )
    near = [
        name
        for name in dir(cls)
        if name.startswith(("on_", "around_"))
        and name not in _PHASES
        and callable(getattr(cls, name))
    ]
    if near:
        log.warning(
            "plugin %r: filter %r has %s, which no phase is (the phases: %s); it is never called",
            plugin,
            cls.name,
            ", ".join(near),
            ", ".join(_PHASES),
        )


def _builtin_modules() -> list[str]:
    import plugins

    return list(plugins.BUILTIN)


def discover(
    blocked: Iterable[str] = (),
    extra: Iterable[tuple[str, object]] = (),
    entry_points: bool = True,
) -> Registry:
    """Find every filter type: built-ins, entry points of group ``filtergate``, ``extra``.

    ``blocked`` names plugins (built-in module short names or entry-point names) not to
    load. ``extra`` registers ``(name, plugin object)`` pairs, as tests do.
    Raises :class:`PluginError` naming the plugin on any problem.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpec)
    blocked = tuple(blocked)
    for name in blocked:
        pm.set_blocked(name)
    dists: dict[int, tuple[str, str]] = {}
    # In registration order (pluggy's get_plugins is a set): built-ins, extras, entry
    # points, so that a clash is always told the same way.
    registered: list[tuple[str, object]] = []
    owners: dict[str, str] = {}  # plugin name -> who registered it, for clash messages

    def register(obj: object, name: str, owner: str) -> None:
        try:
            pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            raise PluginError(f"plugin {name!r}: {e}") from None
        registered.append((name, obj))
        owners[name] = owner

    known = {m.rsplit(".", 1)[-1].replace("_", "-") for m in _builtin_modules()}
    known |= {name for name, _ in extra}
    known |= {ep.name for ep in importlib.metadata.entry_points(group=PROJECT)}
    unknown = sorted(set(blocked) - known)
    if unknown:  # a typo blocks nothing, and says nothing
        log.warning(
            "[discovery] blocked names no plugin: %s (plugins: %s)",
            ", ".join(unknown),
            ", ".join(sorted(known)),
        )
    for modname in _builtin_modules():
        short = modname.rsplit(".", 1)[-1].replace("_", "-")
        if not pm.is_blocked(short):
            register(importlib.import_module(modname), short, "the built-in plugin")
    extra_names = set()
    for name, obj in extra:
        extra_names.add(name)
        if not pm.is_blocked(name):
            register(obj, name, f"plugin {name!r}")
    if entry_points:
        # pluggy's load_setuptools_entrypoints would let an import error of one broken
        # package escape as a traceback, and skip a name taken before without a word;
        # each is loaded here and named when it fails.
        for ep in importlib.metadata.entry_points(group=PROJECT):
            if pm.is_blocked(ep.name):
                continue
            dist = ep.dist
            dname = dist.metadata["name"] if dist is not None else "?"
            dversion = dist.version if dist is not None else "?"
            if pm.has_plugin(ep.name):
                if ep.name in extra_names:
                    continue  # registered by the embedding code itself (tests): it wins
                raise PluginError(
                    f"plugin {ep.name!r} ({dname} {dversion}): the name is taken by "
                    f"{owners[ep.name]}; one of the two must be renamed or uninstalled "
                    "(blocking the name would block both)"
                )
            try:
                obj = ep.load()
            except (Exception, SystemExit) as e:  # a module that exits (argparse) too
                raise PluginError(
                    f"plugin {ep.name!r} ({dname} {dversion}): cannot be loaded: "
                    f"{type(e).__name__}: {e}{_where(e)} (to run without it, list "
                    f'"{ep.name}" in [discovery] blocked)'
                ) from None
            register(obj, ep.name, f"{dname} {dversion}")
            dists[id(obj)] = (dname, dversion)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {pm.get_name(e.plugin)!r}: {e}") from None

    filters: dict[str, FilterInfo] = {}
    for pname, plugin in registered:
        impl = getattr(plugin, "filtergate_filters", None)
        if impl is None:
            continue
        dname, dversion = dists.get(id(plugin), ("filtergate (built-in)", _own_version()))
        try:
            types = list(impl())
        except (Exception, SystemExit) as e:
            raise PluginError(f"plugin {pname!r}: filtergate_filters() failed: {e}") from None
        for cls in types:
            _validate_type(cls, pname)
            if cls.name in filters:
                other = filters[cls.name]
                raise PluginError(
                    f"plugin {pname!r} ({dname} {dversion}): filter name {cls.name!r} is "
                    f"already provided by plugin {other.plugin!r} ({other.distribution} "
                    f"{other.version}); block one of the two in [discovery] blocked"
                )
            filters[cls.name] = FilterInfo(cls, pname, dname, dversion)
    return Registry(filters=filters, blocked=blocked)


def _where(e: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame an exception went through (where a
    plugin's import failed), or of the file a syntax error is in."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" at {e.filename}:{e.lineno}"
    tb = e.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("filtergate")
    except PackageNotFoundError:
        return "0+unknown"
