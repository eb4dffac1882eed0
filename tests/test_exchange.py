"""What filters see: ``Headers`` (the field checks that keep a filter from smuggling a
header line), ``Stash`` and the exchange objects, in memory."""

from __future__ import annotations

import pytest

from engine import exchange as exchange_module
from engine.exchange import Headers, Stash, StashKey, checked_field


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("X-Tenant", "acme", (b"x-tenant", b"acme")),
        (b"X-Tenant", b"acme", (b"x-tenant", b"acme")),
        ("x-t", "  padded\t", (b"x-t", b"padded")),
        ("x-t", "caf\u00e9", (b"x-t", "caf\u00e9".encode())),
        ("x-t", "", (b"x-t", b"")),
        ("!#$%&'*+.^_`|~", "v", (b"!#$%&'*+.^_`|~", b"v")),
    ],
)
def test_a_field_a_filter_adds_is_lowercased_and_trimmed(
    name: str | bytes, value: str | bytes, field: tuple[bytes, bytes]
) -> None:
    for method in ("add", "set"):
        headers = Headers()
        getattr(headers, method)(name, value)
        assert headers.items == [field]


@pytest.mark.parametrize(
    "name",
    ["", "x a", "x:a", "x-a\n", b"x-a\r\n", "x-a\r\nx-b", "x\u00e9", b"x\x00", "\u540d"],
)
def test_a_name_that_is_not_a_token_is_refused_every_time(name: str | bytes) -> None:
    headers = Headers()
    for _ in range(3):  # a name once refused is not remembered as checked
        with pytest.raises(ValueError):  # noqa: PT011
            headers.add(name, "v")
        with pytest.raises(ValueError):  # noqa: PT011
            headers.set(name, "v")
    assert headers.items == []


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\x00b", b"a\r\nx-evil: 1", "\n"])
def test_a_value_with_cr_lf_or_nul_is_refused(value: str | bytes) -> None:
    headers = Headers([(b"x-a", b"1")])
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        headers.add("x-b", value)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        headers.set("x-a", value)
    assert headers.items == [(b"x-a", b"1")]


def test_checked_names_are_bounded_and_still_checked_beyond_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exchange_module, "_MAX_CHECKED", 2)
    monkeypatch.setattr(exchange_module, "_CHECKED_STR", {})
    monkeypatch.setattr(exchange_module, "_CHECKED_BYTES", {})
    headers = Headers()
    for i in range(5):
        headers.add(f"X-Name-{i}", "v")
        headers.add(f"X-Name-{i}".encode(), "w")
    assert len(exchange_module._CHECKED_STR) == 2
    assert len(exchange_module._CHECKED_BYTES) == 2
    assert headers.get_all("x-name-4") == [b"v", b"w"]
    with pytest.raises(ValueError, match="invalid header name"):
        headers.add("X Name", "v")


def test_the_multimap_operations() -> None:
    headers = Headers([(b"a", b"1"), (b"b", b"2"), (b"a", b"3")])
    assert headers.get("A") == b"1"
    assert headers.get(b"c", b"none") == b"none"
    assert headers.get_all(b"a") == [b"1", b"3"]
    assert headers.count("a") == 2
    assert "B" in headers
    assert b"c" not in headers
    assert 1 not in headers
    headers.set("a", "4")
    assert headers.items == [(b"b", b"2"), (b"a", b"4")]
    assert headers.remove("b") == 1
    assert headers.remove("b") == 0
    headers.add("c", "5")
    assert headers.remove_where(lambda n: n in (b"a", b"c")) == 2
    assert len(headers) == 0


def test_the_stash_is_typed_by_its_keys() -> None:
    tenant: StashKey[str] = StashKey("tenant")
    count: StashKey[int] = StashKey("count")
    stash = Stash()
    assert stash.get(tenant) is None
    assert stash.get(count, 0) == 0
    assert tenant not in stash
    stash[tenant] = "acme"
    assert stash[tenant] == "acme"
    assert tenant in stash
    with pytest.raises(KeyError):
        stash[count]
    assert repr(tenant) == "StashKey('tenant')"
    # A dict underneath (its methods in C), one per stash.
    assert isinstance(stash, dict)
    assert dict(stash) == {tenant: "acme"}
    assert Stash() is not Stash()
    assert not hasattr(stash, "__dict__")


def test_a_checked_field_is_set_as_set_sets_it() -> None:
    field = checked_field("X-User-Id", " alice ")
    assert field == (b"x-user-id", b"alice")
    for value in (b"a\r\nb", b"a\nb", b"a\x00b"):
        with pytest.raises(ValueError, match="invalid header value"):
            checked_field(b"x-user-id", value)
    with pytest.raises(ValueError, match="invalid header name"):
        checked_field("x user", b"v")
    h = Headers([(b"x-user-id", b"mallory"), (b"accept", b"*/*"), (b"x-user-id", b"eve")])
    h.set_checked(field)
    assert h.items == [(b"accept", b"*/*"), (b"x-user-id", b"alice")]
    h.set_checked((b"x-other", b"1"))
    assert h.items[-1] == (b"x-other", b"1")
