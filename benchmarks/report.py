"""``python -m benchmarks.report [RESULTS_DIR]``: the results JSON as Markdown tables (for the README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS_DIR, claim, machine_line

ORDER = ["latency", "calibration_overhead", "text_table", "reexport", "scaling", "cold_start", "int8", "roofline",
         "params"]


def markdown(folder: Path) -> str:
    out = []
    summary = folder / "summary.json"
    results = [r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "summary.json")
               if isinstance(r, dict) and "name" in r and "rows" in r]
    results.sort(key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else 99)
    if results:
        out.append(f"Machine: {machine_line(results[0]['machine'])}  ")
        out.append(f"Command: `{results[0].get('command', 'python -m benchmarks')}`"
                   + (f" ({json.loads(summary.read_text())['seconds']:.0f} s)" if summary.is_file() else "") + "\n")
    for r in results:
        if "rows" not in r:
            continue
        verdict = {"met": "met", "missed": "**missed**", "report": "report",
                   "contended": "**contended: no claim**"}[claim(r)]
        out.append(f"#### #{r.get('number', '?')} {r['title']} — target: {r['target']} — {verdict}\n")
        cols = r["columns"] + ["target"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in r["rows"]:
            met = {True: "met", False: "**missed**", None: ""}[row.get("met")]
            if row.get("contended") and row.get("met") is not None:
                met = "contended: no claim"
            cells = [str(row.get(c, "")).replace("|", "/") for c in r["columns"]] + [met]
            out.append("| " + " | ".join(cells) + " |")
        for n in r.get("notes", []):
            out.append(f"\n- {n}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
