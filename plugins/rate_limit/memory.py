"""The in-process store: counters in a bounded dict, least recently used first.

Memory stays bounded whatever the traffic: at most ``max_keys`` keys are kept. Keys whose
counters are back to their initial state ("idle") are dropped as traffic passes them
(a few per decision, from the least recently used end), and when the store is full the
least recently used key is dropped even if not idle; that key then starts afresh, which
errs on the side of admitting. Each drop of a non-idle key is counted in
``filtergate_rate_limit_evictions_total``. A ``sliding-log`` key holds up to ``limit``
timestamps per quota, so size ``max_keys`` with the sum of the limits in mind.
"""

from __future__ import annotations

from collections import OrderedDict

from engine import metrics
from plugins.rate_limit.algorithms import ALGORITHMS
from plugins.rate_limit.store import Outcome, Policy, combine, new_outcome

__all__ = ["MemoryStore"]

_evictions = metrics.counter(
    "filtergate_rate_limit_evictions_total",
    "Rate-limit keys dropped from a full memory store before they were idle.",
)

# Idle keys dropped per decision: more than the one key a decision can add, so idle
# keys drain under any traffic, and few enough to keep every decision O(1).
_SWEEP_PER_DECISION = 4


class _Entry:
    __slots__ = ("idle_at", "states")

    def __init__(self, states: list[object]) -> None:
        self.states = states
        self.idle_at = 0.0


class MemoryStore:
    """Counters for one filter instance, held in this process.

    :meth:`decide_now` is the synchronous core (pure given ``now``); :meth:`decide`
    is the :class:`~plugins.rate_limit.store.Store` interface.
    """

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def decide_now(self, key: str, policy: Policy, now: float) -> Outcome:
        """Decide for one request of ``key`` at instant ``now``; counts it if admitted.

        A ``key`` must always be used with the same ``policy`` (the filter puts the
        policy's name in the key).
        """
        algorithm = ALGORITHMS[policy.algorithm]
        quotas = policy.quotas
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self.max_keys:
                self._make_room(now)
            entry = _Entry([algorithm.new_state(q, now) for q in quotas])
            entries[key] = entry
        else:
            entries.move_to_end(key)
        states = entry.states
        if len(quotas) == 1:
            quota = quotas[0]
            allowed, remaining, reset, retry_after = algorithm.take(states[0], quota, now)
            outcome = new_outcome((allowed, quota, remaining, reset, retry_after))
        else:
            verdicts = [algorithm.check(s, q, now) for s, q in zip(states, quotas, strict=True)]
            outcome = combine(quotas, verdicts)
            if outcome.allowed:
                for s, q in zip(states, quotas, strict=True):
                    algorithm.commit(s, q, now)
        # An upper bound of when the counters are idle again, cheaper than the exact one;
        # entries are in last-use order, so idle ones gather at the front.
        entry.idle_at = now + policy.horizon
        if next(iter(entries.values())).idle_at <= now:  # else _sweep would stop at once
            self._sweep(now)
        return outcome

    async def decide(self, key: str, policy: Policy, now: float) -> Outcome:
        return self.decide_now(key, policy, now)

    def _sweep(self, now: float) -> None:
        entries = self._entries
        for _ in range(_SWEEP_PER_DECISION):
            if not entries:
                return
            oldest = next(iter(entries.values()))
            if oldest.idle_at > now:
                return
            entries.popitem(last=False)

    def _make_room(self, now: float) -> None:
        entries = self._entries
        while len(entries) >= self.max_keys:
            _key, entry = entries.popitem(last=False)
            if entry.idle_at > now:
                _evictions.inc()

    def sweep_all(self, now: float) -> int:
        """Drop every idle key (not only the least recently used ones); returns how many."""
        idle = [k for k, e in self._entries.items() if e.idle_at <= now]
        for k in idle:
            del self._entries[k]
        return len(idle)

    async def aclose(self) -> None:
        self._entries.clear()
