"""The ``cache`` filter: a shared HTTP cache in front of real upstreams, over real sockets.

The upstreams are scripted raw servers that count the requests they get, so each test
can tell a hit (the upstream saw nothing) from a miss. Time is trio's MockClock, jumped
by hand past an answer's freshness: nothing sleeps.
"""

from __future__ import annotations

import gzip
import hashlib
import tomllib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from engine.config import load
from engine.exchange import Headers
from engine.schema import ConfigError
from engine.stubs import open_stubs
from engine.testing import Client, HttpResponse, RunningGateway, http_request, open_gateway
from plugins.cache import Entry, MemoryCache, _Budget, directives, freshness
from tests.upstreams import RecordedRequest, Upstream, UpstreamConn, response_head, serve_upstream

Answer = Callable[[RecordedRequest], bytes]
# The MockClock's jumps count against trio deadlines: tests that jump get one past their
# jumps (pytest-timeout bounds every test in real time too).
JUMPED_DEADLINE = 3600
BODY = b'{"items": [1, 2, 3]}'


def answer(headers: list[tuple[str, str]], body: bytes = BODY, status: int = 200) -> Answer:
    """An answer with ``headers`` and ``body``, framed by Content-Length."""
    data = response_head(status, headers, content_length=len(body)) + body
    return lambda _req: data


def etagged(tag: str, headers: Sequence[tuple[str, str]] = ()) -> Answer:
    """``body`` with ETag ``tag``, or a 304 when the request's If-None-Match names it."""

    def respond(req: RecordedRequest) -> bytes:
        if req.header("if-none-match") == tag:
            return response_head(304, [("etag", tag), *headers], content_length=0)
        return answer([("etag", tag), *headers])(req)

    return respond


class Failing:
    """An upstream script: ``BODY`` with ``Cache-Control: cache_control``, until
    ``failing`` is set; then a 503."""

    def __init__(self, cache_control: str) -> None:
        self.cache_control = cache_control
        self.failing = False

    def __call__(self, req: RecordedRequest) -> bytes:
        if self.failing:
            return answer([], b"down", status=503)(req)
        return answer([("cache-control", self.cache_control)])(req)


@asynccontextmanager
async def scripted(respond: Answer, gate: trio.Event | None = None) -> AsyncIterator[Upstream]:
    """An upstream answering every request (keep-alive) with ``respond(request)``, once
    ``gate`` is set when one is given."""

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            if gate is not None:
                await gate.wait()
            await conn.send(respond(got[0]))

    async with serve_upstream(handler) as upstream:
        yield upstream


