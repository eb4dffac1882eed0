"""Metrics as data: dumps, their sum over worker processes, the exposition, the channel."""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import pytest
import trio
import trio.testing

from engine.metrics import Counter, Gauge, Histogram, MetricDump, merge, render_dumps
from engine.worker_metrics import (
    ASK_TIMEOUT,
    METRICS,
    PURGE,
    Retired,
    WorkerChannel,
    _answer,
    answer,
)


def _process(
    requests: float, open_conns: float, healthy: float, durations: list[float]
) -> dict[str, MetricDump]:
    """One process's dump of a counter, two gauges and a histogram (not registered)."""
    c = Counter("t_requests_total", "Requests.", ("code",))
    c.inc(requests, code="2xx")
    g = Gauge("t_open", "Open.", ())
    g.set(open_conns)
    h = Gauge("t_healthy", "Healthy.", ("target",), merge="min")
    h.set(healthy, target="a:1")
    hist = Histogram("t_seconds", "Durations.", ("route",), buckets=(0.1, 1.0))
    for d in durations:
        hist.observe(d, route="r")
    return {m.name: m.dump() for m in (c, g, h, hist)}


def test_counters_and_histograms_add_up_and_gauges_combine_as_declared() -> None:
    one = _process(3, 10, 1, [0.05, 0.5])
    two = _process(4, 5, 0, [2.0])
    text = render_dumps(merge([one, two])).decode()
    assert 't_requests_total{code="2xx"} 7' in text
    assert "t_open 15" in text  # sum: connections open in both
    assert 't_healthy{target="a:1"} 0' in text  # min: out of rotation in one process
    assert 't_seconds_bucket{route="r",le="0.1"} 1' in text
    assert 't_seconds_bucket{route="r",le="1"} 2' in text
    assert 't_seconds_bucket{route="r",le="+Inf"} 3' in text
    assert 't_seconds_count{route="r"} 3' in text
    assert 't_seconds_sum{route="r"} 2.55' in text
    assert "# TYPE t_seconds histogram" in text
    assert text.count("# TYPE t_requests_total counter") == 1


def test_a_process_dump_renders_as_the_process_itself() -> None:
    one = _process(3, 10, 1, [0.05])
    assert render_dumps(merge([one])) == render_dumps(one)


def test_series_of_one_process_only_are_kept() -> None:
    c1, c2 = Counter("t_c", "C.", ("k",)), Counter("t_c", "C.", ("k",))
    c1.inc(k="a")
    c2.inc(2, k="b")
    text = render_dumps(merge([{"t_c": c1.dump()}, {"t_c": c2.dump()}])).decode()
    assert 't_c{k="a"} 1' in text
    assert 't_c{k="b"} 2' in text


def test_a_metric_that_differs_between_processes_keeps_the_first_definition() -> None:
    h1 = Histogram("t_h", "H.", (), buckets=(1.0,))
    h2 = Histogram("t_h", "H.", (), buckets=(1.0, 2.0))  # another plugin version
    h1.observe(0.5)
    h2.observe(0.5)
    text = render_dumps(merge([{"t_h": h1.dump()}, {"t_h": h2.dump()}])).decode()
    assert "t_h_count 1" in text
    assert 'le="2"' not in text


def test_max_gauges_and_gauges_left_out() -> None:
    a, b = Gauge("t_state", "S.", ("s",), merge="max"), Gauge("t_state", "S.", ("s",), merge="max")
    a.set(1, s="open")
    b.set(0, s="open")
    assert (
        't_state{s="open"} 1'
        in render_dumps(merge([{"t_state": a.dump()}, {"t_state": b.dump()}])).decode()
    )
    assert merge([{"t_state": a.dump()}], gauges=False) == {}
    with pytest.raises(ValueError, match="merge must be one of"):
        Gauge("t_bad", "B.", (), merge="avg")  # type: ignore[arg-type]


