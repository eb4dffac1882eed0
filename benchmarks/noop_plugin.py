"""Ten filters that do nothing: the per-filter overhead of the chain, measured.

Registered for the ``noop-10`` scenario through a bare dist-info on PYTHONPATH (see
:func:`benchmarks.scenarios.noop_distribution`); never installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.chain import Filter, Stage
from engine.plugins import hookimpl

COUNT = 10


@dataclass(frozen=True)
class NoopConfig:
    pass


def _make(index: int) -> type[Any]:
    stages = (Stage.EDGE, Stage.AUTHENTICATE, Stage.LIMIT, Stage.TRANSFORM)

    def on_request(self: Any, exchange: Any) -> None:
        return None

    return type(
        f"Noop{index}",
        (Filter,),
        {
            "name": f"bench-noop-{index}",
            "stage": stages[index % len(stages)],
            "Config": NoopConfig,
            "on_request": on_request,
            "__module__": __name__,
        },
    )


NOOPS = [_make(i) for i in range(COUNT)]


@hookimpl
def filtergate_filters() -> list[type[Any]]:
    return list(NOOPS)
