"""gateway.toml, read into frozen, typed objects.

Every section is a dataclass; :func:`engine.schema.build` checks each value and names
the key path in its error. Each default says why it is what it is. Cross-references
(a route naming an upstream, a plugin name) are checked by :func:`load` too, so
``filtergate check`` catches everything ``filtergate run`` would refuse.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.exchange import FRAMING_HEADERS
from engine.schema import ByteSize, ConfigError, Duration, Invalid, build

# Keys the TLS files' digests (check_tls_files): a config's repr must reveal nothing of a key.
_TLS_SALT = secrets.token_bytes(32)

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "HealthCheckConfig",
    "OutlierConfig",
    "RouteConfig",
    "ServerConfig",
    "TargetConfig",
    "UpstreamConfig",
    "check_tls_files",
    "client_tls_context",
    "load",
    "load_file",
    "parse_address",
]

KiB = 1024
MiB = 1024 * KiB


def parse_address(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as ``(host, port)``; raises ``ValueError``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if m is None:
        if default_port is not None and re.fullmatch(r"[^\s:/\[\]]+", value):
            return value, default_port
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:8080"), got {value!r}')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


@dataclass(frozen=True)
class TlsConfig:
    cert: str = field(metadata={"doc": "PEM certificate chain file"})
    key: str = field(metadata={"doc": "PEM private key file"})


@dataclass(frozen=True)
class ServerConfig:
    # Loopback unless told otherwise: a gateway must be exposed on purpose.
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"])
    # One process is the baseline; more share the port through SO_REUSEPORT.
    workers: int = 1
    # CIDRs whose X-Forwarded-* / X-Request-Id the gateway believes; none by default.
    trusted_proxies: list[str] = field(default_factory=list)
    # 16 KiB is h11's default and sits between nginx (8 KiB per line) and Node (16 KiB).
    max_head_size: ByteSize = ByteSize(16 * KiB)
    # Envoy's default; real browsers send 10-20.
    max_header_count: int = 100
    # Large enough for JSON APIs and uploads of modest files; raise it per route.
    max_body_size: ByteSize = ByteSize(10 * MiB)
    # What a filter that needs a whole body may hold in memory per request.
    max_buffered_body: ByteSize = ByteSize(1 * MiB)
    # What all requests together may hold of bodies still arriving (per process).
    max_buffering: ByteSize = ByteSize(128 * MiB)
    # Slowloris defence: the whole request head must arrive within this.
    head_timeout: Duration = Duration(10.0)
    # Longest silence while a request body is arriving.
    body_timeout: Duration = Duration(30.0)
    # Past 5 s of waiting on it, a request body must arrive this fast on average
    # (bytes a second; 0: no floor). Kestrel's default: a trickle holds no slot for ever.
    min_body_rate: ByteSize = ByteSize(240)
    # Idle keep-alive connections are closed after this (nginx uses 75 s).
    keepalive_timeout: Duration = Duration(60.0)
    # A client that reads nothing for this long is cut off.
    write_timeout: Duration = Duration(30.0)
    # SIGTERM: requests in flight get this long to finish.
    shutdown_timeout: Duration = Duration(15.0)
    # SIGTERM: /readyz says 503 this long before the listeners close, so a load balancer
    # polling it stops sending first (Traefik's requestAcceptGraceTimeout is 0 too).
    drain_delay: Duration = Duration(0.0)
    # Unread request body the gateway drains to keep a connection after answering early.
    drain_limit: ByteSize = ByteSize(64 * KiB)
    request_id_header: str = "x-request-id"
    # The pseudonym in Via: never the host name, which would reveal topology.
    via: str = "filtergate"
    tls: TlsConfig | None = None
    # Accepted connections per scheduler pass are drained in a batch; this caps it.
    accept_batch: int = 256
    # Client connections open at once; beyond it the accept queue waits (nginx's
    # worker_connections). 0: bounded by file descriptors only, as Envoy's default.
    max_connections: int = 0
    # CGI/WSGI upstreams read X_User_Id as X-User-Id, a way around identity headers;
    # nginx drops such names by default too.
    underscores_in_headers: Literal["drop", "allow", "reject"] = "drop"

    def __post_init__(self) -> None:
        if not self.listen:
            raise Invalid("listen", "at least one address is needed")
        for i, addr in enumerate(self.listen):
            try:
                parse_address(addr)
            except ValueError as e:
                raise Invalid(f"listen[{i}]", str(e)) from None
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise Invalid(f"trusted_proxies[{i}]", f"not an IP network: {cidr!r}") from None
        if self.workers < 1:
            raise Invalid("workers", "must be at least 1")
        if self.max_header_count < 1:
            raise Invalid("max_header_count", "must be at least 1")
        if self.max_head_size < 1024:
            raise Invalid("max_head_size", "must be at least 1KiB")
        if self.accept_batch < 1:
            raise Invalid("accept_batch", "must be at least 1")  # 0 would never accept
        if self.max_connections < 0:
            raise Invalid("max_connections", "must be 0 (no limit) or more")
        _positive(self, "head_timeout", "body_timeout", "write_timeout")
        if self.max_buffering < self.max_buffered_body:
            raise Invalid("max_buffering", "must be at least max_buffered_body (one body must fit)")
        rid = self.request_id_header
        if not _TOKEN.fullmatch(rid):
            raise Invalid("request_id_header", f"not a header name: {rid!r}")
        if _reserved_for_request_ids(rid.lower()):
            raise Invalid(
                "request_id_header",
                f"{rid!r} is a header the gateway or HTTP itself gives a meaning to",
            )


def _reserved_for_request_ids(name: str) -> bool:
    """A header the request id cannot be sent in (see ``_NOT_FOR_REQUEST_IDS``)."""
    return name in _NOT_FOR_REQUEST_IDS or name.startswith(_NOT_FOR_REQUEST_ID_PREFIXES)


def _positive(section: object, *keys: str) -> None:
    """Durations that must be more than 0: there, 0 would time out at once (a 504 for
    every call, and every target ejected), where it may be read as "no limit"."""
    for key in keys:
        value = getattr(section, key)
        if value is not None and value <= 0:
            raise Invalid(key, "must be more than 0 (0 would time out at once, not mean no limit)")


# A header name (RFC 9110 5.6.2 token).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# Headers the request id cannot be sent in: framing (a second Content-Length on every
# response), and the ones the gateway sets, strips or reads itself.
_NOT_FOR_REQUEST_IDS = FRAMING_HEADERS | {
    "host",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "authorization",
    "cookie",
    "set-cookie",
    "expect",
    "date",
    "via",
    "location",
    "content-type",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "server",
    "www-authenticate",
    "range",
    "cache-control",
    "vary",
    "etag",
    "last-modified",
    "expires",
    "age",
    "retry-after",
    "allow",
    "origin",
    "referer",
    "user-agent",
}
# Representation, negotiation and conditional headers, CORS and fetch metadata.
_NOT_FOR_REQUEST_ID_PREFIXES = ("content-", "accept", "if-", "access-control-", "sec-")


@dataclass(frozen=True)
class AccessLogConfig:
    """``[access_log]``: see :mod:`engine.accesslog`."""

    # None: no access log. "-" is standard output (containers collect it from there).
    path: str | None = None
    # JSON names every field for log pipelines; "combined" is for tools that read nginx's.
    format: Literal["json", "combined"] = "json"
    # nginx's access_log buffer= and flush= defaults are 64k and "when full".
    buffer: ByteSize = ByteSize(64 * 1024)
    flush: Duration = Duration(1.0)

    def __post_init__(self) -> None:
        if self.path is not None and self.path != "-":
            if os.path.isdir(self.path):
                raise Invalid("path", f"{self.path} is a directory, not a file")
            folder = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(folder):
                raise Invalid("path", f"no such directory: {folder}")
            if not os.access(folder, os.W_OK | os.X_OK) and not os.access(self.path, os.W_OK):
                raise Invalid("path", f"cannot write to {self.path}")
        if self.flush <= 0:
            raise Invalid("flush", "must be positive")


@dataclass(frozen=True)
class AdminConfig:
    # Loopback only: metrics and route tables are for operators, not the internet.
    listen: str = "127.0.0.1:9901"
    enabled: bool = True

    def __post_init__(self) -> None:
        try:
            parse_address(self.listen)
        except ValueError as e:
            raise Invalid("listen", str(e)) from None


@dataclass(frozen=True)
class TargetConfig:
    address: str
    weight: int = 1

    def __post_init__(self) -> None:
        try:
            parse_address(self.address)
        except ValueError as e:
            raise Invalid("address", str(e)) from None
        if self.weight < 1:
            raise Invalid("weight", "must be at least 1")


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str = "/healthz"
    interval: Duration = Duration(5.0)
    timeout: Duration = Duration(1.0)
    # Two successes to come back, three failures to go out: one blip changes nothing.
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: list[int] = field(default_factory=lambda: list(range(200, 400)))

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise Invalid("path", 'must start with "/"')
        if self.interval <= 0:
            raise Invalid("interval", "must be positive")
        _positive(self, "timeout")
        if self.healthy_threshold < 1:
            raise Invalid("healthy_threshold", "must be at least 1")
        if self.unhealthy_threshold < 1:
            raise Invalid("unhealthy_threshold", "must be at least 1")


@dataclass(frozen=True)
class OutlierConfig:
    # Five in a row, as Envoy: one failed request says little about a target.
    consecutive_failures: int = 5
    # Ejection lasts base_ejection times the number of times the target was ejected.
    base_ejection: Duration = Duration(30.0)
    max_ejection: Duration = Duration(300.0)
    # Never eject more than this share of a pool, so an outage cannot empty it.
    max_ejected_percent: int = 50
    # Statuses that count as a failure (besides connect errors and timeouts).
    failure_statuses: list[int] = field(default_factory=lambda: [500, 502, 503, 504])

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise Invalid("consecutive_failures", "must be at least 1")
        if not 0 <= self.max_ejected_percent <= 100:
            raise Invalid("max_ejected_percent", "must be between 0 and 100")


@dataclass(frozen=True)
class UpstreamConfig:
    targets: list[str | TargetConfig]
    balance: Literal["round_robin", "least_conn", "random", "hash"] = "round_robin"
    # balance = "hash": what of a request picks its target (consistent hashing).
    hash_on: str | None = None
    # Envoy's default; a healthy service on a LAN accepts in well under a millisecond.
    connect_timeout: Duration = Duration(5.0)
    # Longest wait for the response head, and longest silence inside a response body.
    read_timeout: Duration = Duration(60.0)
    # Longest time to hand the request body to a target that stopped reading.
    write_timeout: Duration = Duration(60.0)
    # Whole call, head to last byte; 0 means no limit beyond the others.
    timeout: Duration = Duration(0.0)
    # Idle keep-alive connections kept per target.
    pool_max_idle: int = 64
    # Shorter than the keep-alive timeout of common servers (hypercorn 5 s is shorter:
    # a stale connection is detected before reuse and never costs a request).
    pool_idle_timeout: Duration = Duration(30.0)
    # A target that refused a connection is skipped for this long.
    eject_cooldown: Duration = Duration(10.0)
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig | None = None
    # Host header sent upstream when a route does not preserve the client's.
    host_header: str | None = None
    # TLS to the targets (https services): the certificate is verified against
    # tls_server_name (default: each target's host) with the system's CAs or tls_ca_file.
    tls: bool = False
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    # A client certificate for targets that ask for one (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Derived at load, not a TOML key: the TLS files' salted digest, so that a file
    # replaced under the same path makes a reload build new pools (and printing a
    # config shows nothing of a key).
    tls_fingerprint: str = field(init=False, repr=True, compare=True, default="")

    def __post_init__(self) -> None:
        if not self.targets:
            raise Invalid("targets", "at least one target is needed")
        _positive(self, "connect_timeout", "read_timeout", "write_timeout")
        for i, t in enumerate(self.targets):
            if isinstance(t, str):
                try:
                    parse_address(t)
                except ValueError as e:
                    raise Invalid(f"targets[{i}]", str(e)) from None
        if self.pool_max_idle < 0:
            raise Invalid("pool_max_idle", "must not be negative")
        if self.hash_on is not None:
            if self.balance != "hash":
                raise Invalid("hash_on", 'only used with balance = "hash"')
            kind, _, name = self.hash_on.partition(":")
            simple = kind in ("ip", "path", "consumer") and not name
            named = kind in ("header", "cookie") and _TOKEN.fullmatch(name) is not None
            if not (simple or named):
                raise Invalid(
                    "hash_on",
                    'one of "ip", "path", "consumer", "header:NAME", "cookie:NAME"; '
                    f"got {self.hash_on!r}",
                )
        files = ("tls_ca_file", "tls_cert_file", "tls_key_file")
        for key in ("tls_server_name", *files):
            if getattr(self, key) is not None and not self.tls:
                raise Invalid(key, "only used with tls = true")
        if self.tls_server_name is not None:
            try:
                self.tls_server_name.encode("idna")
            except UnicodeError:
                raise Invalid("tls_server_name", "not a host name TLS can send") from None
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise Invalid("tls_key_file", "set tls_cert_file too (the key is its certificate's)")
        if self.tls:
            fingerprint = check_tls_files(
                {key: getattr(self, key) for key in files},
                self.ssl_context,
                "tls_ca_file" if self.tls_cert_file is None else "tls_cert_file",
            )
            object.__setattr__(self, "tls_fingerprint", fingerprint)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of connections to the targets; ``None`` without ``tls``."""
        if not self.tls:
            return None
        context = client_tls_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        context.set_alpn_protocols(["http/1.1"])
        return context

    @property
    def target_list(self) -> list[TargetConfig]:
        return [TargetConfig(t) if isinstance(t, str) else t for t in self.targets]


