"""Route matching: specificity rules, captures, 404/405, and that it does not scan."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import load
from engine.errors import BadRequest, MethodNotAllowed, NotFound
from engine.router import Router


def _router(routes: list[dict[str, Any]]) -> Router[str]:
    config = load({"upstreams": {"u": {"targets": ["127.0.0.1:1"]}}, "routes": routes})
    return Router([(r, r.name) for r in config.routes])


ROUTES: list[dict[str, Any]] = [
    {"name": "root", "prefix": "/", "upstream": "u"},
    {"name": "users", "prefix": "/users", "upstream": "u"},
    {"name": "user", "path": "/users/{id}", "methods": ["GET", "HEAD"], "upstream": "u"},
    {"name": "me", "path": "/users/me", "upstream": "u"},
    {"name": "user-orders", "path": "/users/{id}/orders/{order}", "upstream": "u"},
    {"name": "api-host", "prefix": "/", "hosts": ["api.example.com"], "upstream": "u"},
    {"name": "wild", "prefix": "/users", "hosts": ["*.example.com"], "upstream": "u"},
    {"name": "v2", "prefix": "/x", "headers": {"x-version": "2"}, "upstream": "u"},
    {"name": "debug", "prefix": "/x", "query": {"debug": "*"}, "upstream": "u"},
    {"name": "v1", "prefix": "/x", "upstream": "u"},
]


@pytest.mark.parametrize(
    ("host", "path", "method", "headers", "query", "route", "captures"),
    [
        ("a", "/users/42", b"GET", [], None, "user", {"id": "42"}),
        ("a", "/users/me", b"GET", [], None, "me", {}),  # literal beats capture
        ("a", "/users", b"GET", [], None, "users", {}),
        ("a", "/users/", b"GET", [], None, "users", {}),
        ("a", "/usersx", b"GET", [], None, "root", {}),  # prefix matches whole segments
        ("a", "/users/42", b"POST", [], None, "users", {}),  # method falls to the prefix
        ("a", "/users/7/orders/9", b"GET", [], None, "user-orders", {"id": "7", "order": "9"}),
        ("a", "/users/a%20b", b"GET", [], None, "user", {"id": "a b"}),
        ("api.example.com", "/users/1", b"GET", [], None, "api-host", {}),  # exact host first
        ("b.example.com", "/users/1", b"GET", [], None, "wild", {}),
        ("b.example.com", "/other", b"GET", [], None, "root", {}),  # falls back to any host
        ("a", "/x/1", b"GET", [(b"x-version", b"2")], None, "v2", {}),
        ("a", "/x/1", b"GET", [(b"x-version", b"3")], None, "v1", {}),
        ("a", "/x/1", b"GET", [], {"debug": ["1"]}, "debug", {}),
        ("a", "/x/1", b"GET", [], {}, "v1", {}),
    ],
)
def test_most_specific_route_wins(
    host: str,
    path: str,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    query: dict[str, list[str]] | None,
    route: str,
    captures: dict[str, str],
) -> None:
    m = _router(ROUTES).match(host, path, method, headers, query)
    assert (m.value, m.captures) == (route, captures)


def test_404_and_405_with_allow() -> None:
    router = _router(
        [
            {"name": "get", "path": "/things/{id}", "methods": ["GET"], "upstream": "u"},
            {"name": "put", "path": "/things/{id}", "methods": ["PUT"], "upstream": "u"},
        ]
    )
    with pytest.raises(MethodNotAllowed) as info:
        router.match("a", "/things/1", b"DELETE", [])
    assert (b"allow", b"GET, HEAD, PUT") in info.value.headers  # GET brings HEAD
    with pytest.raises(NotFound):
        router.match("a", "/other", b"GET", [])


def test_config_order_breaks_ties() -> None:
    router = _router(
        [
            {"name": "first", "prefix": "/a", "upstream": "u"},
            {"name": "second", "prefix": "/a", "upstream": "u"},
        ]
    )
    assert router.match("h", "/a/b", b"GET", []).value == "first"


def test_ten_thousand_routes_are_indexed_not_scanned() -> None:
    routes = [
        {"name": f"r{i}", "path": f"/svc{i}/items/{{id}}", "upstream": "u"} for i in range(10_000)
    ]
    router = _router(routes)
    # The trie's first level holds one child per service: a match touches one of them.
    assert len(router._any.literal) == 10_000
    m = router.match("h", "/svc9876/items/5", b"GET", [])
    assert (m.value, m.captures) == ("r9876", {"id": "5"})


def test_path_parameters_are_matched_by_their_segment_s_name() -> None:
    """``/admin;x/users`` is ``/admin/users`` to Tomcat, Jetty and Spring: it took a
    catch-all, past the authenticated ``/admin`` route, to the upstream's admin pages."""
    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "admin", "prefix": "/admin", "upstream": "u"},
            {"name": "login", "path": "/login", "upstream": "u"},
            {"name": "item", "path": "/items/{id}/edit", "upstream": "u"},
        ]
    )
    for path in ("/admin;x/users", "/admin;jsessionid=1", "/admin;"):
        assert router.match("a", path, b"GET", []).route.name == "admin"
    assert router.match("a", "/login;jsessionid=1", b"POST", []).route.name == "login"
    match = router.match("a", "/items/7;v=2/edit;x", b"GET", [])
    assert match.route.name == "item"
    assert match.captures == {"id": "7;v=2"}  # a capture keeps what the client sent
    assert router.match("a", "/adminx;y", b"GET", []).route.name == "open"


