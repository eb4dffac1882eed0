"""The addresses of upstream targets given by name, kept fresh in the background.

A pool asks :meth:`Names.addresses` for a target's addresses each time it opens a
connection. The first ask for a name starts one *keeper* (a trio system task) that
looks the name up, then again every :data:`NAME_REFRESH` seconds for as long as the
pool is open, as Envoy's ``dns_refresh_rate``:

- every connection uses the addresses of the last lookup that succeeded, without
  waiting, for up to :data:`NAME_STALE` seconds; so a resolver that fails or hangs
  delays no connection, and a DNS outage does not take out every upstream given by
  name;
- only when a name has no usable addresses (its first lookup, or its addresses have
  gone stale) does a connection wait for a lookup, and then every connection at once
  waits for the same one (no lookup per connection), each within its own deadline;
- when a lookup no longer gives some addresses, ``on_change`` is called with them, and
  the pool lets go of its connections to them (blue/green behind one name).

Addresses given as IP literals are not cached: looking them up is instant.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from engine.sockets import RESOURCE_ERRORS

__all__ = ["NAME_LOOKUP_TIMEOUT", "NAME_REFRESH", "NAME_STALE", "Names", "lookup"]

log = logging.getLogger("filtergate.upstream")

NAME_REFRESH = 5.0  # seconds between two lookups of a name (Envoy's default)
NAME_STALE = 300.0  # seconds a name's last good addresses serve while lookups fail
NAME_LOOKUP_TIMEOUT = 10.0  # seconds a keeper's lookup may take

Key = tuple[str, int]


async def lookup(host: str, port: int, deadline: float) -> list[Any]:
    """The addresses of ``host`` (``getaddrinfo``), by ``deadline``. Raises ``OSError``
    (with ``EMFILE`` when what the lookup lacked was a descriptor) or ``TooSlowError``."""
    try:
        with trio.CancelScope(deadline=deadline) as scope:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        _raise_shortage()  # the lookup needs descriptors too (/etc/hosts, a DNS socket)
        raise
    if scope.cancelled_caught:
        raise trio.TooSlowError
    if not infos:
        raise OSError(f"cannot resolve {host}")
    return list(infos)


def _raise_shortage() -> None:
    """Raise ``OSError(EMFILE)`` when this process cannot open a socket now: a failed
    name lookup may say "not known" when what it lacked was a descriptor."""
    try:
        socket.socket().close()
    except OSError as e:
        if e.errno in RESOURCE_ERRORS:
            raise OSError(e.errno, f"the name lookup failed: {e.strerror}") from None


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Name:
    __slots__ = ("done", "error", "good_until", "infos", "looking", "wake")

    def __init__(self) -> None:
        self.infos: list[Any] | None = None  # of the last lookup that succeeded
        self.good_until = 0.0  # they serve until then
        self.error: OSError | trio.TooSlowError | None = None  # of the last lookup
        self.looking = False
        self.done = trio.Event()  # set when the next lookup ends (then replaced)
        self.wake = trio.Event()  # set to have the keeper look up now, not at its time


class Names:
    """The names of one pool's targets (see the module docstring)."""

    def __init__(
        self, owner: str, on_change: Callable[[Key, set[Any]], None] | None = None
    ) -> None:
        self.owner = owner
        self.on_change = on_change
        self.closed = False
        self._names: dict[Key, _Name] = {}

    def adopt(self, other: Names, keys: set[Key]) -> None:
        """Start from what ``other`` (the pool an accepted reload replaces) knows of
        ``keys`` (this pool's targets), so that a reload during a DNS outage does not
        start from nothing."""
        for key, old in other._names.items():
            if key in keys and old.infos is not None and key not in self._names:
                name = self._names[key] = _Name()
                name.infos, name.good_until = old.infos, old.good_until
                trio.lowlevel.spawn_system_task(self._keep, key, name)

    def close(self) -> None:
        self.closed = True  # keepers end after their current lookup or sleep

    async def addresses(self, host: str, port: int, deadline: float) -> list[Any]:
        """The addresses to connect to ``host`` by ``deadline``. Raises ``OSError``
        (the lookup's failure) or ``trio.TooSlowError``."""
        if self.closed:  # a request still running on a pool a reload replaced
            return await lookup(host, port, deadline)
        key = (host, port)
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = _Name()
            name.looking = True  # the keeper's first lookup starts at once
            trio.lowlevel.spawn_system_task(self._keep, key, name)
        if name.infos is not None and trio.current_time() < name.good_until:
            return name.infos
        # Nothing usable: a lookup now (one, however many connections wait for it).
        done = name.done
        if not name.looking:
            name.wake.set()
        with trio.CancelScope(deadline=deadline) as scope:
            await done.wait()
        if scope.cancelled_caught:
            raise trio.TooSlowError
        if name.infos is not None and trio.current_time() < name.good_until:
            return name.infos
        if self.closed or name.error is None:  # the pool closed meanwhile
            return await lookup(host, port, deadline)
        raise _again(name.error)

    async def _keep(self, key: Key, name: _Name) -> None:
        """Look ``key`` up now and every NAME_REFRESH seconds until the pool closes (a
        system task: it must never raise anything but Cancelled)."""
        host, port = key
        while not self.closed:
            name.looking = True
            try:
                infos = await lookup(host, port, trio.current_time() + NAME_LOOKUP_TIMEOUT)
            except (OSError, trio.TooSlowError) as e:
                name.error = e
                if name.infos is not None:
                    log.warning(
                        "upstream %s: looking up %s failed (%s); its last addresses serve",
                        self.owner,
                        host,
                        str(e) or "timed out",
                    )
            except Exception as e:  # a resolver's odd error: never the run's end
                name.error = OSError(f"looking up {host} failed: {e!r}")
                log.exception("upstream %s: looking up %s failed", self.owner, host)
            else:
                old, name.infos = name.infos, infos
                name.good_until = trio.current_time() + NAME_STALE
                name.error = None
                try:  # (an else: clause is outside the excepts above)
                    gone = _sockaddrs(old) - _sockaddrs(infos) if old is not None else set()
                    if gone:
                        log.info("upstream %s: %s moved off %s", self.owner, host, gone)
                        if self.on_change is not None:
                            self.on_change(key, gone)
                except Exception:
                    log.exception("upstream %s: letting go of %s's old addresses", self.owner, host)
            finally:
                name.looking = False
                name.done.set()
                name.done = trio.Event()
            name.wake = trio.Event()
            with trio.move_on_after(NAME_REFRESH):
                await name.wake.wait()
        name.done.set()  # closed: whoever still waits looks up for itself


def _sockaddrs(infos: list[Any]) -> set[Any]:
    return {info[4] for info in infos}


def _again(error: OSError | trio.TooSlowError) -> OSError | trio.TooSlowError:
    """A new exception like ``error`` (one exception object is never raised twice)."""
    if isinstance(error, trio.TooSlowError):
        return trio.TooSlowError()
    if error.errno is None:
        return OSError(str(error))
    return OSError(error.errno, error.strerror or str(error))
