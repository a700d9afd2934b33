"""Writing evaluation results: a markdown report, the JSON record, and a PNG heatmap of the accuracy matrices.

Torch-free (numpy + matplotlib with the Agg backend, imported on use).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def summary_rows(results: dict[str, Any], order: str) -> list[dict[str, Any]]:
    rows = []
    for key, rec in results["orders"][order]["methods"].items():
        r = rec["retention"]
        rows.append({
            "method": results["methods"][key]["title"], "key": key,
            "transfer": rec["transfer"], "avg": rec["avg"], "last": rec["last"],
            "retention_before": r["mean_before"], "retention_after": r["mean_after"],
            "untouched_before": r["untouched_before"], "untouched_after": r["untouched_after"],
            "params_per_task": rec["trainable_parameters"]["per_task"],
            "params_total": rec["trainable_parameters"]["total"],
            "train_seconds": rec["train_seconds"], "train_shared": rec["train_shared"],
            "inference_ms": rec["inference_ms_per_image"],
        })
    return rows


def summary_table(results: dict[str, Any], order: str) -> str:
    head = ("| method | Transfer | Avg | Last | held-out zero-shot before → after (all sets) | untouched sets "
            "before → after | trainable params / task | total | train s | infer ms / image |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in summary_rows(results, order):
        shared = "*" if r["train_shared"] else ""
        lines.append(
            f"| {r['method']} | {_f(r['transfer'])} | {_f(r['avg'])} | {_f(r['last'])} | "
            f"{_f(r['retention_before'])} → {_f(r['retention_after'])} | "
            f"{_f(r['untouched_before'])} → {_f(r['untouched_after'])} | {_params(r['params_per_task'])} | "
            f"{_params(r['params_total'])} | {_f(r['train_seconds'])}{shared} | {_f(r['inference_ms'], 2)} |")
    return head + "\n".join(lines) + "\n"


def matrix_table(results: dict[str, Any], order: str, key: str) -> str:
    rec = results["orders"][order]["methods"][key]
    tasks = results["orders"][order]["tasks"]
    head = "| after \\ on | " + " | ".join(tasks) + " |\n|---|" + "---:|" * len(tasks) + "\n"
    rows = []
    for t, row in enumerate(rec["matrix"]):
        rows.append(f"| {tasks[t]} | " + " | ".join(_f(v) for v in row) + " |")
    return head + "\n".join(rows) + "\n"


def holdout_table(results: dict[str, Any], order: str) -> str:
    recs = results["orders"][order]["methods"]
    before = results["retention_before"]
    names = list(before)
    untouched = set(results["orders"][order].get("untouched_holdouts", []))
    head = ("| method | " + " | ".join(f"{n}{'' if n in untouched else ' (†)'}" for n in names) + " |\n|---|"
            + "---:|" * len(names) + "\n")
    rows = ["| frozen backbone (before) | " + " | ".join(_f(before[n]) for n in names) + " |"]
    for key, rec in recs.items():
        rows.append(f"| {results['methods'][key]['title']} | "
                    + " | ".join(_f(rec["retention_after"].get(n)) for n in names) + " |")
    return head + "\n".join(rows) + "\n"


def claims(results: dict[str, Any], order: str) -> list[tuple[str, str, bool | None]]:
    """The paper's claims, checked on one order's numbers: ``(claim, evidence, holds)``."""
    m = results["orders"][order]["methods"]
    out: list[tuple[str, str, bool | None]] = []
    if "zero-shot" not in m or "diki" not in m:
        return out
    zs, dk = m["zero-shot"], m["diki"]
    out.append(("DIKI Transfer >= zero-shot Transfer - 2",
                f"{_f(dk['transfer'])} vs {_f(zs['transfer'])} - 2", dk["transfer"] >= zs["transfer"] - 2))
    for key in ("prompt-l2p", "finetune"):
        if key in m:
            drop_b = zs["transfer"] - m[key]["transfer"]
            drop_d = zs["transfer"] - dk["transfer"]
            out.append((f"{key} loses clearly more Transfer than DIKI (>= 5 points below zero-shot and >= 2 more "
                        "than DIKI)", f"drop {_f(drop_b)} vs DIKI's {_f(drop_d)}",
                        drop_b >= 5 and drop_b >= drop_d + 2))
    out.append(("DIKI Last far above zero-shot Last", f"{_f(dk['last'])} vs {_f(zs['last'])}",
                dk["last"] > zs["last"] + 10))
    others = {k: v["avg"] for k, v in m.items() if not k.startswith("diki")}
    above = [k for k, v in others.items() if dk["avg"] > v]
    out.append(("DIKI Avg above every baseline but at most one",
                f"{_f(dk['avg'])}; baselines " + ", ".join(f"{k} {_f(v)}" for k, v in others.items()),
                len(above) >= len(others) - 1))
    if "diki-no-calib" in m:
        nc = m["diki-no-calib"]
        out.append(("without calibration Transfer drops", f"{_f(nc['transfer'])} vs DIKI {_f(dk['transfer'])}",
                    nc["transfer"] < dk["transfer"]))
        out.append(("without calibration held-out (untouched) accuracy drops",
                    f"{_f(nc['retention']['untouched_after'])} vs DIKI {_f(dk['retention']['untouched_after'])}",
                    nc["retention"]["untouched_after"] < dk["retention"]["untouched_after"]))
    if "diki-heldout" in m:  # every task refitted to its held-out law, against the tasks as trained (the default)
        ho, r, rh = m["diki-heldout"], dk["retention"], m["diki-heldout"]["retention"]
        loss, loss_h = r["untouched_before"] - r["untouched_after"], rh["untouched_before"] - rh["untouched_after"]
        out.append(("held-out calibration: untouched held-out loss <= 2 points (the default's in brackets)",
                    f"{_f(loss_h)} ({_f(loss)})", loss_h <= 2))
        out.append(("held-out calibration: Last within 1 point of the default's",
                    f"{_f(ho['last'])} vs {_f(dk['last'])}", ho["last"] >= dk["last"] - 1))
        out.append(("held-out calibration: Transfer no lower than the default's",
                    f"{_f(ho['transfer'])} vs {_f(dk['transfer'])}", ho["transfer"] >= dk["transfer"]))
    if "diki-vote" in m:
        vt = m["diki-vote"]
        out.append(("(report) batch voting vs per-sample Last", f"{_f(vt['last'])} vs {_f(dk['last'])}", None))
    return out


def markdown(results: dict[str, Any], command: str | None = None) -> str:
    bench = results.get("benchmark", {})
    cfg = bench.get("config", {})
    out = ["# DCIL benchmark results", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    if bench:
        bb = bench.get("backbone", {})
        out += [f"Backbone: `{bb.get('model')}` ({bb.get('pretrained')}, weights sha256 "
                f"`{str(bb.get('weights_sha256', ''))[:12]}`). Training budget for every method and task: "
                f"{cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, seed {cfg.get('seed')}"
                f"{' (QUICK reduced run)' if cfg.get('quick') else ''}. Total wall time "
                f"{results.get('seconds_total')} s on {bench.get('torch_threads')} torch threads.", ""]
        out += ["Tasks: " + ", ".join(f"`{t['name']}` ({t['classes']} classes, {t['train']} train / {t['test']} test)"
                                      for t in bench.get("tasks", [])), ""]
    out += ["Accuracies in %. Transfer / Avg / Last as in MTIL: Transfer = mean over tasks j ≥ 2 of "
            "the mean of A[t, j] for t < j; Avg = mean of the whole matrix; Last = mean of the final row. "
            "Held-out = zero-shot accuracy on held-out images of the backbone's pretraining domains, before the "
            "sequence (frozen backbone) and after it; 'untouched sets' are the held-out sets none of whose classes "
            "belongs to a benchmark task. `*` = training shared with another entry (tasks are independent: each "
            "task is trained once and reused by the DIKI variants and across task orders; the time shown is what "
            "training these tasks costs). Inference time: the final model (all tasks), fixed test images, batch "
            f"{cfg.get('timing_batch', '?')}, preprocessing excluded, {cfg.get('threads') or 'default'} thread(s).", ""]
    for order, rec in results["orders"].items():
        out += [f"## Task order {order}: " + " → ".join(rec["tasks"]), "", summary_table(results, order)]
        checks = claims(results, order)
        if checks:
            out += ["Claims of the paper on this order:", ""]
            out += [f"* {c}: {e} — " + ("holds" if ok else "does NOT hold" if ok is not None else "see text")
                    for c, e, ok in checks]
            out.append("")
        if "onnx_parity" in rec:
            p = rec["onnx_parity"]
            out += [f"ONNX vs PyTorch DIKI (per-sample): {p['differing_predictions']} differing predictions out of "
                    f"{p['images']} (every cell and held-out set); max |ΔA| = {p['max_abs_matrix_difference']:.4f}; "
                    f"metrics equal: {p['metrics_equal']}.", ""]
        for key in rec["methods"]:
            out += [f"### {results['methods'][key]['title']} — accuracy matrix", "", matrix_table(results, order, key)]
            sel = rec["methods"][key].get("selection_accuracy")
            if sel:
                last = [v for v in sel[-1] if v is not None]
                out += ["Task-selection accuracy after the last task (learned tasks' test images): "
                        + ", ".join(f"{t} {_f(v)}" for t, v in zip(rec["tasks"], sel[-1])) +
                        f" (mean {_f(float(np.mean(last)))}).", ""]
            w = rec["methods"][key].get("holdout_mean_weight")
            if w:
                out += ["Mean calibration weight M on held-out images: "
                        + ", ".join(f"{n} {v:.3f}" for n, v in w.items()) + ".", ""]
        out += [f"### Held-out zero-shot accuracy after order {order}", "",
                "(†) = the set's classes are also a benchmark task's classes (learning helps it legitimately).", "",
                holdout_table(results, order)]
    out += ["## Protocols", ""]
    for key, m in results["methods"].items():
        out.append(f"* **{m['title']}** (`{key}`): {m['protocol']}.")
    if results.get("errors"):
        out += ["", "## Errors", ""] + [f"* {k}: {v}" for k, v in results["errors"].items()]
    return "\n".join(out) + "\n"


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(results), indent=2) + "\n", encoding="utf-8")
    return path


def heatmap(results: dict[str, Any], path: Path) -> Path:
    """One row of heatmaps per task order, one panel per method (A[t, j] in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(results["orders"])
    keys = [k for k in results["methods"] if any(k in results["orders"][o]["methods"] for o in orders)]
    fig, axes = plt.subplots(len(orders), len(keys), figsize=(2.9 * len(keys), 3.1 * len(orders)), squeeze=False)
    for r, order in enumerate(orders):
        rec = results["orders"][order]
        tasks = rec["tasks"]
        for c, key in enumerate(keys):
            ax = axes[r][c]
            if key not in rec["methods"]:
                ax.axis("off")
                continue
            m = rec["methods"][key]
            a = np.array(m["matrix"], dtype=float)
            ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
            for i in range(a.shape[0]):
                for j in range(a.shape[1]):
                    ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if a[i, j] < 60 else "black")
            ax.set_xticks(range(len(tasks)))
            ax.set_yticks(range(len(tasks)))
            ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=6)
            ax.set_yticklabels(tasks if c == 0 else [], fontsize=6)
            ax.set_title(f"{key} ({order})\nT {m['transfer']:.1f} / A {m['avg']:.1f} / L {m['last']:.1f}",
                         fontsize=7)
    fig.suptitle("Accuracy A[t, j] after learning task t (rows) on task j (columns), %", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_reports(results: dict[str, Any], out_dir: Path, stem: str = "dcil", command: str | None = None,
                  png: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(results, out_dir / f"{stem}.json")}
    paths["md"] = out_dir / f"{stem}.md"
    paths["md"].write_text(markdown(results, command), encoding="utf-8")
    if png:
        paths["png"] = heatmap(results, out_dir / f"{stem}.png")
    return paths