def _config(target: str, cache: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    plugins = {"cache": cache or {}, **route.pop("plugins", {})}
    return {
        "upstreams": {"up": {"targets": [target]}},
        "routes": [
            {"name": "r", "prefix": "/", "upstream": "up", "plugins": plugins, **route},
        ],
    }


async def _get(
    client: Client, path: str = "/a", headers: Sequence[tuple[str, str]] = (), method: str = "GET"
) -> HttpResponse:
    return await client.request(method, path, headers)


async def test_a_fresh_answer_is_served_from_the_cache(mock_clock: trio.testing.MockClock) -> None:
    respond = answer([("content-type", "application/json"), ("cache-control", "max-age=60")])
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                first = await _get(client)
                mock_clock.jump(30)
                second = await _get(client)
                head = await _get(client, method="HEAD")
                other = await _get(client, "/b")
                mock_clock.jump(31)  # 61 s old: stale, and nothing to revalidate it with
                third = await _get(client)
    assert [r.status for r in (first, second, third)] == [200, 200, 200]
    assert first.header("x-cache-status") == "MISS"
    assert second.header("x-cache-status") == "HIT"
    assert second.header("age") == "30"
    assert second.body == first.body == BODY
    assert second.header("content-length") == str(len(BODY))
    assert second.header("content-type") == "application/json"
    assert head.header("x-cache-status") == "HIT"
    assert head.body == b""
    assert head.header("content-length") == str(len(BODY))  # the GET's
    assert other.header("x-cache-status") == "MISS"  # another target, another key
    assert third.header("x-cache-status") == "EXPIRED"
    assert [r.target for r in up.requests] == [b"/a", b"/b", b"/a"]


async def test_a_stale_answer_is_revalidated_with_its_etag(
    mock_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(etagged('"v1"', [("cache-control", "max-age=10")])) as up:
            async with open_gateway(_config(up.target)) as gw, Client.open(gw.port) as client:
                await _get(client)
                mock_clock.jump(11)
                revalidated = await _get(client)
                again = await _get(client)
    assert revalidated.status == 200
    assert revalidated.header("x-cache-status") == "REVALIDATED"
    assert revalidated.body == BODY
    assert again.header("x-cache-status") == "HIT"  # fresh again for 10 s
    assert again.header("age") == "0"
    assert len(up.requests) == 2
    assert up.requests[0].header("if-none-match") is None
    assert up.requests[1].header("if-none-match") == '"v1"'


async def test_no_cache_answers_are_revalidated_every_time() -> None:
    respond = etagged('"v1"', [("cache-control", "no-cache")])
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                statuses = [(await _get(client)).header("x-cache-status") for _ in range(3)]
    assert statuses == ["MISS", "REVALIDATED", "REVALIDATED"]
    assert [r.header("if-none-match") for r in up.requests] == [None, '"v1"', '"v1"']


async def test_a_clients_conditional_is_answered_from_the_cache() -> None:
    respond = etagged('"v1"', [("cache-control", "max-age=60"), ("vary", "accept-language")])
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                # A first request with a conditional: the upstream gets no conditional, so
                # the cache gets the whole answer.
                first = await _get(client, headers=[("if-none-match", '"v1"')])
                matching = await _get(client, headers=[("if-none-match", 'W/"v1", "v0"')])
                star = await _get(client, headers=[("if-none-match", "*")])
                other = await _get(client, headers=[("if-none-match", '"v2"')])
    assert first.status == 200
    assert up.requests[0].header("if-none-match") is None
    for resp in (matching, star):
        assert resp.status == 304
        assert resp.body == b""
        assert resp.header("etag") == '"v1"'
        assert resp.header("cache-control") == "max-age=60"
        assert resp.header("vary") == "accept-language"
        assert resp.header("content-type") is None  # not one of a 304's fields
    assert other.status == 200
    assert other.body == BODY
    assert len(up.requests) == 1


async def test_if_modified_since_is_answered_from_last_modified() -> None:
    modified = "Mon, 02 Nov 2026 10:00:00 GMT"
    respond = answer([("cache-control", "max-age=60"), ("last-modified", modified)])
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                await _get(client)
                later = await _get(
                    client, headers=[("if-modified-since", "Tue, 03 Nov 2026 00:00:00 GMT")]
                )
                earlier = await _get(
                    client, headers=[("if-modified-since", "Sun, 01 Nov 2026 00:00:00 GMT")]
                )
    assert later.status == 304
    assert later.header("last-modified") == modified  # no ETag: it says which copy
    assert earlier.status == 200
    assert len(up.requests) == 1


@pytest.mark.parametrize(
    ("headers", "status", "why"),
    [
        ([("cache-control", "no-store, max-age=60")], 200, "no-store"),
        ([("cache-control", "private, max-age=60")], 200, "private"),
        ([("cache-control", "max-age=60"), ("set-cookie", "s=1")], 200, "a cookie"),
        ([("cache-control", "max-age=60"), ("vary", "*")], 200, "Vary: *"),
        ([], 200, "no freshness and no ttl"),
        ([("cache-control", "max-age=60")], 500, "a status not listed"),
        ([("cache-control", "max-age=0")], 200, "stale at once, no validator"),
        ([("expires", "0")], 200, "an Expires that is no date"),
    ],
)
async def test_answers_the_upstream_keeps_out_are_not_stored(
    headers: list[tuple[str, str]], status: int, why: str
) -> None:
    with trio.fail_after(20):
        async with scripted(answer(headers, status=status)) as up:
            async with open_gateway(_config(up.target)) as gw, Client.open(gw.port) as client:
                got = [await _get(client) for _ in range(2)]
    assert [r.header("x-cache-status") for r in got] == ["MISS", "MISS"], why
    assert len(up.requests) == 2, why


async def test_expires_and_ttl_give_freshness(mock_clock: trio.testing.MockClock) -> None:
    dated = answer(
        [("date", "Mon, 02 Nov 2026 10:00:00 GMT"), ("expires", "Mon, 02 Nov 2026 10:00:30 GMT")]
    )
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(dated) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                statuses = [(await _get(client)).header("x-cache-status") for _ in range(2)]
                mock_clock.jump(31)
                statuses.append((await _get(client)).header("x-cache-status"))
        assert statuses == ["MISS", "HIT", "EXPIRED"]
        async with scripted(answer([])) as up:
            async with open_gateway(_config(up.target, {"ttl": "5s"})) as gw:
                async with Client.open(gw.port) as client:
                    statuses = [(await _get(client)).header("x-cache-status") for _ in range(2)]
                    mock_clock.jump(6)
                    statuses.append((await _get(client)).header("x-cache-status"))
        assert statuses == ["MISS", "HIT", "EXPIRED"]


async def test_vary_keeps_the_variants_apart() -> None:
    def respond(req: RecordedRequest) -> bytes:
        lang = (req.header("accept-language") or "none").encode()
        return answer([("cache-control", "max-age=60"), ("vary", "Accept-Language")], lang)(req)

    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                got = []
                for lang in ("en", "fr", "en", "fr", None):
                    hdrs = [("accept-language", lang)] if lang else []
                    got.append(await _get(client, headers=hdrs))
    assert [r.body for r in got] == [b"en", b"fr", b"en", b"fr", b"none"]
    assert [r.header("x-cache-status") for r in got] == ["MISS", "MISS", "HIT", "HIT", "MISS"]


async def test_each_consumer_gets_only_its_own_answers() -> None:
    keys = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789ab"}
    consumers = [
        {"id": who, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
        for who, key in keys.items()
    ]

    def respond(req: RecordedRequest) -> bytes:
        who = (req.header("x-consumer-id") or "?").encode()
        return answer([("cache-control", "max-age=60")], who)(req)

    with trio.fail_after(20):
        for per_consumer, expected in (
            (True, [b"alice", b"bob", b"alice"]),
            (False, [b"alice"] * 3),
        ):
            config = _config(
                "127.0.0.1:1",
                {"per_consumer": per_consumer},
                plugins={"key-auth": {"consumers": consumers}},
            )
            async with scripted(respond) as up:
                config["upstreams"]["up"]["targets"] = [up.target]
                async with open_gateway(config) as gw, Client.open(gw.port) as client:
                    got = [
                        await _get(client, headers=[("x-api-key", keys[who])])
                        for who in ("alice", "bob", "alice")
                    ]
            assert [r.body for r in got] == expected
            assert all(r.status == 200 for r in got)


async def test_an_answer_to_a_credential_is_stored_only_when_it_says_public() -> None:
    async def statuses(headers: list[tuple[str, str]]) -> list[str | None]:
        async with scripted(answer(headers)) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                auth = [("authorization", "Basic dTpw")]
                return [
                    (await _get(client, headers=auth)).header("x-cache-status") for _ in range(2)
                ]

    with trio.fail_after(20):
        assert await statuses([("cache-control", "max-age=60")]) == ["MISS", "MISS"]
        assert await statuses([("cache-control", "public, max-age=60")]) == ["MISS", "HIT"]
        assert await statuses([("cache-control", "s-maxage=60")]) == ["MISS", "HIT"]


async def test_a_change_through_the_gateway_drops_what_is_stored() -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            async with open_gateway(_config(up.target)) as gw, Client.open(gw.port) as client:
                before = [(await _get(client, "/a?x=1")).header("x-cache-status") for _ in range(2)]
                await client.request("PUT", "/a?x=1", [], b"new")
                other = await client.request("POST", "/b", [], b"")
                after = await _get(client, "/a?x=1")
    assert before == ["MISS", "HIT"]
    assert other.status == 200
    assert after.header("x-cache-status") == "MISS"


async def test_concurrent_misses_send_one_request_upstream() -> None:
    release = trio.Event()
    respond = answer([("cache-control", "max-age=60")])
    with trio.fail_after(20):
        async with scripted(respond, release) as up, open_gateway(_config(up.target)) as gw:
            results: list[HttpResponse] = []

            async def one() -> None:
                results.append(await http_request(gw.port, "GET", "/a"))

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
                await up.wait_requests(1)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
    assert len(up.requests) == 1
    assert [r.body for r in results] == [BODY] * 10
    assert sorted(r.header("x-cache-status") or "" for r in results) == ["HIT"] * 9 + ["MISS"]


async def test_a_stale_answer_stands_in_for_a_failing_upstream(
    mock_clock: trio.testing.MockClock,
) -> None:
    respond = Failing("max-age=10")

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up:
            config = _config(up.target, {"stale_if_error": "1m"})
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                await _get(client)
                mock_clock.jump(20)
                respond.failing = True
                stale = await _get(client)
                mock_clock.jump(60)  # 80 s old: past 10 s + 1 min
                failed = await _get(client)
    assert stale.status == 200
    assert stale.body == BODY
    assert stale.header("x-cache-status") == "STALE"
    assert stale.header("age") == "20"
    assert failed.status == 503


async def test_a_stale_answer_stands_in_for_a_broken_upstream(
    mock_clock: trio.testing.MockClock,
) -> None:
    broken = False

    async def handler(conn: UpstreamConn) -> None:
        while not broken and (got := await conn.read_request()) is not None:
            await conn.send(answer([("cache-control", "max-age=10, stale-if-error=300")])(got[0]))
        # broken: the connection closes without an answer (a 502 of the gateway's own)

    with trio.fail_after(JUMPED_DEADLINE):
        async with serve_upstream(handler) as up, open_gateway(_config(up.target)) as gw:
            await http_request(gw.port, "GET", "/a")
            broken = True
            mock_clock.jump(60)
            stale = await http_request(gw.port, "GET", "/a")
            failed = await http_request(gw.port, "GET", "/b")
    assert stale.status == 200
    assert stale.body == BODY
    assert stale.header("x-cache-status") == "STALE"
    assert failed.status == 502


async def test_requests_a_stored_answer_cannot_stand_for_bypass_it() -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            async with open_gateway(_config(up.target)) as gw, Client.open(gw.port) as client:
                await _get(client)
                ranged = await _get(client, headers=[("range", "bytes=0-3")])
                matched = await _get(client, headers=[("if-match", '"x"')])
                hit = await _get(client)
    assert ranged.header("x-cache-status") == "BYPASS"
    assert up.requests[1].header("range") == "bytes=0-3"
    assert matched.header("x-cache-status") == "BYPASS"
    assert hit.header("x-cache-status") == "HIT"


async def test_requests_with_a_cookie_bypass_the_cache_unless_told() -> None:
    def respond(req: RecordedRequest) -> bytes:
        who = (req.header("cookie") or "nobody").encode()
        return answer([("cache-control", "max-age=60")], b"page of " + who)(req)

    with trio.fail_after(20):
        async with scripted(respond) as up:
            async with open_gateway(_config(up.target)) as gw, Client.open(gw.port) as client:
                anonymous = await _get(client)
                alice = await _get(client, headers=[("cookie", "session=alice")])
                bob = await _get(client, headers=[("cookie", "session=bob")])
            config = _config(up.target, {"cookies": True, "key_headers": ["cookie"]})
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                keyed = [
                    await _get(client, headers=[("cookie", f"session={who}")])
                    for who in ("alice", "bob", "alice")
                ]
    assert anonymous.header("x-cache-status") == "MISS"
    assert alice.header("x-cache-status") == bob.header("x-cache-status") == "BYPASS"
    assert (alice.body, bob.body) == (b"page of session=alice", b"page of session=bob")
    assert [r.header("x-cache-status") for r in keyed] == ["MISS", "MISS", "HIT"]
    assert keyed[2].body == b"page of session=alice"


async def test_a_streamed_body_is_stored_once_whole_and_a_cut_one_never() -> None:
    big = bytes(range(256)) * 800  # 200 KiB, chunked
    cut = False

    def respond(_req: RecordedRequest) -> bytes:
        head = response_head(200, [("cache-control", "max-age=60")])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (big[:100_000], big[100_000:]))
        if cut:
            return head + chunks[:50_000]  # and the connection closes
        return head + chunks + b"0\r\n\r\n"

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            await conn.send(respond(got[0]))
            if cut:
                return

    with trio.fail_after(20):
        async with serve_upstream(handler) as up, open_gateway(_config(up.target)) as gw:
            whole = await http_request(gw.port, "GET", "/whole")
            hit = await http_request(gw.port, "GET", "/whole")
            cut = True
            with pytest.raises(h11.RemoteProtocolError):
                await http_request(gw.port, "GET", "/cut")
            cut = False
            after_cut = await http_request(gw.port, "GET", "/cut")
    assert whole.body == hit.body == big
    assert hit.header("x-cache-status") == "HIT"
    assert after_cut.header("x-cache-status") == "MISS"
    assert after_cut.body == big


async def test_answers_over_max_entry_size_pass_without_being_stored() -> None:
    big = b"x" * 5000
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")], big)) as up:
            config = _config(up.target, {"max_entry_size": "4KiB"})
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                got = [await _get(client) for _ in range(2)]
    assert [r.body for r in got] == [big, big]
    assert [r.header("x-cache-status") for r in got] == ["MISS", "MISS"]


async def test_a_hit_is_compressed_like_a_miss() -> None:
    body = b'{"k": "' + b"v" * 5000 + b'"}'
    respond = etagged(
        '"v1"', [("cache-control", "max-age=60"), ("content-type", "application/json")]
    )

    def with_body(req: RecordedRequest) -> bytes:
        data = respond(req)
        return data.replace(BODY, body).replace(
            b"content-length: %d" % len(BODY), b"content-length: %d" % len(body)
        )

    with trio.fail_after(20):
        async with scripted(with_body) as up:
            config = _config(up.target, plugins={"compress": {}})
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                gz = [("accept-encoding", "gzip")]
                miss = await _get(client, headers=gz)
                hit = await _get(client, headers=gz)
                plain = await _get(client)
                not_modified = await _get(client, headers=[*gz, ("if-none-match", 'W/"v1"')])
    assert miss.header("x-cache-status") == "MISS"
    assert hit.header("x-cache-status") == "HIT"
    for resp in (miss, hit):
        assert resp.header("content-encoding") == "gzip"
        assert gzip.decompress(resp.body) == body
        assert resp.header("etag") == 'W/"v1"'
    assert plain.body == body
    assert plain.header("etag") == '"v1"'
    assert not_modified.status == 304
    assert not_modified.header("etag") == 'W/"v1"'
    assert len(up.requests) == 1


def test_cache_control_and_freshness_are_read_as_rfc_9111_says() -> None:
    cc = directives(
        [(b"cache-control", b'Max-Age=60, no-cache="set-cookie"'), (b"cache-control", b"max-age=5")]
    )
    assert cc == {b"max-age": b"60", b"no-cache": b"set-cookie"}  # the first max-age counts
    assert freshness({b"s-maxage": b"10", b"max-age": b"60"}, [], 0) == 10
    assert freshness({b"max-age": b"ten"}, [], 30) == 0  # unreadable: stale
    assert freshness({}, [], 30) == 30
    assert freshness({}, [], 0) is None
    dated = [
        (b"date", b"Mon, 02 Nov 2026 10:00:00 GMT"),
        (b"expires", b"Mon, 02 Nov 2026 10:01:00 GMT"),
    ]
    assert freshness({}, dated, 0) == 60
    # No Date: measured from when it arrived.
    assert freshness({}, [(b"expires", b"Mon, 02 Nov 2026 10:01:00 GMT")], 0) == 0  # past
    ahead = freshness({}, [(b"expires", b"Fri, 01 Jan 2100 00:00:00 GMT")], 0)
    assert ahead is not None
    assert ahead > 365 * 86400


def test_the_memory_store_drops_the_least_recently_used_first() -> None:
    def entry(body: bytes) -> Entry:
        return Entry(200, b"OK", [], body, 0.0, 60.0, (0.0, 0.0), (), ())

    store = MemoryCache(max_size=3000)
    keys = [(("r", "up", b"/%d" % i), ("",)) for i in range(3)]
    for key in keys:
        store.put(key, entry(b"x" * 700))
    assert len(store) == 3
    assert store.find(keys[0], Headers()) is not None  # now the most recently used
    store.put((("r", "up", b"/3"), ("",)), entry(b"x" * 700))
    assert store.find(keys[1], Headers()) is None  # the least recently used went
    assert store.find(keys[0], Headers()) is not None
    assert store.size <= 3000
    assert store.invalidate(("r", "up", b"/0")) == 1
    assert store.find(keys[0], Headers()) is None


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({"statuses": [99]}, "statuses[0]"),
        ({"max_size": "1KiB", "max_entry_size": "2KiB"}, "max_entry_size"),
        ({"key_headers": ["bad name"]}, "key_headers[0]"),
        ({"status_header": "x:y"}, "status_header"),
        ({"ttl": "-1s"}, "ttl"),
        ({"status_header": "content-length"}, "status_header"),
        ({"status_header": "Date"}, "status_header"),
    ],
)
def test_bad_config_names_the_key(table: dict[str, Any], path: str) -> None:
    from engine.gateway import compile_runtime
    from engine.plugins import discover

    config = load(_config("127.0.0.1:1", table))
    with pytest.raises(ConfigError) as err:
        compile_runtime(config, discover(entry_points=False))
    assert err.value.path == f"routes[0].plugins.cache.{path}"


