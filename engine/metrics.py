"""Process-wide counters, gauges and histograms, rendered in the Prometheus text format.

Plugins count events here (``counter("filtergate_jwt_failures_total", "...",
("reason",)).inc(reason="expired")``); the admin listener serves :func:`render` (with
workers, :func:`render_dumps` of the :func:`merge` of every process's :func:`dump`).
Metrics are created once (at import or config load) and incremented per request.

With ``workers > 1`` every process counts on its own. A worker hands its metrics to the
main process as plain data (:func:`dump`), and the main process adds them up
(:func:`merge`) before it renders (:func:`render_dumps`): counters and histograms are
summed, and each gauge is combined the way it declares (``merge``: sum, min or max).
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "BoundCounter",
    "BoundHistogram",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricDump",
    "before_dump",
    "counter",
    "dump",
    "gauge",
    "histogram",
    "merge",
    "render",
    "render_dumps",
]

# One metric of one process as plain data (JSON-able), as :meth:`_Metric.dump` makes it:
#   kind, help, labels;
#   counters and gauges: "values", a list of [label values, value];
#   gauges also: "merge", how the processes' values combine ("sum", "min", "max");
#   histograms: "buckets" (the upper bounds, +Inf left out) and "series", a list of
#   [label values, counts per bucket (not cumulative, +Inf last), sum].
MetricDump = dict[str, Any]

GaugeMerge = Literal["sum", "min", "max"]
GAUGE_MERGES: tuple[GaugeMerge, ...] = ("sum", "min", "max")


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def value(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def dump(self) -> MetricDump:
        return {
            "kind": self.kind,
            "help": self.help,
            "labels": list(self.labels),
            "values": [[list(key), v] for key, v in _numbers(self.name, self.values.items())],
        }


def _numbers(
    name: str, values: Iterable[tuple[tuple[str, ...], object]]
) -> list[tuple[tuple[str, ...], float]]:
    """``values`` as floats (a plugin may count in Decimal or numpy numbers, which JSON
    cannot carry). A value that is no number at all is left out, and said once: a
    plugin's bad gauge must not take /metrics, or the process serving it, down."""
    out = []
    for key, v in values:
        try:
            if isinstance(v, str | bytes):  # float() would read "1.5": not a number
                raise TypeError(type(v).__name__)
            out.append((key, float(v)))  # type: ignore[arg-type]
        except Exception:  # whatever a plugin's number type raises
            if name not in _WARNED:
                _WARNED.add(name)
                log.error("metric %s has a value that is no number (%r): left out", name, v)
    return out


_WARNED: set[str] = set()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def bind(self, **labels: str) -> BoundCounter:
        """This counter with its labels fixed once: ``inc()`` on a hot path is a dict add.
        The series is shown from now on, at 0 until counted."""
        return BoundCounter(self.values, self._key(labels))

    def bind_lazily(self, **labels: str) -> BoundCounter:
        """As :meth:`bind`, but the series appears only with its first count (for label
        values that may never occur)."""
        return _LazyBoundCounter(self.values, self._key(labels))


class BoundCounter:
    __slots__ = ("key", "values")

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self.values = values
        self.key = key
        values.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        self.values[self.key] += amount


class _LazyBoundCounter(BoundCounter):
    __slots__ = ()

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self.values = values
        self.key = key

    def inc(self, amount: float = 1.0) -> None:
        self.values[self.key] = self.values.get(self.key, 0.0) + amount


class Gauge(_Metric):
    """A value that goes up and down. ``merge`` says what the main process shows for it
    with ``workers > 1``: the ``sum`` of the processes' values (connections open), their
    ``min`` (1 only while every process has a target in rotation) or their ``max``
    (1 while any process's breaker is in a state)."""

    kind = "gauge"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], merge: GaugeMerge = "sum"
    ) -> None:
        if merge not in GAUGE_MERGES:
            raise ValueError(f"{name}: merge must be one of {GAUGE_MERGES}, not {merge!r}")
        super().__init__(name, help, labels)
        self.merge = merge

    def dump(self) -> MetricDump:
        return {**super().dump(), "merge": self.merge}

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def add(self, amount: float, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def replace_all(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Every series at once, by label values in label order: the others go (a
        series for something that no longer exists must not be exported on)."""
        self.values = dict(values)


class BoundHistogram:
    """One series of a :class:`Histogram`: a count per bucket (not cumulative), and the sum.

    ``observe`` is a C bisection and two additions: cheap enough for every request.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, the bucket "le" that value falls in.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram(_Metric):
    """Observations counted in buckets of upper bounds ``le``, as Prometheus defines them.

    Series are made on their first :meth:`bind`, so a label set that never occurs
    renders nothing. A bound series outlives a config reload: its counts keep growing.
    """

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets if b != math.inf))
        self.series: dict[tuple[str, ...], BoundHistogram] = {}

    def bind(self, **labels: str) -> BoundHistogram:
        key = self._key(labels)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = BoundHistogram(self.buckets)
        return series

    def observe(self, value: float, **labels: str) -> None:
        self.bind(**labels).observe(value)

    def value(self, **labels: str) -> float:
        """The number of observations of a series (its ``_count``)."""
        series = self.series.get(self._key(labels))
        return float(sum(series.counts)) if series is not None else 0.0

    def dump(self) -> MetricDump:
        return {
            "kind": self.kind,
            "help": self.help,
            "labels": list(self.labels),
            "buckets": list(self.buckets),
            "series": [[list(key), list(s.counts), float(s.sum)] for key, s in self.series.items()],
        }


