"""The ``circuit-breaker`` filter: stop calling an upstream that keeps failing.

Each breaker is a small state machine, :class:`Breaker`, written as a transition table
(:data:`TRANSITIONS`) and driven by two calls that take the time as an argument:
:meth:`Breaker.admit` before an upstream call and :meth:`Breaker.record` after it. It
knows nothing of trio, sockets or HTTP; the filter, :class:`CircuitBreaker`, reads
``trio.current_time()``, classifies what ``call_next`` gave back and turns a refusal into
:class:`~engine.errors.CircuitOpen` (503 with ``Retry-After``) or a configured fallback.

States::

    closed --trip--> open --cooldown elapsed--> half-open --all probes succeeded--> closed
                      ^                              |
                      +-------- a probe failed ------+

A closed breaker trips on whichever rule fires first: the failure ratio over a rolling
window (the last ``window_size`` calls, or the calls of the last ``window_duration``)
once the window holds ``min_calls`` calls, or ``consecutive_failures`` failures in a row.
An open breaker refuses every call (the upstream receives nothing) for the open duration,
which grows by ``backoff_multiplier`` on each trip that follows a failed probe, up to
``max_open_duration``. A half-open breaker lets exactly ``probes`` calls through, however
many arrive together; it closes when all of them succeed and opens again on the first
failure.

Operators read the states through :func:`breaker_states` (every live breaker of every
filter instance) or :meth:`CircuitBreaker.snapshot`, and through the metrics
``filtergate_circuit_breaker_state``, ``filtergate_circuit_breaker_transitions_total`` and
``filtergate_circuit_breaker_calls_total``.
"""

from __future__ import annotations

import enum
import itertools
import logging
import re
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from engine.chain import CallNext, Filter, FilterContext, Stage
from engine.errors import BadGateway, CircuitOpen, GatewayError, UpstreamTimeout
from engine.exchange import Exchange, Headers, Response, StashKey, UpstreamCall
from engine.metrics import BoundCounter, before_dump, counter, gauge
from engine.plugins import hookimpl
from engine.schema import Duration, Invalid

__all__ = [
    "TRANSITIONS",
    "Breaker",
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CountWindow",
    "Event",
    "FailedResponseHidden",
    "FallbackConfig",
    "InvalidTransition",
    "Outcome",
    "Permit",
    "Rejection",
    "RollingCount",
    "State",
    "TimeWindow",
    "breaker_states",
    "is_fallback",
    "next_state",
]

# --------------------------------------------------------------------------- the table


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Event(enum.Enum):
    TRIP = "trip"
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    PROBE_FAILED = "probe_failed"
    PROBES_SUCCEEDED = "probes_succeeded"


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.CLOSED, Event.TRIP): State.OPEN,
    (State.OPEN, Event.COOLDOWN_ELAPSED): State.HALF_OPEN,
    (State.HALF_OPEN, Event.PROBE_FAILED): State.OPEN,
    (State.HALF_OPEN, Event.PROBES_SUCCEEDED): State.CLOSED,
}
"""Every state change a breaker can make; anything else is a bug and raises."""