async def test_the_clients_host_is_part_of_the_key() -> None:
    """An upstream that writes the host into its answer (a link, a redirect) must not
    have one host's answer served to another's clients (web cache poisoning)."""

    def respond(req: RecordedRequest) -> bytes:
        host = (req.header("x-forwarded-host") or "?").encode()
        return answer([("cache-control", "max-age=60")], b"https://" + host + b"/next")(req)

    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            evil = await http_request(gw.port, "GET", "/a", host="evil.example")
            good = await http_request(gw.port, "GET", "/a", host="api.example")
            again = await http_request(gw.port, "GET", "/a", host="api.example")
    assert evil.body == b"https://evil.example/next"
    assert good.body == again.body == b"https://api.example/next"
    assert again.header("x-cache-status") == "HIT"


async def test_a_204_is_stored_and_the_upstreams_own_status_field_replaced() -> None:
    respond = answer(
        [("cache-control", "max-age=60"), ("x-cache-status", "HIT from cdn")], b"", 204
    )
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                got = [await _get(client) for _ in range(3)]
    assert [r.status for r in got] == [204] * 3
    assert [r.header_all("x-cache-status") for r in got] == [["MISS"], ["HIT"], ["HIT"]]
    assert len(up.requests) == 1
    assert up.connections == 1  # the 204's connection went back to the pool


