"""``diki-edge predict``: calibrated predictions for image files, directories and globs (torch-free).

Inputs are expanded in a stable order: the arguments in the order given; a directory contributes every image
file below it (recursively, suffixes in :data:`IMAGE_SUFFIXES`, hidden entries skipped) in sorted path order; a
glob pattern (``*``, ``?``, ``[``; ``**`` recurses) contributes its matches in sorted order; a file is taken as
is, whatever its suffix. A path listed twice is predicted once. A missing file, or a pattern or directory that
matches no image, is reported as a failed input.

Labels: ``--labels "rocket,car,tree"`` or ``--labels-file labels.txt`` (one per line) classify among those labels
instead of the bank's classes, each put into ``--template`` (default ``"a photo of a {}."``). DIKI runs exactly as
for the bank's classes: the task and ``M`` come from the image, and the labels are encoded under the selected task's
text adapter at that ``M`` (``diki_edge_runtime.labels``). Needs a model folder with the text graph (exported by
this version; an older folder answers with a "re-export" message).

Output: a table (input, task, M, top-k classes with probabilities) or, with ``--json``, one JSON object per input
per line on stdout, in input order, written as each batch finishes. The schema (version 2; version 1 lacked the two
embedding keys) is stable::

    {
      "input": "photos/cat.jpg",        # the path (as expanded)
      "ok": true,                       # false when this input failed
      "task": "pets",                   # selected task name       (null on failure)
      "task_index": 0,                  # its index in the bank    (null on failure)
      "weight": 0.973214,               # calibrated familiarity M in [0, 1] (null on failure)
      "top_k": [                        # at most --top-k classes of the selected task (or of --labels),
        {"class": "cat", "probability": 0.91},   # best first; softmax over those classes ([] on failure)
        {"class": "dog", "probability": 0.07}
      ],
      "image_embeds": [0.0132, ...],    # with --embeddings: the final L2-normalised image embedding (D floats)
      "frozen_embeds": [0.0121, ...],   # with --embeddings: the pass-1 (frozen encoder) embedding; else null
      "error": null                     # or {"kind": KIND, "message": "photos/x.jpg: file not found"}
    }

``KIND`` is one of ``not_found``, ``unreadable``, ``empty``, ``not_an_image``, ``truncated``, ``too_large``,
``unsupported``, ``inference``. Every key is always present. Every line is strict JSON: numbers are finite (a
non-finite graph output is that image's ``inference`` error) and undecodable bytes of file names are spelled
``\\xNN``. Informational messages (providers in use, progress
bars) go to stderr, never to stdout.

Exit codes: 0 all inputs predicted; 1 at least one input failed (the others are still predicted and printed);
2 usage or setup error (no inputs, model folder or bank missing or incompatible, provider not in the installed
ONNX Runtime or dropped by it at session start, malformed provider options, ONNX Runtime not installed,
``--threads`` above the machine's cores x 4, bad labels or template, labels or embeddings asked of a folder
without them, a metadata or option file that is not a regular file, is oversized or lies outside the model
folder). Usage and setup errors are raised (:class:`UsageError`, :class:`RuntimeSetupError`) and printed by
``cli.main``, the one place that prints errors.

Providers: ``--provider`` takes a name (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``, ``rocm``,
``migraphx``, ``dml``, or an ONNX Runtime id) or a fall-back chain written out (``tensorrt,cuda,cpu``); options
come from ``--provider-options FILE.json`` (``{"tensorrt": {"trt_fp16_enable": true}}``) and
``--provider-option NAME:KEY=VALUE`` (repeatable, applied after the file). Rules: diki_edge_runtime/providers.py.

ONNX Runtime's own log lines follow ``--quiet`` (fatal only) and ``--verbose`` (info and up); by default only
its errors reach stderr.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from diki_edge_runtime.errors import UsageError
from diki_edge_runtime.images import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from diki_edge_runtime.predictor import Prediction, Predictor, PredictorSettings

EXIT_OK, EXIT_FAILED_INPUTS = 0, 1  # usage and setup errors raise (cli.main exits 2)
LABEL_PROGRESS_MIN = 1024  # prompts: smaller label-table builds take a few seconds at most and are not reported
LABEL_PROGRESS_STEP = 0.1  # off a terminal, a line per 10 % of a build
_GLOB_CHARS = set("*?[")


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _directory_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and _is_image_file(Path(dirpath) / name):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


class Unmatched(str):
    """An argument that matched no file (a pattern or an image-less directory); ``message`` says so."""

    message: str

    def __new__(cls, arg: str, message: str) -> Unmatched:
        obj = super().__new__(cls, arg)
        obj.message = message
        return obj


def expand_inputs(args: Iterable[str]) -> list[str]:
    """The files to predict, in a stable order (see the module docstring). Arguments that matched nothing are
    kept in their place as :class:`Unmatched` entries (they become failed inputs)."""
    entries: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            entries.append(p)

    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = _directory_images(p)
            if not found:
                entries.append(Unmatched(arg, f"{arg}: directory holds no image files "
                                              f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            for f in found:
                add(f)
        elif p.exists() or not (_GLOB_CHARS & set(arg)):
            add(arg)  # a missing literal path is predicted as a failed input ("file not found")
        else:
            files = []
            for m in sorted(glob.glob(arg, recursive=True)):
                files.extend(_directory_images(Path(m)) if Path(m).is_dir() else [m])
            if not files:
                entries.append(Unmatched(arg, f"{arg}: no files match this pattern"))
            for f in files:
                add(f)
    return entries


def _format_top(top_k: list[tuple[str, float]]) -> str:
    return ", ".join(f"{c} {p:.3f}" for c, p in top_k)


# Options shared by every command that opens a model folder (`predict`, `serve`): declared once, read into one
# RuntimeOptions, turned into one PredictorSettings.
ModelOption = Annotated[Path, typer.Option("--model", "-m", help="Exported model folder (diki-edge export).")]
BankOption = Annotated[Path | None, typer.Option(help="Use this bank instead of the model folder's own.")]
ProviderOption = Annotated[str, typer.Option(
    help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino, coreml, rocm, migraphx, dml (or an "
         "ONNX Runtime id); a comma-separated chain (tensorrt,cuda,cpu) falls back only as written.")]
ProviderOptionArgs = Annotated[list[str] | None, typer.Option(
    "--provider-option", help="NAME:KEY=VALUE (KEY=VALUE for a single provider), e.g. "
                              "tensorrt:trt_fp16_enable=true; repeatable.", show_default=False)]
ProviderOptionsFile = Annotated[Path | None, typer.Option(
    "--provider-options", help='JSON file {"tensorrt": {"trt_engine_cache_enable": true}, ...}.',
    show_default=False)]
ThreadsOption = Annotated[int | None, typer.Option(
    help="ONNX Runtime intra-op threads (1 .. the machine's cores x 4).")]
WorkersOption = Annotated[int | None, typer.Option(
    min=0, help="Decode threads overlapped with inference (default: one per core, at most 8; 0: none).",
    show_default=False)]
FastDecodeOption = Annotated[bool, typer.Option(
    "--fast-decode", help="Decode JPEGs at a reduced DCT scale before the exact resize: faster on large "
                          "photos, slightly different results (see the README).")]
LowMemoryOption = Annotated[bool, typer.Option(
    "--low-memory", help="ONNX Runtime memory arena and memory patterns off: working memory is returned "
                         "after each run instead of kept.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info on stderr.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="ONNX Runtime's info messages on stderr.")]
PrecisionOption = Annotated[str, typer.Option(
    help="Arithmetic of the image graph: fp32; bf16 (OpenVINO on a CPU with AMX or AVX512-BF16, pip install "
         "'diki-edge-runtime[openvino]'); auto (bf16 where it runs and agrees with fp32 on a probe batch, else "
         "fp32).")]
TopKOption = Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to show per image.")]
# Each image in a forward holds its pixels (3 x 224 x 224 float32 = 0.6 MB) and the encoder's activations, so memory
# grows with the batch while throughput stops growing long before this: a larger value only risks running out.
MAX_BATCH_SIZE = 256
BatchSizeOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]


@dataclass(frozen=True)
class RuntimeOptions:
    """The command-line options that open a model folder, as given (``predict`` and ``serve`` share them)."""

    model: Path
    bank: Path | None = None
    provider: str = "cpu"
    provider_option: tuple[str, ...] = ()
    provider_options: Path | None = None
    threads: int | None = None
    workers: int | None = None
    fast_decode: bool = False
    low_memory: bool = False
    quiet: bool = False
    verbose: bool = False
    precision: str = "fp32"

    def check(self) -> None:
        """The checks that need no file: a :class:`UsageError` naming the option."""
        from diki_edge_runtime.session import max_threads

        if self.threads is not None and self.threads < 1:
            raise UsageError("--top-k, --batch-size and --threads must be >= 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must be >= 0")
        if self.threads is not None and self.threads > max_threads():
            raise UsageError(f"--threads {self.threads} is more than this machine's {os.cpu_count() or 1} cores x "
                             f"4 = {max_threads()}")
        if self.quiet and self.verbose:
            raise UsageError("--quiet and --verbose contradict each other")
        if self.precision.strip().lower() not in ("fp32", "bf16", "auto"):
            raise UsageError(f"--precision {self.precision!r}: use fp32, bf16 or auto")

    @property
    def log_severity(self) -> int:
        from diki_edge_runtime.session import DEFAULT_LOG_SEVERITY

        return 4 if self.quiet else 1 if self.verbose else DEFAULT_LOG_SEVERITY

    def settings(self) -> PredictorSettings:
        """The one :class:`PredictorSettings` these options stand for (reads ``--provider-options``)."""
        from diki_edge_runtime.predictor import PredictorSettings
        from diki_edge_runtime.providers import load_options_file, merge_options, parse_option_args
        from diki_edge_runtime.session import SessionSettings

        options = merge_options(load_options_file(self.provider_options) if self.provider_options else None,
                                parse_option_args(self.provider_option, self.provider.split(",")))
        session = SessionSettings(self.provider, self.threads, provider_options=options,
                                  low_memory=self.low_memory, log_severity=self.log_severity,
                                  precision=self.precision.strip().lower())
        return PredictorSettings(session, workers=self.workers, fast_decode=self.fast_decode)

    def open(self) -> Predictor:
        from diki_edge_runtime.predictor import Predictor

        return Predictor(self.model, bank=self.bank, settings=self.settings())


@dataclass(frozen=True)
class PredictJob:
    """What ``diki-edge predict`` does with the opened model: inputs, top-k, labels and the output form."""

    inputs: tuple[str, ...]
    top_k: int = 5
    batch_size: int = 8
    json_: bool = False
    labels: str | None = None
    labels_file: Path | None = None
    template: str | None = None
    embeddings: bool = False

    def check(self) -> None:
        if not self.inputs:
            raise UsageError("no inputs given")
        if self.top_k < 1 or self.batch_size < 1:
            raise UsageError("--top-k, --batch-size and --threads must be >= 1")
        if self.batch_size > MAX_BATCH_SIZE:
            raise UsageError(f"--batch-size {self.batch_size} is more than {MAX_BATCH_SIZE}: memory grows with the "
                             "batch (pixels and activations of every image in it) while throughput does not; "
                             f"use at most {MAX_BATCH_SIZE}")

    def label_list(self) -> list[str] | None:
        """The labels asked for (checked with the template), or None; a :class:`UsageError` naming the problem."""
        from diki_edge_runtime.labels import label_prompts, parse_labels, read_labels_file

        label_list = None
        try:
            if self.labels is not None and self.labels_file is not None:
                raise ValueError("give --labels or --labels-file, not both")
            if self.labels is not None:
                label_list = parse_labels(self.labels)
            elif self.labels_file is not None:
                label_list = read_labels_file(self.labels_file)
            elif self.template is not None:
                raise ValueError("--template needs --labels or --labels-file")
            if label_list is not None:
                label_prompts(label_list, self.template)
            if self.embeddings and not self.json_:
                raise ValueError("--embeddings adds the embeddings to the --json lines; pass --json too")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return label_list


def predict_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files, directories (recursed) or glob patterns.",
                                                show_default=False)],
    model: ModelOption,
    bank: BankOption = None,
    provider: ProviderOption = "cpu",
    provider_option: ProviderOptionArgs = None,
    provider_options: ProviderOptionsFile = None,
    top_k: TopKOption = 5,
    batch_size: BatchSizeOption = 8,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per image per line (schema in the docs).")]
    = False,
    threads: ThreadsOption = None,
    workers: WorkersOption = None,
    fast_decode: FastDecodeOption = False,
    low_memory: LowMemoryOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    precision: PrecisionOption = "fp32",
    labels: Annotated[str | None, typer.Option(help="Classify among these comma-separated labels instead of "
                                                       "the bank's classes.")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="Labels, one per line (instead of --labels).")] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template for the labels; {} is the label "
                                                         "[default: 'a photo of a {}.'].")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Add image and frozen (pass-1) embeddings to "
                                                                  "the --json lines.")] = False,
) -> None:
    """Predict task, familiarity M and top-k classes (or any labels) for images, without PyTorch."""
    runtime = RuntimeOptions(model, bank, provider, tuple(provider_option or ()), provider_options, threads, workers,
                             fast_decode, low_memory, quiet, verbose, precision)
    job = PredictJob(tuple(inputs), top_k, batch_size, json_, labels, labels_file, template, embeddings)
    code = run_predict(runtime, job)
    if code:
        raise typer.Exit(code)


def run_predict(runtime: RuntimeOptions, job: PredictJob) -> int:
    """The body of ``diki-edge predict`` in three steps (parse and open, predict, sink); returns the exit code
    (see the module docstring)."""
    from PIL import Image
    from rich.console import Console

    from diki_edge_runtime.errors import DikiEdgeError, RuntimeSetupError
    from diki_edge_runtime.predictor import Prediction

    # the pixel limit is enforced per image (a clear per-image error); Pillow's own warning would only be noise
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error is one line, whatever the width
    job.check()
    runtime.check()
    label_list = job.label_list()
    entries = expand_inputs(job.inputs)
    paths = [e for e in entries if not isinstance(e, Unmatched)]
    progress: Progressbar | None = None  # started below when there is more than one batch

    def advance(n: int) -> None:
        if progress:
            progress.advance(n)

    try:
        predictor = open_predictor(runtime, job)
        predicted = predictor.iter_predict(paths, top_k=job.top_k, batch_size=job.batch_size, labels=label_list,
                                           template=job.template, on_progress=advance)
        # (iter_predict checks the labels and the text graph here, before any image is read)
    except (UsageError, RuntimeSetupError):
        raise
    except DikiEdgeError as exc:  # a bank that is missing or does not fit is a setup error here too (exit 2)
        raise RuntimeSetupError(str(exc)) from None
    sink = JsonSink(job.embeddings) if job.json_ else TableSink(job.top_k)
    if not runtime.quiet:
        _print_setup(err, runtime.model, predictor, runtime.verbose)
    if not runtime.quiet and len(paths) > job.batch_size:
        progress = Progressbar(err, len(paths))
    if label_list is not None and not runtime.quiet:
        predictor.text_progress = LabelProgress(err, progress.progress if progress and err.is_terminal else None,
                                                progress.bar if progress else None)
    try:
        for index, entry in enumerate(entries):  # results in argument order, unmatched arguments in place
            if isinstance(entry, Unmatched):
                sink.emit(Prediction(str(entry), index, error=entry.message, error_kind="not_found"))
            else:
                sink.emit(next(predicted))
    finally:
        if progress:
            progress.stop()
    sink.close()
    if sink.failed and not runtime.quiet:
        err.print(f"{sink.failed} of {len(entries)} inputs failed", markup=False)
    return EXIT_FAILED_INPUTS if sink.failed else EXIT_OK


def open_predictor(runtime: RuntimeOptions, job: PredictJob) -> Predictor:
    """The model folder opened with the run's settings, checked for what the job asks of it."""
    from diki_edge_runtime.errors import DikiEdgeError

    predictor = runtime.open()
    if job.embeddings and not predictor.has_frozen_embeds:
        raise DikiEdgeError(f"{runtime.model}: the model folder was exported before the frozen (pass-1) embedding "
                            "was a graph output; re-export it with `diki-edge export` to use --embeddings")
    return predictor


