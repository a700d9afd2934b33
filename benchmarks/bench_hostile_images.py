"""Peak memory of predicting hostile image sizes: each must cost < 300 MB peak RSS, predict or be too_large.

    python benchmarks/bench_hostile_images.py [--runtime PATH]

Each image is written and predicted in a fresh process (``Predictor`` on the committed golden model folder,
tests/runtime/golden/model, so ONNX Runtime is included in the figure); the process's peak RSS is its ``VmHWM``
(``ru_maxrss`` would include the parent's memory on Linux). ``--runtime`` puts another copy of the runtime
first on ``sys.path`` — e.g. ``git archive main runtime/diki_edge_runtime | tar -x -C /tmp/main`` and
``--runtime /tmp/main/runtime`` — to measure the code before a change in the same run.
Writes benchmarks/results/hostile_images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "tests" / "runtime" / "golden" / "model"
LIMIT_MB = 300
IMAGES = {  # table label -> the image MEASURE writes
    "300000x1 PNG (gray)": "wide",
    "1x300000 PNG (RGB)": "tall",
    "7000x7000 16-bit PNG": "deep",
}

MEASURE = """
import json, sys, time
import numpy as np
from PIL import Image
kind, path, model = sys.argv[1:4]
if kind == "wide":
    Image.new("L", (300000, 1), 128).save(path)
elif kind == "tall":
    Image.new("RGB", (1, 300000), (10, 200, 30)).save(path)
else:
    row = (np.arange(7000, dtype=np.uint32) * 9).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (7000, 7000)))).save(path)
from diki_edge_runtime.predictor import Predictor
predictor = Predictor(model)
start = time.perf_counter()
result = predictor.predict([path])[0]
seconds = time.perf_counter() - start
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({"peak_mb": int(status["VmHWM"].split()[0]) / 1024, "seconds": seconds, "ok": result.ok,
                  "kind": result.error_kind}))
"""


def measure(kind: str, runtime: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if runtime is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(runtime), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(Path(tmp) / f"{kind}.png"), str(MODEL)],
                              capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, runtime: Path | None = None) -> dict[str, Any]:
    from benchmarks.common import make_result

    rows = []
    for label, kind in IMAGES.items():
        m = measure(kind, runtime)
        met = "error" not in m and m["peak_mb"] < LIMIT_MB and (m["ok"] or m["kind"] == "too_large")
        rows.append({"image": label,
                     "peak RSS": "error" if "error" in m else f"{m['peak_mb']:.0f} MB",
                     "time": "" if "error" in m else f"{m['seconds']:.2f} s",
                     "result": m.get("error") or ("predicted" if m["ok"] else m["kind"]),
                     "met": met, "data": m})
    notes = [f"runtime: {runtime or 'the installed one'}; model: tests/runtime/golden/model (tiny backbone: the "
             "figures are the image path's plus ONNX Runtime's)"]
    return make_result("hostile_images", "Peak RSS of predicting hostile image sizes", f"< {LIMIT_MB} MB each",
                       ["image", "peak RSS", "time", "result"], rows, notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=Path, default=None, help="a runtime source folder to put first on sys.path")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks.common import render, write_result

    result = run(runtime=args.runtime)
    render(result)
    print(f"wrote {write_result(result, args.out)}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
