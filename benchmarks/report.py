"""Results: ratios to the baselines, the table, the target checks, JSON and a PNG."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.jitter import window_tail

MiB = 1024 * 1024

#: The machine probes of a run: each probe's unit durations (``benchmarks/jitter.py``).
Machine = Sequence[Sequence[float]]


@dataclass
class Result:
    """One scenario's outcome (the median run when repeated)."""

    name: str
    title: str
    target: str
    kind: str = "load"
    connections: int = 32
    request: str = "bare"
    workers: int = 1
    status: str = "ok"  # ok | skipped: why | failed: why
    tool: str = ""
    requests: int = 0
    duration: float = 0.0
    rps: float = 0.0
    errors: int = 0
    error_detail: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_us_per_req: float | None = None
    peak_rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)  # req/s of every repeat
    tails: list[float] = field(default_factory=list)  # p99/p50 of every repeat
    ratio_direct: float | None = None
    ratio_forwarder: float | None = None
    cpu_ratio_forwarder: float | None = None
    rss_ratio_forwarder: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def median_result(runs: Sequence[Result]) -> Result:
    """The run with the median req/s (the lower middle one for an even count)."""
    done = [r for r in runs if r.ok]
    if not done:
        return runs[-1]
    ordered = sorted(done, key=lambda r: r.rps)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.runs = [r.rps for r in done]
    chosen.tails = [t for r in done if (t := tail_ratio(r)) is not None]
    return chosen


def tail_ratio(r: Result) -> float | None:
    """p99 / p50 of one run."""
    p50 = r.latency_ms.get("p50")
    if not p50 or "p99" not in r.latency_ms:
        return None
    return r.latency_ms["p99"] / p50


def median_tail(r: Result) -> float | None:
    """p99 / p50 as the tail target judges it: the median over the repeats (as req/s
    is), since a single 5-second run's p99 moves with the machine's stalls."""
    return statistics.median(r.tails) if r.tails else tail_ratio(r)


def _baseline(results: Sequence[Result], target: str, row: Result) -> Result | None:
    same = [
        r
        for r in results
        if r.ok
        and r.kind == "load"
        and r.target == target
        and r.workers == 1
        and not r.extra.get("variant")
    ]
    for r in same:
        if r.request == row.request and r.connections == row.connections:
            return r
    for r in same:
        if r.request == "bare" and r.connections == 32:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(results: Sequence[Result]) -> None:
    """Ratios of each load row to direct and to the forwarder (same request, same
    concurrency where measured, else the bare c32 run)."""
    for row in results:
        if not row.ok or row.kind != "load":
            continue
        direct = _baseline(results, "direct", row)
        fwd = _baseline(results, "forwarder", row)
        row.ratio_direct = _ratio(row.rps, direct.rps if direct else None)
        row.ratio_forwarder = _ratio(row.rps, fwd.rps if fwd else None)
        row.cpu_ratio_forwarder = _ratio(row.cpu_us_per_req, fwd.cpu_us_per_req if fwd else None)
        row.rss_ratio_forwarder = _ratio(row.peak_rss_mb, fwd.peak_rss_mb if fwd else None)


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(results: Sequence[Result]) -> str:
    """The load table, then the bodies/idle rows, then skipped and failed ones."""
    header = (
        "scenario",
        "req/s",
        "x direct",
        "x fwd",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "CPU us/req",
        "x fwd",
        "peak RSS MB",
        "x fwd",
    )
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        if not r.ok or r.kind != "load":
            continue
        lat = r.latency_ms
        rows.append(
            (
                r.name,
                f"{r.rps:,.0f}",
                _f(r.ratio_direct, ".2f"),
                _f(r.ratio_forwarder, ".2f"),
                _f(lat.get("p50"), ".2f"),
                _f(lat.get("p99"), ".2f"),
                _f(lat.get("max"), ".1f"),
                str(r.errors),
                _f(r.cpu_us_per_req, ".0f"),
                _f(r.cpu_ratio_forwarder, ".2f"),
                _f(r.peak_rss_mb, ".1f"),
                _f(r.rss_ratio_forwarder, ".2f"),
            )
        )
    out = [_grid(rows)]
    other = [r for r in results if r.ok and r.kind != "load"]
    if other:
        rows = [("scenario", "what was measured")]
        for r in other:
            rows.append((r.name, describe_extra(r)))
        out.append(_grid(rows, left=2))
    not_run = [r for r in results if not r.ok]
    if not_run:
        out.append("\n".join(f"{r.name}: {r.status}" for r in not_run))
    return "\n\n".join(out)


