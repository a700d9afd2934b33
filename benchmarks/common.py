"""Shared helpers of the benchmark suite: timing, machine description, subprocess measurements, results.

Timing rules (the machines are shared and noisy): every figure is the median of repeated runs after warm-up, and
min / median / max are always recorded. Two things that are compared are timed *side by side*, interleaved
(A, B, A, B, ...), so that a burst of load from another process hits both; the ratio reported is the ratio of the
medians (and the median of the per-round ratios is kept as a cross-check). Interleaving is not enough on a loaded
machine (a busy machine slows PyTorch's thread pool far more than ONNX Runtime's), so every block of rounds also
records the machine's load (:mod:`benchmarks.load`): a contended block marks its rows ``contended``, and such rows
never claim a target. With ``--require-quiet`` (:func:`configure_load`) a block waits for a quiet machine first
and is repeated when it was contended anyway; :class:`~benchmarks.load.MachineBusy` ends the wait.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.load import LoadMeter, LoadWindow, MachineBusy, describe_load

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1

# --------------------------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """What one run of the suite measures and how hard it tries."""

    models: list[str] = field(default_factory=lambda: ["ViT-B-16", "ViT-B-32"])
    reference_model: str = "ViT-B-16"
    tasks: int = 11
    classes: int = 100
    batches: list[int] = field(default_factory=lambda: [1, 8])
    task_counts: list[int] = field(default_factory=lambda: [1, 11, 50, 100])
    fit_images: int = 4  # images per task the Gaussian is fitted on (the "familiar" images)
    warmup: int = 1
    repeats: int = 5  # timed rounds per measurement (medians of these)
    slow_repeats: int = 3  # for measurements that take seconds each (re-export, text re-encoding, cold start)
    threads: int = 0  # 0: every core this process may use
    require_quiet: bool = False  # wait (bounded) for a quiet machine before each block of rounds, repeat contended
    quiet_timeout_s: float = 600.0  # the longest wait for a quiet machine before MachineBusy
    provider: str = "cpu"
    quick: bool = False
    tiny: bool = False
    cache_dir: Path = field(default_factory=lambda: Path(os.environ.get(
        "DIKI_BENCH_CACHE", Path.home() / ".cache" / "diki-edge" / "benchmarks")))
    out_dir: Path = RESULTS_DIR

    @property
    def n_threads(self) -> int:
        return self.threads or available_cores()

    @classmethod
    def full(cls, **kw) -> Config:
        return cls(**kw)

    @classmethod
    def quick_mode(cls, **kw) -> Config:
        base = dict(models=["ViT-B-32"], reference_model="ViT-B-32", task_counts=[1, 11, 100], fit_images=4,
                    warmup=1, repeats=3, slow_repeats=1, quick=True)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny_mode(cls, model_spec: str, **kw) -> Config:
        base = dict(models=[model_spec], reference_model=model_spec, task_counts=[1, 11, 20], fit_images=4,
                    warmup=1, repeats=2, slow_repeats=1, quick=True, tiny=True)
        base.update(kw)
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache_dir"] = str(self.cache_dir)
        d["out_dir"] = str(self.out_dir)
        d["n_threads"] = self.n_threads
        return d


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------- load
@dataclass
class LoadPolicy:
    """How timed blocks treat the machine's load (set once per run by :func:`configure_load`)."""

    meter: LoadMeter
    require_quiet: bool = False
    quiet_timeout_s: float = 600.0
    retries: int = 2  # extra tries of a contended block under require_quiet


LOAD = LoadPolicy(LoadMeter(threads=0, usable_cores=0))


def configure_load(cfg: Config, meter: LoadMeter | None = None) -> LoadPolicy:
    """Point the timing helpers at ``cfg``'s threads and quiet policy (``meter``: tests pass a fake one)."""
    global LOAD
    LOAD = LoadPolicy(meter or LoadMeter(cfg.n_threads, available_cores()), cfg.require_quiet, cfg.quiet_timeout_s)
    return LOAD