def client_tls_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    """A TLS client context verifying servers with ``ca_file`` (else the system's CAs),
    presenting ``cert_file`` (its key in ``key_file`` or in itself) when given."""
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    return context


def _no_password() -> bytes:
    """``load_cert_chain``'s password callback: an encrypted key is refused at load, where
    OpenSSL would otherwise ask for a pass phrase on the terminal (and block a reload)."""
    raise ValueError("the private key is encrypted; give it unencrypted (file mode 0600)")


def check_tls_files(
    files: Mapping[str, str | None], make_context: Callable[[], object], error_key: str
) -> str:
    """Check a config's TLS files at load; returns the salted digest of their contents.

    ``files`` maps config keys to paths (``None``: not set). Each file is read (a config
    error names its key), then ``make_context`` builds the TLS context once (a failure
    is a config error at ``error_key``). The digest goes in the config, so a
    file replaced under the same path makes a reload build anew; the salt keeps a
    printed config from showing anything of a key.
    """
    digest = hmac.new(_TLS_SALT, digestmod=hashlib.sha256)
    for key, path in files.items():
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError as e:
            raise Invalid(key, f"cannot read {path!r}: {e.strerror or e}") from None
    try:
        make_context()
    except (OSError, ssl.SSLError, ValueError) as e:
        raise Invalid(error_key, f"cannot load the TLS files: {e}") from None
    return digest.hexdigest()[:16]