async def test_an_answer_that_may_no_longer_be_stored_drops_the_stale_one(
    mock_clock: trio.testing.MockClock,
) -> None:
    stored = True

    def respond(req: RecordedRequest) -> bytes:
        if stored:
            return etagged('"v1"', [("cache-control", "max-age=10")])(req)
        return answer([("cache-control", "no-store")], b"fresh")(req)

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                await _get(client)
                mock_clock.jump(11)
                stored = False
                replaced = await _get(client)
                after = await _get(client)
    assert replaced.header("x-cache-status") == "EXPIRED"
    assert replaced.body == b"fresh"
    # The stale answer went: the next request is a plain miss, with no conditional.
    assert after.header("x-cache-status") == "MISS"
    assert up.requests[2].header("if-none-match") is None


async def test_the_demo_catalog_list_is_served_from_the_cache() -> None:
    """The default gateway.toml's catalog-list route, in front of the catalog stub."""
    demo = tomllib.loads((Path(__file__).parent.parent / "gateway.toml").read_text())
    (route,) = [r for r in demo["routes"] if r["name"] == "catalog-list"]
    with trio.fail_after(20):
        async with open_stubs(names=["catalog"]) as stubs:
            config = {
                "upstreams": {"catalog": {"targets": [f"127.0.0.1:{stubs.ports['catalog']}"]}},
                "routes": [route],
            }
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                first = await _get(client, "/api/catalog")
                second = await _get(client, "/api/catalog")
    assert first.status == second.status == 200
    assert first.body == second.body
    assert [first.header("x-cache-status"), second.header("x-cache-status")] == ["MISS", "HIT"]


# -- found by review: each of these failed before its fix ---------------------------------


async def test_a_cookie_in_a_304_goes_to_its_client_only(
    mock_clock: trio.testing.MockClock,
) -> None:
    sent = 0

    def respond(req: RecordedRequest) -> bytes:
        nonlocal sent
        sent += 1
        if req.header("if-none-match") == '"v1"':
            fields = [("etag", '"v1"'), ("cache-control", "max-age=60")]
            return response_head(
                304, [*fields, ("set-cookie", f"s=client-{sent}")], content_length=0
            )
        return answer([("etag", '"v1"'), ("cache-control", "max-age=10")])(req)

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            await http_request(gw.port, "GET", "/a")
            mock_clock.jump(11)
            revalidated = await http_request(gw.port, "GET", "/a")
            other = await http_request(gw.port, "GET", "/a")
    assert revalidated.header("x-cache-status") == "REVALIDATED"
    assert revalidated.header_all("set-cookie") == ["s=client-2"]
    assert other.header_all("set-cookie") == []
    assert other.header("x-cache-status") == "MISS"  # an answer that sets cookies is not kept


async def test_a_breakers_fallback_is_never_stored(mock_clock: trio.testing.MockClock) -> None:
    failing = True

    def respond(req: RecordedRequest) -> bytes:
        if failing:
            return answer([], b"down", status=503)(req)
        return answer([], b"real")(req)

    breaker = {
        "consecutive_failures": 1,
        "open_duration": "1s",
        "fallback": {
            "status": 200,
            "body": "fallback",
            "headers": {"cache-control": "max-age=600"},
        },
    }
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up:
            config = _config(up.target, {"ttl": "60s"}, plugins={"circuit-breaker": breaker})
            async with open_gateway(config) as gw, Client.open(gw.port) as client:
                tripped = await _get(client)
                fallback = await _get(client)
                mock_clock.jump(5)  # the breaker lets a call through; the upstream is back
                failing = False
                recovered = await _get(client)
    assert tripped.status == 503
    assert fallback.body == b"fallback"
    assert recovered.body == b"real"


async def test_a_slow_client_does_not_hold_back_the_misses_waiting_for_its_answer() -> None:
    """A body of known length is read whole at the upstream's pace and stored before
    it is sent, so the requests waiting for it get a hit at once, whatever the speed
    of the client that asked first (it might never read)."""
    big = b"z" * 6_000_000  # more than the sockets' buffers hold

    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")], big)) as up:
            config = _config(up.target, {"max_entry_size": "8MiB"})
            async with open_gateway(config) as gw:
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                async with stream:
                    await stream.send_all(b"GET /a HTTP/1.1\r\nhost: test.local\r\n\r\n")
                    await up.wait_requests(1)
                    with trio.fail_after(5):  # (well below lock_timeout)
                        second = await http_request(gw.port, "GET", "/a")
    assert second.header("x-cache-status") == "HIT"
    assert second.body == big
    assert len(up.requests) == 1


