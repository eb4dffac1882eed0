"""The demo upstream stubs, over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import trio

from engine.stubs import STUB_PORTS, Stubs, open_stubs, serve_stubs


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Reply:
    """One HTTP/1.1 request on a fresh connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        all_headers = [("host", "stub"), *(headers or []), ("content-length", str(len(body)))]
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        status, resp_headers, chunks = 0, [], []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, resp_headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, resp_headers, b"".join(chunks))


@pytest.fixture
async def stubs() -> Any:
    async with open_stubs() as running:
        yield running


async def test_every_service_listens_and_is_healthy(stubs: Stubs) -> None:
    with trio.fail_after(10):
        assert set(stubs.ports) == set(STUB_PORTS)
        assert len(set(stubs.ports.values())) == len(STUB_PORTS)
        for name, port in stubs.ports.items():
            reply = await request(port, "GET", "/healthz")
            assert reply.status == 200
            assert reply.json() == {"status": "ok", "service": name}
            assert (b"x-stub", name.encode()) in reply.headers


@pytest.mark.parametrize(
    ("service", "target", "status", "check"),
    [
        ("users", "/users", 200, lambda j: [u["id"] for u in j["users"]] == [1, 2, 3]),
        ("users", "/users/2", 200, lambda j: j["name"] == "Alan Turing"),
        ("users", "/2", 200, lambda j: j["id"] == 2),
        ("users", "/users/99", 404, lambda j: j["error"] == "not_found"),
        ("users", "/users/1/extra", 404, lambda j: j["error"] == "not_found"),
        (
            "orders",
            "/orders?user_id=1",
            200,
            lambda j: [o["id"] for o in j["orders"]] == [101, 102],
        ),
        ("orders", "/orders?user_id=42", 200, lambda j: j["orders"] == []),
        ("orders", "/orders/103", 200, lambda j: j["user_id"] == 2),
        ("orders", "/orders", 200, lambda j: len(j["orders"]) == 4),
        ("catalog", "/catalog", 200, lambda j: len(j["catalog"]) == 3),
        ("catalog", "/catalog/3", 200, lambda j: j["sku"] == "MN-27"),
        ("catalog", "/catalog?sku=KB-01", 200, lambda j: j["catalog"][0]["id"] == 1),
        ("catalog", "/catalog/x", 404, lambda j: "message" in j),
    ],
)
async def test_record_services(
    stubs: Stubs, service: str, target: str, status: int, check: Any
) -> None:
    with trio.fail_after(10):
        reply = await request(stubs.ports[service], "GET", target)
        assert reply.status == status
        assert (b"content-type", b"application/json") in reply.headers
        assert check(reply.json())


async def test_record_services_are_read_only(stubs: Stubs) -> None:
    with trio.fail_after(10):
        reply = await request(stubs.ports["users"], "POST", "/users", body=b"{}")
        assert reply.status == 405


async def test_echo_describes_the_request(stubs: Stubs) -> None:
    with trio.fail_after(10):
        reply = await request(
            stubs.ports["echo"],
            "POST",
            "/some/path?a=1&a=2&b=",
            headers=[("x-one", "1"), ("x-dup", "a"), ("x-dup", "b")],
            body="héllo".encode(),
        )
        assert reply.status == 200
        echoed = reply.json()
        assert echoed["method"] == "POST"
        assert echoed["path"] == "/some/path"
        assert echoed["query"] == "a=1&a=2&b="
        assert echoed["args"] == {"a": ["1", "2"], "b": [""]}
        assert echoed["headers"]["x-one"] == "1"
        assert echoed["headers"]["x-dup"] == "a, b"
        assert ["x-dup", "a"] in echoed["header_list"]
        assert echoed["body"] == "héllo"


async def test_slow_answers_after_the_delay(stubs: Stubs) -> None:
    with trio.fail_after(10):
        reply = await request(stubs.ports["slow"], "GET", "/slow?delay=0.01")
        assert reply.status == 200
        assert reply.json() == {"delayed": 0.01}
        stats = (await request(stubs.ports["slow"], "GET", "/slow/stats")).json()
        assert stats == {"started": 1, "completed": 1, "cancelled": 0, "in_flight": 0}


@pytest.mark.parametrize("delay", ["-1", "x", "nan"])
async def test_slow_rejects_a_bad_delay(stubs: Stubs, delay: str) -> None:
    with trio.fail_after(10):
        reply = await request(stubs.ports["slow"], "GET", f"/?delay={delay}")
        assert reply.status == 400