def _print_setup(err, model: Path, predictor: Predictor, verbose: bool = False) -> None:
    info = predictor.info()
    err.print(f"model {model} · bank {info['bank']} ({len(info['tasks'])} tasks, {len(predictor.classes)} "
              f"classes) · providers: {', '.join(predictor.providers)}", markup=False)
    compute = info["compute"]
    if verbose or compute["requested"] != "fp32":
        err.print(f"precision {compute['precision']} (asked: {compute['requested']}) on {compute['engine']} · CPU "
                  f"kernels: {', '.join(compute['cpu_kernels']) or 'none reported'}", markup=False)
    for note in info["provider_notes"] + compute["notes"]:
        err.print(f"note: {note}", markup=False)


class Progressbar:
    """A transient rich progress bar on stderr (shown when there is more than one batch)."""

    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # rich redirects sys.stdout into its live display by default: on a terminal the --json lines would go to
        # the terminal instead of stdout
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True, redirect_stdout=False,
                                 redirect_stderr=False)
        self.progress.start()
        self.bar = self.progress.add_task("predicting", total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.bar, n)

    def stop(self) -> None:
        self.progress.stop()


class LabelProgress:
    """Progress of the label tables' builds (``Predictor.text_progress``): a second bar beside the images' on a
    terminal, else a line every :data:`LABEL_PROGRESS_STEP` of a build on stderr. Builds of fewer than
    :data:`LABEL_PROGRESS_MIN` prompts (seconds at most) are not reported. A build stalls the image bar, so its rate
    (and ETA) restart once the build is done instead of counting the build as image time."""

    def __init__(self, err, progress=None, image_bar=None):
        self.err, self.progress, self.image_bar = err, progress, image_bar
        self.bar = None
        self.started = 0.0
        self.next_line = 0.0

    def __call__(self, done: int, total: int) -> None:
        import time

        if total < LABEL_PROGRESS_MIN:
            return
        first = self.started == 0.0
        if first:
            self.started, self.next_line = time.monotonic(), LABEL_PROGRESS_STEP
            if self.progress is not None:
                self.bar = self.progress.add_task("encoding labels", total=total)
            else:
                self.err.print(f"encoding {total:,} label prompts ...", markup=False)
        if self.bar is not None:
            self.progress.update(self.bar, completed=done)
        elif done < total and done / total >= self.next_line:
            self.err.print(f"  {done:,} / {total:,} label prompts ({done / total:.0%})", markup=False)
            self.next_line = (int(done / total / LABEL_PROGRESS_STEP) + 1) * LABEL_PROGRESS_STEP
        if done >= total:
            self._finished(total, time.monotonic() - self.started)

    def _finished(self, total: int, seconds: float) -> None:
        if self.bar is not None:
            self.progress.remove_task(self.bar)
            if self.image_bar is not None:  # restart the image rate: the build was not image time
                done = next(t.completed for t in self.progress.tasks if t.id == self.image_bar)
                self.progress.reset(self.image_bar, completed=done)
        else:
            self.err.print(f"encoded {total:,} label prompts in {seconds:.1f} s", markup=False)
        self.bar, self.started = None, 0.0


