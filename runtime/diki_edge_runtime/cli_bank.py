"""``diki-edge bank show | merge | remove | rename | add-task | recalibrate``: inspect and edit task banks, torch-free.

Editing commands check that their output can be written (folder, permissions, free space for about the size
of their inputs) before loading anything, and write atomically (:mod:`diki_edge_runtime.files`). Names from a
bank are printed as text, never as rich markup. Errors are raised as :class:`DikiEdgeError` (a
:class:`UsageError` for a bad argument); ``cli.main`` prints them and exits with their status.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diki_edge_runtime import calibration as calib
from diki_edge_runtime import files
from diki_edge_runtime.errors import BankError, DikiEdgeError, UsageError

bank_app = typer.Typer(no_args_is_help=True,
                       help="Inspect and edit task banks (show, merge, remove, rename, add-task, recalibrate).")

out = Console()
err = Console(stderr=True)


def _check_output(output: Path, inputs: list[Path]) -> None:
    """Before any work: ``output`` can be written, with room for about the inputs' size."""
    from diki_edge_runtime.files import check_writable

    size = 0
    for p in inputs:
        try:
            size += p.stat().st_size
        except OSError:
            pass  # a missing input is reported by loading it, with its own message
    check_writable(output, size, what="bank")


def printable(text: str) -> str:
    from diki_edge_runtime.labels import printable as one_cell

    return one_cell(text)


def _load_bank(path: Path, repair: bool = False):
    """The bank at ``path``; ``repair`` (show, remove, rename) accepts the bad class names an older version wrote
    and names each such task once on stderr, so that the other tasks stay reachable and the bad one removable."""
    from diki_edge_runtime.bank import TaskBank

    bank = TaskBank.load(path, repair=repair)
    if repair:
        for task, problem in bank.name_problems().items():
            err.print(f"warning: {path}: task {task!r} has a class name this version refuses ({problem}); "
                      f"remove it with `diki-edge bank remove {path} {task}` and retrain it",
                      highlight=False, markup=False)
    return bank