async def test_slow_counts_a_client_that_went_away(stubs: Stubs) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", stubs.ports["slow"])
        await stream.send_all(b"GET /slow?delay=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        await stubs.slow.wait_started(1)
        assert stubs.slow.in_flight == 1
        await stream.aclose()
        await stubs.slow.wait_cancelled(1)
        stats = (await request(stubs.ports["slow"], "GET", "/stats")).json()
        assert stats == {"started": 1, "completed": 0, "cancelled": 1, "in_flight": 0}


async def test_flaky_n_of_m_is_deterministic(stubs: Stubs) -> None:
    with trio.fail_after(10):
        port = stubs.ports["flaky"]
        statuses = [(await request(port, "GET", "/x?fail=1-of-3")).status for _ in range(6)]
        assert statuses == [500, 200, 200, 500, 200, 200]
        other_key = [
            (await request(port, "GET", "/x?fail=2&key=k&status=503")).status for _ in range(3)
        ]
        assert other_key == [503, 503, 200]
        stats = (await request(port, "GET", "/flaky/stats")).json()
        assert stats == {"requests": 9, "failures": 4}
        assert (await request(port, "POST", "/flaky/reset")).status == 200
        assert (await request(port, "GET", "/x?fail=1-of-3")).status == 500
        assert stubs.flaky.requests == 1


async def test_flaky_rate_bounds(stubs: Stubs) -> None:
    with trio.fail_after(10):
        port = stubs.ports["flaky"]
        assert {(await request(port, "GET", "/?rate=1")).status for _ in range(5)} == {500}
        assert {(await request(port, "GET", "/?rate=0")).status for _ in range(5)} == {200}
        assert (await request(port, "GET", "/")).status == 200


@pytest.mark.parametrize("query", ["rate=2", "rate=x", "fail=3-of-2", "fail=a", "status=99"])
async def test_flaky_rejects_bad_parameters(stubs: Stubs, query: str) -> None:
    with trio.fail_after(10):
        assert (await request(stubs.ports["flaky"], "GET", f"/?{query}")).status == 400


async def test_flaky_rate_is_reproducible_per_instance() -> None:
    with trio.fail_after(10):
        sequences = []
        for _ in range(2):
            async with open_stubs(names=["flaky"]) as stubs:
                port = stubs.ports["flaky"]
                sequences.append(
                    [(await request(port, "GET", "/?rate=0.5")).status for _ in range(8)]
                )
        assert sequences[0] == sequences[1]
        assert set(sequences[0]) == {200, 500}


async def test_serve_stubs_reports_bound_ports_and_rejects_unknown_names() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(
                lambda task_status: serve_stubs(
                    "127.0.0.1", {"echo": 0, "users": 0}, task_status=task_status
                )
            )
            assert set(ports) == {"echo", "users"}
            assert (await request(ports["echo"], "GET", "/healthz")).status == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(KeyError, match="nope"):
            await serve_stubs("127.0.0.1", {"nope": 0})


async def test_cli_serves_every_stub_and_stops_on_interrupt() -> None:
    code = "import sys, engine.stubs as s; sys.exit(s.main(sys.argv[1:]))"
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", code, "--base-port", "0"], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            output = b""
            while output.count(b"\n") < len(STUB_PORTS):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "stubs exited early"
                output += chunk
            names = [line.split()[1] for line in output.decode().splitlines()]
            assert names == list(STUB_PORTS)
            port = int(output.decode().splitlines()[3].rsplit(":", 1)[1])
            assert (await request(port, "GET", "/healthz")).json()["service"] == "echo"
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            proc.kill()
            await proc.wait()


def test_cli_names_a_taken_port_and_refuses_a_base_port_out_of_range() -> None:
    """A taken port gave 'Address already in use' without saying which, and
    --base-port 65533 an 80-line traceback."""
    import socket

    from engine.stubs import _cannot_bind

    code = "import sys, engine.stubs as s; sys.exit(s.main(sys.argv[1:]))"
    for _ in range(20):  # a port whose three before it are free (echo is the fourth)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        base = port - 3
        if base >= 1 and not any(_cannot_bind("127.0.0.1", p) for p in range(base, port)):
            break
        taken.close()
    else:
        pytest.skip("no free run of ports around one the kernel gave")
    with taken:
        taken.listen()
        run = subprocess.run(
            [sys.executable, "-c", code, "--base-port", str(base)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    assert run.returncode == 1
    assert f"127.0.0.1:{port} (echo): Address already in use" in run.stderr
    out_of_range = subprocess.run(
        [sys.executable, "-c", code, "--base-port", "65533"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert out_of_range.returncode == 2
    assert "Traceback" not in out_of_range.stderr
    assert "--base-port must be 0 or 1-65530" in out_of_range.stderr