class JsonSink:
    """``--json``: one line per result on stdout, flushed as it is written."""

    def __init__(self, embeddings: bool):
        self.embeddings = embeddings
        self.failed = 0

    def emit(self, res: Prediction) -> None:
        self.failed += not res.ok
        line = json.dumps(res.to_json(embeddings=self.embeddings), ensure_ascii=False, allow_nan=False)
        try:
            sys.stdout.write(line + "\n")
        except UnicodeEncodeError:  # a stdout that cannot encode every character (LANG=C on old Pythons)
            sys.stdout.write(json.dumps(res.to_json(embeddings=self.embeddings), allow_nan=False) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        pass


class TableSink:
    """The default output: one table of every result, printed at the end."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.results: list[Prediction] = []
        self.failed = 0

    def emit(self, res: Prediction) -> None:
        self.failed += not res.ok
        self.results.append(res)

    def close(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=False)
        table.add_column("input", overflow="fold")
        table.add_column("task")
        table.add_column("M", justify="right")
        table.add_column(f"top-{self.top_k}", overflow="fold")
        for res in self.results:
            if res.ok:
                table.add_row(_escape(res.input), _escape(res.task), f"{res.weight:.3f}",
                              _escape(_format_top(res.top_k)))
            else:
                table.add_row(_escape(res.input), "[red]error[/red]", "", f"[red]{_escape(res.error)}[/red]")
        Console(highlight=False).print(table)


def _escape(text: str | None) -> str:
    from rich.markup import escape

    from diki_edge_runtime.labels import printable

    return escape(printable(text or ""))