def describe_extra(r: Result) -> str:
    e = r.extra
    if r.kind == "bodies":
        return (
            f"{e.get('size_mib', 0):,.0f} MiB up {e.get('up_mib_s', 0):,.0f} MiB/s, "
            f"down {e.get('down_mib_s', 0):,.0f} MiB/s, peak RSS {_f(r.peak_rss_mb, '.1f')} MB"
            + (f", errors: {e['error']}" if e.get("error") else "")
        )
    if r.kind == "idle":
        return (
            f"{e.get('open', 0):,} idle conns open, RSS {e.get('rss_mb', 0):.1f} MB "
            f"(peak {_f(r.peak_rss_mb, '.1f')} MB), a new request served in "
            f"{_f(e.get('served_ms'), '.1f')} ms (status {e.get('served_status')}), "
            f"an idle conn reused in {_f(e.get('reused_ms'), '.1f')} ms"
        )
    return json.dumps(e)


def _grid(rows: Sequence[tuple[str, ...]], left: int = 1, text: Sequence[int] = ()) -> str:
    """A Markdown table; the first ``left`` columns and the ``text`` ones left-aligned,
    the rest (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < left or i in text or k == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    op: str  # ">=" or "<="
    bound: float
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        ok = self.value >= self.bound if self.op == ">=" else self.value <= self.bound
        return "PASS" if ok else "FAIL"


def check_targets(results: Sequence[Result], machine: Machine = ()) -> list[Check]:
    """The issue's targets, each a ratio or bound within this run; ``machine`` is the
    machine probes' unit durations, set next to each tail check at the row's p50."""
    by = {r.name: r for r in results if r.ok}

    def rps(name: str) -> float | None:
        r = by.get(name)
        return r.rps if r else None

    checks = [
        Check(
            "filtergate / forwarder req/s", _ratio(rps("filtergate"), rps("forwarder")), ">=", 1.2
        ),
        proxypy_check(rps("filtergate"), rps("proxypy-keepalive"), rps("proxypy")),
        Check(
            "full chain / no filters req/s",
            _ratio(rps("full-chain"), rps("filtergate")),
            ">=",
            0.75,
        ),
        Check(
            "full chain / no filters, same request",
            _ratio(rps("full-chain"), rps("filtergate-full-request")),
            ">=",
            0.75,
            note="the no-filter row sends the full chain's request (its bearer token)",
        ),
        Check(
            "10,000 routes / 10 routes req/s",
            _ratio(rps("routes-10000"), rps("routes-10")),
            ">=",
            0.9,
        ),
    ]
    for name in ("filtergate", "filtergate-c64", "filtergate-c256"):
        r = by.get(name)
        tail = median_tail(r) if r else None
        runs = ", ".join(f"{t:.2f}" for t in r.tails) if r and len(r.tails) > 1 else ""
        notes = [f"median of the repeats: {runs}"] if runs else []
        alone = window_tail(machine, r.latency_ms.get("p50", 0) / 1000) if r else None
        if alone is not None:
            notes.insert(0, f"machine alone {alone:.2f}")
        note = "; ".join(notes)
        checks.append(Check(f"{name} p99 / p50", tail, "<=", 4.0, note=note))
    bodies = by.get("bodies")
    checks.append(
        Check("1 GiB each way: peak RSS MB", bodies.peak_rss_mb if bodies else None, "<=", 64.0)
    )
    idle = by.get("idle-10k")
    idle_mb = idle.extra.get("rss_mb") if idle else None
    checks.append(Check("10,000 idle conns: RSS MB", idle_mb, "<=", 300.0))
    return checks


def proxypy_check(filtergate: float | None, keepalive: float | None, close: float | None) -> Check:
    """filtergate against proxy.py: its keep-alive row (the relay plugin) when measured,
    else its Connection: close row; the row's name says which."""
    if keepalive is not None or close is None:
        name = "filtergate / proxy.py req/s (keep-alive plugin)"
        return Check(name, _ratio(filtergate, keepalive), ">=", 1.0, note="proxypy-keepalive")
    name = "filtergate / proxy.py req/s (Connection: close)"
    return Check(name, _ratio(filtergate, close), ">=", 1.0, note="proxypy")


MACHINE_WINDOWS_MS = (2, 5, 10, 40)


def machine_tails(machine: Machine) -> dict[str, float]:
    """The machine probe's p99/p50 over windows of 2 to 40 ms of work, by window."""
    tails = {f"{ms} ms": window_tail(machine, ms / 1000) for ms in MACHINE_WINDOWS_MS}
    return {k: v for k, v in tails.items() if v is not None}


# The rows at 32 connections whose tails are set side by side: filtergate, then the
# servers that run none of its code.
_TAIL_PEERS = (
    "filtergate",
    "direct",
    "nginx",
    "floor",
    "forwarder",
    "proxypy-keepalive",
    "proxypy-parsed",
)


def _tail_of(r: Result | None) -> float | None:
    return median_tail(r) if r is not None and r.kind == "load" else None