# Request headers the router never sees (the gateway reads, sets or drops them before
# routing): a condition on one could never hold.
_UNROUTED_HEADERS = {
    "host": 'the Host header is matched by "hosts"',
    **{
        name: "a hop-by-hop header, read by the gateway and never routed on"
        for name in (*FRAMING_HEADERS, "proxy-connection", "proxy-authorization")
    },
    "expect": "Expect is answered by the gateway (100 Continue)",
    **{
        name: "the gateway sets it from the connection (or a trusted proxy's) after routing"
        # (Forwarded, X-Real-IP, X-Forwarded-Port and the path headers such as
        # X-Original-URL are routed on when a trusted proxy sent them.)
        for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
    },
}


#: An HTTP token (RFC 9110 5.6.2): what an Upgrade protocol name is made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_canonical(key: str, pattern: str) -> None:
    """A path pattern must be written as requests are matched: in canonical form (see
    :mod:`engine.canonical`), or it can never match."""
    from engine.canonical import canonical_path
    from engine.errors import BadRequest

    if "?" in pattern or "#" in pattern:
        raise Invalid(key, 'never matches: a path has no query (match one with "query")')
    # As a client sends it: characters outside ASCII as UTF-8 escapes.
    sent = "".join(
        c if " " < c < "\x7f" else "".join(f"%{b:02X}" for b in c.encode()) for c in pattern
    )
    try:
        canonical = canonical_path(sent.encode())
    except BadRequest as e:
        raise Invalid(key, f"never matches: a request with this path is refused ({e})") from None
    if canonical != pattern:
        raise Invalid(
            key,
            f"never matches: requests are matched by their canonical path; write {canonical!r}",
        )


