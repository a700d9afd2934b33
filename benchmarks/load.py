"""Machine load around timed rounds: what other processes did to the cores while a figure was measured.

A figure is only as good as the machine was quiet. Before and after each block of timed rounds the suite reads

* the load averages (``/proc/loadavg``, or ``os.getloadavg``), and
* the CPU time every process *other than this one* used: the busy time of all cores (``/proc/stat``: user, nice,
  system, irq, softirq, steal — steal is time a hypervisor gave our cores to someone else) minus this process's
  own CPU time (``/proc/self/stat``: all its threads plus the children it has reaped) and that of its live
  descendants (e.g. the ``diki-edge serve`` child of the serve benchmark: its work is the measurement's own).

``other_cores`` = other processes' CPU seconds / wall seconds, the average number of cores they kept busy. The
load during the rounds is ``threads + other_cores``; a block is **contended** when that exceeds the usable cores
by more than :data:`TOLERANCE_CORES` (kernel threads and daemons of an idle machine), i.e. when other processes
took cores the measurement was using. Without ``/proc/stat`` the 1-minute load average at the end stands in for
the load (it includes the measurement's own threads, so it over-reports; a contended verdict is then cautious).

The load averages are recorded, never used for the verdict when ``/proc`` exists: they are a one-minute
exponential average that still remembers the previous measurement's own threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Cores other processes may keep busy on average before a block counts as contended: an idle Linux machine's
# kernel threads and daemons stay well below this; one other busy thread is far above it.
TOLERANCE_CORES = 0.15
PROC = Path("/proc")
_sleep = time.sleep  # module-level so tests can fake the passage of time


@dataclass(frozen=True)
class CpuReading:
    """One reading: monotonic time, load averages, all cores' busy seconds, this process's CPU seconds."""

    wall: float
    loadavg: tuple[float, float, float] | None
    busy_s: float | None  # None: no /proc/stat
    own_s: float | None


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):  # pragma: no cover (not POSIX)
        return 100


def parse_busy_seconds(stat_text: str, ticks: int) -> float:
    """All cores' busy seconds from the ``cpu`` line of ``/proc/stat`` (user nice system idle iowait irq softirq
    steal ...): everything but idle and iowait."""
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            busy = sum(fields[:8]) - fields[3] - fields[4]
            return busy / ticks
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def parse_own_seconds(self_stat_text: str, ticks: int) -> float:
    """utime + stime + cutime + cstime of ``/proc/self/stat`` (fields 14-17; the command name may hold spaces,
    so fields are counted after its closing parenthesis)."""
    rest = self_stat_text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state): fields 14..17 are rest[11..14]
    return sum(int(x) for x in rest[11:15]) / ticks


def parse_stat_fields(stat_text: str) -> tuple[int, float]:
    """(ppid, utime + stime in ticks) of one ``/proc/PID/stat``."""
    rest = stat_text.rsplit(")", 1)[1].split()
    return int(rest[1]), float(int(rest[11]) + int(rest[12]))


def descendants_seconds(proc: Path, root: int, ticks: int) -> float:
    """CPU seconds (utime + stime) of the live descendants of process ``root``, from every ``proc/PID/stat``
    (a process that exits between listing and reading is skipped: its time moves to its parent's cutime)."""
    parent, cpu = {}, {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent[int(entry.name)], cpu[int(entry.name)] = parse_stat_fields((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        total += cpu[pid]
        todo += children.get(pid, [])
    return total / ticks


def parse_loadavg(text: str) -> tuple[float, float, float]:
    a, b, c = text.split()[:3]
    return float(a), float(b), float(c)


def read_cpu(proc: Path | None = None) -> CpuReading:
    """A :class:`CpuReading` now (``proc``: a folder laid out like ``/proc``, default :data:`PROC`)."""
    proc = proc or PROC
    ticks = _clock_ticks()
    wall = time.monotonic()
    try:
        loadavg: tuple[float, float, float] | None = parse_loadavg((proc / "loadavg").read_text())
    except OSError:
        loadavg = tuple(os.getloadavg()) if hasattr(os, "getloadavg") else None  # type: ignore[assignment]
    try:
        busy = parse_busy_seconds((proc / "stat").read_text(), ticks)
        own = parse_own_seconds((proc / "self" / "stat").read_text(), ticks)
        own += descendants_seconds(proc, os.getpid(), ticks)
    except (OSError, ValueError, IndexError):
        busy = own = None
    return CpuReading(wall, loadavg, busy, own)


@dataclass(frozen=True)
class LoadWindow:
    """The machine's load over one block of timed rounds (readings before and after)."""

    before: CpuReading
    after: CpuReading
    threads: int  # threads the measurement ran on
    usable_cores: int

    @property
    def wall_s(self) -> float:
        return max(self.after.wall - self.before.wall, 1e-9)

    @property
    def other_cpu_s(self) -> float | None:
        """CPU seconds other processes used during the window (None without /proc)."""
        b, a = self.before, self.after
        if None in (b.busy_s, a.busy_s, b.own_s, a.own_s):
            return None
        return max((a.busy_s - b.busy_s) - (a.own_s - b.own_s), 0.0)  # type: ignore[operator]

    @property
    def other_cores(self) -> float | None:
        o = self.other_cpu_s
        return None if o is None else o / self.wall_s

    @property
    def load(self) -> float | None:
        """Cores demanded during the window: the measurement's threads plus what others kept busy."""
        if self.other_cores is not None:
            return self.threads + self.other_cores
        return self.after.loadavg[0] if self.after.loadavg else None

    @property
    def contended(self) -> bool:
        load = self.load
        return load is not None and load > self.usable_cores + TOLERANCE_CORES

    def describe(self) -> str:
        return describe_load(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {"contended": self.contended, "load": _r(self.load), "other_cores": _r(self.other_cores),
                "other_cpu_s": _r(self.other_cpu_s), "wall_s": _r(self.wall_s), "threads": self.threads,
                "usable_cores": self.usable_cores, "tolerance_cores": TOLERANCE_CORES,
                "loadavg_before": self.before.loadavg, "loadavg_after": self.after.loadavg,
                "all_cores_busy_s": [_r(self.before.busy_s), _r(self.after.busy_s)],
                "own_cpu_s": [_r(self.before.own_s), _r(self.after.own_s)],
                "source": "/proc/stat" if self.other_cores is not None else "loadavg"}


def describe_load(record: dict[str, Any]) -> str:
    """Table text of a :meth:`LoadWindow.to_json` record: ``quiet`` / ``CONTENDED`` and why."""
    la = record.get("loadavg_after")
    others = "" if record.get("other_cores") is None else f"others {record['other_cores']:.2f} cores, "
    loadavg = f"loadavg {la[0]:.2f}" if la else "no loadavg"
    return f"{'CONTENDED' if record['contended'] else 'quiet'} ({others}{loadavg})"


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


class LoadMeter:
    """Measures :class:`LoadWindow` s; ``read`` and ``sleep`` are injectable so tests can fake a machine (by
    default they are looked up when called: :func:`read_cpu` and ``time.sleep``)."""

    def __init__(self, threads: int, usable_cores: int, read: Callable[[], CpuReading] | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.threads = threads
        self.usable_cores = usable_cores
        self.read = read or (lambda: read_cpu())
        self.sleep = sleep or (lambda s: _sleep(s))

    def window(self, before: CpuReading) -> LoadWindow:
        return LoadWindow(before, self.read(), self.threads, self.usable_cores)

    def idle_window(self, seconds: float) -> LoadWindow:
        """The load while this process sleeps for ``seconds`` (what the machine does without us)."""
        before = self.read()
        self.sleep(seconds)
        return self.window(before)

    def wait_quiet(self, timeout_s: float, probe_s: float = 3.0) -> LoadWindow:
        """Probe the idle load until a probe is quiet; :class:`MachineBusy` once ``timeout_s`` would be passed
        (the wait never exceeds ``max(timeout_s, probe_s)``)."""
        probe_s = min(probe_s, max(timeout_s, 0.1))
        first: LoadWindow | None = None
        while True:
            w = self.idle_window(probe_s)
            first = first or w
            if not w.contended:
                return w
            if w.after.wall - first.before.wall + probe_s > timeout_s:
                raise MachineBusy(f"the machine stayed busy for {timeout_s:.0f} s: {w.describe()} with "
                                  f"{self.threads} threads on {self.usable_cores} usable cores")


class MachineBusy(RuntimeError):
    """``--require-quiet`` gave up waiting for a quiet machine."""