def test_retired_workers_keep_their_counts_not_their_gauges() -> None:
    retired = Retired()
    retired.add(_process(3, 10, 1, [0.5]))
    retired.add(_process(4, 5, 1, []))
    text = render_dumps(retired.metrics).decode()
    assert 't_requests_total{code="2xx"} 7' in text
    assert 't_seconds_count{route="r"} 1' in text
    assert "t_open" not in text
    assert "t_healthy" not in text


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


@asynccontextmanager
async def _served(sock: socket.socket) -> AsyncIterator[WorkerChannel]:
    """The main side's channel on ``sock``, served (as a worker's supervisor does)."""
    channel = WorkerChannel(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.serve)
        try:
            yield channel
        finally:
            channel.close()


async def test_a_worker_answers_with_this_process_metrics() -> None:
    ours, theirs = _pair()
    with trio.fail_after(10):
        async with _served(ours) as channel, trio.open_nursery() as nursery:
            nursery.start_soon(answer, theirs)
            first = await channel.ask()
            second = await channel.ask()
            assert "filtergate_responses_total" in first  # the engine's, registered here
            assert second.keys() == first.keys()
            channel.close()  # the worker's loop ends when the main process goes


async def test_a_late_answer_is_dropped_and_the_last_one_shown(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker that does not answer in time shows its last metrics; its late answer is
    read and dropped on the next ask, whose own answer is the one kept."""
    ours, theirs = _pair()
    worker = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))

    async def reply(seq: bytes, value: int) -> None:
        body = json.dumps(
            {"v": {"kind": "counter", "help": "", "labels": [], "values": [[[], value]]}}
        ).encode()
        await worker.send_all(struct.pack(">II", int.from_bytes(seq, "big"), len(body)) + body)

    with trio.fail_after(60):
        async with _served(ours) as channel:
            async with trio.open_nursery() as nursery:

                async def prompt() -> None:
                    await reply((await worker.receive_some(9))[:4], 1)

                nursery.start_soon(prompt)
                assert (await channel.ask())["v"]["values"] == [[[], 1]]

            late_seq = b""

            async def slow() -> None:
                nonlocal late_seq
                late_seq = (await worker.receive_some(9))[:4]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                assert (await channel.ask())["v"]["values"] == [[[], 1]]  # timed out: the last
            await reply(late_seq, 2)  # the answer to the ask that gave up

            async with trio.open_nursery() as nursery:

                async def prompt_again() -> None:
                    await reply((await worker.receive_some(9))[:4], 3)

                nursery.start_soon(prompt_again)
                assert (await channel.ask())["v"]["values"] == [[[], 3]]
            await worker.aclose()
            assert (await channel.ask())["v"]["values"] == [[[], 3]]  # gone: the last one


async def test_garbage_from_a_worker_is_never_read_again() -> None:
    ours, theirs = _pair()
    with trio.fail_after(10):
        async with _served(ours) as channel, trio.open_nursery() as nursery:

            async def garbage() -> None:
                seq = (await trio.to_thread.run_sync(theirs.recv, 9))[:4]
                theirs.sendall(seq + struct.pack(">I", 5) + b"{nope")

            nursery.start_soon(garbage)
            assert await channel.ask() == {}
            assert await channel.ask() == {}  # closed: no wait, no read
    theirs.close()


def test_sample_values_are_written_in_full() -> None:
    c = Counter("t_big_total", "Big.", ())
    c.inc(3_703_701)
    g = Gauge("t_odd", "Odd.", ("k",))
    g.set(0.1, k="tenth")
    g.set(math.inf, k="inf")
    g.set(-math.inf, k="-inf")
    g.set(math.nan, k="nan")
    text = render_dumps({"t_big_total": c.dump(), "t_odd": g.dump()}).decode()
    assert "t_big_total 3703701\n" in text  # not 3.7037e+06
    assert 't_odd{k="tenth"} 0.1\n' in text
    assert 't_odd{k="inf"} +Inf\n' in text
    assert 't_odd{k="-inf"} -Inf\n' in text
    assert 't_odd{k="nan"} NaN\n' in text


def test_a_value_json_cannot_carry_never_takes_the_worker_down() -> None:
    """A plugin counting in Decimal is sent as a float; a value that is no number at
    all is left out (and logged), in a worker's answer and the main process's page."""
    from engine import metrics

    g = metrics.gauge("t_plugin_ratio", "A plugin's gauge.")
    try:
        g.set(Decimal("0.5"))  # type: ignore[arg-type]
        seq, length = struct.unpack_from(">II", _answer(7))
        body = json.loads(_answer(7)[8:])
        assert (seq, body["t_plugin_ratio"]["values"]) == (7, [[[], 0.5]])
        assert length > 0
        g.set(10**400)  # too large for a float: left out too
        assert json.loads(_answer(9)[8:])["t_plugin_ratio"]["values"] == []
        g.set("1.5")  # type: ignore[arg-type]
        assert json.loads(_answer(10)[8:])["t_plugin_ratio"]["values"] == []

        class Weird:
            def __float__(self) -> float:
                raise RuntimeError("a plugin's number type")

        g.set(Weird())  # type: ignore[arg-type]
        assert json.loads(_answer(11)[8:])["t_plugin_ratio"]["values"] == []
        g.set(object())  # type: ignore[arg-type]
        body = json.loads(_answer(8)[8:])  # left out, the rest sent
        assert body["t_plugin_ratio"]["values"] == []
        assert "filtergate_responses_total" in body
        assert b"# TYPE t_plugin_ratio gauge" in metrics.render()  # the main process too
    finally:
        del metrics._REGISTRY["t_plugin_ratio"]


async def test_an_empty_answer_keeps_the_last_metrics() -> None:
    ours, theirs = _pair()
    with trio.fail_after(10):
        async with _served(ours) as channel:
            channel.last = {"kept": {"kind": "counter", "help": "", "labels": [], "values": []}}
            async with trio.open_nursery() as nursery:

                async def empty() -> None:
                    seq = (await trio.to_thread.run_sync(theirs.recv, 9))[:4]
                    theirs.sendall(struct.pack(">II", int.from_bytes(seq, "big"), 0))

                nursery.start_soon(empty)
                assert list(await channel.ask()) == ["kept"]
    theirs.close()


async def test_scrapes_at_once_share_one_ask_and_each_returns_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Five scrapes while the worker does not answer: each is back within one timeout
    (they do not queue behind one another), with the last metrics."""
    ours, theirs = _pair()  # nobody answers on theirs
    back: list[float] = []

    with trio.fail_after(60):
        async with _served(ours) as channel:

            async def scrape() -> None:
                await channel.ask()
                back.append(trio.current_time())

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(scrape)
            assert len(back) == 5
            assert max(back) - start <= ASK_TIMEOUT + 0.01
            assert theirs.recv(64) == struct.pack(">IBI", 1, 0, 0)  # one ask went out, not five
    theirs.close()


async def test_a_worker_that_was_busy_answers_only_the_newest_ask_and_every_purge() -> None:
    ours, theirs = _pair()
    purged: list[dict[str, Any]] = []

    def purge(selector: dict[str, Any]) -> int:
        purged.append(selector)
        return 7

    async def next_answer() -> tuple[int, bytes]:
        seq, length = struct.unpack(">II", await trio.to_thread.run_sync(ours.recv, 8))
        body = b""
        while len(body) < length:
            body += await trio.to_thread.run_sync(ours.recv, length - len(body))
        return seq, body

    with trio.fail_after(10):
        # Asks that queued while the worker was busy: metrics, a purge, metrics.
        ours.sendall(struct.pack(">IBI", 1, METRICS, 0))
        selector = json.dumps({"route": "r"}).encode()
        ours.sendall(struct.pack(">IBI", 2, PURGE, len(selector)) + selector)
        ours.sendall(struct.pack(">IBI", 3, METRICS, 0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, theirs, purge)
            assert await next_answer() == (2, b'{"purged": 7}')
            seq, body = await next_answer()
            assert seq == 3
            assert "filtergate_responses_total" in json.loads(body)
            await trio.testing.wait_all_tasks_blocked()
            ours.setblocking(False)
            with pytest.raises(BlockingIOError):
                ours.recv(1)  # no answer to 1
            ours.close()  # the worker's loop ends
    assert purged == [{"route": "r"}]


async def test_a_purge_is_answered_with_what_the_worker_dropped() -> None:
    ours, theirs = _pair()
    with trio.fail_after(10):
        async with _served(ours) as channel, trio.open_nursery() as nursery:
            nursery.start_soon(answer, theirs, lambda selector: len(selector))
            assert await channel.purge({"route": "r", "target": "/a"}) == 2
            assert "filtergate_responses_total" in await channel.ask()  # still in step
            channel.close()


async def test_a_worker_that_dies_during_a_scrape_is_counted_once() -> None:
    """Its answer came, then it died and was retired with that answer as its last:
    counted in the retired totals and among the answers, 300 requests read 383, and
    the next scrape went down again (Prometheus reads a reset)."""
    from engine.cli import Workers

    def requests(n: float) -> dict[str, MetricDump]:
        return {"r": {"kind": "counter", "help": "", "labels": [], "values": [[[], n]]}}

    class Channel:
        def __init__(self, n: float, then: object = None) -> None:
            self.last = requests(n)
            self.then = then

        async def ask(self) -> dict[str, MetricDump]:
            await trio.lowlevel.checkpoint()
            if callable(self.then):
                self.then()  # what supervise() does when the process exits
            return self.last

        def close(self) -> None:
            pass

    workers = Workers([], 2)
    workers.metrics = {1: Channel(100, lambda: workers._retire(1)), 2: Channel(200)}  # type: ignore[dict-item]
    with trio.fail_after(5):
        gathered = await workers.gather_metrics()
    assert merge(gathered)["r"]["values"] == [[[], 300.0]]


def test_status_classes_that_never_occur_are_not_shown() -> None:
    """/metrics listed responses_total for 0xx and 6xx-9xx, at 0 for ever."""
    import engine.server  # noqa: F401  (binds the series)
    from engine.metrics import render

    text = render().decode()
    shown = [line for line in text.splitlines() if line.startswith("filtergate_responses_total{")]
    assert [line.split('"')[1] for line in shown][:5] == ["1xx", "2xx", "3xx", "4xx", "5xx"]
    assert not any(f'code="{c}xx"' in text for c in (0, 6, 7, 8, 9))


async def test_purges_to_a_stuck_worker_all_reach_it_and_the_channel_stays_in_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker that does not read for a while (stopped, busy): purges that time out
    with scrapes beside them, more than its socket buffer holds, are written whole all
    the same and carried out once it reads; the channel is not closed."""
    ours, theirs = _pair()
    purged: list[dict[str, Any]] = []
    with trio.fail_after(60):
        async with _served(ours) as channel:
            answers: list[int | None] = []

            async def purge(i: int) -> None:
                answers.append(await channel.purge({"target": f"/t{i}"}))

            async with trio.open_nursery() as nursery:
                for i in range(1000):  # (a socket buffer holds some 300 such asks)
                    nursery.start_soon(purge, i)
                    nursery.start_soon(channel.ask)
            assert answers == [None] * 1000  # nobody answered in time

            def carry_out(selector: dict[str, Any]) -> int:
                purged.append(selector)
                return 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, theirs, carry_out)  # the worker reads again
                assert await channel.purge({"target": "/last"}) == 1  # still in step
                assert "filtergate_responses_total" in await channel.ask()
                channel.close()
    assert sorted(p["target"] for p in purged) == sorted(
        [f"/t{i}" for i in range(1000)] + ["/last"]
    )
    assert purged[-1]["target"] == "/last"  # in the order they were asked
