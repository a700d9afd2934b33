"""Cold start (process start to first prediction) and peak RSS: ``diki-edge predict`` vs the PyTorch path.

Runtime side: ``diki-edge predict IMAGE --model DIR --json --threads N`` (or, while the command is not yet
registered in ``diki_edge.cli``, the same ``predict_command`` through a two-line typer app, as the runtime's
tests do). PyTorch side: ``python -m benchmarks._torch_predict`` — load the backbone from a local safetensors
checkpoint, the bank, ``CalibratedDiki``, open_clip's transform. Both predict the same familiar image (both passes
run). Time = from ``Popen`` to the first JSON line on stdout; peak RSS = the child's own VmHWM, reported at exit
(``ru_maxrss`` would include this harness's RSS, inherited across fork + exec).
One untimed warm-up run each (page cache), then interleaved runs. A separate run of the command
with an import hook checks that the runtime never imports torch, torchvision or open_clip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from benchmarks.common import (
    REPO,
    Config,
    Timing,
    make_result,
    python_cmd,
    run_measured,
    under_load_watch,
    venv_script,
)
from benchmarks.world import get_world

NAME = "cold_start"
TITLE = "cold start and peak RSS: diki-edge predict (torch-free) vs the PyTorch path"
TARGET = "report; runtime must not import torch; runtime peak RSS lower"

TYPER_APP = textwrap.dedent("""
    import sys, typer
    from diki_edge_runtime.cli_predict import predict_command
    app = typer.Typer(add_completion=False)
    app.command()(predict_command)
    app(prog_name="diki-edge predict")
""")
IMPORT_CHECK = textwrap.dedent("""
    import sys, json, atexit
    def _report():
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip"))
        sys.stderr.write("IMPORTED-HEAVY " + json.dumps(bad[:10]) + "\\n")
    atexit.register(_report)
""")


CONSOLE_SCRIPT = textwrap.dedent("""
    import sys
    from diki_edge_runtime.cli import main
    sys.argv[0] = "diki-edge"
    sys.exit(main())
""")


def runtime_command() -> tuple[str, list[str], str]:
    """(code for ``python -c``, leading args, description): the ``diki-edge`` console script's own body when
    ``predict`` is registered, else the runtime's ``predict_command`` in a bare typer app."""
    exe = venv_script("diki-edge")
    probe = subprocess.run([exe, "predict", "--help"], capture_output=True, text=True, cwd=REPO)
    if probe.returncode == 0:
        return CONSOLE_SCRIPT, ["predict"], "diki-edge predict"
    return TYPER_APP, [], "predict_command via typer (diki-edge predict not registered yet)"


def measure(cfg: Config) -> dict[str, Any]:
    from PIL import Image

    model = cfg.reference_model
    w = get_world(cfg, model)
    model_dir = w.exported("fp32")
    image = w.dir / "familiar0.png"
    Image.fromarray(w.familiar[0]).save(image)
    checkpoint = "-" if model.startswith("local-dir:") else str(w.checkpoint())
    code, lead, how = runtime_command()
    rt_args = lead + [str(image), "--model", str(model_dir), "--json", "--quiet", "--threads", str(cfg.n_threads)]
    rt_cmd = python_cmd(code, *rt_args)
    pt_cmd = python_cmd("import runpy; runpy.run_module('benchmarks._torch_predict', run_name='__main__')",
                        model, checkpoint, str(w.bank_path), str(cfg.n_threads), str(image))
    env = {"HF_HUB_OFFLINE": "1"}
    reps = 0 if cfg.tiny else max(cfg.slow_repeats, 1)
    first_timed = 0 if cfg.tiny else 1

    def timed_runs() -> dict[str, list]:
        runs: dict[str, list] = {"runtime": [], "pytorch": []}
        for i in range(first_timed, reps + 1):  # run 0: warm-up (page cache); none in --tiny
            for side, cmd in (("runtime", rt_cmd), ("pytorch", pt_cmd)) if i % 2 == 0 else (
                    ("pytorch", pt_cmd), ("runtime", rt_cmd)):
                r = run_measured(cmd, env=env)
                if r.returncode != 0 or r.first_line_s is None:
                    raise RuntimeError(f"{side} command failed ({r.returncode}): {' '.join(cmd)}\n"
                                       f"{r.stderr[-3000:]}")
                if i or cfg.tiny:
                    runs[side].append(r)
        return runs

    runs, window = under_load_watch(timed_runs)  # the children's CPU time is ours (reaped), not "others"
    preds = {s: json.loads(runs[s][-1].stdout.splitlines()[0]) for s in runs}
    # does the runtime import torch? (the same command with an import report at exit)
    chk_cmd = [sys.executable, "-c", IMPORT_CHECK + code, *rt_args]
    chk = run_measured(chk_cmd, env=env)
    heavy = None
    for line in chk.stderr.splitlines():
        if line.startswith("IMPORTED-HEAVY "):
            heavy = json.loads(line.split(" ", 1)[1])
    first = {s: Timing([r.first_line_s for r in runs[s]], window) for s in runs}
    total = {s: Timing([r.total_s for r in runs[s]], window) for s in runs}
    rss = {s: [r.peak_rss_mib for r in runs[s]] for s in runs}
    rss_med = {s: sorted(v)[len(v) // 2] for s, v in rss.items()}
    rows = []
    for s in ("runtime", "pytorch"):
        rows.append({
            "path": how if s == "runtime" else "PyTorch (checkpoint -> CalibratedDiki)",
            "to first prediction": first[s].fmt(1, "s"), "process total": total[s].fmt(1, "s"),
            "peak RSS": f"{rss_med[s]:.0f} MiB ({min(rss[s]):.0f}–{max(rss[s]):.0f})",
            "imports torch": ("no" if heavy == [] else f"YES {heavy}" if heavy else "?") if s == "runtime" else "yes",
            "prediction": f"{preds[s]['task']}, M={preds[s]['weight']:.3f}, {preds[s]['top_k'][0]['class']}",
            "met": None,
            "data": {"first_line": first[s].to_json(), "total": total[s].to_json(), "peak_rss_mib": rss[s]},
        })
    speed = first["pytorch"].median / first["runtime"].median
    rss_ratio = rss_med["pytorch"] / rss_med["runtime"]
    rows.append({"path": "runtime vs PyTorch", "to first prediction": f"{speed:.1f}x faster",
                 "process total": "", "peak RSS": "", "imports torch": "must be no",
                 "prediction": "same task/top-1" if (preds["runtime"]["task"] == preds["pytorch"]["task"] and
                                                     preds["runtime"]["top_k"][0]["class"] ==
                                                     preds["pytorch"]["top_k"][0]["class"]) else "DIFFERENT",
                 "met": heavy == [], "data": {"speedup": speed, "heavy_imports": heavy}})
    rows.append({"path": "peak RSS", "to first prediction": "", "process total": "",
                 "peak RSS": f"runtime {rss_ratio:.1f}x lower", "imports torch": "", "prediction": "",
                 "met": rss_med["runtime"] < rss_med["pytorch"], "data": {"rss_ratio": rss_ratio}})
    notes = [f"{model}; {len(runs['runtime'])} timed cold starts per side after one warm-up, interleaved",
             f"runtime command: {how} {' '.join(rt_args[len(lead):])}",
             "peak RSS: VmHWM of the child itself, reported at exit"]
    cols = ["path", "to first prediction", "process total", "peak RSS", "imports torch", "prediction"]
    return make_result(NAME, TITLE, TARGET, cols, rows, notes, extra={"model": model})


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