def _current_meter() -> LoadMeter:
    if LOAD.meter.threads == 0:  # never configured (a bench module run on its own): all usable cores
        LOAD.meter = LoadMeter(available_cores(), available_cores())
    return LOAD.meter


def under_load_watch(block: Callable[[], Any]) -> tuple[Any, LoadWindow]:
    """Run ``block`` (one block of timed rounds) and return its value with the load it ran under.

    Under ``require_quiet``: wait for a quiet machine first, and repeat a contended block up to ``retries`` times;
    a block still contended after that raises :class:`MachineBusy` (its figures would not be quiet ones).
    """
    meter = _current_meter()
    for _ in range(1 + (LOAD.retries if LOAD.require_quiet else 0)):
        if LOAD.require_quiet:
            meter.wait_quiet(LOAD.quiet_timeout_s)
        before = meter.read()
        value = block()
        window = meter.window(before)
        if not (LOAD.require_quiet and window.contended):
            return value, window
    raise MachineBusy(f"timed rounds stayed contended in {1 + LOAD.retries} tries: {window.describe()}")


# --------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of repeated runs (after warm-up); reported in milliseconds. ``load``: the machine's load over
    the block of rounds these samples came from (shared by every side of a side-by-side block)."""

    samples: list[float]
    load: LoadWindow | None = None

    @property
    def contended(self) -> bool:
        return bool(self.load and self.load.contended)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"unit": "ms", "n": len(self.samples), "min": self.min * 1e3, "median": self.median * 1e3,
                "max": self.max * 1e3, "samples": [round(s * 1e3, 4) for s in self.samples],
                "load": self.load.to_json() if self.load else None}

    def fmt(self, scale: float = 1e3, unit: str = "ms") -> str:
        """``median [min–max] unit``"""
        return f"{_num(self.median * scale)} [{_num(self.min * scale)}–{_num(self.max * scale)}] {unit}"


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def time_fn(fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()

    def rounds() -> list[float]:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return samples

    samples, window = under_load_watch(rounds)
    return Timing(samples, window)


def time_side_by_side(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Time several callables interleaved round by round (A, B, C, A, B, C, ...), after warm-up of each.

    The order within a round alternates (forward, then reversed) so neither side always runs right after the other.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()

    def rounds() -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append(time.perf_counter() - t0)
        return samples

    samples, window = under_load_watch(rounds)
    return {n: Timing(s, window) for n, s in samples.items()}


def ratio(a: Timing, b: Timing) -> dict[str, float]:
    """``a / b``: of the medians, plus the median/min/max of the per-round ratios (same round = same load)."""
    per_round = [x / y for x, y in zip(a.samples, b.samples) if y > 0]
    return {"of_medians": a.median / b.median, "round_median": statistics.median(per_round),
            "round_min": min(per_round), "round_max": max(per_round)}


# --------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": available_cores(),
        "memory_gib": _memory_gib(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for mod in ("numpy", "torch", "onnxruntime", "onnx", "open_clip"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception:
            info[f"{mod}_version"] = None
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        pass
    try:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cpus']} logical), "
            f"{m['memory_gib']} GiB; Python {m['python']}, torch {m['torch_version']}, "
            f"onnxruntime {m['onnxruntime_version']}, open_clip {m['open_clip_version']}; "
            f"load average at start {m['loadavg_at_start']}")


# --------------------------------------------------------------------------------------------- subprocesses
# Prepended to a child's ``python -c`` code: at exit, report the process's own peak RSS (VmHWM, KiB) on stderr.
# ``ru_maxrss`` from wait4 cannot be used for a child of this (large) process: Linux carries the parent's RSS
# high-water mark across fork + exec into the child's maxrss, so every child would look at least as big as us.
PEAK_RSS_HOOK = """
import atexit as _atexit, sys as _sys
def _diki_bench_peak():
    try:
        with open("/proc/self/status") as _fh:
            for _line in _fh:
                if _line.startswith("VmHWM:"):
                    _sys.stderr.write("PEAK-RSS-KIB " + _line.split()[1] + "\\n")
                    _sys.stderr.flush()
    except Exception:
        pass
