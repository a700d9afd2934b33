"""``diki-edge eval``: the DCIL benchmark, every method side by side (typer-compatible, torch-free at import).

Wire it into the CLI with ``app.command("eval")(eval_command)``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from diki_edge_runtime.errors import DikiEdgeError

METHOD_HELP = "zero-shot, diki, diki-heldout, diki-vote, diki-no-calib, prompt-l2p, finetune, diki-onnx"


def eval_command(
    out: Path = typer.Option(Path("benchmarks/results"), help="Folder for NAME.json, NAME.md and NAME.png."),
    name: str = typer.Option("dcil", help="File stem of the reports."),
    order: list[str] | None = typer.Option(None, "--order",
                                              help="Task order(s) to run: A and/or B (default both)."),
    method: list[str] | None = typer.Option(None, "--method",
                                               help=f"Methods to compare (default all): {METHOD_HELP}."),
    quick: bool = typer.Option(False, "--quick", help="Reduced run: 2 epochs, <= 48 train / 32 test images per task."),
    model: str | None = typer.Option(None, help="Backbone (default: the bundled diki-tiny)."),
    pretrained: str | None = typer.Option(None, help="Pretrained tag or checkpoint for --model."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs per task for every method (default 10; quick 2)."),
    batch_size: int = typer.Option(32, min=1, help="Training batch size for every method."),
    vote_batch: int = typer.Option(32, min=1, help="Test batch size of DIKI's batch-voting variant."),
    diki_lr: float = typer.Option(50.0, help="SGD learning rate of DIKI (reference 5.0 is for ViT-B/16; see "
                                               "diki_edge.evaluation.runner.EvalConfig)."),
    finetune_lr: float = typer.Option(1e-4, help="AdamW learning rate of sequential full fine-tuning."),
    prompt_lr: float = typer.Option(0.03, help="Adam learning rate of the prompt baseline."),
    max_train: int | None = typer.Option(None, min=2, help="Cap on training images per task."),
    max_test: int | None = typer.Option(None, min=1, help="Cap on test images per task."),
    max_holdout: int | None = typer.Option(None, min=1, help="Cap on images per held-out set."),
    debian: bool = typer.Option(False, "--debian", help="Also use Debian's Fashion-MNIST as a held-out set."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch (and ONNX Runtime) threads. The small benchmark models gain "
                                               "nothing from intra-op threads; more threads are slower on a busy "
                                               "machine."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-task progress lines."),
) -> None:
    """Run the DCIL task sequence(s) for every method; report Transfer / Avg / Last, retention, cost."""
    from rich.console import Console

    err = Console(stderr=True)
    import time

    import torch

    from diki_edge.evaluation.report import summary_table, write_reports
    from diki_edge.evaluation.runner import EvalConfig, run_dcil

    torch.set_num_threads(threads)
    base = EvalConfig.quick_config() if quick else EvalConfig()
    overrides = {"threads": threads, "batch_size": batch_size, "vote_batch": vote_batch, "diki_lr": diki_lr,
                 "finetune_lr": finetune_lr, "prompt_lr": prompt_lr, "seed": seed, "include_debian": debian}
    if order:
        overrides["orders"] = list(order)
    if method:
        overrides["methods"] = list(method)
    if epochs is not None:
        overrides["epochs"] = epochs
    for k, v in (("max_train", max_train), ("max_test", max_test), ("max_holdout", max_holdout)):
        if v is not None:
            overrides[k] = v
    cfg = EvalConfig(**{**base.__dict__, **overrides})
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            err.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {msg}", highlight=False)

    try:
        results = run_dcil(cfg, model=model, pretrained=pretrained, log=log)
    except (DikiEdgeError, KeyError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1)
    prog = Path(sys.argv[0]).name
    prog = prog if prog == "diki-edge" else f"python {sys.argv[0]}"
    command = " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])
    paths = write_reports(results, out, name, command=command)
    console = Console()
    for o in results["orders"]:
        console.print(f"\nTask order {o}: " + " -> ".join(results["orders"][o]["tasks"]), highlight=False)
        console.print(summary_table(results, o), highlight=False, markup=False)
    for k, v in results.get("errors", {}).items():
        err.print(f"[yellow]warning:[/] {k}: {v}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)
