"""engine.sockets: waits with deadlines filed in the timer wheel instead of cancel scopes."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from engine.sockets import TICK, RawSocket, TlsSocket, timers


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


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_tls_half_close_keeps_what_was_received_and_reads_on(
    version: ssl.TLSVersion,
) -> None:
    """shutdown_write sends close_notify and FIN, and the peer's data still arrives:
    the records already received (OpenSSL drops them while it looks for the peer's
    close_notify) and what the peer sends after it saw the half-close."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.maximum_version = version
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    a, b = socket.socketpair()
    server = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(b)), server_context, server_side=True
    )
    tls = TlsSocket(RawSocket(a), client_context, "127.0.0.1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await tls.handshake(trio.current_time() + 5)
        records = b"".join(bytes([65 + i]) * 16384 for i in range(5))
        await server.send_all(records)
        got = await tls.recv(5)  # one record; the others wait undecrypted
        while len(got) < 16384:
            got += await tls.recv(5)
        await tls.shutdown_write(5)

        async def answer_after_eof() -> None:
            while await server.receive_some(65536):
                pass
            await server.send_all(b"END")
            await server.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_after_eof)
            while data := await tls.recv(5):
                got += data
        tls.close()
    assert got == records + b"END"