_atexit.register(_diki_bench_peak)
"""


def python_cmd(code: str, *args: str) -> list[str]:
    """``[python, -c, PEAK_RSS_HOOK + code, *args]``: a Python child whose peak RSS :func:`run_measured` reads."""
    return [sys.executable, "-c", PEAK_RSS_HOOK + code, *args]


@dataclass
class ProcessRun:
    """One child process: wall time to its first stdout line and to exit, its own peak RSS (VmHWM reported by
    :data:`PEAK_RSS_HOOK` when the child ran with it, else ``wait4``'s ``ru_maxrss``, an upper bound)."""

    returncode: int
    first_line_s: float | None
    total_s: float
    peak_rss_mib: float
    stdout: str
    stderr: str


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 600) -> ProcessRun:
    """Start ``cmd``, time until its first stdout line and its exit, and read ITS peak RSS (not the suite's).

    Children started with :func:`python_cmd` report their own VmHWM; otherwise ``os.wait4``'s ``ru_maxrss`` of
    exactly that child is used (an upper bound: see :data:`PEAK_RSS_HOOK`).
    """
    import selectors

    full_env = {**os.environ, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env,
                            cwd=str(cwd or REPO))
    first: float | None = None
    out_chunks: list[bytes] = []
    err_chunks: list[bytes] = []
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    deadline = t0 + timeout
    while open_streams:
        if time.perf_counter() > deadline:
            proc.kill()
            break
        for key, _ in sel.select(timeout=1.0):
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            if key.data == "out":
                if first is None and b"\n" in data:
                    first = time.perf_counter() - t0
                out_chunks.append(data)
            else:
                err_chunks.append(data)
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = b"".join(err_chunks).decode(errors="replace")
    peak_kib = float(usage.ru_maxrss)
    kept = []
    for line in err.splitlines():
        if line.startswith("PEAK-RSS-KIB "):
            peak_kib = float(line.split()[1])
        else:
            kept.append(line)
    return ProcessRun(proc.returncode, first, total, peak_kib / 1024.0,
                      b"".join(out_chunks).decode(errors="replace"), "\n".join(kept))


def venv_script(name: str) -> str:
    """The console script ``name`` next to the running interpreter (the project's virtual environment)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


# --------------------------------------------------------------------------------------------- results
def make_result(name: str, title: str, target: str, columns: list[str], rows: list[dict[str, Any]],
                notes: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema every measurement returns (see tests/test_benchmarks.py).

    ``rows``: one dict per table row, with the ``columns`` as keys (display strings or numbers) plus ``met``
    (True / False / None = report only) and any raw figures under ``data``.

    Load: every row whose ``data`` holds a :meth:`Timing.to_json` gets ``load`` (table text) and ``contended``
    (True when any of its blocks of rounds was); the result is ``contended`` when any row is, and a ``load``
    column is added to the table.
    """
    for row in rows:
        windows = load_windows(row.get("data"))
        if windows:
            worst = max(windows, key=lambda w: (w["contended"], w["load"] or 0.0))
            row["contended"] = worst["contended"]
            row["load"] = describe_load(worst)
    if any("load" in r for r in rows) and "load" not in columns:
        columns = [*columns, "load"]
        for r in rows:
            r.setdefault("load", "")
    mets = [r.get("met") for r in rows if r.get("met") is not None]
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "title": title,
        "target": target,
        "columns": columns,
        "rows": rows,
        "met": (all(mets) if mets else None),
        "contended": any(r.get("contended") for r in rows),
        "notes": list(notes or []),
        **(extra or {}),
    }


