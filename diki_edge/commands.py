"""The training core's ``diki-edge`` commands: ``train``, ``eval`` and ``demo``.

Registered into the runtime's app (:mod:`diki_edge_runtime.cli`) through the ``diki_edge.commands`` entry-point
group; every command imports torch and the training modules inside its body, so ``diki-edge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.errors import DikiEdgeError
from rich.console import Console
from rich.markup import escape

from diki_edge.evaluation.command import eval_command

err = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Prompt template; {} is the class name."),
    seed: int = typer.Option(0),
    ridge: float = typer.Option(1e-7, help="Covariance ridge (a new bank only; a bank keeps its own)."),
    levels: int = typer.Option(9, min=2, help="Calibration levels G of the class text table (a new bank only)."),
    replace: bool = typer.Option(False, help="Retrain a task of the same name in place."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Learn one task from an image folder and append it to a bank (atomically)."""
    from diki_edge.train import TrainConfig, train_into_bank

    try:  # every setting is checked before anything is loaded
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, template=template, seed=seed, ridge=ridge,
                          levels=levels)
    except DikiEdgeError as exc:
        fail(str(exc), 2)
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


def register(app: typer.Typer) -> None:
    """Entry point of the ``diki_edge.commands`` group."""
    app.command("train")(train)
    app.command("eval")(eval_command)
    app.command("demo")(demo)