@bank_app.command("show")
def bank_show(path: Path = typer.Argument(..., help="Bank file."),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Tasks, classes, sizes and backbone of a bank."""
    b = _load_bank(path, repair=True)
    info = b.describe()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    bb = info["backbone"]
    out.print(f"[bold]{escape(str(path))}[/]  format v{info['format_version']}  backbone "
              f"{escape(str(bb.get('model')))} ({escape(str(bb.get('pretrained')))}, sha256 "
              f"{escape(str(bb.get('weights_sha256'))[:12])})", highlight=False)
    out.print(f"adapted layers: image {info['adapted_layers']['image']}, text {info['adapted_layers']['text']}; "
              f"l = {info['residual_length']}; D = {info['embed_dim']}; "
              f"{info['trainable_parameters_per_task']:,} trainable parameters per task; "
              f"{info['bytes'] / 1e6:.2f} MB of arrays", highlight=False)
    table = Table("#", "task", "classes", "samples", "template", "calibration", "class names")
    for i, t in enumerate(info["tasks"]):
        names = ", ".join(map(printable, t["class_names"][:6])) + (" …" if len(t["class_names"]) > 6 else "")
        table.add_row(str(i), escape(printable(t["name"])), str(t["classes"]), str(t["samples"]),
                      escape(printable(t["template"])), escape(t["calibration"]), escape(names))
    out.print(table)


@bank_app.command("merge")
def bank_merge(output: Path = typer.Argument(..., help="Merged bank file to write."),
               inputs: list[Path] = typer.Argument(..., help="Banks to merge, in task order."),
               force: bool = typer.Option(False, help="Overwrite OUTPUT if it exists.")) -> None:
    """Merge banks trained separately on the same backbone into one (no retraining)."""
    if output.exists() and not force:
        raise BankError(f"{output} exists (use --force to overwrite)")
    _check_output(output, inputs)
    with files.locked(output):
        banks = [_load_bank(p) for p in inputs]
        merged = banks[0]
        for p, b in zip(inputs[1:], banks[1:]):
            try:
                merged = merged.merged(b)
            except DikiEdgeError as exc:
                raise BankError(f"{p} (merging into {inputs[0]}): {exc}") from None
        merged.save(output)
    err.print(f"{output}: {merged.num_tasks} tasks ({', '.join(merged.task_names)})", highlight=False, markup=False)


@bank_app.command("remove")
def bank_remove(path: Path = typer.Argument(...), task: str = typer.Argument(...),
                output: Path | None = typer.Option(None, "--out", help="Write here instead of in place.")) -> None:
    """Remove one task from a bank."""
    _check_output(output or path, [path])
    with files.locked(output or path):
        b = _load_bank(path, repair=True)  # read under the lock: a writer that just finished is seen
        try:
            b.without(task).save(output or path)
        except DikiEdgeError as exc:
            raise BankError(f"{path}: {exc}") from None
    err.print(f"removed task {task!r} -> {output or path}", highlight=False, markup=False)


@bank_app.command("rename")
def bank_rename(path: Path = typer.Argument(...), old: str = typer.Argument(...), new: str = typer.Argument(...),
                output: Path | None = typer.Option(None, "--out", help="Write here instead of in place.")) -> None:
    """Rename a task in a bank."""
    _check_output(output or path, [path])
    with files.locked(output or path):
        b = _load_bank(path, repair=True)  # read under the lock: a writer that just finished is seen
        try:
            b.renamed(old, new).save(output or path)
        except DikiEdgeError as exc:
            raise BankError(f"{path}: {exc}") from None
    err.print(f"renamed task {old!r} -> {new!r} in {output or path}", highlight=False, markup=False)


@bank_app.command("add-task")
def bank_add_task(path: Path = typer.Argument(..., help="Bank file (in a model folder, or pass --model)."),
                  name: str = typer.Argument(..., help="Name of the new task."),
                  images: list[str] = typer.Option(..., "--images", help="Example images: files, folders (recursed) "
                                                                        "or globs; repeat the option for more."),
                  labels: str | None = typer.Option(None, help="The task's labels, comma-separated."),
                  labels_file: Path | None = typer.Option(None, help="The task's labels, one per line."),
                  template: str | None = typer.Option(None, help="Prompt template; {} is the label "
                                                                    "[default: 'a photo of a {}.']."),
                  model: Path | None = typer.Option(None, help="Exported model folder [default: the folder the "
                                                                  "bank is in]."),
                  output: Path | None = typer.Option(None, "--out", help="Write here instead of in place."),
                  threads: int | None = typer.Option(None, min=1, help="ONNX Runtime intra-op threads."),
                  calibration: str = typer.Option(calib.DEFAULT_METHOD, help=calib.METHOD_HELP)) -> None:
    """Add a label-only task without training or torch: V_r = 0, the labels' frozen text embeddings as its class
    table, a Gaussian fitted to the frozen embeddings of the example images. `diki-edge train --replace` can
    later swap in a trained task of the same name."""
    from diki_edge_runtime.cli_predict import Unmatched, expand_inputs
    from diki_edge_runtime.label_task import add_label_task
    from diki_edge_runtime.labels import parse_labels, read_labels_file

    _check_output(output or path, [path])  # before any image is encoded
    try:
        if (labels is None) == (labels_file is None):
            raise ValueError("give the task's labels with --labels or --labels-file (one of them)")
        label_list = parse_labels(labels) if labels is not None else read_labels_file(labels_file)
        entries = expand_inputs(images)
        paths = [e for e in entries if not isinstance(e, Unmatched)]
        if not paths:
            raise ValueError("no example images found: " + "; ".join(e.message for e in entries))
        _check_method(calibration)
        report = add_label_task(path, name, label_list, paths, model_dir=model, template=template, out=output,
                                threads=threads, calibration=calibration)
    except ValueError as exc:  # bad labels or no images: the arguments' fault
        raise UsageError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    except DikiEdgeError as exc:  # the same error (and exit status), naming the bank if it did not
        if str(path) not in str(exc):
            exc.args = (f"{path}: {exc}",)
        raise
    for problem in report.skipped:
        err.print(f"[yellow]skipped:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    err.print(f"added label-only task {name!r} ({report.labels} labels, Gaussian of {report.examples} example "
              f"images, calibration {report.calibration.describe()}) -> {report.bank}", highlight=False,
              soft_wrap=True, markup=False)
    if report.warning:
        err.print(f"warning: {report.warning}", highlight=False, soft_wrap=True, markup=False)


@bank_app.command("recalibrate")
def bank_recalibrate(path: Path = typer.Argument(..., help="Bank file."),
                     method: str = typer.Option(calib.DEFAULT_METHOD, help=calib.METHOD_HELP),
                     task: list[str] | None = typer.Option(None, help="Only this task (repeat for more) "
                                                                         "[default: every task]."),
                     output: Path | None = typer.Option(None, "--out", help="Write here instead of in place.")
                     ) -> None:
    """Fit the tasks' familiarity calibration again from the statistics the bank stores (no images, no training):
    e.g. `--method paper` for a model folder exported before graphs took a per-task calibration."""
    _check_method(method)
    _check_output(output or path, [path])
    with files.locked(output or path):
        b = _load_bank(path)  # read under the lock: a writer that just finished is seen
        try:
            new = b.recalibrated(method, list(task) if task else None)
            new.save(output or path)
        except DikiEdgeError as exc:
            raise BankError(f"{path}: {exc}") from None
    for t in new.tasks:
        if not task or t.name in task:
            err.print(f"{t.name}: {t.calibration.describe()}", highlight=False, markup=False)
    err.print(f"-> {output or path}", highlight=False, markup=False)


def _check_method(method: str) -> None:
    if method not in calib.METHODS:
        raise UsageError(f"--calibration/--method must be one of {', '.join(calib.METHODS)}, not {method!r}")