async def test_an_endless_stream_holds_no_one_back() -> None:
    """A chunked answer is stored once it ends; concurrent misses do not wait for that
    (an event stream may never end)."""
    go_on = trio.Event()

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            await conn.send(response_head(200, [("cache-control", "max-age=60")]))
            await conn.send(b"5\r\nfirst\r\n")
            await go_on.wait()
            await conn.send(b"0\r\n\r\n")
            del got

    with trio.fail_after(20):
        async with serve_upstream(handler) as up, open_gateway(_config(up.target)) as gw:
            first = await trio.open_tcp_stream("127.0.0.1", gw.port)
            async with first:
                await first.send_all(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
                await up.wait_requests(1)
                second = await trio.open_tcp_stream("127.0.0.1", gw.port)
                async with second:
                    await second.send_all(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
                    got = b""
                    with trio.fail_after(2):  # its first chunk comes, no lock_timeout
                        while b"first" not in got:
                            got += await second.receive_some(65536)
                    go_on.set()
    assert b"x-cache-status: miss" in got.lower()
    assert len(up.requests) == 2


async def test_answers_being_fetched_hold_at_most_max_size() -> None:
    release = trio.Event()
    body = b"q" * 300_000

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            head = response_head(200, [("cache-control", "max-age=60")], content_length=len(body))
            await conn.send(head + body[:100_000])
            await release.wait()
            await conn.send(body[100_000:])
            del got

    with trio.fail_after(20):
        async with serve_upstream(handler) as up:
            config = _config(up.target, {"max_size": "1MiB", "max_entry_size": "512KiB"})
            async with open_gateway(config) as gw:
                results: list[HttpResponse] = []

                async def one(i: int) -> None:
                    results.append(await http_request(gw.port, "GET", f"/{i}"))

                filters = gw.gateway.runtime.routes[0].chain.filters
                (cache,) = [f for f in filters if f.name == "cache"]
                budget = cache._budget = _Watched(1024 * 1024, asks=6)
                async with trio.open_nursery() as nursery:
                    for i in range(6):  # 6 x 300 KB: more than 1 MiB at once
                        nursery.start_soon(one, i)
                    await budget.all_asked.wait()  # every head is in; no body is whole
                    release.set()
                stored = len(cache.store)
    assert [r.body for r in results] == [body] * 6  # every client got its answer
    # Three fitted in the budget while being fetched (the rest passed unstored), and
    # the budget is whole again once they were.
    assert budget.peak == 900_000
    assert stored == 3
    assert budget.left == 1024 * 1024


class _Watched(_Budget):
    """The fetch budget, with its peak, and an event once ``asks`` takes were asked."""

    def __init__(self, size: int, asks: int) -> None:
        super().__init__(size)
        self.size = size
        self.asks = asks
        self.peak = 0
        self.all_asked = trio.Event()

    def take(self, n: int) -> bool:
        taken = super().take(n)
        self.peak = max(self.peak, self.size - self.left)
        self.asks -= 1
        if self.asks == 0:
            self.all_asked.set()
        return taken


async def test_revalidations_keep_the_upstream_connection() -> None:
    respond = etagged('"v1"', [("cache-control", "no-cache")])
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                statuses = [(await _get(client)).header("x-cache-status") for _ in range(5)]
    assert statuses == ["MISS"] + ["REVALIDATED"] * 4
    assert up.connections == 1


async def test_a_304_for_another_representation_fetches_it_whole(
    mock_clock: trio.testing.MockClock,
) -> None:
    def respond(req: RecordedRequest) -> bytes:
        if req.header("if-none-match") is not None:  # a broken upstream: another tag
            return response_head(304, [("etag", '"v2"')], content_length=0)
        return answer(
            [("etag", '"v2"' if up.requests[1:] else '"v1"'), ("cache-control", "max-age=10")]
        )(req)

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            await http_request(gw.port, "GET", "/a")
            mock_clock.jump(11)
            again = await http_request(gw.port, "GET", "/a")
    assert again.status == 200
    assert again.header("etag") == '"v2"'
    assert again.header("x-cache-status") == "MISS"
    assert [r.header("if-none-match") for r in up.requests] == [None, '"v1"', None]


def test_the_store_keeps_its_size_right_when_a_dropped_entry_is_refreshed() -> None:
    store = MemoryCache(max_size=10_000)
    key = (("r", "up", b"/a"), ("",))
    entry = Entry(200, b"OK", [], b"x" * 100, 0.0, 60.0, (0.0, 0.0), (), ())
    store.put(key, entry)
    store.invalidate(("r", "up", b"/a"))  # a PUT went through meanwhile
    before = entry.size
    entry.set_headers([(b"x-big", b"y" * 2000)], 1.0, 60.0, (0.0, 0.0))
    store.resized(key, entry, before)
    assert store.size == 0
    huge = Entry(200, b"OK", [], b"x" * 20_000, 0.0, 60.0, (0.0, 0.0), (), ())
    store.put(key, Entry(200, b"OK", [], b"small", 0.0, 60.0, (0.0, 0.0), (), ()))
    store.put((("r", "up", b"/b"), ("",)), huge)  # larger than the store: not kept
    assert store.find(key, Headers()) is not None
    assert store.size < 10_000


async def test_the_admin_listener_shows_each_cache() -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            async with open_gateway(_config(up.target)) as gw:
                await http_request(gw.port, "GET", "/a")
                await http_request(gw.port, "GET", "/b")
                assert gw.admin_port is not None
                plugins = await http_request(gw.admin_port, "GET", "/plugins")
    state = plugins.json()["cache (route:r)"]
    assert state["answers"] == 2
    assert 2 * len(BODY) < state["bytes"] < 4096
    assert state["max_size"] == 32 * 1024 * 1024
    assert state["misses_being_fetched"] == state["bytes_being_fetched"] == 0


async def test_a_body_that_breaks_while_read_whole_gets_a_stale_answer_or_a_502(
    mock_clock: trio.testing.MockClock,
) -> None:
    broken = False

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            head = response_head(
                200, [("cache-control", "max-age=10, stale-if-error=60")], content_length=len(BODY)
            )
            if broken:
                await conn.send(head + BODY[:5])  # then the connection closes
                return
            await conn.send(head + BODY)
            del got

    with trio.fail_after(JUMPED_DEADLINE):
        async with serve_upstream(handler) as up, open_gateway(_config(up.target)) as gw:
            await http_request(gw.port, "GET", "/a")
            mock_clock.jump(20)
            broken = True
            async with Client.open(gw.port) as client:
                stale = await _get(client, "/a")
                failed = await _get(client, "/b")  # nothing stored: the gateway's 502
                after = await _get(client, "/a")  # the connection is still good
    assert stale.status == 200
    assert stale.body == BODY
    assert stale.header("x-cache-status") == "STALE"
    assert failed.status == 502
    assert after.header("x-cache-status") == "STALE"


async def test_the_upstreams_age_counts(mock_clock: trio.testing.MockClock) -> None:
    """An answer that spent 50 s in a cache behind the gateway has 10 s of its 60 left."""
    respond = answer([("cache-control", "max-age=60"), ("age", "50")])
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                await _get(client)
                mock_clock.jump(5)
                hit = await _get(client)
                mock_clock.jump(6)
                expired = await _get(client)
    assert hit.header("x-cache-status") == "HIT"
    assert hit.header_all("age") == ["55"]
    assert expired.header("x-cache-status") == "EXPIRED"


async def test_a_204_without_content_length_is_stored() -> None:
    """RFC 9110 8.6: a 204 has no Content-Length, and no body whatever its framing."""
    data = b"HTTP/1.1 204 No Content\r\ncache-control: max-age=60\r\n\r\n"
    with trio.fail_after(20):
        async with scripted(lambda _req: data) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                got = [await _get(client) for _ in range(2)]
    assert [r.header("x-cache-status") for r in got] == ["MISS", "HIT"]
    assert len(up.requests) == 1


async def test_a_stale_answer_keeps_the_failing_upstreams_connection(
    mock_clock: trio.testing.MockClock,
) -> None:
    respond = Failing("max-age=1, stale-if-error=600")

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                await _get(client)
                respond.failing = True
                mock_clock.jump(2)
                stale = [(await _get(client)).header("x-cache-status") for _ in range(4)]
    assert stale == ["STALE"] * 4
    assert up.connections == 1  # each 503 was read to its end, not closed


async def test_requests_that_cannot_be_cached_say_bypass() -> None:
    respond = answer([("cache-control", "max-age=60"), ("x-cache-status", "FROM-UPSTREAM")])
    with trio.fail_after(20):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            async with Client.open(gw.port) as client:
                with_body = await client.request("GET", "/a", [], b"a body")
    assert with_body.header_all("x-cache-status") == ["BYPASS"]


async def test_a_refetch_passes_on_the_cookie_of_the_304_that_caused_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    def respond(req: RecordedRequest) -> bytes:
        if req.header("if-none-match") is not None:
            return response_head(304, [("etag", '"v2"'), ("set-cookie", "s=1")], content_length=0)
        return answer([("etag", '"v1"'), ("cache-control", "max-age=10")])(req)

    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up, open_gateway(_config(up.target)) as gw:
            await http_request(gw.port, "GET", "/a")
            mock_clock.jump(11)
            refetched = await http_request(gw.port, "GET", "/a")
            hit = await http_request(gw.port, "GET", "/a")
    assert refetched.header_all("set-cookie") == ["s=1"]
    assert hit.header("x-cache-status") == "HIT"  # what was fetched again was stored
    assert hit.header_all("set-cookie") == []


# -- stale-while-revalidate -----------------------------------------------------------


SWR = {"stale_while_revalidate": "1m"}


class Versions:
    """An upstream script: ``v1``, ``v2`` ... in turn, each with ``cache_control``."""

    def __init__(self, cache_control: str) -> None:
        self.cache_control = cache_control
        self.gate: trio.Event | None = None
        self.served = 0
        self.status = 200

    def hold(self) -> trio.Event:
        """From now on, each answer waits until the event returned is set."""
        self.gate = trio.Event()
        return self.gate

    async def handler(self, conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            if self.gate is not None:
                await self.gate.wait()
            self.served += 1
            body = b"v%d" % self.served
            head = [("cache-control", self.cache_control)]
            await conn.send(answer(head, body, self.status)(got[0]))


@asynccontextmanager
async def versioned(
    versions: Versions, cache: dict[str, Any] | None = None, name: str = "r"
) -> AsyncIterator[tuple[Upstream, RunningGateway, Client]]:
    """A gateway caching ``versions`` on route ``name``, and a client of it."""
    async with serve_upstream(versions.handler) as up:
        async with open_gateway(_config(up.target, cache, name=name)) as gw:
            async with Client.open(gw.port) as client:
                yield up, gw, client


async def _settled(up: Upstream, requests: int) -> None:
    """Once the upstream has seen ``requests`` and the gateway has done all it can."""
    await up.wait_requests(requests)
    await trio.testing.wait_all_tasks_blocked()


async def test_a_stale_answer_is_served_at_once_while_it_is_refreshed(
    mock_clock: trio.testing.MockClock,
) -> None:
    versions = Versions("max-age=10")
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, SWR) as (up, _gw, client):
            first = await _get(client)
            mock_clock.jump(15)
            gate = versions.hold()  # the refresh is held upstream
            updating = [await _get(client) for _ in range(5)]
            head = await _get(client, method="HEAD")
            await up.wait_requests(2)
            gate.set()
            await _settled(up, 2)
            fresh = await _get(client)
    assert first.body == b"v1"
    assert [r.header("x-cache-status") for r in updating] == ["UPDATING"] * 5
    assert [r.body for r in updating] == [b"v1"] * 5  # served without waiting for it
    assert updating[0].header("age") == "15"
    assert head.header("x-cache-status") == "UPDATING"
    assert len(up.requests) == 2  # one refresh for all of them
    assert up.requests[1].method == b"GET"
    assert (fresh.header("x-cache-status"), fresh.body) == ("HIT", b"v2")
    assert fresh.header("age") == "0"


async def test_a_refresh_in_the_background_revalidates_with_the_etag(
    mock_clock: trio.testing.MockClock,
) -> None:
    respond = etagged('"v1"', [("cache-control", "max-age=10, stale-while-revalidate=30")])
    with trio.fail_after(JUMPED_DEADLINE):
        async with scripted(respond) as up:
            async with (
                open_gateway(_config(up.target, name="swr-304")) as gw,
                Client.open(gw.port) as client,
            ):
                await _get(client)
                mock_clock.jump(12)
                updating = await _get(client)
                await _settled(up, 2)
                mock_clock.jump(5)
                hit = await _get(client)
                assert gw.admin_port is not None
                metrics = (await http_request(gw.admin_port, "GET", "/metrics")).body
    assert updating.header("x-cache-status") == "UPDATING"  # the upstream's own directive
    assert up.requests[1].header("if-none-match") == '"v1"'
    assert hit.header("x-cache-status") == "HIT"  # the 304 made it fresh again
    assert hit.header("age") == "5"
    assert hit.body == BODY
    assert (
        b'filtergate_cache_background_refreshes_total{route="swr-304",outcome="refreshed"} 1'
        in metrics
    )
    assert b'filtergate_cache_responses_total{route="swr-304",status="updating"} 1' in metrics


@pytest.mark.parametrize(
    ("cache_control", "status"),
    [
        ("max-age=10", "EXPIRED"),  # 10 s fresh + 20 s: past its window
        ("max-age=30, must-revalidate", "EXPIRED"),
        ("max-age=30, proxy-revalidate", "EXPIRED"),
        ("s-maxage=30", "EXPIRED"),
        ("max-age=30, no-cache", "MISS"),  # (nothing to revalidate it with: never stored)
    ],
)
async def test_a_stale_answer_out_of_the_window_is_fetched_in_front(
    cache_control: str, status: str, mock_clock: trio.testing.MockClock
) -> None:
    versions = Versions(cache_control)
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, {"stale_while_revalidate": "20s"}) as (_up, _gw, client):
            await _get(client)
            mock_clock.jump(31)
            second = await _get(client)
    assert second.header("x-cache-status") == status
    assert second.body == b"v2"


async def test_a_failed_refresh_keeps_the_stale_answer(mock_clock: trio.testing.MockClock) -> None:
    versions = Versions("max-age=10")
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, SWR, "swr-failed") as (up, gw, client):
            await _get(client)
            mock_clock.jump(20)
            versions.status = 503
            first = await _get(client)
            await _settled(up, 2)
            second = await _get(client)  # still stale: another refresh goes
            await _settled(up, 3)
            versions.status = 200
            mock_clock.jump(60)  # 80 s old: past 10 s + 1 min
            expired = await _get(client)
            assert gw.admin_port is not None
            metrics = (await http_request(gw.admin_port, "GET", "/metrics")).body
    assert [first.body, second.body] == [b"v1", b"v1"]
    assert [first.header("x-cache-status"), second.header("x-cache-status")] == ["UPDATING"] * 2
    assert (expired.header("x-cache-status"), expired.body) == ("EXPIRED", b"v4")
    assert b'background_refreshes_total{route="swr-failed",outcome="failed"} 2' in metrics


