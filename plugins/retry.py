"""The ``retry`` filter: try a failed upstream call again, on another target, within a budget.

A call is retried only when all of these hold:

- its method is in ``methods`` (the idempotent ones unless a route says otherwise);
- it failed in a way that says the upstream did not act on it, or that acting twice is
  harmless: no target accepted a connection (error code ``upstream_unreachable``), the
  connection broke before the first byte of the response (``upstream_reset``), the
  upstream answered one of ``statuses`` (502 and 503 by default), or, with
  ``on_timeout = true``, it timed out;
- the call can be sent again: its body is buffered, or not one byte of a streamed body
  was sent (``call.replayable``), or the streamed body sent so far is still held in the
  replay buffer (at most ``replay_buffer`` bytes of it, kept as they are sent);
- fewer than ``attempts`` attempts were made;
- the retry budget allows it: retries in the last ``budget_window`` stay below
  ``budget_percent`` of the requests in it, plus a floor of ``min_retries_per_second``
  so that a quiet upstream can still be retried. During an outage the budget, not the
  attempt count, bounds the extra load, so retries cannot multiply it.

Before each retry the failed target joins ``call.exclude`` (the upstream pool picks
another target when there is one; when the pool has none left but excluded ones, the
retry goes to those again), the failed response is closed, and the filter sleeps
for an exponential backoff with full jitter: ``uniform(0, min(backoff_max, backoff_base *
2**n))`` before the n-th retry (n from 0).

Stage EDGE: this filter wraps the ``circuit-breaker`` filter (stage LIMIT), so every
attempt counts in the breaker, and an attempt refused by an open breaker
(:class:`~engine.errors.CircuitOpen`, or its fallback response) is never retried.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import trio

from engine.chain import CallNext, Filter, FilterContext, Stage
from engine.errors import GatewayError, NoHealthyTarget, UpstreamTimeout
from engine.exchange import BodyStream, Exchange, Response, UpstreamCall
from engine.metrics import counter
from engine.plugins import hookimpl
from engine.schema import ByteSize, Duration, Invalid
from plugins.circuit_breaker import FailedResponseHidden, RollingCount, is_fallback

__all__ = [
    "IDEMPOTENT_METHODS",
    "ReplayBuffer",
    "Retry",
    "RetryBudget",
    "RetryConfig",
    "backoff_cap",
]

_UNSENT_CODES = frozenset({"upstream_unreachable", "upstream_reset"})
"""Error codes of calls the upstream cannot have acted on (or, for a reset before any
response byte, of idempotent calls that are safe to send again): no target accepted a
connection, or the connection broke before the first byte of the response."""

IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
"""RFC 9110 section 9.2.2: sending these twice has the effect of sending them once."""


@dataclass(frozen=True)
class RetryConfig:
    # One retry: enough to step over a dead target or a stale connection; more mostly
    # adds latency to a request that is failing anyway (Envoy's default is also 1 retry).
    attempts: int = field(default=2, metadata={"doc": "attempts in all, the first included"})
    methods: tuple[str, ...] = field(
        default=IDEMPOTENT_METHODS,
        metadata={"doc": "methods that may be retried (set it to allow e.g. POST on a route)"},
    )
    # 502/503 mean the upstream (or a proxy in front of it) did not process the request;
    # 504 and 500 may come after the work was done.
    statuses: tuple[int, ...] = field(
        default=(502, 503), metadata={"doc": "upstream response statuses that are retried"}
    )
    # A timed-out request may have been processed, and retrying it doubles the latency
    # the client already suffered.
    on_timeout: bool = field(default=False, metadata={"doc": "retry calls that timed out"})
    # Envoy's defaults: 25 ms base, 10x base cap.
    backoff_base: Duration = field(
        default=Duration(0.025), metadata={"doc": "backoff before the first retry (cap)"}
    )
    backoff_max: Duration = field(
        default=Duration(0.25), metadata={"doc": "the backoff never grows beyond this"}
    )
    # Envoy's retry budget default (20% of active requests); Linkerd uses the same ratio.
    budget_percent: float = field(
        default=20.0, metadata={"doc": "retries allowed, in percent of recent requests"}
    )
    # Linkerd's defaults: a 10 s window and 10 retries per second to start from.
    budget_window: Duration = field(
        default=Duration(10.0), metadata={"doc": "how far back the budget looks"}
    )
    min_retries_per_second: float = field(
        default=10.0, metadata={"doc": "retries always allowed, whatever the request count"}
    )
    per_try_timeout: Duration | None = field(
        default=None, metadata={"doc": "timeout of each attempt (default: the upstream's)"}
    )
    # Envoy keeps a request body for retries up to a per-request buffer limit too. Most
    # bodies that are retried (a PUT of a JSON document) are far smaller than this; a
    # bigger one streams as before and is retried only if none of it was sent.
    replay_buffer: ByteSize = field(
        default=ByteSize(64 * 1024),
        metadata={"doc": "bytes of a streamed request body kept to send again (0: none)"},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 10:
            raise Invalid("attempts", f"expected 1 to 10, got {self.attempts}")
        for i, m in enumerate(self.methods):
            if not re.fullmatch(r"[A-Z]+", m):
                raise Invalid(f"methods[{i}]", f"expected an upper-case method, got {m!r}")
        for i, s in enumerate(self.statuses):
            if not 100 <= s <= 599:
                raise Invalid(f"statuses[{i}]", f"expected a status from 100 to 599, got {s}")
        if self.backoff_max < self.backoff_base:
            raise Invalid("backoff_max", "must be at least backoff_base")
        if not 0.0 <= self.budget_percent <= 100.0:
            raise Invalid("budget_percent", f"expected 0 to 100, got {self.budget_percent:g}")
        if self.budget_window <= 0:
            raise Invalid("budget_window", "must be positive")
        if self.min_retries_per_second < 0:
            raise Invalid("min_retries_per_second", "must not be negative")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise Invalid("per_try_timeout", "must be positive")


class RetryBudget:
    """How many retries one upstream may take: pure logic, time is an argument.

    Over the last ``window`` seconds, retries may number at most ``min_per_second *
    window + percent / 100 * requests`` (requests are first attempts).
    """

    def __init__(self, percent: float, min_per_second: float, window: float) -> None:
        self.ratio = percent / 100.0
        self.reserve = min_per_second * window
        self.requests = RollingCount(window)
        self.retries = RollingCount(window)

    def record_request(self, now: float) -> None:
        self.requests.add(now)

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; ``False`` (and nothing taken) when it is spent."""
        allowed = self.reserve + self.ratio * self.requests.total(now)
        if self.retries.total(now) + 1 > allowed:
            return False
        self.retries.add(now)
        return True