def test_a_get_route_takes_head_too() -> None:
    """HEAD went past ``methods = ["GET"]`` to a catch-all, whose upstream answered it
    with its GET handler (headers of what the GET route guards)."""
    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "ops", "prefix": "/ops", "methods": ["GET", "POST"], "upstream": "u"},
        ]
    )
    assert router.match("a", "/ops/secret", b"HEAD", []).route.name == "ops"
    assert router.match("a", "/ops/secret", b"DELETE", []).route.name == "open"


@pytest.mark.parametrize(
    ("headers", "query", "route"),
    [
        ([(b"x-tenant", b"public")], {}, "public-docs"),
        ([(b"x-tenant", b"public"), (b"x-tenant", b"public")], {}, "public-docs"),
        ([(b"x-tenant", b"internal"), (b"x-tenant", b"public")], {}, None),
        ([(b"x-tenant", b"public"), (b"x-tenant", b"internal")], {}, None),
        ([(b"x-tenant", b"internal"), (b"x-tenant", b"other")], {}, None),
        ([], {"visibility": ["public"]}, "public-reports"),
        ([], {"visibility": ["public", "public"]}, None),  # ASP.NET: "public,public"
        ([], {"visibility": ["private", "public"]}, None),
        ([], {"visibility": ["public", "private"]}, None),
        ([], {"visibility": ["private", ""]}, None),
        ([], {"debug": ["", "1"]}, "debug"),  # "*": present, whatever the values
    ],
)
def test_a_name_a_condition_is_on_repeated_with_different_values_is_refused(
    headers: list[tuple[bytes, bytes]], query: dict[str, list[str]], route: str | None
) -> None:
    """Upstreams read one of the values (the first, the last, or all joined). A match on
    any one let ?visibility=private&visibility=public take the public route; one on every
    one let a second value take a guarded request past its route to a catch-all. Either
    way the client chose the route by one value and was served by another: refused."""
    router = _router(
        [
            {"name": "guarded", "prefix": "/", "upstream": "u"},
            {
                "name": "public-docs",
                "prefix": "/",
                "headers": {"x-tenant": "public"},
                "upstream": "u",
            },
            {
                "name": "public-reports",
                "prefix": "/",
                "query": {"visibility": "public"},
                "upstream": "u",
            },
            {"name": "debug", "prefix": "/", "query": {"debug": "*"}, "upstream": "u"},
        ]
    )
    if route is None:
        with pytest.raises(BadRequest, match=r"repeated with different values|more than one way"):
            router.match("a", "/r", b"GET", headers, query)
    else:
        assert router.match("a", "/r", b"GET", headers, query).route.name == route


def test_a_repeated_name_no_condition_is_on_is_left_alone() -> None:
    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "docs", "prefix": "/docs", "query": {"v": "2"}, "upstream": "u"},
        ]
    )
    query = {"tag": ["a", "b"], "v": ["2"]}
    assert (
        router.match("a", "/docs", b"GET", [(b"x-a", b"1"), (b"x-a", b"2")], query).route.name
        == "docs"
    )
    assert router.match("a", "/other", b"GET", [], {"v": ["1", "2"]}).route.name == "open"


@pytest.mark.parametrize(
    "raw",
    [
        "visibility=public;visibility=private",  # Rack and older Go split on ";"
        "x=1;visibility=public",  # the router saw no visibility at all
        "visibility=public&Visibility=private",  # ASP.NET folds case
        "Visibility=public",
        "user.id=1&visibility=public",  # (another name: no matter)
        "visibility=public&%20visibility=private",  # PHP drops leading spaces
        "visibility=public&+visibility=private",
        "visibility=public&visibility%00x=private",  # PHP cuts the name at a NUL
        "visibility=public&%u0076isibility=private",  # IIS's %u escapes
        "visibility=public&V%C4%B1s%C4%B1b%C4%B1l%C4%B1ty=private",  # dotless i: ASP.NET
        "visibility=public&vi%C5%BFibility=private",  # long s
        "visibility=public&visibility[]=private",  # PHP, Rack, qs: the same parameter
        "visibility=public&visibility[0]=private",
    ],
)
def test_a_condition_s_value_other_servers_read_otherwise_is_refused(raw: str) -> None:
    from urllib.parse import parse_qs

    router = _router(
        [
            {"name": "guarded", "prefix": "/", "upstream": "u"},
            {"name": "public", "prefix": "/", "query": {"visibility": "public"}, "upstream": "u"},
        ]
    )
    query = parse_qs(raw, keep_blank_values=True)
    if raw.startswith("user.id"):
        assert router.match("a", "/r", b"GET", [], query, raw.encode()).route.name == "public"
        return
    with pytest.raises(BadRequest, match="more than one way"):
        router.match("a", "/r", b"GET", [], query, raw.encode())