# The proxy.py rows the floor is set against: (row, name in the line, what it says).
_FLOOR_AGAINST = (
    (
        "proxypy-keepalive",
        "proxy.py keep-alive",
        "parsing both heads with h11 on trio, and nothing else, is {} proxy.py's unparsed "
        "relay here",
    ),
    (
        "proxypy-parsed",
        "proxy.py parsing both heads",
        "with the same parsing work, the floor of this stack is {} proxy.py's loop and parser",
    ),
)


def context(results: Sequence[Result], machine: Machine = ()) -> list[str]:
    """What the targets cannot show alone: the tail the machine adds by itself
    (``benchmarks/jitter.py``), and where the stack's floor (``benchmarks/floor.py``)
    sits between filtergate and proxy.py, i.e. how much of the proxy.py gap any gateway
    on trio + h11 must keep."""
    lines = []
    tails = machine_tails(machine)
    if tails:
        units = [u for run in machine for u in run]
        unit = statistics.median(units) * 1e3
        over = ", ".join(f"{v:.2f} over {k}" for k, v in tails.items())
        lines.append(
            f"machine alone: fixed work on the gateway's CPU ({len(units):,} units of "
            f"{unit:.2f} ms, nothing else on that CPU, the load on the stub beside it) has "
            f"p99 / p50 {over}; each tail "
            f"check's note gives it at the row's own p50"
        )
    by = {r.name: r for r in results if r.ok}
    peers = [(name, t) for name in _TAIL_PEERS if (t := _tail_of(by.get(name))) is not None]
    if len(peers) > 1:
        listed = ", ".join(f"{name} {t:.2f}" for name, t in peers)
        lines.append(
            f"p99 / p50 at 32 connections of every server in this run: {listed}; the tail "
            f"target's bound is 4"
        )
    floor = by.get("floor")
    if floor is None:
        return lines
    for name, against, what in _FLOOR_AGAINST:
        peer = by.get(name)
        if peer is not None and peer.rps:
            ratio = floor.rps / peer.rps
            verdict = "behind" if ratio < 1 else "ahead of"
            lines.append(f"trio+h11 floor / {against} req/s: {ratio:.2f}; {what.format(verdict)}")
    gateway = by.get("filtergate")
    if gateway is not None and floor.rps:
        cpu = ""
        if gateway.cpu_us_per_req and floor.cpu_us_per_req:
            cpu = (
                f"; CPU {gateway.cpu_us_per_req:.0f} vs {floor.cpu_us_per_req:.0f} us/req, "
                f"{gateway.cpu_us_per_req - floor.cpu_us_per_req:.0f} us/req above the floor"
            )
        lines.append(f"filtergate / trio+h11 floor req/s: {gateway.rps / floor.rps:.2f}{cpu}")
    return lines


def render_checks(checks: Sequence[Check]) -> str:
    rows: list[tuple[str, ...]] = [("target", "measured", "bound", "verdict", "note")]
    for c in checks:
        rows.append((c.name, _f(c.value, ".2f"), f"{c.op} {c.bound:g}", c.verdict, c.note))
    return _grid(rows, text=(4,))


def to_json(
    results: Sequence[Result],
    meta: dict[str, Any],
    checks: Sequence[Check],
    machine: Machine = (),
) -> str:
    units = [u for run in machine for u in run]
    return json.dumps(
        {
            "meta": meta,
            "results": [asdict(r) for r in results],
            "targets": [{**asdict(c), "verdict": c.verdict} for c in checks],
            "machine": {
                "probes": len(machine),
                "units": len(units),
                "unit_ms": statistics.median(units) * 1e3 if units else None,
                "p99_p50": machine_tails(machine),
            },
            "context": context(results, machine),
        },
        indent=2,
    )


def write_png(results: Sequence[Result], path: Path) -> str | None:
    """Latency percentiles of every load row in one PNG; why not, or None when written."""
    try:
        # Optional: not a dependency of filtergate.
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results if r.ok and r.kind == "load" and r.latency_ms]
    if not rows:
        return "no latency to draw"
    labels = ["p50", "p75", "p90", "p99", "p99.9", "max"]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 3))
    for i, r in enumerate(rows):
        # matplotlib cycles ten colours: every ten rows, another line style and marker,
        # so no two rows look alike.
        ax.plot(
            labels,
            [r.latency_ms.get(k, float("nan")) for k in labels],
            linestyle=("-", "--", ":", "-.")[i // 10 % 4],
            marker="os^D"[i // 10 % 4],
            label=r.name,
        )
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("filtergate benchmarks: latency percentiles")
    ax.legend(fontsize="small", ncol=2, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def spread(values: Sequence[float]) -> float | None:
    """Relative spread (max-min)/median of repeated runs: how noisy a row was."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else None
