"""``python -m benchmarks [--quick | --tiny] [--only NAME ...] [--provider cpu|cuda] [--threads N] [--out DIR]``

Runs the suite's measurements (docs/benchmarks.md), prints one rich table per
measurement and a summary of targets met / missed, and writes ``<out>/<name>.json`` (default
``benchmarks/results/``) plus ``<out>/summary.json``, each with the machine description.

* ``--quick``: ViT-B/32 only, fewer repeats and task counts (<= 3 minutes on 2 cores once the cache is warm);
* ``--tiny``: the tiny test backbone of tests/conftest.py (the smoke test; figures are meaningless);
* ``--require-quiet``: wait (at most ``--quiet-timeout`` seconds) for a quiet machine before the run and before
  every block of timed rounds, repeat a block that was contended anyway, and fail (exit 3) when the machine stays
  busy. Without it, contended rows are still marked (``load`` column, ``contended`` in the JSON) and the summary
  claims no target from them (exit 0 unless a target was missed on quiet rounds);
* other engineers' scripts (``bench_skip_pass.py``, ``bench_bank_swap.py``, ``export_full_size.py``) run with
  ``--with-external`` or when named by ``--only``: through their ``run(quick: bool) -> dict`` if they have one,
  else as a subprocess with their own defaults (``--quick`` passed only if the script's ``--help`` offers it).
  They are not in the default run because they build their own banks and exports (minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    SCHEMA_VERSION,
    Config,
    available_cores,
    claim,
    configure_load,
    machine_info,
    machine_line,
    make_result,
    render,
    run_measured,
    write_result,
)
from benchmarks.load import LoadMeter, MachineBusy

EXIT_MISSED = 1
EXIT_BUSY = 3

# (name, module, issue-table number); the order of the run
OWN = [
    ("params", "benchmarks.bench_params", 9),
    ("latency", "benchmarks.bench_latency", 1),
    ("calibration_overhead", "benchmarks.bench_calibration_overhead", 2),
    ("text_table", "benchmarks.bench_text_table", 3),
    ("reexport", "benchmarks.bench_reexport", 4),
    ("scaling", "benchmarks.bench_scaling", 5),
    ("cold_start", "benchmarks.bench_cold_start", 6),  # also the peak RSS
    ("int8", "benchmarks.bench_int8", 8),
    ("roofline", "benchmarks.bench_roofline", 10),
    ("peers", "benchmarks.bench_peers", 21),  # fastest validated runtime path vs PyTorch's fastest and OpenVINO
    ("throughput", "benchmarks.bench_throughput", 13),  # decode pool, fast decode
    ("throughput_vit", "benchmarks.bench_throughput_vit", 13),  # ViT-B/16, low memory
    ("train", "benchmarks.bench_train", 11),  # streamed vs in-memory training, gloo, CUDA fp32/bf16
    ("labels", "benchmarks.bench_labels", 12),  # labels at prediction time, encode_text, label cache
    ("serve", "benchmarks.bench_serve", 20),  # diki-edge serve: batching, overload, reload under load, idle unload
    ("train_memory", "benchmarks.bench_train_memory", 19),  # training peak RSS flat in the number of images
    ("open_world", "benchmarks.bench_open_world", 22),  # M on learned vs unfamiliar domains, per calibration
]
# Scripts other engineers own; included when present. Not run in --tiny mode (they pick their own backbones).
EXTERNAL = [
    ("skip_pass", "bench_skip_pass.py"),
    ("bank_swap_runtime", "bench_bank_swap.py"),
    ("export_full_size", "export_full_size.py"),
    ("hostile_images", "bench_hostile_images.py"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="ViT-B/32 only, fewer repeats (<= 3 min)")
    mode.add_argument("--tiny", action="store_true", help="tiny random backbone: smoke test of the harness")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this measurement (repeatable): " + ", ".join(n for n, _, _ in OWN)
                    + ", " + ", ".join(n for n, _ in EXTERNAL))
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="threads for ONNX Runtime and PyTorch (0: all usable)")
    ap.add_argument("--require-quiet", action="store_true",
                    help="wait for a quiet machine before each block of rounds; fail (exit 3) if it stays busy")
    ap.add_argument("--quiet-timeout", type=float, default=600.0, metavar="S",
                    help="longest wait for a quiet machine with --require-quiet (default 600 s)")
    ap.add_argument("--model", action="append", default=[], help="backbone(s) instead of the default ones")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS_DIR})")
    ap.add_argument("--cache", type=Path, default=None, help="cache folder for banks and exports")
    ap.add_argument("--with-external", action="store_true", help="also run the other engineers' scripts")
    ap.add_argument("--list", action="store_true", help="list the measurements and exit")
    return ap.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    kw: dict[str, Any] = {"threads": args.threads, "provider": args.provider,
                          "require_quiet": args.require_quiet, "quiet_timeout_s": args.quiet_timeout}
    if args.cache is not None:
        kw["cache_dir"] = args.cache
    if args.tiny:
        from benchmarks.world import tiny_model_dir

        cache = args.cache or Path(Config().cache_dir)
        spec = f"local-dir:{tiny_model_dir(cache)}"
        cfg = Config.tiny_mode(spec, **kw)
    elif args.quick:
        cfg = Config.quick_mode(**kw)
    else:
        cfg = Config.full(**kw)
    if args.model:
        cfg.models = list(args.model)
        cfg.reference_model = args.model[0]
    cfg.out_dir = args.out or (RESULTS_DIR / ("tiny" if args.tiny else "quick" if args.quick else ""))
    return cfg


def run_own(name: str, module: str, number: int, cfg: Config) -> dict[str, Any]:
    mod = importlib.import_module(module)
    result = mod.measure(cfg)
    result["number"] = number
    return result


def run_external(name: str, script: str, cfg: Config) -> dict[str, Any] | None:
    path = REPO / "benchmarks" / script
    if not path.is_file():
        return None
    modname = f"benchmarks.{path.stem}"
    t0 = time.perf_counter()
    mod = importlib.import_module(modname)
    if callable(getattr(mod, "run", None)):
        raw = mod.run(cfg.quick)
        how = f"{modname}.run(quick={cfg.quick})"
    else:
        import subprocess

        helptext = subprocess.run([sys.executable, "-m", modname, "--help"], capture_output=True, text=True,
                                  cwd=REPO).stdout
        cmd = [sys.executable, "-m", modname] + (["--quick"] if cfg.quick and "--quick" in helptext else [])
        proc = run_measured(cmd, timeout=1800)
        raw = {"returncode": proc.returncode, "stdout_tail": proc.stdout[-4000:], "stderr_tail": proc.stderr[-2000:]}
        how = " ".join(cmd[1:])
    if isinstance(raw, dict) and isinstance(raw.get("rows"), list) and "target" in raw:
        result = dict(raw)
        result.setdefault("schema_version", SCHEMA_VERSION)
        result.setdefault("name", name)
        result.setdefault("columns", sorted({k for r in raw["rows"] for k in r if k not in ("met", "data")}))
        result.setdefault("notes", [])
        result.setdefault("met", None)
        result.setdefault("title", name)
    else:
        rows = [{"key": k, "value": _short(v)} for k, v in (raw.items() if isinstance(raw, dict) else [])]
        result = make_result(name, f"{script} (owned by another engineer; reported as is)", "report",
                             ["key", "value"], rows, notes=[f"ran: {how}"], extra={"raw": raw})
    result["number"] = result.get("number", "ext")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= 120 else s[:117] + "..."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for n, m, num in OWN:
            print(f"#{num}\t{n}\t{m}")
        for n, s in EXTERNAL:
            print(f"ext\t{n}\tbenchmarks/{s}{'' if (REPO / 'benchmarks' / s).is_file() else ' (absent)'}")
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and CI: wide tables instead of 80-column wrapping
        console = Console(width=200)
    wanted = set(args.only)
    known = {n for n, _, _ in OWN} | {n for n, _ in EXTERNAL}
    unknown = wanted - known
    if unknown:
        console.print(f"[red]unknown measurement(s) {sorted(unknown)}; known: {sorted(known)}[/red]")
        return 2
    # what the machine does without us, before anything is built (bounded wait under --require-quiet)
    meter = LoadMeter(args.threads or available_cores(), available_cores())
    try:
        start_load = meter.wait_quiet(args.quiet_timeout) if args.require_quiet else meter.idle_window(1.0)
    except MachineBusy as exc:
        console.print(f"[red]--require-quiet: {exc}[/red]")
        return EXIT_BUSY
    cfg = build_config(args)
    configure_load(cfg, meter)
    machine = machine_info()
    machine["load_at_start"] = start_load.to_json()
    console.print(f"[bold]diki-edge benchmarks[/bold] ({'tiny' if cfg.tiny else 'quick' if cfg.quick else 'full'}) "
                  f"models {cfg.models}, {cfg.n_threads} threads, provider {cfg.provider}")
    console.print(f"[dim]machine: {machine_line(machine)}; idle probe: {start_load.describe()}[/dim]")
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    results: list[dict[str, Any]] = []
    busy = False
    t_all = time.perf_counter()
    jobs: list[tuple[str, Any]] = [(n, ("own", m, num)) for n, m, num in OWN if not wanted or n in wanted]
    if not cfg.tiny:
        jobs += [(n, ("ext", s)) for n, s in EXTERNAL if n in wanted or (args.with_external and not wanted)]
    for name, job in jobs:
        t0 = time.perf_counter()
        try:
            if job[0] == "own":
                result = run_own(name, job[1], job[2], cfg)
            else:
                result = run_external(name, job[1], cfg)
                if result is None:
                    continue
        except MachineBusy as exc:  # --require-quiet: the machine stayed busy; later figures would not be quiet
            console.print(f"[red]{name}: --require-quiet: {exc}[/red]")
            busy = True
            break
        except Exception as exc:  # one broken measurement must not lose the others
            console.print(f"[red]{name} failed: {type(exc).__name__}: {exc}[/red]")
            result = make_result(name, name, "(failed)", ["error"], [{"error": f"{type(exc).__name__}: {exc}",
                                                                       "met": False}],
                                 extra={"traceback": traceback.format_exc()})
            result["number"] = job[2] if job[0] == "own" else "ext"
        result.setdefault("seconds", round(time.perf_counter() - t0, 1))
        result["machine"] = machine
        result["config"] = cfg.to_json()
        result["command"] = command
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path = write_result(result, cfg.out_dir)
        render(result, console)
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        console.print(f"[dim]  ({result['seconds']} s) -> {shown}"
                      "[/dim]\n")
        results.append(result)

    summary = Table(title="summary: targets", title_justify="left")
    for col in ("name", "measurement", "target", "result", "s"):
        summary.add_column(col)
    styles = {"met": "[green]met[/green]", "missed": "[red]MISSED[/red]", "report": "[dim]report[/dim]",
              "contended": "[yellow]contended: no claim[/yellow]"}
    for r in results:
        summary.add_row(str(r.get("number", "")), r["title"], r["target"], styles[claim(r)],
                        str(r.get("seconds", "")))
    console.print(summary)
    total = round(time.perf_counter() - t_all, 1)
    claims = {r["name"]: claim(r) for r in results}
    missed = [n for n, c in claims.items() if c == "missed"]
    unclaimed = [n for n, c in claims.items() if c == "contended"]
    console.print(f"{len(results)} measurements in {total} s; "
                  + (f"[red]missed: {', '.join(missed)}[/red]" if missed else "[green]no target missed[/green]")
                  + (f"; [yellow]no target claimed from contended rounds: {', '.join(unclaimed)}[/yellow] "
                     "(re-run on a quiet machine: python -m benchmarks --require-quiet)" if unclaimed else ""))
    write_result({"schema_version": SCHEMA_VERSION, "name": "summary", "command": command, "seconds": total,
                  "machine": machine, "config": cfg.to_json(), "machine_busy": busy,
                  "results": [{"name": r["name"], "number": r.get("number"), "title": r["title"],
                               "target": r["target"], "met": r["met"], "contended": r.get("contended", False),
                               "claim": claims[r["name"]], "seconds": r.get("seconds")}
                              for r in results]}, cfg.out_dir)
    if busy:
        return EXIT_BUSY
    if cfg.tiny:
        console.print("[dim]--tiny: a smoke test of the harness; the figures and targets mean nothing here[/dim]")
        return 0
    return EXIT_MISSED if missed else 0


if __name__ == "__main__":
    sys.exit(main())
