"""``diki-edge export`` and ``diki-edge demo`` (train, export and predict end to end): typer commands added to the
``diki-edge`` app through the ``diki_edge.commands`` entry points.

Module-level imports stay light (no torch): the CLI imports this module to build its help text.
"""

from __future__ import annotations

from pathlib import Path

import typer

from diki_edge_runtime.contract import DEFAULT_OPSET, DEFAULT_SKIP_BELOW


def export_command(
    bank: Path = typer.Option(..., "--bank", help="task bank (.safetensors) to export with"),
    out: Path = typer.Option(..., "--out", help="output folder (model.onnx, bank, preprocess.json, manifest.json)"),
    precision: str = typer.Option("fp32", "--precision",
                                  help="fp32 | fp16 (encoder in float16, for the CUDA provider) | int8 "
                                       "(dynamic quantisation, for CPUs)"),
    force: bool = typer.Option(False, "--force", help="replace the output folder if it exists"),
    model: str | None = typer.Option(None, "--model",
                                        help="backbone to export (default: the one named in the bank)"),
    pretrained: str | None = typer.Option(None, "--pretrained",
                                             help="pretrained tag or checkpoint file (default: from the bank)"),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help=f"ONNX opset (>= {DEFAULT_OPSET})"),
    dynamo: bool = typer.Option(False, "--dynamo/--torchscript",
                                help="exporter: torch.export-based (dynamo) or the TorchScript tracer (default)"),
    skip_below: float = typer.Option(DEFAULT_SKIP_BELOW, "--skip-below",
                                     help="images whose calibrated M is below this skip the second encoder pass"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors"),
) -> None:
    """Export a bank and its backbone to one validated ONNX graph (bank arrays are graph inputs)."""
    from rich.console import Console
    from rich.markup import escape

    from diki_edge_runtime.errors import DikiEdgeError

    err = Console(stderr=True, highlight=False)
    try:
        from diki_edge_export.exporter import export_model

        export_model(bank, out, model=model, pretrained=pretrained, precision=precision, force=force, opset=opset,
                     dynamo=dynamo, skip_below=skip_below, quiet=quiet)
    except DikiEdgeError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(code=1) from None


def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for the data, bank, model and samples (replaced)."),
    order: str = typer.Option("A", help="DCIL task order (A or B)."),
    epochs: int = typer.Option(10, min=1),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Learn the DCIL tasks on the bundled backbone, export, predict held-out images, print the table."""
    from rich.console import Console
    from rich.markup import escape

    from diki_edge_export.demo import run_demo
    from diki_edge_runtime.errors import DikiEdgeError

    try:
        run_demo(out, order=order, epochs=epochs, quiet=quiet)
    except DikiEdgeError as exc:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(code=1) from None


def register(app: typer.Typer) -> None:
    """Entry point of the ``diki_edge.commands`` group: adds ``export`` to the runtime's ``diki-edge`` app."""
    app.command("export")(export_command)
    app.command("demo")(demo)
