"""Metrics as data: dumps, their sum over worker processes, the exposition, the channel."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio

from engine.metrics import Counter, Gauge, Histogram, MetricDump, merge, render_dumps
from engine.worker_metrics import Retired, WorkerMetrics, answer


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


async def test_a_worker_answers_with_this_process_metrics() -> None:
    ours, theirs = _pair()
    channel = WorkerMetrics(ours)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, theirs)
            first = await channel.ask()
            second = await channel.ask()
            assert "filtergate_responses_total" in first  # the engine's, registered here
            assert second.keys() == first.keys()
            await channel.aclose()  # the worker's loop ends when the main process goes


async def test_a_late_answer_is_dropped_and_the_last_one_shown(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker that does not answer in time shows its last metrics; its late answer is
    read and dropped on the next ask, whose own answer is the one kept."""
    ours, theirs = _pair()
    channel = WorkerMetrics(ours)
    worker = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))

    async def reply(seq: bytes, value: int) -> None:
        body = json.dumps(
            {"v": {"kind": "counter", "help": "", "labels": [], "values": [[[], value]]}}
        ).encode()
        await worker.send_all(struct.pack(">II", int.from_bytes(seq, "big"), len(body)) + body)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def prompt() -> None:
                await reply(await worker.receive_some(4), 1)

            nursery.start_soon(prompt)
            assert (await channel.ask())["v"]["values"] == [[[], 1]]

        late_seq = b""

        async def slow() -> None:
            nonlocal late_seq
            late_seq = await worker.receive_some(4)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            assert (await channel.ask())["v"]["values"] == [[[], 1]]  # timed out: the last
        await reply(late_seq, 2)  # the answer to the ask that gave up

        async with trio.open_nursery() as nursery:

            async def prompt_again() -> None:
                await reply(await worker.receive_some(4), 3)

            nursery.start_soon(prompt_again)
            assert (await channel.ask())["v"]["values"] == [[[], 3]]
        await worker.aclose()
        assert (await channel.ask())["v"]["values"] == [[[], 3]]  # gone: the last one


async def test_garbage_from_a_worker_is_never_read_again() -> None:
    ours, theirs = _pair()
    channel = WorkerMetrics(ours)
    with trio.fail_after(10):
        theirs.sendall(struct.pack(">II", 1, 5) + b"{nope")
        assert await channel.ask() == {}
        assert await channel.ask() == {}  # closed: no wait, no read
    theirs.close()
