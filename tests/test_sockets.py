"""engine.sockets: waits with deadlines filed in the timer wheel instead of cancel scopes."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from engine.sockets import TICK, RawSocket, timers


def _pair() -> tuple[RawSocket, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    return RawSocket(a), b


async def test_a_wait_times_out_after_its_deadline_within_a_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    io, peer = _pair()
    with io.sock, peer, trio.fail_after(30):
        for timeout in (1.0, 0.15, 0.05, 2.5):  # multiples of the tick included
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await io.recv(timeout)
            waited = trio.current_time() - start
            assert timeout <= waited <= timeout + TICK + 1e-9


async def test_data_before_the_deadline_is_read_and_the_next_wait_starts_clean(
    autojump_clock: trio.testing.MockClock,
) -> None:
    io, peer = _pair()
    with io.sock, peer, trio.fail_after(30):

        async def send_later() -> None:
            await trio.sleep(0.5)
            peer.send(b"hello")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            assert await io.recv(2.0) == b"hello"
        # The deadline of the finished wait is gone: nothing fires at t+2 s.
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await io.recv(5.0)
        assert trio.current_time() - start >= 5.0


async def test_expire_ends_an_idle_wait_at_once(autojump_clock: trio.testing.MockClock) -> None:
    io, peer = _pair()
    with io.sock, peer, trio.fail_after(30):

        async def expire_soon() -> None:
            await trio.sleep(1.0)
            io.expire()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(expire_soon)
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await io.recv_until(trio.current_time() + 100)
            assert trio.current_time() - start == pytest.approx(1.0)
        # The socket still works after an expired wait.
        peer.send(b"x")
        assert await io.recv(1.0) == b"x"


async def test_every_task_waiting_on_an_expired_socket_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    io, peer = _pair()
    io.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with io.sock, peer, trio.fail_after(30):
        outcomes: list[str] = []

        async def reader() -> None:
            try:
                await io.recv(1.0)
            except trio.TooSlowError:
                outcomes.append("reader timed out")

        async def writer() -> None:
            try:
                await io.send_all(b"x" * (8 << 20), 100.0)  # the peer never reads
            except trio.TooSlowError:
                outcomes.append("writer timed out")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        assert sorted(outcomes) == ["reader timed out", "writer timed out"]


async def test_the_timer_task_sleeps_when_nothing_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    io, peer = _pair()
    with io.sock, peer, trio.fail_after(2000):
        with pytest.raises(trio.TooSlowError):
            await io.recv(0.2)
        wheel = timers()
        await trio.sleep(1.0)  # the emptied slots are popped as their time comes
        assert not wheel.slots
        done = wheel.done
        await trio.sleep(1000)  # and no tick runs while nothing is filed
        assert wheel.done == done