async def test_a_refresh_that_may_not_be_stored_drops_the_answer(
    mock_clock: trio.testing.MockClock,
) -> None:
    versions = Versions("max-age=10")
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, SWR) as (up, _gw, client):
            await _get(client)
            mock_clock.jump(20)
            versions.cache_control = "no-store"
            updating = await _get(client)
            await _settled(up, 2)
            after = await _get(client)
    assert updating.header("x-cache-status") == "UPDATING"
    assert (after.header("x-cache-status"), after.body) == ("MISS", b"v3")


async def test_an_answer_always_refreshed_in_the_background_is_stored(
    mock_clock: trio.testing.MockClock,
) -> None:
    # max-age=0 with stale-while-revalidate, no validator: served from the cache, and
    # fetched again behind every request that finds it stale.
    versions = Versions("max-age=0, stale-while-revalidate=60")
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions) as (up, _gw, client):
            first = await _get(client)
            second = await _get(client)
            await _settled(up, 2)
            mock_clock.jump(1)
            third = await _get(client)
    assert first.body == b"v1"
    assert (second.header("x-cache-status"), second.body) == ("UPDATING", b"v1")
    assert (third.header("x-cache-status"), third.body) == ("UPDATING", b"v2")


async def test_a_chunked_refresh_is_stored_whole_and_a_large_one_not(
    mock_clock: trio.testing.MockClock,
) -> None:
    size = 3000
    served = 0

    async def handler(conn: UpstreamConn) -> None:
        nonlocal served
        while (await conn.read_request()) is not None:
            served += 1
            body = (b"%d" % served) * (size if served == 3 else 10)
            head = response_head(200, [("cache-control", "max-age=10")])  # chunked
            await conn.send(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

    with trio.fail_after(JUMPED_DEADLINE):
        async with serve_upstream(handler) as up:
            cache = {"stale_while_revalidate": "1m", "max_entry_size": "2KiB"}
            async with open_gateway(_config(up.target, cache)) as gw:
                async with Client.open(gw.port) as client:
                    await _get(client)
                    mock_clock.jump(11)
                    await _get(client)  # refreshed: "2" * 10
                    await _settled(up, 2)
                    refreshed = await _get(client)
                    mock_clock.jump(11)
                    await _get(client)  # refreshed: 3000 bytes, over max_entry_size
                    await _settled(up, 3)
                    after = await _get(client)
                    assert gw.admin_port is not None
                    state = (await http_request(gw.admin_port, "GET", "/plugins")).json()
    assert (refreshed.header("x-cache-status"), refreshed.body) == ("HIT", b"2" * 10)
    assert after.header("x-cache-status") == "MISS"  # the old one dropped, the new not kept
    assert after.body == b"4" * 10
    cache_state = state["cache (route:r)"]
    assert cache_state["bytes_being_fetched"] == cache_state["refreshing_in_background"] == 0


async def test_a_reload_cancels_the_refreshes_of_a_dropped_cache(
    mock_clock: trio.testing.MockClock,
) -> None:
    versions = Versions("max-age=10")
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, SWR, "swr-reload") as (up, gw, client):
            await _get(client)
            mock_clock.jump(11)
            gate = versions.hold()  # the refresh hangs upstream
            updating = await _get(client)
            await up.wait_requests(2)
            changed = _config(up.target, {"stale_while_revalidate": "2m"}, name="swr-reload")
            changed["server"] = {"listen": ["127.0.0.1:0"]}
            changed["admin"] = {"listen": "127.0.0.1:0"}
            await gw.gateway.reload(load(changed))
            await trio.testing.wait_all_tasks_blocked()
            gate.set()  # too late: the refresh was cancelled with its cache
            await trio.testing.wait_all_tasks_blocked()
            after = await _get(client)
            assert gw.admin_port is not None
            metrics = (await http_request(gw.admin_port, "GET", "/metrics")).body
    assert updating.header("x-cache-status") == "UPDATING"
    assert after.header("x-cache-status") == "MISS"  # a new cache
    assert b'background_refreshes_total{route="swr-reload"' not in metrics