class InvalidTransition(RuntimeError):
    """``(state, event)`` is not in :data:`TRANSITIONS`."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; raises :class:`InvalidTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(state, event) from None


class Outcome(enum.Enum):
    """How one admitted call ended, as far as the breaker is concerned."""

    SUCCESS = "success"
    FAILURE = "failure"
    # Neither: the client went away, or the call failed for a reason that says nothing
    # about the upstream's health. A half-open probe that ends so frees its slot.
    IGNORED = "ignored"


# An enum member reached through its class costs a descriptor call (~150 ns on this
# interpreter), several per upstream call; the per-call paths use these names instead.
_CLOSED, _OPEN, _HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
_SUCCESS, _FAILURE, _IGNORED = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


# --------------------------------------------------------------------------- windows


class RollingCount:
    """A count of events over the last ``duration`` seconds, kept in ``slices`` buckets.

    Memory is bounded by ``slices`` whatever the rate; the price is that an event leaves
    the count up to ``duration / slices`` late.
    """

    __slots__ = ("_buckets", "_total", "_width", "slices")

    def __init__(self, duration: float, slices: int = 10) -> None:
        if duration <= 0 or slices < 1:
            raise ValueError("duration must be positive and slices at least 1")
        self.slices = slices
        self._width = duration / slices
        self._buckets: deque[list[int]] = deque()  # [slice index, count], oldest first
        self._total = 0

    def _expire(self, index: int) -> None:
        while self._buckets and self._buckets[0][0] <= index - self.slices:
            self._total -= self._buckets.popleft()[1]

    def add(self, now: float, amount: int = 1) -> None:
        index = int(now // self._width)
        buckets = self._buckets
        if buckets and buckets[0][0] <= index - self.slices:  # else nothing to expire
            self._expire(index)
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += amount
        else:
            buckets.append([index, amount])
        self._total += amount

    def total(self, now: float) -> int:
        self._expire(int(now // self._width))
        return self._total

    def clear(self) -> None:
        self._buckets.clear()
        self._total = 0


class CountWindow:
    """The outcomes of the last ``size`` calls."""

    __slots__ = ("_failures", "_outcomes")

    def __init__(self, size: int) -> None:
        self._outcomes: deque[bool] = deque(maxlen=size)
        self._failures = 0

    def add(self, failed: bool, now: float) -> None:
        outcomes = self._outcomes
        if len(outcomes) == outcomes.maxlen and outcomes[0]:
            self._failures -= 1
        outcomes.append(failed)
        self._failures += failed

    def totals(self, now: float) -> tuple[int, int]:
        """``(calls, failures)`` in the window."""
        return len(self._outcomes), self._failures

    def describe(self) -> str:
        return f"the last {len(self._outcomes)} calls"

    def clear(self) -> None:
        self._outcomes.clear()
        self._failures = 0


class TimeWindow:
    """The outcomes of the calls that ended in the last ``duration`` seconds."""

    __slots__ = ("_calls", "_duration", "_failures")

    def __init__(self, duration: float) -> None:
        self._duration = duration
        self._calls = RollingCount(duration)
        self._failures = RollingCount(duration)

    def add(self, failed: bool, now: float) -> None:
        self._calls.add(now)
        if failed:
            self._failures.add(now)

    def totals(self, now: float) -> tuple[int, int]:
        return self._calls.total(now), self._failures.total(now)

    def describe(self) -> str:
        return f"the last {self._duration:g}s"

    def clear(self) -> None:
        self._calls.clear()
        self._failures.clear()


# --------------------------------------------------------------------------- config

_STATUS_CLASS = re.compile(r"[1-5]xx")


@dataclass(frozen=True)
class FallbackConfig:
    """A static answer given instead of the 503 while the breaker refuses calls."""

    status: int = field(default=503, metadata={"doc": "status of the fallback response"})
    headers: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "header fields of the fallback response"}
    )
    body: str = field(default="", metadata={"doc": "body of the fallback response (UTF-8)"})

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise Invalid("status", f"expected a status from 200 to 599, got {self.status}")
        for name in self.headers:
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise Invalid(f"headers.{name}", "not a valid header name")
            if name.lower() in ("content-length", "transfer-encoding", "connection"):
                raise Invalid(f"headers.{name}", "framing headers are set by the gateway")


def _expand_statuses(key: str, items: tuple[int | str, ...]) -> frozenset[int]:
    out: set[int] = set()
    for i, item in enumerate(items):
        if isinstance(item, int):
            if not 100 <= item <= 599:
                raise Invalid(f"{key}[{i}]", f"expected a status from 100 to 599, got {item}")
            out.add(item)
        elif _STATUS_CLASS.fullmatch(item):
            first = int(item[0]) * 100
            out.update(range(first, first + 100))
        else:
            raise Invalid(f"{key}[{i}]", f'expected a status or a class like "5xx", got {item!r}')
    return frozenset(out)


@dataclass(frozen=True)
class CircuitBreakerConfig:
    scope: Literal["upstream", "route"] = field(
        default="upstream",
        metadata={"doc": 'one breaker per upstream, or per (route, upstream) with "route"'},
    )
    window: Literal["count", "time"] = field(
        default="count",
        metadata={"doc": '"count": the last window_size calls; "time": the last window_duration'},
    )
    # Resilience4j's default is 100 calls; a gateway sees far fewer calls per upstream on
    # a quiet service, and 20 still makes one failure weigh only 5%.
    window_size: int = field(default=20, metadata={"doc": "calls in a count window"})
    window_duration: Duration = field(
        default=Duration(30.0), metadata={"doc": "length of a time window"}
    )
    # Below this many calls a ratio says little: 2 failures of 3 calls is noise.
    min_calls: int = field(
        default=10, metadata={"doc": "calls the window must hold before the ratio counts"}
    )
    # Resilience4j's and Polly's default.
    failure_ratio: float = field(
        default=0.5, metadata={"doc": "trip when failures / calls >= this (0 < r <= 1)"}
    )
    # A dead backend trips the breaker after 5 calls without waiting for min_calls.
    consecutive_failures: int = field(
        default=5, metadata={"doc": "trip after this many failures in a row (0: off)"}
    )
    slow_call_threshold: Duration | None = field(
        default=None, metadata={"doc": "a call slower than this (to the response head) fails"}
    )
    failure_statuses: tuple[int | str, ...] = field(
        default=("5xx",), metadata={"doc": 'response statuses that count as failures ("5xx", 503)'}
    )
    # Long enough for a restarting backend to come back, short enough that users do not
    # notice a recovered one late (Hystrix uses 5 s, Resilience4j 60 s).
    open_duration: Duration = field(
        default=Duration(10.0), metadata={"doc": "how long a breaker stays open after tripping"}
    )
    backoff_multiplier: float = field(
        default=2.0, metadata={"doc": "open_duration grows by this after each failed probe"}
    )
    max_open_duration: Duration = field(
        default=Duration(300.0), metadata={"doc": "cap of the growing open duration"}
    )
    probes: int = field(default=3, metadata={"doc": "calls let through while half-open"})
    hide_failed_responses: bool = field(
        default=False,
        metadata={"doc": "answer 502 instead of relaying a response counted as a failure"},
    )
    fallback: FallbackConfig | None = field(
        default=None, metadata={"doc": "static response instead of the 503 while open"}
    )
    failure_status_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise Invalid("window_size", "must be at least 1")
        if self.window_duration <= 0:
            raise Invalid("window_duration", "must be positive")
        if self.min_calls < 1:
            raise Invalid("min_calls", "must be at least 1")
        if self.window == "count" and self.min_calls > self.window_size:
            raise Invalid(
                "min_calls",
                f"must be at most window_size ({self.window_size}), or the ratio never trips",
            )
        if not 0.0 < self.failure_ratio <= 1.0:
            raise Invalid("failure_ratio", f"expected 0 < ratio <= 1, got {self.failure_ratio}")
        if self.consecutive_failures < 0:
            raise Invalid("consecutive_failures", "must not be negative (0 turns it off)")
        if self.slow_call_threshold is not None and self.slow_call_threshold <= 0:
            raise Invalid("slow_call_threshold", "must be positive")
        if self.open_duration <= 0:
            raise Invalid("open_duration", "must be positive")
        if self.backoff_multiplier < 1.0:
            raise Invalid("backoff_multiplier", "must be at least 1 (1 keeps it constant)")
        if self.max_open_duration < self.open_duration:
            raise Invalid("max_open_duration", "must be at least open_duration")
        if self.probes < 1:
            raise Invalid("probes", "must be at least 1")
        statuses = _expand_statuses("failure_statuses", self.failure_statuses)
        object.__setattr__(self, "failure_status_set", statuses)


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back to :meth:`Breaker.record`."""

    epoch: int
    probe: bool


