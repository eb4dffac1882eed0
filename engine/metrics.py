"""Process-wide counters, gauges and histograms, rendered in the Prometheus text format.

Plugins count events here (``counter("filtergate_jwt_failures_total", "...",
("reason",)).inc(reason="expired")``); the admin listener serves :func:`render`.
Metrics are created once (at import or config load) and incremented per request.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence

__all__ = [
    "BoundCounter",
    "BoundHistogram",
    "Counter",
    "Gauge",
    "Histogram",
    "counter",
    "gauge",
    "histogram",
    "render",
]


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

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, v in sorted(self.values.items()):
            if key:
                inner = ",".join(
                    f'{k}="{_escape(val)}"' for k, val in zip(self.labels, key, strict=True)
                )
                lines.append(f"{self.name}{{{inner}}} {v:g}")
            else:
                lines.append(f"{self.name} {v:g}")
        return lines


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def bind(self, **labels: str) -> BoundCounter:
        """This counter with its labels fixed once: ``inc()`` on a hot path is a dict add."""
        return BoundCounter(self.values, self._key(labels))


class BoundCounter:
    __slots__ = ("key", "values")

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self.values = values
        self.key = key
        values.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        self.values[self.key] += amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def add(self, amount: float, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount


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

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        les = [f"{b:g}" for b in self.buckets] + ["+Inf"]
        for key, series in sorted(self.series.items()):
            inner = "".join(
                f'{k}="{_escape(val)}",' for k, val in zip(self.labels, key, strict=True)
            )
            total = 0
            for le, n in zip(les, series.counts, strict=True):
                total += n
                lines.append(f'{self.name}_bucket{{{inner}le="{le}"}} {total}')
            labels = f"{{{inner[:-1]}}}" if inner else ""
            lines.append(f"{self.name}_sum{labels} {series.sum!r}")  # full precision
            lines.append(f"{self.name}_count{labels} {total}")
        return lines


_REGISTRY: dict[str, _Metric] = {}
_COLLECTORS: list[Callable[[], list[str]]] = []


def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
    """The counter ``name``, created on first use (the same object afterwards)."""
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Counter(name, help, labels)
    assert isinstance(m, Counter), f"{name} is already a {m.kind}"
    return m


def gauge(name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
    """The gauge ``name``, created on first use (the same object afterwards)."""
    m = _REGISTRY.get(name)
    if m is None:
        m = _REGISTRY[name] = Gauge(name, help, labels)
    assert isinstance(m, Gauge), f"{name} is already a {m.kind}"
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


def add_collector(fn: Callable[[], list[str]]) -> None:
    """Register a function producing extra exposition lines at render time."""
    _COLLECTORS.append(fn)


def render() -> bytes:
    """Every metric in the Prometheus text exposition format."""
    lines: list[str] = []
    for m in _REGISTRY.values():
        lines.extend(m.render())
    for fn in _COLLECTORS:
        lines.extend(fn())
    return ("\n".join(lines) + "\n").encode()