def load_windows(data: Any) -> list[dict[str, Any]]:
    """Every load record (:meth:`LoadWindow.to_json`) inside a row's raw figures, however deeply nested."""
    found: list[dict[str, Any]] = []
    if isinstance(data, dict):
        load = data.get("load")
        if isinstance(load, dict) and "contended" in load:
            found.append(load)
        for k, v in data.items():
            if k != "load":
                found += load_windows(v)
    elif isinstance(data, (list, tuple)):
        for v in data:
            found += load_windows(v)
    return found


def claim(result: dict[str, Any]) -> str:
    """What a result may claim: ``met`` / ``missed`` / ``report``, or ``contended`` when a target was measured on
    a busy machine (its figures claim nothing either way)."""
    if result.get("met") is None:
        return "report"
    if result.get("contended"):
        return "contended"
    return "met" if result["met"] else "missed"


def write_result(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Timing):
        return o.to_json()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def mark(met: bool | None, contended: bool = False) -> str:
    if contended and met is not None:
        return "[yellow]contended: no claim[/yellow]"
    return "[green]met[/green]" if met else ("[dim]report[/dim]" if met is None else "[red]MISSED[/red]")


def render(result: dict[str, Any], console=None) -> None:
    """A rich table of one measurement."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{result['name']}: {result['title']}", title_justify="left",
                  caption=f"target: {result['target']}", caption_justify="left")
    for c in result["columns"]:
        table.add_column(c, no_wrap=False)
    table.add_column("target")
    for row in result["rows"]:
        table.add_row(*[str(row.get(c, "")) for c in result["columns"]], mark(row.get("met"), row.get("contended")))
    console.print(table)
    for n in result.get("notes", []):
        console.print(f"  [dim]• {n}[/dim]")


# --------------------------------------------------------------------------------------------- ONNX Runtime
def ort_session(model_path: Path | str, threads: int, provider: str = "cpu", opt_level: str = "all",
                profile_prefix: str | None = None, extra: dict[str, str] | None = None):
    """An ``InferenceSession`` configured like :class:`diki_edge_runtime.session.Session` (intra-op threads,
    one inter-op thread), with an optional graph-optimisation level and profiling."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = levels[opt_level]
    for k, v in (extra or {}).items():
        opts.add_session_config_entry(k, v)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)


def profile_ort(model_path: Path | str, feeds: dict[str, Any], threads: int, runs: int = 2,
                top: int = 12, opt_level: str = "all") -> dict[str, Any]:
    """Per-op-type and per-node time of ``runs`` runs (after one warm-up) from ONNX Runtime's own profiler."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ortprof-") as tmp:
        sess = ort_session(model_path, threads, opt_level=opt_level, profile_prefix=str(Path(tmp) / "p"))
        sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    by_type: dict[str, float] = {}
    by_node: dict[str, float] = {}
    run_total = 0.0
    for ev in trace:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            run_total += ev.get("dur", 0)
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        args = ev.get("args", {})
        op = args.get("op_name", "?")
        by_type[op] = by_type.get(op, 0.0) + ev.get("dur", 0)
        node = ev["name"][: -len("_kernel_time")]
        by_node[node] = by_node.get(node, 0.0) + ev.get("dur", 0)
    total = sum(by_type.values()) or 1.0
    # the first model_run in the trace is the warm-up
    per_run = lambda us: round(us / (runs + 1) / 1e3, 3)  # noqa: E731  (ms per run)
    return {
        "runs": runs + 1,
        "kernel_ms_per_run": per_run(total),
        "model_run_ms_per_run": per_run(run_total),
        "op_types": [{"op": k, "ms_per_run": per_run(v), "share": round(v / total, 4)}
                     for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]],
        "nodes": [{"node": k, "ms_per_run": per_run(v), "share": round(v / total, 4)}
                  for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]],
        "node_count": len(by_node),
    }


def profile_line(prof: dict[str, Any], n: int = 6) -> str:
    ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in prof["op_types"][:n])
    return f"{prof['kernel_ms_per_run']:.1f} ms kernel time per run over {prof['node_count']} nodes: {ops}"