_REGISTRY: dict[str, _Metric] = {}
log = logging.getLogger("filtergate.metrics")


def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
    """The counter ``name``, created on first use (the same object afterwards)."""
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Counter(name, help, labels)
    assert isinstance(m, Counter), f"{name} is already a {m.kind}"
    return m


def gauge(name: str, help: str, labels: tuple[str, ...] = (), merge: GaugeMerge = "sum") -> Gauge:
    """The gauge ``name``, created on first use (the same object afterwards); ``merge``
    is how the values of several worker processes combine (see :class:`Gauge`)."""
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Gauge(name, help, labels, merge)
    assert isinstance(m, Gauge), f"{name} is already a {m.kind}"
    assert m.merge == merge, f"{name} already merges by {m.merge}, not {merge}"
    return m


def histogram(
    name: str, help: str, labels: tuple[str, ...] = (), buckets: Sequence[float] = ()
) -> Histogram:
    """The histogram ``name``, created on first use (the same object afterwards)."""
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Histogram(name, help, labels, buckets)
    assert isinstance(m, Histogram), f"{name} is already a {m.kind}"
    return m


_BEFORE_DUMP: list[Callable[[], None]] = []


def before_dump(fn: Callable[[], None]) -> None:
    """Have ``fn`` bring gauges up to date before each :func:`dump`, for a state that
    changes with time alone (a target whose ejection ran out is back in rotation)."""
    _BEFORE_DUMP.append(fn)


def dump() -> dict[str, MetricDump]:
    """This process's metrics as plain data, by name (what a worker sends the main one)."""
    for fn in _BEFORE_DUMP:
        fn()
    return {name: m.dump() for name, m in _REGISTRY.items()}


def merge(
    dumps: Iterable[Mapping[str, MetricDump]], *, gauges: bool = True
) -> dict[str, MetricDump]:
    """The metrics of several processes as one: counters and histograms summed, each
    gauge combined by its ``merge``. ``gauges=False`` leaves gauges out (the dumps of
    processes that are gone: what they counted still counts, their state does not).

    The first dump that has a metric defines it; a later one whose kind, labels or
    buckets differ (a plugin of another version) is left out of that metric.
    """
    out: dict[str, MetricDump] = {}
    values: dict[str, dict[tuple[str, ...], Any]] = {}
    for one in dumps:
        for name, m in one.items():
            kind = m["kind"]
            if kind == "gauge" and not gauges:
                continue
            first = out.get(name)
            if first is None:
                first = out[name] = {k: v for k, v in m.items() if k not in ("values", "series")}
                acc = values[name] = {}
            elif any(first.get(k) != m.get(k) for k in ("kind", "labels", "buckets", "merge")):
                continue
            else:
                acc = values[name]
            if kind == "histogram":
                for key, counts, total in m["series"]:
                    k = tuple(key)
                    seen = acc.get(k)
                    if seen is None:
                        acc[k] = [list(counts), total]
                    else:
                        seen[0] = [a + b for a, b in zip(seen[0], counts, strict=True)]
                        seen[1] += total
                continue
            combine = _COMBINE[m.get("merge", "sum")]
            for key, v in m["values"]:
                k = tuple(key)
                acc[k] = v if k not in acc else combine(acc[k], v)
    for name, m in out.items():
        acc = values[name]
        if m["kind"] == "histogram":
            m["series"] = [[list(k), counts, total] for k, (counts, total) in acc.items()]
        else:
            m["values"] = [[list(k), v] for k, v in acc.items()]
    return out


def _add(a: float, b: float) -> float:
    return a + b


_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": _add, "min": min, "max": max}


def render_dumps(metrics: Mapping[str, MetricDump]) -> bytes:
    """``metrics`` (from :func:`dump` or :func:`merge`) in the Prometheus text format."""
    lines: list[str] = []
    for name, m in metrics.items():
        lines.append(f"# HELP {name} {m['help']}")
        lines.append(f"# TYPE {name} {m['kind']}")
        labels: list[str] = m["labels"]
        if m["kind"] == "histogram":
            les = [f"{b:g}" for b in m["buckets"]] + ["+Inf"]
            for key, counts, total_sum in sorted(m["series"]):
                inner = "".join(
                    f'{k}="{_escape(val)}",' for k, val in zip(labels, key, strict=True)
                )
                total = 0
                for le, n in zip(les, counts, strict=True):
                    total += n
                    lines.append(f'{name}_bucket{{{inner}le="{le}"}} {total}')
                braced = f"{{{inner[:-1]}}}" if inner else ""
                lines.append(f"{name}_sum{braced} {_number(total_sum)}")
                lines.append(f"{name}_count{braced} {total}")
            continue
        for key, v in sorted(m["values"]):
            if key:
                inner = ",".join(
                    f'{k}="{_escape(val)}"' for k, val in zip(labels, key, strict=True)
                )
                lines.append(f"{name}{{{inner}}} {_number(v)}")
            else:
                lines.append(f"{name} {_number(v)}")
    return ("\n".join(lines) + "\n").encode()


def _number(v: float) -> str:
    """A sample value in full: ``g`` would show a counter past a million as ``3.7037e+06``
    (six digits), so that it moved only every tenth increment or so."""
    v = float(v)
    if v.is_integer():
        return str(int(v))
    if math.isfinite(v):
        return repr(v)
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")


def render() -> bytes:
    """Every metric of this process in the Prometheus text exposition format."""
    return render_dumps(dump())