@dataclass(frozen=True, slots=True)
class Rejection:
    """The breaker refuses the call; ``retry_after`` seconds until it may let one through."""

    retry_after: float


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """What an operator sees of one breaker at one moment (see :func:`breaker_states`)."""

    name: str
    upstream: str
    route: str | None
    state: str  # "closed" | "open" | "half_open"
    since: float  # trio time of the last state change (or of creation)
    retry_after: float | None  # open: seconds until half-open
    calls: int  # in the window (closed)
    failures: int
    consecutive_failures: int
    trips: int  # times opened, ever
    open_duration: float  # of the current (or next) open period
    probes_in_flight: int
    probes_succeeded: int
    reason: str  # why the last state change happened

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "upstream": self.upstream,
            "route": self.route,
            "state": self.state,
            "since": self.since,
            "retry_after": self.retry_after,
            "calls": self.calls,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "trips": self.trips,
            "open_duration": self.open_duration,
            "probes_in_flight": self.probes_in_flight,
            "probes_succeeded": self.probes_succeeded,
            "reason": self.reason,
        }


TransitionListener = Callable[["Breaker", State, State, str], None]


class Breaker:
    """One circuit breaker: a pure state machine; every method takes ``now`` (seconds).

    Protocol: ``admit(now)`` before each call; when it returns a :class:`Permit`, make the
    call and then ``record(permit, outcome, now)`` exactly once, whatever happened
    (:attr:`Outcome.IGNORED` when the call neither succeeded nor failed, e.g. cancelled).
    Results of calls admitted before the last state change are ignored, so a slow call
    from before a trip cannot close or re-open the breaker.

    ``on_transition(breaker, old, new, reason)`` is called on every state change.
    """

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig,
        now: float,
        *,
        upstream: str = "",
        route: str | None = None,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.name = name
        self.upstream = upstream or name
        self.route = route
        self.config = config
        self.on_transition = on_transition
        self.state = State.CLOSED
        self.since = now
        self.reason = "created"
        self.epoch = 0
        self.trips = 0
        self.window: CountWindow | TimeWindow = (
            CountWindow(config.window_size)
            if config.window == "count"
            else TimeWindow(config.window_duration)
        )
        self.consecutive = 0
        self.open_streak = 0  # trips since the breaker last closed: drives the backoff
        self.open_until = 0.0
        self.probes_admitted = 0
        self.probes_succeeded = 0
        # Permits are immutable: a closed breaker hands out one per epoch, not one per call.
        self._permit = Permit(self.epoch, probe=False)

    # -- the two calls of the protocol

    def admit(self, now: float) -> Permit | Rejection:
        """Leave to call the upstream now, or a refusal saying for how long."""
        if self.state is _OPEN:
            if now < self.open_until:
                return Rejection(self.open_until - now)
            self._fire(Event.COOLDOWN_ELAPSED, now, f"open for {self.current_open_duration:g}s")
        if self.state is _HALF_OPEN:
            if self.probes_admitted < self.config.probes:
                self.probes_admitted += 1
                return Permit(self.epoch, probe=True)
            # The probes are out; nobody knows yet when they will settle it.
            return Rejection(0.0)
        return self.closed_permit()

    def closed_permit(self) -> Permit:
        """:meth:`admit` of a closed breaker, which needs no clock: leave to call."""
        assert self.state is _CLOSED
        permit = self._permit
        if permit.epoch != self.epoch:
            permit = self._permit = Permit(self.epoch, probe=False)
        return permit

    def record_success_untimed(self, permit: Permit) -> bool:
        """:meth:`record` of a success when that needs no clock, else ``False`` with
        nothing done (then call :meth:`record` with the time).

        It needs none for a call admitted while closed with a count window (which
        counts calls, not seconds), nor for a permit from before the last state change.
        """
        if permit.epoch != self.epoch:
            return True
        window = self.window
        if permit.probe or not isinstance(window, CountWindow):
            return False
        assert self.state is _CLOSED  # a current non-probe permit: see record
        window.add(False, 0.0)  # a count window is not told the time
        self.consecutive = 0
        return True

    def record(self, permit: Permit, outcome: Outcome, now: float, detail: str = "") -> None:
        """Account for the end of a call made under ``permit``.

        ``detail`` says what happened (``"status 503"``, ``"upstream_timeout"``) and ends
        up in the reason of a state change it causes.
        """
        if permit.epoch != self.epoch:
            return
        if outcome is _IGNORED:
            if permit.probe:
                self.probes_admitted -= 1
            return
        failed = outcome is _FAILURE
        if self.state is _HALF_OPEN:
            if failed:
                self._fire(Event.PROBE_FAILED, now, f"a probe failed ({detail or 'failure'})")
                return
            self.probes_succeeded += 1
            if self.probes_succeeded >= self.config.probes:
                self._fire(Event.PROBES_SUCCEEDED, now, f"{self.probes_succeeded} probes succeeded")
            return
        # A permit of the current epoch is only ever given while closed or half-open.
        assert self.state is _CLOSED
        self.window.add(failed, now)
        self.consecutive = self.consecutive + 1 if failed else 0
        if not failed:
            return
        cfg = self.config
        last = f"; last: {detail}" if detail else ""
        if cfg.consecutive_failures and self.consecutive >= cfg.consecutive_failures:
            self._fire(Event.TRIP, now, f"{self.consecutive} consecutive failures{last}")
            return
        calls, failures = self.window.totals(now)
        if calls >= cfg.min_calls and failures >= cfg.failure_ratio * calls:
            self._fire(
                Event.TRIP,
                now,
                f"failure ratio {failures}/{calls} >= {cfg.failure_ratio:g} "
                f"over {self.window.describe()}{last}",
            )

    # -- reading

    @property
    def current_open_duration(self) -> float:
        """The length of the current open period (of the next one, when not open)."""
        cfg = self.config
        streak = max(self.open_streak, 1)
        grown: float = cfg.open_duration * cfg.backoff_multiplier ** (streak - 1)
        return min(cfg.max_open_duration, grown)

    def snapshot(self, now: float) -> BreakerSnapshot:
        """The breaker as of ``now``; reading changes nothing.

        An open breaker whose time is up reads ``half_open`` with no probe out yet: the
        state it moves to when the next call arrives.
        """
        state = self.state
        since, reason = self.since, self.reason
        probes_in_flight = self.probes_admitted - self.probes_succeeded
        probes_succeeded = self.probes_succeeded
        retry_after: float | None = None
        if state is State.OPEN:
            if now >= self.open_until:
                state, since = State.HALF_OPEN, self.open_until
                reason = f"open for {self.current_open_duration:g}s"
                probes_in_flight = probes_succeeded = 0
            else:
                retry_after = self.open_until - now
        if state is not State.HALF_OPEN:
            probes_in_flight = probes_succeeded = 0
        calls, failures = self.window.totals(now)
        return BreakerSnapshot(
            name=self.name,
            upstream=self.upstream,
            route=self.route,
            state=state.value,
            since=since,
            retry_after=retry_after,
            calls=calls,
            failures=failures,
            consecutive_failures=self.consecutive,
            trips=self.trips,
            open_duration=self.current_open_duration,
            probes_in_flight=probes_in_flight,
            probes_succeeded=probes_succeeded,
            reason=reason,
        )

    # -- the one place the state changes

    def _fire(self, event: Event, now: float, reason: str) -> None:
        old = self.state
        new = next_state(old, event)
        self.state = new
        self.since = now
        self.reason = reason
        self.epoch += 1
        if new is State.OPEN:
            self.trips += 1
            self.open_streak += 1
            self.open_until = now + self.current_open_duration
        elif new is State.HALF_OPEN:
            self.probes_admitted = 0
            self.probes_succeeded = 0
        else:
            self.open_streak = 0
        # Every period starts afresh: what happened before a trip or a recovery says
        # nothing about the backend now.
        self.window.clear()
        self.consecutive = 0
        if self.on_transition is not None:
            self.on_transition(self, old, new, reason)