@dataclass(frozen=True)
class RouteConfig:
    name: str = ""
    hosts: list[str] = field(default_factory=list)
    path: str | None = None
    prefix: str | None = None
    methods: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    upstream: str | None = None
    strip_prefix: bool = False
    rewrite: str | None = None
    preserve_host: bool = False
    connect_timeout: Duration | None = None
    read_timeout: Duration | None = None
    timeout: Duration | None = None
    max_body_size: ByteSize | None = None
    allow_absolute_form: bool = False
    # CONNECT host:port opens a TCP tunnel to this route's upstream (never to the host
    # the client names: the gateway is no open proxy). Matched on `hosts` only.
    allow_connect: bool = False
    # Protocols a client may switch to on this route (Upgrade, e.g. "websocket"): the
    # request goes upstream with its Upgrade, and an upstream's 101 opens a tunnel.
    upgrades: list[str] = field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.path is not None and self.prefix is not None:
            raise Invalid("prefix", 'give either "path" or "prefix", not both')
        pattern = self.path if self.path is not None else self.prefix
        key = "path" if self.path is not None else "prefix"
        if pattern is not None:
            if not pattern.startswith("/"):
                raise Invalid(key, 'must start with "/"')
            names = re.findall(r"\{([^}]*)\}", pattern)
            for n in names:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n):
                    raise Invalid(key, f"capture name {n!r} is not an identifier")
            if len(set(names)) != len(names):
                raise Invalid(key, "a capture name is used twice")
            for seg in pattern.split("/"):
                if "{" in seg and not re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", seg):
                    raise Invalid(key, f"a capture must be a whole segment: {seg!r}")
            _check_canonical(key, pattern)
        for i, m in enumerate(self.methods):
            if not re.fullmatch(r"[A-Z]+", m):
                raise Invalid(f"methods[{i}]", f"expected an upper-case method, got {m!r}")
        for i, h in enumerate(self.hosts):
            if re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?:\d+", h):
                raise Invalid(
                    f"hosts[{i}]",
                    f"a port never matches ({h!r}): routes match the host name without "
                    f"its port; write {h.rsplit(':', 1)[0]!r}",
                )
            if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", h):
                raise Invalid(
                    f"hosts[{i}]", f'expected "api.example.com" or "*.example.com", got {h!r}'
                )
        for name in self.headers:
            unseen = _UNROUTED_HEADERS.get(name.lower())
            if unseen is not None:
                raise Invalid(f"headers.{name}", f"never matches: {unseen}")
        _positive(self, "connect_timeout", "read_timeout")
        if self.allow_connect and self.upstream is None:
            raise Invalid("allow_connect", 'needs "upstream": the tunnel goes there')
        if self.strip_prefix and self.prefix is None:
            raise Invalid("strip_prefix", 'needs "prefix"')
        for i, proto in enumerate(self.upgrades):
            if not _TOKEN.fullmatch(proto):
                raise Invalid(
                    f"upgrades[{i}]", f'expected a protocol name ("websocket"), got {proto!r}'
                )
            if proto.lower() == "h2c":
                # After a 101 the client would speak HTTP/2 straight to the upstream:
                # every request on the tunnel would pass routing and filters by
                # ("h2c smuggling").
                raise Invalid(
                    f"upgrades[{i}]",
                    "h2c is not proxied: requests over the upgraded connection would bypass "
                    "routing and every filter",
                )
        if self.upgrades and self.upstream is None:
            raise Invalid("upgrades", 'needs "upstream": the upgraded connection goes there')
        if self.rewrite is not None and not self.rewrite.startswith("/"):
            raise Invalid("rewrite", 'must start with "/"')

    @property
    def pattern(self) -> str:
        if self.path is not None:
            return self.path
        return self.prefix if self.prefix is not None else "/"

    @property
    def is_prefix(self) -> bool:
        return self.path is None


