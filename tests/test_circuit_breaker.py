"""The circuit-breaker plugin: the state machine as tables, the filter with a fake
``call_next`` on trio's mock clock, and end to end through a running gateway."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from engine.chain import FilterContext
from engine.config import RouteConfig, load
from engine.errors import (
    BadGateway,
    CircuitOpen,
    NoHealthyTarget,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from engine.exchange import Exchange, Headers, Request, Response, Timings, UpstreamCall
from engine.metrics import render
from engine.schema import ConfigError, build
from engine.testing import Stubs, http_request, open_gateway, open_stubs
from plugins.circuit_breaker import (
    TRANSITIONS,
    Breaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    Event,
    InvalidTransition,
    Outcome,
    Permit,
    Rejection,
    RollingCount,
    State,
    breaker_states,
    is_fallback,
    next_state,
)

# --------------------------------------------------------------------------- helpers


def config(**overrides: Any) -> CircuitBreakerConfig:
    return build(CircuitBreakerConfig, overrides, "plugins.circuit-breaker")


def run(breaker: Breaker, outcomes: str, now: float = 0.0, step: float = 0.0) -> None:
    """Feed ``outcomes`` (``S`` success, ``F`` failure, ``I`` ignored) one call each."""
    kinds = {"S": Outcome.SUCCESS, "F": Outcome.FAILURE, "I": Outcome.IGNORED}
    for i, c in enumerate(outcomes):
        t = now + i * step
        permit = breaker.admit(t)
        assert isinstance(permit, Permit), f"call {i} refused"
        breaker.record(permit, kinds[c], t, "test")


def state_of(b: Breaker) -> State:
    """``b.state``, through a call so that mypy does not narrow it between steps."""
    return b.state


def make_exchange(route: str | None = "r") -> Exchange:
    request = Request(
        method=b"GET",
        path="/x",
        raw_query=b"",
        headers=Headers(),
        http_version=b"1.1",
        client="127.0.0.1",
        peer=("127.0.0.1", 1),
    )
    return Exchange(
        request=request,
        request_id="req-1",
        timings=Timings(start=0.0),
        route=None if route is None else RouteConfig(name=route),
    )


def make_call(upstream: str = "users", method: bytes = b"GET") -> UpstreamCall:
    return UpstreamCall(upstream=upstream, method=method, target=b"/x", headers=Headers())


def make_filter(scope: str = "global", **overrides: Any) -> CircuitBreaker:
    return CircuitBreaker(config(**overrides), FilterContext("circuit-breaker", scope))


class Backend:
    """A fake ``call_next``: answers ``status`` (or raises ``error``) after ``delay``."""

    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.error: BaseException | None = None
        self.calls = 0

    async def __call__(self, call: UpstreamCall) -> Response:
        self.calls += 1
        if self.delay:
            await trio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return Response(self.status, body=b"upstream")


async def send(f: CircuitBreaker, backend: Callable[[UpstreamCall], Awaitable[Response]]) -> int:
    """One call through the filter: the status the client would see."""
    try:
        response = await f.around_upstream(make_exchange(), make_call(), backend)
    except (CircuitOpen, BadGateway, UpstreamTimeout) as e:
        return e.status
    return response.status


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_transition_table(state: State, event: Event) -> None:
    expected = {
        (State.CLOSED, Event.TRIP): State.OPEN,
        (State.OPEN, Event.COOLDOWN_ELAPSED): State.HALF_OPEN,
        (State.HALF_OPEN, Event.PROBE_FAILED): State.OPEN,
        (State.HALF_OPEN, Event.PROBES_SUCCEEDED): State.CLOSED,
    }
    assert expected == dict(TRANSITIONS)
    if (state, event) in expected:
        assert next_state(state, event) is expected[(state, event)]
    else:
        with pytest.raises(InvalidTransition):
            next_state(state, event)


# --------------------------------------------------------------------------- tripping

COUNT = {"window_size": 10, "min_calls": 5, "failure_ratio": 0.5, "consecutive_failures": 0}


@pytest.mark.parametrize(
    ("overrides", "outcomes", "state", "reason"),
    [
        # the ratio rule, count window
        (COUNT, "SSSSF", State.CLOSED, ""),
        (COUNT, "SFSFF", State.OPEN, "failure ratio 3/5 >= 0.5 over the last 5 calls"),
        (COUNT, "FFFF", State.CLOSED, ""),  # below min_calls, however bad
        (COUNT, "FFFFF", State.OPEN, "failure ratio 5/5"),
        (COUNT, "SSSSSSSSFSFSF", State.CLOSED, ""),  # 3 of the last 10
        (COUNT, "SSSSSSSSSSFFFFF", State.OPEN, "5/10"),  # the old successes rolled out
        (COUNT, "IIIIFFFF", State.CLOSED, ""),  # ignored calls are not samples
        ({**COUNT, "failure_ratio": 1.0}, "FFFFSFFFFF", State.CLOSED, ""),
        # the consecutive rule fires below min_calls
        ({**COUNT, "consecutive_failures": 3}, "SFF", State.CLOSED, ""),
        ({**COUNT, "consecutive_failures": 3}, "SFFF", State.OPEN, "3 consecutive failures"),
        ({**COUNT, "consecutive_failures": 3}, "FFSFF", State.OPEN, "failure ratio 4/5"),
        ({**COUNT, "min_calls": 10, "consecutive_failures": 3}, "FFSFFS", State.CLOSED, ""),
        ({**COUNT, "consecutive_failures": 3}, "FFIF", State.OPEN, "consecutive"),
        # defaults: 5 in a row, or half of 20 once 10 were seen
        ({}, "FFFFF", State.OPEN, "5 consecutive failures; last: test"),
        ({}, "FSFSFSFSSF", State.OPEN, "failure ratio 5/10"),
        ({}, "FSFSFSFSFS", State.CLOSED, ""),  # a success never trips the breaker
    ],
)
def test_trip_rules(overrides: dict[str, Any], outcomes: str, state: State, reason: str) -> None:
    b = Breaker("users", config(**overrides), 0.0)
    run(b, outcomes)
    assert b.state is state
    if reason:
        assert reason in b.reason


def test_time_window_forgets_old_failures() -> None:
    b = Breaker(
        "users",
        config(window="time", window_duration="10s", min_calls=4, consecutive_failures=0),
        0.0,
    )
    run(b, "FFF", now=0.0, step=1.0)  # three failures at t=0..2
    run(b, "S", now=20.0)  # they expired: 0 of 1
    run(b, "FF", now=21.0)  # 2 of 3: still below min_calls
    assert state_of(b) is State.CLOSED
    run(b, "F", now=22.0)  # 3 of 4
    assert state_of(b) is State.OPEN
    assert "over the last 10s" in b.reason


def test_rolling_count() -> None:
    c = RollingCount(10.0, slices=10)
    for t in range(20):
        c.add(float(t))
    assert c.total(19.5) == 10
    assert c.total(25.0) == 4  # slices 16..19 are still within 10 s of 25
    assert c.total(100.0) == 0
    c.add(100.0, 3)
    assert c.total(100.0) == 3


# --------------------------------------------------------------------------- open, half-open


def test_open_refuses_then_half_open_admits_exactly_probes() -> None:
    b = Breaker("users", config(consecutive_failures=2, open_duration="10s", probes=3), 0.0)
    run(b, "FF", now=100.0)
    assert state_of(b) is State.OPEN
    r = b.admit(104.0)
    assert r == Rejection(6.0)
    assert state_of(b) is State.OPEN
    permits = [b.admit(110.0) for _ in range(5)]
    assert state_of(b) is State.HALF_OPEN
    assert [isinstance(p, Permit) and p.probe for p in permits] == [True] * 3 + [False] * 2
    assert permits[3] == Rejection(0.0)
    for p in permits[:3]:
        assert isinstance(p, Permit)
        b.record(p, Outcome.SUCCESS, 111.0)
    assert state_of(b) is State.CLOSED
    assert b.reason == "3 probes succeeded"
    assert isinstance(b.admit(111.0), Permit)


def test_failed_probe_reopens_with_growing_duration_up_to_the_cap() -> None:
    cfg = config(
        consecutive_failures=1,
        open_duration="10s",
        backoff_multiplier=2.0,
        max_open_duration="35s",
        probes=2,
    )
    b = Breaker("users", cfg, 0.0)
    run(b, "F", now=0.0)
    now = 0.0
    durations = []
    for _ in range(4):
        assert state_of(b) is State.OPEN
        durations.append(b.open_until - now)
        now = b.open_until
        probe = b.admit(now)
        assert isinstance(probe, Permit)
        b.record(probe, Outcome.FAILURE, now, "status 500")
        assert b.reason == "a probe failed (status 500)"
    assert durations == [10.0, 20.0, 35.0, 35.0]
    # recovery resets the backoff
    now = b.open_until
    for p in [b.admit(now), b.admit(now)]:
        assert isinstance(p, Permit)
        b.record(p, Outcome.SUCCESS, now)
    assert state_of(b) is State.CLOSED
    run(b, "F", now=now)
    assert b.open_until - now == 10.0


def test_one_failed_probe_reopens_even_with_others_in_flight() -> None:
    b = Breaker("users", config(consecutive_failures=1, probes=3), 0.0)
    run(b, "F")
    first, second = b.admit(10.0), b.admit(10.0)
    assert isinstance(first, Permit)
    assert isinstance(second, Permit)
    b.record(first, Outcome.SUCCESS, 10.5)
    b.record(second, Outcome.FAILURE, 11.0)
    assert state_of(b) is State.OPEN
    assert b.open_until == 31.0  # 10 s doubled
    assert b.trips == 2


def test_ignored_probe_frees_its_slot() -> None:
    b = Breaker("users", config(consecutive_failures=1, probes=1), 0.0)
    run(b, "F")
    p = b.admit(10.0)
    assert isinstance(p, Permit)
    assert isinstance(b.admit(10.0), Rejection)
    b.record(p, Outcome.IGNORED, 10.0)  # the client went away
    q = b.admit(10.0)
    assert isinstance(q, Permit)
    b.record(q, Outcome.SUCCESS, 10.0)
    assert state_of(b) is State.CLOSED


def test_results_from_before_a_state_change_are_ignored() -> None:
    b = Breaker("users", config(consecutive_failures=2, probes=1), 0.0)
    slow = b.admit(0.0)
    assert isinstance(slow, Permit)
    run(b, "FF")
    b.admit(10.0)  # half-open, its one probe out
    b.record(slow, Outcome.SUCCESS, 10.5)  # the slow call from before the trip ends
    assert state_of(b) is State.HALF_OPEN
    assert b.snapshot(10.5).probes_succeeded == 0


def test_a_closed_breaker_permits_with_the_epoch_of_the_moment() -> None:
    # A closed breaker hands out one permit object per epoch; a permit kept across a
    # trip and a recovery must still be one from before the state changes.
    b = Breaker("users", config(consecutive_failures=2, probes=1, window_size=10), 0.0)
    before = b.admit(0.0)
    assert isinstance(before, Permit)
    assert b.admit(0.0) == before
    run(b, "FF")  # trip
    probe = b.admit(10.0)  # half-open
    assert isinstance(probe, Permit)
    b.record(probe, Outcome.SUCCESS, 10.0)  # closed again
    assert state_of(b) is State.CLOSED
    after = b.admit(10.0)
    assert isinstance(after, Permit)
    assert (after.epoch, after.probe) == (b.epoch, False)
    assert before.epoch != b.epoch
    b.record(before, Outcome.FAILURE, 10.0)  # from before the trip: ignored
    assert b.snapshot(10.0).calls == 0
    b.record(after, Outcome.FAILURE, 10.0)
    assert b.snapshot(10.0).failures == 1


def test_an_untimed_success_counts_as_a_timed_one_in_a_count_window() -> None:
    timed = Breaker("users", config(consecutive_failures=3, window_size=10, min_calls=10), 0.0)
    untimed = Breaker("users", config(consecutive_failures=3, window_size=10, min_calls=10), 0.0)
    for b in (timed, untimed):
        run(b, "FF")
    p = timed.closed_permit()
    timed.record(p, Outcome.SUCCESS, 5.0)
    q = untimed.closed_permit()
    assert q == untimed.admit(5.0)
    assert untimed.record_success_untimed(q)
    assert untimed.snapshot(5.0) == timed.snapshot(5.0)
    assert untimed.consecutive == 0
    # Two failures more do not trip on consecutive failures: the success reset them.
    run(untimed, "FF")
    assert state_of(untimed) is State.CLOSED


def test_an_untimed_success_needs_a_clock_with_a_time_window_or_a_probe() -> None:
    b = Breaker("users", config(window="time", window_duration=10.0), 0.0)
    permit = b.closed_permit()
    assert not b.record_success_untimed(permit)
    assert b.snapshot(0.0).calls == 0  # nothing recorded: the caller records with a time
    b = Breaker("users", config(consecutive_failures=1, probes=1), 0.0)
    stale = b.closed_permit()
    run(b, "F")  # trip
    probe = b.admit(100.0)
    assert isinstance(probe, Permit)
    assert probe.probe
    assert not b.record_success_untimed(probe)
    assert b.record_success_untimed(stale)  # from before the trip: nothing to record
    assert state_of(b) is State.HALF_OPEN


async def test_a_closed_breaker_admits_and_records_without_reading_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = make_filter()
    assert await send(f, Backend()) == 200  # makes the breaker (reads the clock once)
    reads = 0
    clock = trio.current_time

    def counting_clock() -> float:
        nonlocal reads
        reads += 1
        return clock()

    monkeypatch.setattr(trio, "current_time", counting_clock)
    assert await send(f, Backend()) == 200
    assert reads == 0
    assert await send(f, Backend(status=503)) == 503  # a failure is recorded with its time
    assert reads == 1
    assert f.breakers["users"].snapshot(clock()).failures == 1
    timed = make_filter(slow_call_threshold=1.0)
    assert await send(timed, Backend()) == 200
    reads = 0
    assert await send(timed, Backend()) == 200
    assert reads == 2  # start and end, to time the call


def test_snapshot() -> None:
    b = Breaker("users", config(consecutive_failures=3), 5.0, upstream="users")
    run(b, "SF", now=6.0)
    s = b.snapshot(7.0)
    assert (s.state, s.calls, s.failures, s.consecutive_failures) == ("closed", 2, 1, 1)
    assert s.retry_after is None
    run(b, "FF", now=8.0)
    s = b.snapshot(9.0)
    assert (s.state, s.since, s.retry_after, s.trips) == ("open", 8.0, 9.0, 1)
    assert s.reason == "3 consecutive failures; last: test"
    s = b.snapshot(18.0)  # the open period is over: reads as half-open, changes nothing
    assert (s.state, s.since, s.probes_in_flight) == ("half_open", 18.0, 0)
    assert s.as_dict()["state"] == "half_open"
    assert state_of(b) is State.OPEN


# --------------------------------------------------------------------------- the filter


async def test_filter_trips_refuses_and_recovers(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        f = make_filter(consecutive_failures=3, open_duration="10s", probes=2)
        backend = Backend(status=500)
        assert [await send(f, backend) for _ in range(3)] == [500, 500, 500]  # relayed
        assert backend.calls == 3
        # open: the backend receives nothing; Retry-After counts down
        with pytest.raises(CircuitOpen) as info:
            await f.around_upstream(make_exchange(), make_call(), backend)
        assert info.value.status == 503
        assert (b"retry-after", b"10") in info.value.headers
        await trio.sleep(4.5)
        with pytest.raises(CircuitOpen) as info:
            await f.around_upstream(make_exchange(), make_call(), backend)
        assert (b"retry-after", b"6") in info.value.headers
        assert backend.calls == 3
        # half-open after 10 s: the backend recovered
        await trio.sleep(6)
        backend.status = 200
        assert [await send(f, backend) for _ in range(3)] == [200, 200, 200]
        assert f.snapshot()["users"].state == "closed"
        assert backend.calls == 6


async def test_half_open_lets_exactly_probes_through_100_concurrent_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        f = make_filter(consecutive_failures=1, open_duration="5s", probes=3)
        dead = Backend(status=503)
        await send(f, dead)
        await trio.sleep(5)
        backend = Backend(status=200, delay=1.0)
        statuses: list[int] = []

        async def client() -> None:
            statuses.append(await send(f, backend))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(client)
        assert backend.calls == 3
        assert sorted(statuses) == [200] * 3 + [503] * 97
        assert f.snapshot()["users"].state == "closed"


async def test_failed_probe_reopens_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(120):
        f = make_filter(consecutive_failures=1, open_duration="5s", probes=1)
        backend = Backend(status=500)
        await send(f, backend)
        await trio.sleep(5)
        assert await send(f, backend) == 500  # the probe fails
        snap = f.snapshot()["users"]
        assert (snap.state, snap.retry_after, snap.trips) == ("open", 10.0, 2)
        await trio.sleep(9.9)
        assert await send(f, backend) == 503
        await trio.sleep(0.1)
        backend.status = 200
        assert await send(f, backend) == 200
        assert f.snapshot()["users"].state == "closed"


@pytest.mark.parametrize(
    ("error", "status", "counts"),
    [
        (UpstreamUnreachable("down"), None, True),
        (UpstreamTimeout("slow"), None, True),
        (BadGateway("garbage"), None, True),
        (NoHealthyTarget("none"), None, False),  # no call was made
        (None, 500, True),
        (None, 503, True),
        (None, 404, False),
        (None, 429, False),
        (None, 200, False),
    ],
)
async def test_what_counts_as_a_failure(
    error: Exception | None, status: int | None, counts: bool
) -> None:
    with trio.fail_after(5):
        f = make_filter(consecutive_failures=1)
        backend = Backend(status=status or 200)
        backend.error = error
        if error is not None:
            with pytest.raises(type(error)):
                await f.around_upstream(make_exchange(), make_call(), backend)
        else:
            response = await f.around_upstream(make_exchange(), make_call(), backend)
            assert response.status == status  # relayed as it is, even when counted
        assert f.snapshot()["users"].state == ("open" if counts else "closed")


async def test_client_disconnect_is_not_a_failure_and_is_not_swallowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        f = make_filter(consecutive_failures=1, probes=1)
        slow = Backend(delay=10.0)
        with trio.move_on_after(1) as scope:
            await send(f, slow)
        assert scope.cancelled_caught  # Cancelled went through the filter
        assert f.snapshot()["users"].state == "closed"
        # a cancelled half-open probe frees its slot for the next caller
        await send(f, Backend(status=500))
        await trio.sleep(10)
        with trio.move_on_after(1):
            await send(f, slow)
        assert await send(f, Backend(status=200)) == 200
        assert f.snapshot()["users"].state == "closed"


async def test_slow_calls_count_as_failures(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        f = make_filter(consecutive_failures=2, slow_call_threshold="2s")
        assert await send(f, Backend(delay=1.0)) == 200
        assert await send(f, Backend(delay=2.5)) == 200
        assert f.snapshot()["users"].state == "closed"
        assert await send(f, Backend(delay=3.0)) == 200
        snap = f.snapshot()["users"]
        assert snap.state == "open"
        assert "slow call 3s" in snap.reason


async def test_failure_statuses_and_hidden_failed_responses() -> None:
    with trio.fail_after(5):
        f = make_filter(failure_statuses=[503, "4xx"], consecutive_failures=2)
        assert await send(f, Backend(status=500)) == 500
        assert await send(f, Backend(status=404)) == 404
        assert f.snapshot()["users"].consecutive_failures == 1
        hidden = make_filter(hide_failed_responses=True)
        assert await send(hidden, Backend(status=500)) == 502


async def test_fallback_response(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        f = make_filter(
            consecutive_failures=1,
            fallback={"status": 200, "headers": {"Content-Type": "application/json"}, "body": "[]"},
        )
        backend = Backend(status=500)
        await send(f, backend)
        exchange = make_exchange()
        response = await f.around_upstream(exchange, make_call(), backend)
        assert (response.status, response.body) == (200, b"[]")
        assert response.headers.get("content-type") == b"application/json"
        assert is_fallback(exchange, response)
        assert not is_fallback(exchange, Response(200))
        assert backend.calls == 1


async def test_scope_route_keeps_one_breaker_per_route_and_upstream() -> None:
    with trio.fail_after(5):
        f = CircuitBreaker(
            config(scope="route", consecutive_failures=1),
            FilterContext("circuit-breaker", "route:r"),
        )
        backend = Backend(status=500)
        await f.around_upstream(make_exchange("a"), make_call("users"), backend)
        response = await f.around_upstream(make_exchange("b"), make_call("users"), Backend())
        assert response.status == 200
        states = {name: s.state for name, s in f.snapshot().items()}
        assert states == {"route:r/a/users": "open", "route:r/b/users": "closed"}
        assert f.snapshot()["route:r/a/users"].route == "a"


async def test_states_are_logged_exposed_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(5):
        caplog.set_level(logging.INFO, logger="filtergate.plugins.circuit-breaker")
        f = make_filter(consecutive_failures=2)
        backend = Backend(status=502)
        call = make_call("logged")
        for _ in range(2):
            await f.around_upstream(make_exchange(), call, backend)
        assert any(
            "circuit breaker logged: closed -> open (2 consecutive failures; last: status 502"
            in r.getMessage()
            for r in caplog.records
        )
        assert breaker_states()["logged"].state == "open"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(f.background)  # in use, as the serving config's instances are
            await trio.testing.wait_all_tasks_blocked()
            metrics = render().decode()
            nursery.cancel_scope.cancel()
        assert 'filtergate_circuit_breaker_state{breaker="logged",state="open"} 1' in metrics
        assert 'filtergate_circuit_breaker_state{breaker="logged",state="closed"} 0' in metrics
        # An instance no longer in use (a reload dropped it) leaves the gauge.
        after = render().decode().splitlines()
        assert not [
            m for m in after if m.startswith('filtergate_circuit_breaker_state{breaker="logged"')
        ]
        assert (
            'filtergate_circuit_breaker_transitions_total{breaker="logged",'
            'from_state="closed",to_state="open"} 1'
        ) in metrics
        assert (
            'filtergate_circuit_breaker_calls_total{breaker="logged",outcome="failure"} 2'
        ) in metrics


async def test_the_newest_instance_reports_a_breaker_name_they_share() -> None:
    # A reload replaces an instance; until the old one is garbage collected both are
    # alive, and their breakers of one upstream have one name.
    with trio.fail_after(5):
        for first_status, second_status, expected in [(500, 200, "closed"), (200, 500, "open")]:
            first = make_filter(consecutive_failures=1)
            await first.around_upstream(make_exchange(), make_call("shared"), Backend(first_status))
            second = make_filter(consecutive_failures=1)
            await second.around_upstream(
                make_exchange(), make_call("shared"), Backend(second_status)
            )
            assert breaker_states()["shared"].state == expected
            del first, second


async def test_call_counts_appear_with_their_first_call() -> None:
    with trio.fail_after(5):
        f = make_filter()
        call = make_call("counted")
        for _ in range(3):
            await f.around_upstream(make_exchange(), call, Backend())
        metrics = render().decode()
        assert 'filtergate_circuit_breaker_calls_total{breaker="counted",outcome="success"} 3' in (
            metrics
        )
        assert 'breaker="counted",outcome="failure"' not in metrics
        await f.around_upstream(make_exchange(), call, Backend(status=503))
        metrics = render().decode()
        assert 'filtergate_circuit_breaker_calls_total{breaker="counted",outcome="failure"} 1' in (
            metrics
        )
        assert list(f.breakers) == ["counted"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ({"failure_ratio": 0}, "failure_ratio", "expected 0 < ratio <= 1"),
        ({"failure_ratio": "half"}, "failure_ratio", "expected a number"),
        ({"min_calls": 30}, "min_calls", "must be at most window_size (20)"),
        ({"window": "sliding"}, "window", "expected one of 'count', 'time'"),
        ({"scope": "target"}, "scope", "expected one of 'upstream', 'route'"),
        ({"open_duration": "soon"}, "open_duration", "expected a duration"),
        ({"max_open_duration": "1s"}, "max_open_duration", "at least open_duration"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier", "at least 1"),
        ({"probes": 0}, "probes", "at least 1"),
        ({"failure_statuses": [600]}, "failure_statuses[0]", "from 100 to 599"),
        ({"failure_statuses": [500, "5x"]}, "failure_statuses[1]", 'a class like "5xx"'),
        ({"fallback": {"status": 99}}, "fallback.status", "from 200 to 599"),
        (
            {"fallback": {"headers": {"content-length": "1"}}},
            "fallback.headers.content-length",
            "framing",
        ),
        ({"fallback": {"code": 1}}, "fallback.code", "unknown key"),
        ({"treshold": 1}, "treshold", "unknown key"),
    ],
)
def test_config_errors(table: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(CircuitBreakerConfig, table, "routes[2].plugins.circuit-breaker")
    assert info.value.path == f"routes[2].plugins.circuit-breaker.{path}"
    assert message in info.value.message


def test_config_defaults() -> None:
    c = config()
    assert c.failure_status_set == frozenset(range(500, 600))
    assert (c.window, c.window_size, c.min_calls, c.failure_ratio) == ("count", 20, 10, 0.5)
    assert config(failure_statuses=["4xx", 503]).failure_status_set == frozenset(
        [*range(400, 500), 503]
    )


# --------------------------------------------------------------------------- end to end


def flaky_gateway(stubs: Stubs, **breaker: Any) -> dict[str, Any]:
    return {
        "upstreams": {"flaky": {"targets": [stubs.target("flaky")]}},
        "routes": [
            {
                "name": "flaky",
                "prefix": "/",
                "upstream": "flaky",
                "plugins": {"circuit-breaker": breaker},
            }
        ],
    }


async def test_end_to_end_trips_refuses_and_recovers() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["flaky"]) as stubs:
            config = flaky_gateway(stubs, consecutive_failures=3, open_duration="300ms", probes=1)
            async with open_gateway(config) as gw:
                # the first 3 requests fail (and are relayed), then the backend is fine
                for _ in range(3):
                    r = await http_request(gw.port, "GET", "/things?fail=3")
                    assert r.status == 500
                    assert r.json()["error"] == "flaky"
                assert stubs.flaky.requests == 3
                for _ in range(10):
                    r = await http_request(gw.port, "GET", "/things?fail=3")
                    assert r.status == 503
                    assert r.json()["error"]["code"] == "circuit_open"
                    assert r.header("retry-after") == "1"
                assert stubs.flaky.requests == 3  # while open, the backend receives nothing
                await trio.sleep(0.35)
                r = await http_request(gw.port, "GET", "/things?fail=3")
                assert r.status == 200  # the probe
                assert stubs.flaky.requests == 4
                states = breaker_states()
                assert states["route:flaky/flaky"].state == "closed"
                assert states["route:flaky/flaky"].trips == 1


async def test_the_state_gauge_follows_a_reload() -> None:
    """It said open for good once a reload changed or removed the breaker's route: an
    alert on it fired forever."""
    series = 'filtergate_circuit_breaker_state{breaker="route:flaky/flaky",state="open"}'

    async def open_state(admin_port: int | None) -> str | None:
        assert admin_port is not None
        text = (await http_request(admin_port, "GET", "/metrics")).body.decode()
        return next(
            (line.split()[-1] for line in text.splitlines() if line.startswith(series)), None
        )

    with trio.fail_after(20):
        async with open_stubs(names=["flaky"]) as stubs:
            config = flaky_gateway(stubs, consecutive_failures=2, open_duration="60s")
            async with open_gateway(config) as gw:
                for _ in range(2):
                    await http_request(gw.port, "GET", "/things?rate=1")
                assert await open_state(gw.admin_port) == "1"
                changed = flaky_gateway(stubs, consecutive_failures=3, open_duration="60s")
                changed["server"] = {"listen": ["127.0.0.1:0"]}
                changed["admin"] = {"listen": "127.0.0.1:0"}
                await gw.gateway.reload(load(changed))
                await trio.testing.wait_all_tasks_blocked()
                assert await open_state(gw.admin_port) is None  # a fresh breaker, not used yet
                await http_request(gw.port, "GET", "/things")
                assert await open_state(gw.admin_port) == "0"
                removed = {**changed, "routes": []}
                await gw.gateway.reload(load(removed))
                await trio.testing.wait_all_tasks_blocked()
                assert await open_state(gw.admin_port) is None


async def test_end_to_end_a_hanging_backend_gets_fast_503s() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["slow"]) as stubs:
            config = {
                "upstreams": {"slow": {"targets": [stubs.target("slow")], "read_timeout": "200ms"}},
                "routes": [
                    {
                        "name": "slow",
                        "prefix": "/",
                        "upstream": "slow",
                        "plugins": {
                            "circuit-breaker": {"consecutive_failures": 2, "open_duration": "1m"}
                        },
                    }
                ],
            }
            async with open_gateway(config) as gw:
                for _ in range(2):
                    r = await http_request(gw.port, "GET", "/?delay=5")
                    assert r.status == 504
                # open: no client waits for the backend's timeout any more
                with trio.fail_after(1):
                    for _ in range(20):
                        r = await http_request(gw.port, "GET", "/?delay=5")
                        assert r.status == 503
                        assert r.header("retry-after") == "60"
                assert stubs.slow.stats()["started"] == 2


async def test_end_to_end_half_open_lets_exactly_probes_through_100_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["slow"]) as stubs:
            config = {
                "upstreams": {"slow": {"targets": [stubs.target("slow")], "read_timeout": "1s"}},
                "routes": [
                    {
                        "name": "slow",
                        "prefix": "/",
                        "upstream": "slow",
                        "plugins": {
                            "circuit-breaker": {
                                "consecutive_failures": 1,
                                "open_duration": "200ms",
                                "probes": 2,
                            }
                        },
                    }
                ],
            }
            async with open_gateway(config) as gw:
                assert (await http_request(gw.port, "GET", "/?delay=5")).status == 504
                # the probes take 0.5 s: every client arrives while they are out
                await trio.sleep(0.25)
                statuses: list[int] = []

                async def client() -> None:
                    r = await http_request(gw.port, "GET", "/?delay=0.5")
                    statuses.append(r.status)

                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        nursery.start_soon(client)
                assert sorted(statuses) == [200] * 2 + [503] * 98
                assert stubs.slow.stats()["started"] == 1 + 2
                assert breaker_states()["route:slow/slow"].state == "closed"


async def test_end_to_end_fallback_and_statuses_from_config() -> None:
    with trio.fail_after(20):
        async with open_stubs(names=["flaky"]) as stubs:
            config = flaky_gateway(
                stubs,
                consecutive_failures=1,
                failure_statuses=[502],
                fallback={
                    "status": 200,
                    "headers": {"content-type": "application/json"},
                    "body": '{"degraded": true}',
                },
            )
            async with open_gateway(config) as gw:
                r = await http_request(gw.port, "GET", "/?fail=1&status=500")
                assert r.status == 500  # not a failure by this config
                r = await http_request(gw.port, "GET", "/?fail=1&status=502&key=b")
                assert r.status == 502
                r = await http_request(gw.port, "GET", "/")
                assert (r.status, r.json()) == (200, {"degraded": True})
                assert r.header("content-type") == "application/json"
                assert stubs.flaky.requests == 2


async def test_end_to_end_config_error_names_the_path() -> None:
    with trio.fail_after(10):
        async with open_stubs(names=["flaky"]) as stubs:
            config = flaky_gateway(stubs, failure_ratio=2)
            with pytest.raises(ConfigError) as info:
                async with open_gateway(config):
                    pass
            assert info.value.path == "routes[0].plugins.circuit-breaker.failure_ratio"


async def test_the_filter_permits_a_recovered_breaker_under_its_new_epoch() -> None:
    # The filter takes a closed breaker's permit without the clock; after a trip and a
    # recovery it must be the new epoch's, or its successes would not be counted.
    with trio.fail_after(5):
        f = make_filter(consecutive_failures=1, probes=1, window_size=10)
        call = make_call("recovering")
        await f.around_upstream(make_exchange(), call, Backend())
        b = f.breakers["recovering"]
        now = trio.current_time()
        run(b, "F", now)  # trip
        probe = b.admit(now + 1000.0)  # half-open
        assert isinstance(probe, Permit)
        b.record(probe, Outcome.SUCCESS, now + 1000.0)  # closed again
        assert state_of(b) is State.CLOSED
        calls = b.snapshot(now + 1000.0).calls
        await f.around_upstream(make_exchange(), call, Backend())
        assert b.snapshot(now + 1000.0).calls == calls + 1
        await f.around_upstream(make_exchange(), call, Backend())
        assert b.snapshot(now + 1000.0).calls == calls + 2


def test_an_untimed_success_in_a_full_count_window_drops_the_oldest_outcome() -> None:
    cfg = config(consecutive_failures=5, window_size=3, min_calls=3, failure_ratio=1.0)
    timed, untimed = Breaker("users", cfg, 0.0), Breaker("users", cfg, 0.0)
    for b in (timed, untimed):
        run(b, "FSF")  # full: the oldest outcome is a failure
    timed.record(timed.closed_permit(), Outcome.SUCCESS, 1.0)
    assert untimed.record_success_untimed(untimed.closed_permit())
    assert untimed.snapshot(1.0) == timed.snapshot(1.0)
    assert (untimed.snapshot(1.0).calls, untimed.snapshot(1.0).failures) == (3, 1)
