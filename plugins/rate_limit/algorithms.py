"""The three rate-limit algorithms as pure state machines: time is an argument.

Every algorithm keeps a small mutable state per (key, quota) and answers two questions
at an instant ``now`` (seconds on any monotonic clock):

``check(state, quota, now) -> Verdict``
    Would one more request be admitted, and what would the quota look like after it?
    Does not change the state.
``commit(state, quota, now)``
    Count the request (call only after ``check`` admitted it at the same ``now``).
``take(state, quota, now) -> Verdict``
    ``check``, then ``commit`` when admitted, in one call: what a single-quota policy
    does per request.

Splitting the two lets a route with several quotas (10 per second *and* 1000 per hour)
admit a request only when every quota has room, and spend from none when one refuses.
The Redis scripts in :mod:`plugins.rate_limit.redis` implement the same arithmetic in Lua
on the server's clock; keep the two in step.

Error bound of the sliding-window counter (``sliding-window``): it keeps two fixed-window
counts (previous ``p`` and current ``c``) and estimates the sliding count as
``p * (1 - f) + c`` where ``f`` is the fraction of the current window elapsed. Every
fixed (aligned) window admits at most ``limit``. Any interval of length ``d <= window``
admits at most ``limit * (1 + d / window)`` requests, reached only when the previous
window's requests all came at its very end; so a burst straddling a window boundary can
never double (an interval of length ``d -> 0`` admits at most ``limit`` plus one), and
the worst interval of a full window length approaches, but never reaches, ``2 * limit``.
Use ``sliding-log`` where the limit must be exact.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Quota",
    "SlidingLog",
    "SlidingLogState",
    "SlidingWindow",
    "SlidingWindowState",
    "TokenBucket",
    "TokenBucketState",
    "Verdict",
    "new_verdict",
]

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Quota:
    """``limit`` requests per ``window`` seconds; ``burst`` is a token bucket's capacity."""

    limit: int
    window: float
    burst: int | None = None

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.limit


class Verdict(NamedTuple):
    """The answer for one quota.

    ``remaining`` is what is left after this request if it is admitted (else 0);
    ``reset`` the seconds until the quota is whole again if no more requests come;
    ``retry_after`` the seconds until one request would be admitted (0 when admitted).
    """

    # A NamedTuple, not a frozen dataclass: made once per quota per request, and a
    # frozen dataclass's __init__ costs several times more.
    allowed: bool
    remaining: int
    reset: float
    retry_after: float


# ``Verdict(...)`` runs the NamedTuple's ``__new__``, a Python function; this makes the
# same tuple in C, for verdicts made once per request: all four fields, in order.
new_verdict: Callable[[tuple[bool, int, float, float]], Verdict] = functools.partial(
    tuple.__new__, Verdict
)


class Algorithm(Protocol, Generic[S]):
    """One rate-limit algorithm: a state factory plus ``check`` and ``commit``."""

    name: str

    def new_state(self, quota: Quota, now: float) -> S: ...

    def check(self, state: S, quota: Quota, now: float) -> Verdict: ...

    def commit(self, state: S, quota: Quota, now: float) -> None: ...

    def take(self, state: S, quota: Quota, now: float) -> Verdict: ...

    def idle_at(self, state: S, quota: Quota) -> float:
        """The instant from which ``state`` is equivalent to a new one (may be dropped)."""
        ...

    def horizon(self, quota: Quota) -> float:
        """The longest a state can stay not idle after its last request."""
        ...


# --- sliding-window counter -------------------------------------------------------------


class SlidingWindowState:
    """Counts of the current aligned window (index ``index``) and of the one before."""

    __slots__ = ("current", "index", "previous")

    def __init__(self, index: int) -> None:
        self.index = index
        self.current = 0
        self.previous = 0


class SlidingWindow:
    """The sliding-window counter: weighted previous + current fixed window.

    See the module docstring for its error bound.
    """

    name = "sliding-window"

    def new_state(self, quota: Quota, now: float) -> SlidingWindowState:
        return SlidingWindowState(math.floor(now / quota.window))

    @staticmethod
    def _roll(state: SlidingWindowState, index: int) -> tuple[int, int]:
        """``(previous, current)`` as they are in window ``index``."""
        if index == state.index:
            return state.previous, state.current
        if index == state.index + 1:
            return state.current, 0
        return 0, 0

    def check(self, state: SlidingWindowState, quota: Quota, now: float) -> Verdict:
        return self.take(state, quota, now, False)

    def take(
        self, state: SlidingWindowState, quota: Quota, now: float, count: bool = True
    ) -> Verdict:
        """``check``, and with ``count`` (the default) the ``commit`` of an admitted request.

        The per-request path of a single-quota policy: the window is rolled once, and an
        admitted verdict is made without the NamedTuple's Python ``__new__``.
        """
        w = quota.window
        index = math.floor(now / w)
        if index == state.index:  # still the last request's window: nothing to roll
            previous, current = state.previous, state.current
        else:
            previous, current = self._roll(state, index)
        start = index * w
        elapsed = (now - start) / w
        weight = 1.0 - elapsed
        estimate = previous * weight + current
        if estimate + 1 <= quota.limit:
            if count:
                state.index, state.previous, state.current = index, previous, current + 1
            after = estimate + 1
            # Never negative: after <= limit here (no max() call needed).
            remaining = math.floor(quota.limit - after)
            # Whole again once the current window (with this request) has slid out.
            reset = start + 2 * w - now
            return new_verdict((True, remaining, reset, 0.0))
        return Verdict(
            False,
            0,
            self._full_reset(previous, current, start, w, now),
            self._retry_after(quota.limit, previous, current, start, w, now),
        )

    @staticmethod
    def _full_reset(previous: int, current: int, start: float, w: float, now: float) -> float:
        if current:
            return start + 2 * w - now
        if previous:
            return start + w - now
        return 0.0

    @staticmethod
    def _retry_after(
        limit: int, previous: int, current: int, start: float, w: float, now: float
    ) -> float:
        room = limit - 1  # the estimate must fall to this for one more request
        if current <= room and previous > 0:
            # Within this window, once the previous window's weight has decayed enough.
            f = 1.0 - (room - current) / previous
            return max(0.0, start + f * w - now)
        # Here current > room: in the next window, this count decays as the previous one.
        f = 1.0 - room / current
        return max(0.0, start + w + f * w - now)

    def commit(self, state: SlidingWindowState, quota: Quota, now: float) -> None:
        index = math.floor(now / quota.window)
        state.previous, state.current = self._roll(state, index)
        state.index = index
        state.current += 1

    def idle_at(self, state: SlidingWindowState, quota: Quota) -> float:
        return (state.index + 2) * quota.window

    def horizon(self, quota: Quota) -> float:
        return 2 * quota.window


