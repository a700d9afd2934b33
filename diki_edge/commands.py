"""The training core's ``diki-edge`` commands: ``train`` and ``eval``.

Registered into the runtime's app (:mod:`diki_edge_runtime.cli`) through the ``diki_edge.commands`` entry-point
group; every command imports torch and the training modules inside its body, so ``diki-edge --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from diki_edge.evaluation.command import eval_command
from diki_edge_runtime import calibration as calib
from diki_edge_runtime.contract import DEFAULT_TEMPLATE
from diki_edge_runtime.errors import DikiEdgeError

err = Console(stderr=True)


def fail(exc: DikiEdgeError) -> None:
    """Print ``exc`` as one line and exit with its own status (2 for a usage error, 1 for a failed run)."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def train(
    bank: Path = typer.Option(..., help="Bank file to create or append the task to (safetensors)."),
    task: str = typer.Option(..., help="Name of the new task."),
    data: Path = typer.Option(..., help="Image folder: one sub-folder per class (or a classes.txt)."),
    model: str | None = typer.Option(None, help="open_clip model name, local-dir:PATH, or diki-tiny "
                                                   "(default; for an existing bank: the bank's backbone)."),
    pretrained: str | None = typer.Option(None, help="Pretrained tag (e.g. openai), a local checkpoint file, "
                                                        "or 'random'."),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(128, min=1),
    lr: float | None = typer.Option(None, help="SGD learning rate, cosine to lr*1e-3 (default: the reference's "
                                                  "5.0, or the backbone's recommendation: 50 for diki-tiny)."),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Prompt template; {} is the class name."),
    seed: int = typer.Option(0),
    ridge: float = typer.Option(1e-7, help="Covariance ridge (a new bank only; a bank keeps its own)."),
    levels: int = typer.Option(9, min=2, help="Calibration levels G of the class text table (a new bank only)."),
    calibration: str = typer.Option(calib.DEFAULT_METHOD, help=calib.METHOD_HELP),
    replace: bool = typer.Option(False, help="Retrain a task of the same name in place."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (under torchrun: each rank's own GPU)."),
    precision: str = typer.Option("fp32", help="Training precision: fp32, or bf16/fp16 autocast on CUDA "
                                               "(statistics and the text table stay fp32)."),
    workers: int | None = typer.Option(None, min=0, help="Image-decoding processes (default: 0 on the CPU, "
                                                            "up to 8 per GPU)."),
    checkpoint_every: int = typer.Option(0, min=0, help="Also checkpoint every N steps (always: every epoch)."),
    resume: bool = typer.Option(False, help="Continue the task from its checkpoint beside the bank."),
) -> None:
    """Learn one task from an image folder and append it to a bank (atomically).

    Streams the images; runs on the CPU or CUDA; under torchrun (``torchrun --nproc-per-node N -m diki_edge train
    ...``) on every process of the job, with the same result as one process."""
    from diki_edge.train import RunOptions, TrainConfig, train_into_bank

    try:  # every setting is checked before anything is loaded
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, template=template, seed=seed, ridge=ridge,
                          levels=levels, calibration=calibration)
    except DikiEdgeError as exc:
        fail(exc)
    options = RunOptions(device=device, precision=precision, workers=workers, checkpoint_every=checkpoint_every,
                         resume=resume)
    try:
        new_bank, report = train_into_bank(bank, data, task, model=model, pretrained=pretrained, cfg=cfg,
                                           replace=replace, quiet=quiet, options=options,
                                           on_device=lambda note: err.print(note, highlight=False))
    except DikiEdgeError as exc:
        fail(exc)
    if report.rank != 0:
        return
    msg = (f"task {report.task!r}: {report.samples} images, train accuracy {report.train_accuracy:.1%}, "
           f"{report.seconds:.1f}s on {report.device}"
           + (f" x {report.processes} processes" if report.processes > 1 else "")
           + (f", resumed at {report.resumed_from}" if report.resumed_from else "")
           + f" -> {bank} ({new_bank.num_tasks} tasks)")
    if report.skipped:
        msg += f"; skipped {report.skipped} unreadable images"
    err.print(msg, highlight=False)
    fitted = next(t for t in new_bank.tasks if t.name == report.task).calibration
    if report.warning:  # it says what the fallback note would, and what to do
        err.print(f"[yellow]warning:[/] {escape(report.warning)}", highlight=False, soft_wrap=True)
    elif fitted.note:
        err.print(f"note: task {report.task!r}: {escape(fitted.note)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Entry point of the ``diki_edge.commands`` group."""
    app.command("train")(train)
    app.command("eval")(eval_command)