# -- purging ----------------------------------------------------------------------------


async def _purge(admin_port: int | None, query: str = "") -> HttpResponse:
    assert admin_port is not None
    return await http_request(admin_port, "DELETE", "/cache" + (f"?{query}" if query else ""))


async def test_the_admin_listener_purges_by_route_and_target() -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            config = _config(up.target)
            config["routes"].append(
                {"name": "other", "prefix": "/o/", "upstream": "up", "plugins": {"cache": {}}}
            )
            async with open_gateway(config) as gw:

                async def fill() -> None:
                    for path in ("/a", "/a?page=2", "/ab", "/b", "/o/a"):
                        await http_request(gw.port, "GET", path)

                async def statuses() -> list[str | None]:
                    got = []
                    for path in ("/a", "/a?page=2", "/ab", "/b", "/o/a"):
                        r = await http_request(gw.port, "GET", path)
                        got.append(r.header("x-cache-status"))
                    return got

                await fill()
                exact = await _purge(gw.admin_port, "route=r&target=%2Fa%3Fpage%3D2")
                after_exact = await statuses()
                prefix = await _purge(gw.admin_port, "target=/a*")
                after_prefix = await statuses()
                route = await _purge(gw.admin_port, "route=other")
                after_route = await statuses()
                everything = await _purge(gw.admin_port)
                after_all = await statuses()
    assert exact.status == 200
    assert exact.json() == {"purged": 1, "processes": 1, "processes_not_answering": 0}
    assert after_exact == ["HIT", "MISS", "HIT", "HIT", "HIT"]
    assert prefix.json()["purged"] == 3  # /a, /a?page=2, /ab: the target as sent upstream
    assert after_prefix == ["MISS", "MISS", "MISS", "HIT", "HIT"]
    assert route.json()["purged"] == 1
    assert after_route == ["HIT", "HIT", "HIT", "HIT", "MISS"]
    assert everything.json()["purged"] == 5
    assert after_all == ["MISS"] * 5