# --- sliding log ------------------------------------------------------------------------


class SlidingLogState:
    """The instants of the admitted requests still inside the window (at most ``limit``)."""

    __slots__ = ("log",)

    def __init__(self, limit: int) -> None:
        # maxlen bounds memory even if a caller commits without checking.
        self.log: deque[float] = deque(maxlen=limit)


class SlidingLog:
    """The exact sliding window: one timestamp per admitted request."""

    name = "sliding-log"

    def new_state(self, quota: Quota, now: float) -> SlidingLogState:
        return SlidingLogState(quota.limit)

    @staticmethod
    def _prune(state: SlidingLogState, quota: Quota, now: float) -> None:
        log = state.log
        horizon = now - quota.window
        while log and log[0] <= horizon:
            log.popleft()

    def check(self, state: SlidingLogState, quota: Quota, now: float) -> Verdict:
        # Pruning expired entries does not change the decision, only the memory held.
        self._prune(state, quota, now)
        log = state.log
        if len(log) < quota.limit:
            return Verdict(True, quota.limit - len(log) - 1, quota.window, 0.0)
        # The oldest entry must leave the window to free one slot.
        retry = log[len(log) - quota.limit] + quota.window - now
        return Verdict(False, 0, log[-1] + quota.window - now, max(0.0, retry))

    def commit(self, state: SlidingLogState, quota: Quota, now: float) -> None:
        state.log.append(now)

    def take(self, state: SlidingLogState, quota: Quota, now: float) -> Verdict:
        verdict = self.check(state, quota, now)
        if verdict.allowed:
            state.log.append(now)
        return verdict

    def idle_at(self, state: SlidingLogState, quota: Quota) -> float:
        return state.log[-1] + quota.window if state.log else -math.inf

    def horizon(self, quota: Quota) -> float:
        return quota.window


# --- token bucket -----------------------------------------------------------------------


class TokenBucketState:
    """Tokens in the bucket at instant ``stamp``."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class TokenBucket:
    """A bucket of ``burst`` tokens (default ``limit``) refilled at ``limit / window``/s."""

    name = "token-bucket"

    def new_state(self, quota: Quota, now: float) -> TokenBucketState:
        return TokenBucketState(float(quota.capacity), now)

    @staticmethod
    def _tokens(state: TokenBucketState, quota: Quota, now: float) -> float:
        rate = quota.limit / quota.window
        return min(float(quota.capacity), state.tokens + max(0.0, now - state.stamp) * rate)

    def check(self, state: TokenBucketState, quota: Quota, now: float) -> Verdict:
        rate = quota.limit / quota.window
        tokens = self._tokens(state, quota, now)
        if tokens >= 1.0:
            after = tokens - 1.0
            return Verdict(True, math.floor(after), (quota.capacity - after) / rate, 0.0)
        return Verdict(False, 0, (quota.capacity - tokens) / rate, (1.0 - tokens) / rate)

    def commit(self, state: TokenBucketState, quota: Quota, now: float) -> None:
        state.tokens = self._tokens(state, quota, now) - 1.0
        state.stamp = now

    def take(self, state: TokenBucketState, quota: Quota, now: float) -> Verdict:
        verdict = self.check(state, quota, now)
        if verdict.allowed:
            self.commit(state, quota, now)
        return verdict

    def idle_at(self, state: TokenBucketState, quota: Quota) -> float:
        rate = quota.limit / quota.window
        return state.stamp + (quota.capacity - state.tokens) / rate

    def horizon(self, quota: Quota) -> float:
        # Tokens never go below 0, so a bucket is full again at most this long after.
        return quota.capacity * quota.window / quota.limit


ALGORITHMS: dict[str, Algorithm[Any]] = {
    "sliding-window": SlidingWindow(),
    "sliding-log": SlidingLog(),
    "token-bucket": TokenBucket(),
}
"""The algorithms by config name."""