# --------------------------------------------------------------------------- the filter

# Each worker process has its own breakers: over several, 1 for every state some
# process's breaker is in.
_STATE_GAUGE = gauge(
    "filtergate_circuit_breaker_state",
    "1 for the state each circuit breaker is in, 0 for the others",
    ("breaker", "state"),
    merge="max",
)
_TRANSITIONS_TOTAL = counter(
    "filtergate_circuit_breaker_transitions_total",
    "Circuit breaker state changes",
    ("breaker", "from_state", "to_state"),
)
_CALLS_TOTAL = counter(
    "filtergate_circuit_breaker_calls_total",
    "Upstream calls seen by circuit breakers, by outcome (rejected: refused while open)",
    ("breaker", "outcome"),
)

_FALLBACK_ANSWER: StashKey[list[Response]] = StashKey("circuit-breaker.fallback")

# Live instances by creation order: an instance a reload replaced lingers here until it
# is garbage collected, and where its breakers' names clash with the newer instance's,
# the newer one must be what breaker_states() reports.
_INSTANCES: weakref.WeakValueDictionary[int, CircuitBreaker] = weakref.WeakValueDictionary()
_CREATED = itertools.count()


def is_fallback(exchange: Exchange, response: Response) -> bool:
    """Whether ``response`` is a breaker's static fallback rather than the upstream's.

    The retry filter uses it so that it never retries a call the breaker refused.
    """
    answers = exchange.stash.get(_FALLBACK_ANSWER)
    return answers is not None and any(r is response for r in answers)


