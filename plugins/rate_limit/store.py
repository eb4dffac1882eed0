"""What every rate-limit store shares: policies, outcomes, and the store interface."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from plugins.rate_limit.algorithms import ALGORITHMS, Quota, Verdict

__all__ = [
    "Outcome",
    "Policy",
    "Store",
    "StoreUnavailable",
    "combine",
    "format_policy",
    "new_outcome",
]


class StoreUnavailable(Exception):
    """The store could not decide (unreachable, too slow, or it answered an error)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The quotas one tier of callers gets, under one algorithm.

    ``name`` is ``""`` for the route's default limits and ``"g:GROUP"`` for a group's;
    it is part of every counter's key, so tiers never share counters.
    ``header`` is the ``RateLimit-Policy`` value; ``horizon`` the longest a key's
    counters can stay in use after its last request.
    """

    name: str
    algorithm: str
    quotas: tuple[Quota, ...]
    header: bytes
    horizon: float

    @classmethod
    def build(cls, name: str, algorithm: str, quotas: Sequence[Quota]) -> Policy:
        """Raises ``KeyError`` for an unknown algorithm."""
        alg = ALGORITHMS[algorithm]
        horizon = max(alg.horizon(q) for q in quotas)
        return cls(name, algorithm, tuple(quotas), format_policy(quotas, algorithm), horizon)


def _seconds(value: float) -> str:
    return f"{value:g}"


def format_policy(quotas: Sequence[Quota], algorithm: str) -> bytes:
    """The ``RateLimit-Policy`` value, e.g. ``10;w=1, 1000;w=3600``.

    Token buckets add their capacity as ``burst`` (an extension parameter the draft
    allows): ``10;w=1;burst=20``.
    """
    items = []
    for q in quotas:
        item = f"{q.limit};w={_seconds(q.window)}"
        if algorithm == "token-bucket":
            item += f";burst={q.capacity}"
        items.append(item)
    return ", ".join(items).encode()


class Outcome(NamedTuple):
    """The decision for one request, and the quota its headers describe.

    When admitted, the reported quota is the one closest to exhaustion (fewest
    remaining; the longest reset breaks ties); when refused, the refusing quota that
    frees up last, whose ``retry_after`` is the request's ``Retry-After``.
    """

    allowed: bool
    quota: Quota
    remaining: int
    reset: float
    retry_after: float


# As ``new_verdict``: an Outcome made in C, without the NamedTuple's Python ``__new__``.
new_outcome: Callable[[tuple[bool, Quota, int, float, float]], Outcome] = functools.partial(
    tuple.__new__, Outcome
)


def combine(quotas: Sequence[Quota], verdicts: Sequence[Verdict]) -> Outcome:
    """One :class:`Outcome` from the verdicts of every quota of a policy."""
    best: tuple[Quota, Verdict] | None = None
    if all(v.allowed for v in verdicts):
        for q, v in zip(quotas, verdicts, strict=True):
            if best is None or (v.remaining, -v.reset) < (best[1].remaining, -best[1].reset):
                best = (q, v)
        assert best is not None
        q, v = best
        return Outcome(True, q, v.remaining, v.reset, 0.0)
    for q, v in zip(quotas, verdicts, strict=True):
        if not v.allowed and (best is None or v.retry_after > best[1].retry_after):
            best = (q, v)
    assert best is not None
    q, v = best
    return Outcome(False, q, 0, v.reset, v.retry_after)


class Store(Protocol):
    """Where counters live. ``decide`` counts the request only when it is admitted."""

    async def decide(self, key: str, policy: Policy, now: float) -> Outcome:
        """Decide for one request of ``key`` under ``policy``.

        ``now`` is ``trio.current_time()``; a shared store uses its own clock instead.
        Raises :class:`StoreUnavailable` when no decision could be made in time.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