def backoff_cap(retry: int, base: float, maximum: float) -> float:
    """The upper bound of the jittered sleep before retry number ``retry`` (from 0)."""
    # min() first keeps 2**retry from overflowing a float for absurd counts.
    return min(maximum, base * 2.0 ** min(retry, 62))


class ReplayBuffer:
    """A streamed request body kept as it is sent, up to ``limit`` bytes, so that a
    retry can send it again. Each :meth:`attempt` is the body from its first byte: what
    was kept, then the rest of the client's body (kept too). Once the body outgrows
    ``limit`` what was kept is dropped and :attr:`overflowed` is set: what was sent
    cannot be sent again.

    The bytes are kept in one buffer, not as the chunks they came in: a client sending
    a chunk per byte must not make ``limit`` bytes cost dozens of times that in objects.
    """

    __slots__ = ("body", "kept", "limit", "overflowed")

    def __init__(self, body: BodyStream, limit: int) -> None:
        self.body = body
        self.limit = limit
        self.kept = bytearray()
        self.overflowed = False

    def attempt(self) -> _Attempt:
        return _Attempt(self)

    def keep(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        if len(self.kept) + len(chunk) > self.limit:
            self.release()
        else:
            self.kept += chunk

    def release(self) -> None:
        """No more retries: let go of what was kept, and keep nothing more."""
        self.overflowed = True
        self.kept = bytearray()


class _Attempt:
    """One attempt's body stream over a :class:`ReplayBuffer` (one attempt at a time).
    Closing it closes nothing: the client's body is the exchange's."""

    __slots__ = ("_replay", "_sent")

    def __init__(self, replay: ReplayBuffer) -> None:
        self._replay = replay
        self._sent = 0  # bytes of the kept ones given to this attempt

    def __aiter__(self) -> _Attempt:
        return self

    async def __anext__(self) -> bytes:
        replay = self._replay
        kept = replay.kept
        if self._sent < len(kept):
            with memoryview(kept) as view:  # one copy, not two (and released at once)
                chunk = bytes(view[self._sent : self._sent + _REPLAY_SLICE])
            self._sent += len(chunk)
            return chunk
        chunk = await replay.body.__aiter__().__anext__()
        replay.keep(chunk)
        self._sent = len(replay.kept)
        return chunk

    async def aclose(self) -> None:
        pass


_REPLAY_SLICE = 64 * 1024  # bytes of a replayed body per chunk sent


_RETRIES_TOTAL = counter(
    "filtergate_upstream_retries_total", "Upstream calls retried, by reason", ("upstream", "reason")
)
_BUDGET_EXHAUSTED_TOTAL = counter(
    "filtergate_upstream_retry_budget_exhausted_total",
    "Retries not made because the retry budget was spent",
    ("upstream",),
)


class Retry(Filter):
    """Retries failed upstream calls (see the module docstring for exactly which)."""

    name = "retry"
    stage = Stage.EDGE
    Config = RetryConfig

    def __init__(self, config: RetryConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: RetryConfig = config
        self.logger = context.logger
        self.methods = frozenset(m.encode() for m in config.methods)
        self.statuses = frozenset(config.statuses)
        self.budgets: dict[str, RetryBudget] = {}
        # Jitter needs no cryptographic quality; tests may seed it.
        self.random = random.Random()

    def budget_for(self, upstream: str) -> RetryBudget:
        budget = self.budgets.get(upstream)
        if budget is None:
            cfg = self.config
            budget = RetryBudget(cfg.budget_percent, cfg.min_retries_per_second, cfg.budget_window)
            self.budgets[upstream] = budget
        return budget

    async def around_upstream(
        self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
    ) -> Response:
        cfg = self.config
        budget = self.budgets.get(call.upstream) or self.budget_for(call.upstream)
        budget.requests.add(trio.current_time())  # record_request, one call fewer
        if cfg.per_try_timeout is not None:
            call.per_try_timeout = float(cfg.per_try_timeout)
        retryable_method = cfg.attempts > 1 and call.method in self.methods
        replay: ReplayBuffer | None = None
        body = call.body
        if retryable_method and cfg.replay_buffer and not (body is None or isinstance(body, bytes)):
            replay = ReplayBuffer(body, cfg.replay_buffer)
            call.body = replay.attempt()
        retries = 0
        excluded: set[str] | None = None  # targets this filter added to call.exclude
        failed: GatewayError | None = None  # the last attempt's error
        while True:
            call.attempt = retries
            delay: float | None = None  # before the next attempt: drawn by _may_retry
            try:
                response = await call_next(call)
            except NoHealthyTarget:
                if excluded:
                    # Every target left is one that failed: go back to them rather than
                    # fail a retry that has a target to go to.
                    call.exclude -= excluded
                    excluded = None
                    continue
                if failed is not None:
                    # No target to retry on (the one that failed was ejected): the
                    # client gets what the last attempt met, not "no healthy target".
                    raise failed from None
                raise
            except GatewayError as e:
                reason = e.code
                if e.code in _UNSENT_CODES:
                    wanted = True
                elif isinstance(e, FailedResponseHidden):
                    # The breaker hid the upstream's answer: judge it as that answer.
                    wanted = e.upstream_status in self.statuses
                    reason = f"status_{e.upstream_status}"
                else:
                    wanted = cfg.on_timeout and isinstance(e, UpstreamTimeout)
                if not (
                    wanted
                    and retryable_method
                    and (delay := self._may_retry(call, retries, budget, replay)) is not None
                ):
                    if replay is not None:
                        replay.release()
                    raise
                failed = e
            else:
                if (
                    response.status not in self.statuses
                    or not retryable_method
                    or is_fallback(exchange, response)
                    or (delay := self._may_retry(call, retries, budget, replay)) is None
                ):
                    if replay is not None:
                        replay.release()  # the answer stands: no attempt will follow
                    return response
                reason = f"status_{response.status}"
                failed = None
                await response.aclose()
            _RETRIES_TOTAL.inc(upstream=call.upstream, reason=reason)
            self.logger.debug(
                "retrying %s %s on upstream %r (%s, target %s), request %s",
                call.method.decode(),
                call.target.decode("latin-1"),
                call.upstream,
                reason,
                call.target_address,
                exchange.request_id,
            )
            address = call.target_address
            if address is not None and address not in call.exclude:
                call.exclude.add(address)
                if excluded is None:
                    excluded = set()
                excluded.add(address)
            call.target_address = None
            if replay is not None and call.body_started:
                call.body = replay.attempt()  # from the first byte again
                call.body_started = False
            retries += 1
            assert delay is not None  # (set where the retry was allowed)
            await trio.sleep(delay)

    def _may_retry(
        self, call: UpstreamCall, retries: int, budget: RetryBudget, replay: ReplayBuffer | None
    ) -> float | None:
        """The wait before one more attempt, or None when none is allowed; spends budget
        only when one is."""
        cfg = self.config
        if retries + 1 >= cfg.attempts:
            return None
        delay = self.random.uniform(0.0, backoff_cap(retries, cfg.backoff_base, cfg.backoff_max))
        if call.deadline is not None and trio.current_time() + delay >= call.deadline:
            return None  # it could not start within the whole call's time: this answer stands
        if not call.replayable and (replay is None or replay.overflowed):
            return None
        if not budget.try_spend(trio.current_time()):
            _BUDGET_EXHAUSTED_TOTAL.inc(upstream=call.upstream)
            return None
        return delay


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [Retry]