class FailedResponseHidden(BadGateway):
    """``hide_failed_responses``: the upstream answered ``upstream_status``, counted as a
    failure, and the client gets a 502 instead. A ``retry`` filter around the breaker
    still sees the upstream's status, and retries it as it would the response."""

    def __init__(self, upstream_status: int) -> None:
        super().__init__(f"upstream answered {upstream_status}")
        self.upstream_status = upstream_status


# Instances in use by the config serving (their background task runs), by creation:
# the state gauge is theirs alone, so a breaker a reload dropped or replaced leaves it
# (an alert on "open" must not fire forever for a removed route).
_IN_USE: dict[int, CircuitBreaker] = {}


def _publish_states() -> None:
    """``filtergate_circuit_breaker_state`` as of now, at each scrape: an open breaker
    whose time is up reads half_open, as :func:`breaker_states` does."""
    try:
        now = trio.current_time()
    except RuntimeError:  # no trio run: nothing in use
        return
    values: dict[tuple[str, ...], float] = {}
    for _serial, instance in sorted(_IN_USE.items()):  # a newer one's names win
        for name, snap in instance.snapshot(now).items():
            for s in State:
                values[(name, s.value)] = 1.0 if s.value == snap.state else 0.0
    _STATE_GAUGE.replace_all(values)


