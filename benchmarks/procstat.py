"""CPU time and memory of a server process and its descendants, from /proc (Linux).

CPU time is utime + stime of the process and of every live descendant (workers), plus
the cutime + cstime of children that already exited and were waited for. Peak memory
is VmHWM (the high-water mark of resident memory) of each process, summed over the
tree: with several workers, each has its own peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and its descendants."""
    ticks = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields is None:
            continue
        # After the command name: state=0, ppid=1, ..., utime=11, stime=12,
        # cutime=13, cstime=14 (fields 14-17 of proc(5), shifted by the 3 skipped).
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes(pid: int) -> int:
    """Sum over the tree of each process's peak resident memory (VmHWM)."""
    return sum(_status_kib(p, "VmHWM:") for p in descendants(pid)) * 1024


def rss_bytes(pid: int) -> int:
    """Sum over the tree of each process's current resident memory (VmRSS)."""
    return sum(_status_kib(p, "VmRSS:") for p in descendants(pid)) * 1024


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    peak_rss: int


def sample(pid: int) -> Usage:
    return Usage(cpu_seconds(pid), peak_rss_bytes(pid))