@pytest.mark.parametrize(
    ("raw", "route"),
    [
        ("sort=a%3Bdesc", "sorted"),  # an escaped ";" is a ";" to everyone
        ("sort=a&page=2", "open"),
        ("sort=b;c=1", None),  # "b" to Rack, "b;c=1" to the router
        ("page=1;2", "open"),  # no condition on page
        ("x=1;y=2&sort=a%3Bdesc", "sorted"),  # pieces before it split on ";": no matter
    ],
)
def test_a_semicolon_is_refused_only_where_a_reading_differs(raw: str, route: str | None) -> None:

    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "sorted", "prefix": "/", "query": {"sort": "a;desc"}, "upstream": "u"},
        ]
    )
    _route_or_400(router, raw, route)


def _route_or_400(router: Router[str], raw: str, route: str | None) -> None:
    """Match ``?raw``: the route named ``route``, or 400 when it is None."""
    from urllib.parse import parse_qs

    query = parse_qs(raw, keep_blank_values=True)
    if route is None:
        with pytest.raises(BadRequest):
            router.match("a", "/r", b"GET", [], query, raw.encode())
    else:
        assert router.match("a", "/r", b"GET", [], query, raw.encode()).route.name == route


def test_another_method_s_conditions_never_refuse_a_request() -> None:
    """A GET with two X-Role headers was 400 because of a POST-only route with an
    X-Role condition, though a catch-all takes the GET."""
    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {
                "name": "writers",
                "prefix": "/",
                "methods": ["POST"],
                "headers": {"x-role": "writer"},
                "upstream": "u",
            },
        ]
    )
    twice = [(b"x-role", b"writer"), (b"x-role", b"reader")]
    assert router.match("a", "/r", b"GET", twice).route.name == "open"
    with pytest.raises(BadRequest):
        router.match("a", "/r", b"POST", twice)


def test_a_name_php_reads_as_the_condition_s_is_refused() -> None:
    """PHP turns "." (and space and "[") in names into "_": user.id=2 is its user_id."""
    from urllib.parse import parse_qs

    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "one", "prefix": "/", "query": {"user_id": "1"}, "upstream": "u"},
        ]
    )
    raw = "user_id=1&user.id=2"
    with pytest.raises(BadRequest, match="more than one way"):
        router.match("a", "/r", b"GET", [], parse_qs(raw), raw.encode())


def test_semicolon_pieces_count_against_the_parameter_cap() -> None:
    """parse_qs counts only '&': a query of ';' pieces went past the 1000 cap, and was
    split and decoded again for every condition of every route at the path."""
    from urllib.parse import parse_qs

    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "public", "prefix": "/", "query": {"visibility": "public"}, "upstream": "u"},
        ]
    )
    raw = "visibility=public;" + ";".join(["%41"] * 2000)
    with pytest.raises(BadRequest, match="more than 1000 query parameters"):
        router.match("a", "/r", b"GET", [], parse_qs(raw), raw.encode())


@pytest.mark.parametrize(
    ("raw", "route"),
    [
        ("user_type=public&user[type=private", None),  # PHP: user[type is user_type
        ("visibility=public&Visibility=public;private", None),  # ASP.NET: & only, folded
        ("visibility=public&visibility[]=public;private", None),
        ("filter[status]=open&filter[type]=bug", "filtered"),  # a condition named [..]
        ("filter[status]=open&Filter=x", "filtered"),
        ("filter[status]=open&Filter[Status]=closed", None),
    ],
)
def test_names_and_splits_servers_read_together(raw: str, route: str | None) -> None:

    router = _router(
        [
            {"name": "open", "prefix": "/", "upstream": "u"},
            {"name": "typed", "prefix": "/", "query": {"user_type": "public"}, "upstream": "u"},
            {"name": "public", "prefix": "/", "query": {"visibility": "public"}, "upstream": "u"},
            {
                "name": "filtered",
                "prefix": "/",
                "query": {"filter[status]": "open"},
                "upstream": "u",
            },
        ]
    )
    _route_or_400(router, raw, route)