@dataclass(frozen=True)
class DiscoveryConfig:
    # Plugin names (built-in module or entry-point names) that must not be loaded.
    blocked: list[str] = field(default_factory=list)
    # Third-party plugins from the "filtergate" entry-point group.
    entry_points: bool = True


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    routes: list[RouteConfig] = field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = field(default="<memory>", metadata={"internal": True})  # the file's name


def load(data: dict[str, Any], source: str = "<memory>") -> Config:
    """A checked :class:`Config` from parsed TOML. Raises :class:`ConfigError`."""
    config = _replace(build(Config, data), source=source)
    names: set[str] = set()
    routes = []
    for i, route in enumerate(config.routes):
        path = f"routes[{i}]"
        if not route.name:
            route = _replace(route, name=f"routes[{i}]")
        if route.name in names:
            raise ConfigError(f"{path}.name", f"duplicate route name {route.name!r}")
        names.add(route.name)
        if route.upstream is not None and route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams)) or "none defined"
            raise ConfigError(
                f"{path}.upstream", f"no upstream named {route.upstream!r} (known: {known})"
            )
        server = config.server
        for name in route.headers:
            if name.lower() == server.request_id_header.lower():
                why = "the request id header is the gateway's own (server.request_id_header)"
                raise ConfigError(f"{path}.headers.{name}", f"never matches: {why}")
            if "_" in name and server.underscores_in_headers != "allow":
                why = 'headers with "_" are dropped (server.underscores_in_headers)'
                raise ConfigError(f"{path}.headers.{name}", f"never matches: {why}")
        routes.append(route)
    result: Config = _replace(config, routes=routes)
    return result


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def load_file(path: str | Path) -> Config:
    """Read and check a gateway.toml. Raises :class:`ConfigError`."""
    return load_bytes(read_file(path), path)


def read_file(path: str | Path) -> bytes:
    """The bytes of a config file. Raises :class:`ConfigError`."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        hint = (
            " (`filtergate init` writes a starter config)"
            if isinstance(e, FileNotFoundError)
            else ""
        )
        raise ConfigError("", f"cannot read it: {e.strerror}{hint}") from None


def load_bytes(raw: bytes, path: str | Path) -> Config:
    """Check the bytes of a gateway.toml read from ``path`` (its ``source``)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("", f"not valid TOML: {e}") from None
    config: Config = load(data, source=str(path))
    return config