@pytest.mark.parametrize(
    ("method", "target", "status", "says"),
    [
        ("DELETE", "/cache?path=/a", 400, b"unknown parameter 'path'"),
        ("DELETE", "/cache?route=r&route=r", 400, b"given twice"),
        ("DELETE", "/cache?target=a", 400, b"from its /"),
        ("DELETE", "/cache?nonsense", 400, b"name=value"),
        ("DELETE", "/cache?route=nope", 404, b"no route named 'nope'"),
        ("GET", "/cache", 405, b"method not allowed"),
        ("DELETE", "/metrics", 405, b"method not allowed"),
    ],
)
async def test_a_purge_the_admin_listener_cannot_do_is_refused(
    method: str, target: str, status: int, says: bytes
) -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            async with open_gateway(_config(up.target)) as gw:
                await http_request(gw.port, "GET", "/a")
                assert gw.admin_port is not None
                refused = await http_request(gw.admin_port, method, target)
                still = await http_request(gw.port, "GET", "/a")
    assert refused.status == status
    assert says in refused.body
    if status == 405:
        assert refused.header("allow") == ("DELETE" if target == "/cache" else "GET, HEAD")
    assert still.header("x-cache-status") == "HIT"  # nothing was purged


@pytest.mark.parametrize(
    ("query", "status"),
    [("target=/a", "MISS"), ("route=r", "MISS"), ("", "MISS"), ("target=/b", "HIT")],
)
async def test_an_answer_fetched_across_a_purge_of_it_is_not_stored(
    query: str, status: str
) -> None:
    release = trio.Event()
    respond = answer([("cache-control", "max-age=60")])
    with trio.fail_after(20):
        async with scripted(respond, release) as up, open_gateway(_config(up.target)) as gw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(http_request, gw.port, "GET", "/a")
                await up.wait_requests(1)  # asked for before the purge, answered after
                purged = await _purge(gw.admin_port, query)
                release.set()
            after = await http_request(gw.port, "GET", "/a")
    assert purged.json()["purged"] == 0
    assert after.header("x-cache-status") == status  # a purge of another target: stored


async def test_a_purge_target_is_percent_decoded_as_a_path() -> None:
    with trio.fail_after(20):
        async with scripted(answer([("cache-control", "max-age=60")])) as up:
            async with open_gateway(_config(up.target)) as gw:
                await http_request(gw.port, "GET", "/a+b")
                await http_request(gw.port, "GET", "/a%20b")
                plus = await _purge(gw.admin_port, "target=/a+b")  # "+" is no space
                space = await _purge(gw.admin_port, "target=/a%2520b")  # as sent upstream
    assert plus.json()["purged"] == space.json()["purged"] == 1


async def test_the_config_window_alone_does_not_store_answers_stale_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    versions = Versions("max-age=0")  # "do not reuse", and nothing to revalidate with
    with trio.fail_after(JUMPED_DEADLINE):
        async with versioned(versions, SWR) as (_up, _gw, client):
            answers = [await _get(client) for _ in range(3)]
    assert [(r.header("x-cache-status"), r.body) for r in answers] == [
        ("MISS", b"v1"),
        ("MISS", b"v2"),
        ("MISS", b"v3"),
    ]


async def test_a_refresh_is_given_up_after_lock_timeout(mock_clock: trio.testing.MockClock) -> None:
    served = 0
    hang = trio.Event()

    async def handler(conn: UpstreamConn) -> None:
        nonlocal served
        while (await conn.read_request()) is not None:
            served += 1
            head = response_head(200, [("cache-control", "max-age=10")])  # chunked
            if served == 1:
                await conn.send(head + b"2\r\nv1\r\n0\r\n\r\n")
            else:  # a body that trickles and never ends
                await conn.send(head + b"1\r\nx\r\n")
                await hang.wait()

    with trio.fail_after(JUMPED_DEADLINE):
        async with serve_upstream(handler) as up:
            cache = {"stale_while_revalidate": "1m", "lock_timeout": "3s"}
            async with open_gateway(_config(up.target, cache, name="swr-stuck")) as gw:
                async with Client.open(gw.port) as client:
                    await _get(client)
                    mock_clock.jump(11)
                    first = await _get(client)
                    await _settled(up, 2)
                    during = await _state(gw)
                    mock_clock.jump(4)  # past lock_timeout: the refresh is given up
                    await trio.testing.wait_all_tasks_blocked()
                    after = await _state(gw)
                    second = await _get(client)  # still stale: a refresh goes again
                    await _settled(up, 3)
                    hang.set()
    assert [first.header("x-cache-status"), second.header("x-cache-status")] == ["UPDATING"] * 2
    assert during["refreshing_in_background"] == 1
    assert after["refreshing_in_background"] == after["bytes_being_fetched"] == 0
    assert after["misses_being_fetched"] == 0


async def _state(gw: RunningGateway, name: str = "cache (route:swr-stuck)") -> dict[str, int]:
    assert gw.admin_port is not None
    state: dict[str, int] = (await http_request(gw.admin_port, "GET", "/plugins")).json()[name]
    return state


async def test_each_variant_is_refreshed_and_a_refresh_holds_no_miss_back() -> None:
    held = trio.Event()  # the refreshes of "fr" wait for it
    served: dict[str, int] = {}

    async def handler(conn: UpstreamConn) -> None:
        while (got := await conn.read_request()) is not None:
            language = got[0].header("accept-language") or ""
            served[language] = served.get(language, 0) + 1
            if language == "fr" and served[language] > 1:
                await held.wait()
            body = b"%s-%d" % (language.encode(), served[language])
            head = [("cache-control", "max-age=0, stale-while-revalidate=60")]
            await conn.send(answer([*head, ("vary", "accept-language")], body)(got[0]))

    async def get(language: str) -> tuple[str | None, bytes]:
        r = await http_request(gw.port, "GET", "/a", [("accept-language", language)])
        return r.header("x-cache-status"), r.body

    with trio.fail_after(10):  # a miss held back by a refresh would wait lock_timeout (30 s)
        async with serve_upstream(handler) as up:
            async with open_gateway(_config(up.target, {"lock_timeout": "30s"})) as gw:
                await get("fr")
                await get("en")
                fr = await get("fr")  # its refresh hangs upstream
                en = await get("en")  # another variant: a refresh of its own
                await up.wait_requests(4)
                de = await get("de")  # a miss: not held back by fr's refresh
                held.set()
    assert fr == ("UPDATING", b"fr-1")
    assert en == ("UPDATING", b"en-1")
    assert de == ("MISS", b"de-1")
    assert served == {"fr": 2, "en": 2, "de": 1}


async def test_an_answer_fetched_across_a_change_of_its_target_is_not_stored() -> None:
    release = trio.Event()
    version = 1

    async def handler(conn: UpstreamConn) -> None:
        nonlocal version
        while (got := await conn.read_request()) is not None:
            if got[0].method == b"POST":
                version += 1
                await conn.send(answer([], b"changed")(got[0]))
                continue
            body = b"version-%d" % version
            await release.wait()
            await conn.send(answer([("cache-control", "max-age=60")], body)(got[0]))

    with trio.fail_after(20):
        async with serve_upstream(handler) as up, open_gateway(_config(up.target)) as gw:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(http_request, gw.port, "GET", "/a")
                await up.wait_requests(1)  # asked for before the change, answered after
                changed = await http_request(gw.port, "POST", "/a")
                release.set()
            after = await http_request(gw.port, "GET", "/a")
    assert changed.status == 200
    assert (after.header("x-cache-status"), after.body) == ("MISS", b"version-2")