before_dump(_publish_states)


def _failure_detail(err: GatewayError) -> str | None:
    """What makes ``err`` from the upstream layer a failure of the upstream, if it is."""
    if isinstance(err, BadGateway | UpstreamTimeout) or err.status in (502, 504):
        return err.code
    return None


class _CallCounts:
    """``filtergate_circuit_breaker_calls_total`` of one breaker, by outcome.

    Each outcome's counter is bound on its first call, so a series appears with its
    first count (as with ``inc(**labels)``) and later calls skip the label handling.
    """

    __slots__ = ("_bound", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: dict[str, BoundCounter] = {}

    def inc(self, outcome: str) -> None:
        bound = self._bound.get(outcome)
        if bound is None:
            bound = self._bound[outcome] = _CALLS_TOTAL.bind(breaker=self._name, outcome=outcome)
        bound.inc()


class CircuitBreaker(Filter):
    """Refuses upstream calls while the upstream's breaker is open.

    Stage LIMIT, so that in the ``around_upstream`` order the ``retry`` filter (stage
    EDGE) wraps this one: every attempt of a retried call passes through the breaker and
    counts, and a retry that meets an open breaker fails at once instead of reaching the
    upstream.
    """

    name = "circuit-breaker"
    stage = Stage.LIMIT
    Config = CircuitBreakerConfig

    def __init__(self, config: CircuitBreakerConfig, context: FilterContext) -> None:
        super().__init__(config, context)
        self.config: CircuitBreakerConfig = config
        # Per breaker key (see breaker_for): the breaker and its call counters.
        self._entries: dict[str, tuple[Breaker, _CallCounts]] = {}
        self.logger = context.logger
        self._per_route = config.scope == "route"
        self._failure_statuses = config.failure_status_set
        self._slow = config.slow_call_threshold
        # Instances configured on one route get their own breakers: name them apart.
        self._prefix = "" if context.scope == "global" else f"{context.scope}/"
        fb = config.fallback
        self._fallback = (
            None
            if fb is None
            else (
                fb.status,
                [(k.lower().encode(), v.encode()) for k, v in fb.headers.items()],
                fb.body.encode(),
            )
        )
        self._serial = next(_CREATED)
        _INSTANCES[self._serial] = self

    async def background(self) -> None:
        """Mark this instance in use for as long as the serving config has it."""
        _IN_USE[self._serial] = self
        try:
            await trio.sleep_forever()
        finally:
            del _IN_USE[self._serial]

    @property
    def breakers(self) -> dict[str, Breaker]:
        """Every breaker of this instance, by key: the upstream, or ``ROUTE/UPSTREAM``."""
        return {key: breaker for key, (breaker, _counts) in self._entries.items()}

    def breaker_for(self, route: str | None, upstream: str, now: float) -> Breaker:
        """The breaker of ``upstream`` (reached through ``route``), made on first use."""
        return self._entry(route, upstream, now)[0]

    def _entry(
        self, route: str | None, upstream: str, now: float | None
    ) -> tuple[Breaker, _CallCounts]:
        """The breaker of ``upstream`` and its counters, made on first use at ``now``
        (``None``: trio's clock, read only then)."""
        if self._per_route:
            key = f"{route or '-'}/{upstream}"
        else:
            key, route = upstream, None
        entry = self._entries.get(key)
        if entry is None:
            name = self._prefix + key
            breaker = Breaker(
                name,
                self.config,
                trio.current_time() if now is None else now,
                upstream=upstream,
                route=route,
                on_transition=self._on_transition,
            )
            entry = self._entries[key] = (breaker, _CallCounts(name))
        return entry

    def _on_transition(self, breaker: Breaker, old: State, new: State, reason: str) -> None:
        level = logging.WARNING if new is State.OPEN else logging.INFO
        extra = f", open for {breaker.current_open_duration:g}s" if new is State.OPEN else ""
        self.logger.log(
            level,
            "circuit breaker %s: %s -> %s (%s%s)",
            breaker.name,
            old.value,
            new.value,
            reason,
            extra,
        )
        _TRANSITIONS_TOTAL.inc(breaker=breaker.name, from_state=old.value, to_state=new.value)

    def snapshot(self, now: float | None = None) -> dict[str, BreakerSnapshot]:
        """Every breaker of this instance by name; ``now`` defaults to trio's clock."""
        t = trio.current_time() if now is None else now
        return {b.name: b.snapshot(t) for b, _counts in list(self._entries.values())}

    async def around_upstream(
        self, exchange: Exchange, call: UpstreamCall, call_next: CallNext
    ) -> Response:
        # The clock is read only when needed: to make a breaker, to admit through one
        # that is not closed, to time a slow call, to record what a count window cannot.
        slow = self._slow
        if self._per_route:
            route = exchange.route.name if exchange.route is not None else None
            breaker, counts = self._entry(route, call.upstream, None)
        else:
            entry = self._entries.get(call.upstream)
            breaker, counts = entry or self._entry(None, call.upstream, None)
        if breaker.state is _CLOSED and slow is None:
            start = 0.0  # not used: nothing is timed
            admission: Permit | Rejection = breaker.closed_permit()
        else:
            start = trio.current_time()
            admission = breaker.admit(start)
        if isinstance(admission, Rejection):
            counts.inc("rejected")
            return self._refuse(exchange, breaker, admission)
        try:
            response = await call_next(call)
        except GatewayError as e:
            detail = _failure_detail(e)
            outcome = _IGNORED if detail is None else _FAILURE
            self._record(breaker, counts, admission, outcome, detail or e.code)
            raise
        except BaseException:
            # Cancelled (the client went away) or a bug below: nothing about the upstream.
            self._record(breaker, counts, admission, _IGNORED, "")
            raise
        if response.status in self._failure_statuses:
            counts.inc("failure")
            breaker.record(admission, _FAILURE, trio.current_time(), f"status {response.status}")
            if self.config.hide_failed_responses:
                await response.aclose()
                raise FailedResponseHidden(response.status)
            return response
        if slow is not None:
            end = trio.current_time()
            if end - start >= slow:
                counts.inc("failure")
                breaker.record(admission, _FAILURE, end, f"slow call {end - start:.3g}s")
                return response
            counts.inc("success")
            breaker.record(admission, _SUCCESS, end)
            return response
        counts.inc("success")
        if not breaker.record_success_untimed(admission):
            breaker.record(admission, _SUCCESS, trio.current_time())
        return response

    def _record(
        self, breaker: Breaker, counts: _CallCounts, permit: Permit, outcome: Outcome, detail: str
    ) -> None:
        counts.inc(outcome.value)
        breaker.record(permit, outcome, trio.current_time(), detail)

    def _refuse(self, exchange: Exchange, breaker: Breaker, rejection: Rejection) -> Response:
        """The fallback response, or raise :class:`CircuitOpen`."""
        if self._fallback is None:
            raise CircuitOpen(
                f"circuit breaker open for upstream {breaker.upstream!r}",
                retry_after=rejection.retry_after,
            )
        status, headers, body = self._fallback
        response = Response(status, Headers(list(headers)), body=body)
        answers = exchange.stash.get(_FALLBACK_ANSWER)
        if answers is None:
            exchange.stash[_FALLBACK_ANSWER] = answers = []
        answers.append(response)
        return response


def breaker_states(now: float | None = None) -> dict[str, BreakerSnapshot]:
    """Every breaker of every live ``circuit-breaker`` instance, by breaker name.

    Names are the upstream (``"users"``), or ``"ROUTE/UPSTREAM"`` with ``scope =
    "route"``; an instance configured on one route prefixes them with ``"route:NAME/"``.
    ``now`` defaults to ``trio.current_time()`` (so call it from the gateway's trio run).
    When two instances have a breaker of one name (a reload replaced an instance that is
    not garbage collected yet), the newer instance's is reported.
    The admin listener serves this; :meth:`BreakerSnapshot.as_dict` is its JSON form.
    """
    t = trio.current_time() if now is None else now
    out: dict[str, BreakerSnapshot] = {}
    for _created, instance in sorted(_INSTANCES.items()):
        out.update(instance.snapshot(t))
    return out


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return [CircuitBreaker]
