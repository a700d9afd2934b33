"""The task bank: every per-task array stacked along a leading task axis, in one safetensors file.

A bank is what training produces and what the exported graph and the runtime consume. DIKI tasks are
independent (each has its own slice, nothing is shared), so banks trained separately merge without retraining.

Arrays (declared once in :data:`diki_edge_runtime.contract.BANK_ARRAYS`; names are those of the graph inputs
where the graph consumes them):

==================  =========================  =====================================================
name                shape / dtype              meaning
==================  =========================  =====================================================
``bank_k``          [T, L_img, l, W_img] f32   image-encoder residual keys
``bank_v``          [T, L_img, l, W_img] f32   image-encoder residual values
``text_k``          [T, L_txt, l, W_txt] f32   text-encoder residual keys (used offline only)
``text_v``          [T, L_txt, l, W_txt] f32   text-encoder residual values
``gauss_mean``      [T, D] f32                 task means of the frozen normalised image embeddings
``gauss_whiten``    [T, D, D] f32              inverse Cholesky factors (computed in float64)
``gauss_const``     [T] f32                    -0.5 (D log 2pi + log|Sigma|)
``stats_count``     [T] i64                    sufficient statistics, float64, so tasks can be
``stats_sum``       [T, D] f64                 re-finalised (other ridge) or merged with more data
``stats_outer``     [T, D, D] f64
``class_embeds``    [G, C, D] f32              class text embeddings at G levels of M (diki_edge/calibrated.py)
``class_task``      [C] i64                    task index of each class
``calib_slope``     [T] f32                    M = sigmoid(calib_slope * S + calib_bias) for the selected
``calib_bias``      [T] f32                    task (diki_edge_runtime.calibration); format 2 on
==================  =========================  =====================================================

Format 1 banks (before per-task calibration) lack the two ``calib_*`` arrays and load as the paper's mapping
(slope ``1/D``, bias ``-1``); saving writes format 2. Each task's metadata records its calibration (method and
what it was fitted to); ``calib_*`` are derived from it and the task's Gaussian in :meth:`TaskBank.with_task` and
:meth:`TaskBank.recalibrated`.

The JSON metadata (safetensors ``__metadata__["diki_edge"]``) names the format version, backbone, adapted depth,
``l``, dims, calibration grid and per-task name, classes, template, sample count and calibration; its schema is
checked by :mod:`diki_edge_runtime.schema` on load.

A bank is refused (:class:`~diki_edge_runtime.errors.BankError`, naming the file and the array) when it is
saved or loaded with a non-finite value in any float array, or when ``class_task`` is not the task index of
each class in task order (sorted, contiguous, every task at least one class, counts matching the metadata).
Files are written by :func:`diki_edge_runtime.files.atomic_write` (atomic, mode kept, through symlinks).

numpy + safetensors only: the runtime loads banks without torch. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diki_edge_runtime import calibration as calib
from diki_edge_runtime.contract import BANK_ARRAYS, CALIB_BIAS, CALIB_SLOPE, DEFAULT_TEMPLATE
from diki_edge_runtime.errors import BankError, DikiEdgeError
from diki_edge_runtime.files import WriteError, atomic_write
from diki_edge_runtime.gaussian import GaussianScoring, GaussianStats
from diki_edge_runtime.schema import bank_layout, bank_metadata

FORMAT_VERSION = 2  # 2: calib_slope / calib_bias and each task's calibration record (1 loads as the paper mapping)
METADATA_KEY = "diki_edge"
# BankLayout fields that are array dimensions (contract.BANK_ARRAYS dims besides tasks, classes, levels).
BANK_LAYOUT_DIMS = ("image_layers", "text_layers", "residual_length", "image_width", "text_width", "embed_dim")

# Every name, shape and dtype comes from the contract's one declaration (contract.BANK_ARRAYS).
# Arrays with a leading task axis; everything in a task's slice.
TASK_ARRAYS = tuple(s.name for s in BANK_ARRAYS if s.role == "task")
CLASS_ARRAYS = tuple(s.name for s in BANK_ARRAYS if s.role == "class")
# What the exported graph consumes; a runtime loads only these (``TaskBank.load(..., graph_only=True)``).
GRAPH_ARRAYS = tuple(s.name for s in BANK_ARRAYS if s.consumer == "graph")
# What the text graph consumes besides prompts: loaded with the graph arrays when labels may be encoded.
TEXT_GRAPH_ARRAYS = tuple(s.name for s in BANK_ARRAYS if s.consumer == "text_graph")
ARRAY_DTYPES = {s.name: np.dtype(s.dtype) for s in BANK_ARRAYS}
# Arrays a bank of an older format lacks; load() derives them from the metadata.
LATER_ARRAYS = tuple(s.name for s in BANK_ARRAYS if not s.required)


@dataclass
class TaskInfo:
    name: str
    classes: list[str]
    template: str = DEFAULT_TEMPLATE
    num_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: calib.Calibration = field(default_factory=calib.paper)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "template": self.template,
            "num_samples": int(self.num_samples),
            "extra": self.extra,
            "calibration": self.calibration.to_json(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskInfo:
        """From a task entry already checked by :func:`diki_edge_runtime.schema.task_info`."""
        cal = calib.Calibration.from_json(d["calibration"], d["name"]) if "calibration" in d else calib.paper()
        return cls(d["name"], list(d["classes"]), d.get("template", DEFAULT_TEMPLATE), int(d.get("num_samples", 0)),
                   dict(d.get("extra", {})), cal)


@dataclass
class BankLayout:
    """Everything that must agree between a bank, a backbone and an exported graph."""

    backbone: dict[str, Any]  # {"model", "pretrained", "weights_sha256", ...}
    image_layers: int  # adapted blocks in the image encoder (the first ones)
    text_layers: int
    residual_length: int  # l
    image_width: int
    text_width: int
    embed_dim: int  # D
    calibration_levels: list[float]  # the G grid points of M for class_embeds
    ridge: float
    logit_scale: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Any, source: str = "bank layout") -> BankLayout:
        """Checked against :func:`diki_edge_runtime.schema.bank_layout`; raises ``MetadataError`` naming ``source``."""
        checked = bank_layout(d, source)
        return cls(**{k: checked[k] for k in cls.__dataclass_fields__})

    def shapes(self, tasks: int, classes: int) -> dict[str, tuple[int, ...]]:
        """Every bank array's shape (``contract.BANK_ARRAYS`` dims resolved) for ``tasks`` tasks and ``classes``."""
        sizes = {"tasks": tasks, "classes": classes, "levels": len(self.calibration_levels),
                 **{k: int(getattr(self, k)) for k in BANK_LAYOUT_DIMS}}
        return {spec.name: tuple(sizes[d] for d in spec.dims) for spec in BANK_ARRAYS}

    def task_bytes(self, classes: int) -> int:
        """Bytes one more task with ``classes`` classes adds to a bank's arrays."""
        one, none = self.shapes(1, classes), self.shapes(0, 0)
        return int(sum((np.prod(one[k]) - np.prod(none[k])) * np.dtype(ARRAY_DTYPES[k]).itemsize for k in one))

    @property
    def backbone_hash(self) -> str:
        return str(self.backbone.get("weights_sha256", ""))

    def compatibility_problem(self, other: BankLayout) -> str | None:
        """Why a bank with layout ``other`` cannot be used where ``self`` is expected, or None."""
        if self.backbone_hash != other.backbone_hash:
            return (f"backbone weights differ (hash {other.backbone_hash[:12]} vs expected "
                    f"{self.backbone_hash[:12]}; model {other.backbone.get('model')!r} vs "
                    f"{self.backbone.get('model')!r})")
        for key in BANK_LAYOUT_DIMS:
            if getattr(self, key) != getattr(other, key):
                return f"{key} differs ({getattr(other, key)} vs expected {getattr(self, key)})"
        mine, theirs = list(self.calibration_levels), list(other.calibration_levels)
        if len(mine) != len(theirs) or not np.allclose(mine, theirs):  # (allclose cannot compare other lengths)
            return (f"calibration levels of the class text table differ (the bank has {len(theirs)} levels "
                    f"{_levels_text(theirs)}, expected {len(mine)} levels {_levels_text(mine)}: --levels of "
                    "`diki-edge train`)")
        if not np.isclose(self.logit_scale, other.logit_scale):
            return f"logit scale differs ({other.logit_scale} vs expected {self.logit_scale})"
        return None


def _levels_text(levels: list[float]) -> str:
    shown = ", ".join(f"{v:.4g}" for v in levels[:6])
    return f"[{shown}{', ...' if len(levels) > 6 else ''}]"


@dataclass
class TaskSlice:
    """One task's arrays (no task axis) plus its metadata: what training produces and a bank appends."""

    info: TaskInfo
    image_k: np.ndarray  # [L_img, l, W_img]
    image_v: np.ndarray
    text_k: np.ndarray  # [L_txt, l, W_txt]
    text_v: np.ndarray
    stats: GaussianStats
    class_embeds: np.ndarray  # [G, C_task, D]


class TaskBank:
    """An in-memory bank: layout + per-task metadata + stacked arrays. Immutable operations return new banks."""

    def __init__(self, layout: BankLayout, tasks: list[TaskInfo], arrays: dict[str, np.ndarray],
                 graph_only: bool = False):
        self.layout = layout
        self.tasks = tasks
        self.arrays = arrays
        # A graph-only bank (what a runtime loads) lacks the training arrays: it can be run, not edited or saved.
        self.graph_only = graph_only
        problem = self._shape_problem()
        if problem:
            raise BankError(problem)

    # ----------------------------------------------------------------- construction
    @classmethod
    def empty(cls, layout: BankLayout) -> TaskBank:
        shapes = layout.shapes(0, 0)
        arrays = {k: np.zeros(s, ARRAY_DTYPES[k]) for k, s in shapes.items()}
        return cls(layout, [], arrays)

    def with_task(self, task: TaskSlice) -> TaskBank:
        """A new bank with ``task`` appended (or replacing the task of the same name, in place)."""
        self._require_full("add a task to")
        info = task.info
        try:
            scoring: GaussianScoring = task.stats.finalize(self.layout.ridge)
        except ValueError as exc:
            raise BankError(f"task {info.name!r}: cannot finalise its Gaussian: {exc}") from None
        per_task = {
            "bank_k": task.image_k, "bank_v": task.image_v, "text_k": task.text_k, "text_v": task.text_v,
            "gauss_mean": scoring.mean, "gauss_whiten": scoring.whiten, "gauss_const": np.asarray(scoring.const),
            "stats_count": np.asarray(task.stats.count), "stats_sum": task.stats.total,
            "stats_outer": task.stats.outer,
        }
        slope, bias = info.calibration.affine(scoring.const, self.layout.embed_dim)
        problem = calib.check_affine(slope, bias, f"task {info.name!r}")
        if problem:
            raise BankError(problem)
        per_task[CALIB_SLOPE], per_task[CALIB_BIAS] = np.asarray(slope), np.asarray(bias)
        expected = self.layout.shapes(1, len(info.classes))
        for name, arr in per_task.items():
            if tuple(np.shape(arr)) != expected[name][1:]:
                raise BankError(f"task {info.name!r}: array {name} has shape {list(np.shape(arr))}, "
                                f"expected {list(expected[name][1:])}")
        if tuple(task.class_embeds.shape) != expected["class_embeds"]:
            raise BankError(f"task {info.name!r}: class_embeds has shape {list(task.class_embeds.shape)}, "
                            f"expected {list(expected['class_embeds'])}")
        bank = self.without(info.name) if info.name in self.task_names else self
        index = self.task_names.index(info.name) if info.name in self.task_names else bank.num_tasks
        single = {k: np.asarray(v, ARRAY_DTYPES[k])[None] for k, v in per_task.items()}
        single["class_embeds"] = np.asarray(task.class_embeds, np.float32)
        single["class_task"] = np.zeros(len(info.classes), np.int64)
        added = TaskBank(self.layout, [info], single)
        return bank._insert(added, index)

    def merged(self, other: TaskBank) -> TaskBank:
        """Append every task of ``other`` (same backbone and layout; task names must not collide)."""
        problem = self.layout.compatibility_problem(other.layout)
        # The ridge is baked into every task's whitening: tasks finalised with different ridges score on different
        # scales, and the merged bank could record only one of them.
        if problem is None and not np.isclose(self.layout.ridge, other.layout.ridge, rtol=1e-12, atol=0.0):
            problem = (f"ridge differs ({other.layout.ridge:g} vs expected {self.layout.ridge:g}; --ridge of "
                       "`diki-edge train` — retrain one with the other's ridge)")
        if problem:
            raise BankError(f"cannot merge banks: {problem}")
        clash = sorted(set(self.task_names) & set(other.task_names))
        if clash:
            raise BankError(f"cannot merge banks: task names {clash} exist in both (rename one first)")
        return self._insert(other, self.num_tasks)

    def without(self, name: str) -> TaskBank:
        index = self._index(name)
        keep = [i for i in range(self.num_tasks) if i != index]
        return self.select(keep)

    def renamed(self, old: str, new: str) -> TaskBank:
        index = self._index(old)
        if new in self.task_names:
            raise BankError(f"a task named {new!r} already exists")
        tasks = copy.deepcopy(self.tasks)
        tasks[index].name = new
        return TaskBank(self.layout, tasks, dict(self.arrays), graph_only=self.graph_only)

    def recalibrated(self, method: str, names: list[str] | None = None) -> TaskBank:
        """A new bank whose tasks ``names`` (default: all) are calibrated by ``method`` again, from their stored
        statistics alone (:func:`diki_edge_runtime.calibration.fit`)."""
        self._require_full("recalibrate")
        names = self.task_names if names is None else names
        for name in names:
            self._index(name)
        tasks = copy.deepcopy(self.tasks)
        arrays = dict(self.arrays)
        slopes, biases = arrays[CALIB_SLOPE].copy(), arrays[CALIB_BIAS].copy()
        dim = self.layout.embed_dim
        for i, task in enumerate(tasks):
            if task.name in names:
                task.calibration = calib.fit(method, int(arrays["stats_count"][i]), dim)
                slopes[i], biases[i] = task.calibration.affine(float(arrays["gauss_const"][i]), dim)
        arrays[CALIB_SLOPE], arrays[CALIB_BIAS] = slopes, biases
        return TaskBank(self.layout, tasks, arrays)

    def uses_paper_calibration(self) -> bool:
        """Every task maps its score to M by the paper's ``sigmoid(S / D - 1)`` (what graphs exported before
        per-task calibration compute)."""
        return not self.calibrated_task_names()

    def calibrated_task_names(self) -> list[str]:
        return [t.name for t in self.tasks if t.calibration.method != calib.PAPER]

    def _require_full(self, action: str) -> None:
        if self.graph_only:
            raise BankError(f"cannot {action} a bank loaded without its training arrays (graph_only=True); "
                            "load it in full")

    def select(self, indices: list[int]) -> TaskBank:
        """A bank holding only the given tasks, in the given order."""
        self._require_full("select tasks of")
        idx = np.asarray(indices, np.int64)
        arrays = {k: self.arrays[k][idx] for k in TASK_ARRAYS}
        class_task = self.arrays["class_task"]
        cols, new_task = [], []
        for new_i, old_i in enumerate(indices):
            c = np.nonzero(class_task == old_i)[0]
            cols.append(c)
            new_task.append(np.full(len(c), new_i, np.int64))
        cols_arr = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        arrays["class_embeds"] = self.arrays["class_embeds"][:, cols_arr]
        arrays["class_task"] = np.concatenate(new_task) if new_task else np.zeros(0, np.int64)
        return TaskBank(self.layout, [copy.deepcopy(self.tasks[i]) for i in indices], arrays)

    def _insert(self, other: TaskBank, index: int) -> TaskBank:
        other._require_full("merge")
        order = list(range(self.num_tasks))
        left, right = self.select(order[:index]), self.select(order[index:])
        arrays = {}
        for k in TASK_ARRAYS:
            arrays[k] = np.concatenate([left.arrays[k], other.arrays[k], right.arrays[k]], axis=0)
        arrays["class_embeds"] = np.concatenate(
            [left.arrays["class_embeds"], other.arrays["class_embeds"], right.arrays["class_embeds"]], axis=1)
        arrays["class_task"] = np.concatenate([
            left.arrays["class_task"],
            other.arrays["class_task"] + left.num_tasks,
            right.arrays["class_task"] + left.num_tasks + other.num_tasks,
        ])
        tasks = copy.deepcopy(left.tasks + other.tasks + right.tasks)
        return TaskBank(self.layout, tasks, arrays)

    # ----------------------------------------------------------------- queries
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def class_names(self) -> list[str]:
        """Every class of every task, in the column order of ``class_embeds`` / the graph's logits."""
        return [c for t in self.tasks for c in t.classes]

    def _index(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise BankError(f"no task named {name!r} in the bank (tasks: {self.task_names})") from None

    def task_slice(self, name_or_index: str | int) -> TaskSlice:
        self._require_full("take a task slice of")
        i = self._index(name_or_index) if isinstance(name_or_index, str) else int(name_or_index)
        a = self.arrays
        stats = GaussianStats(int(a["stats_count"][i]), a["stats_sum"][i].copy(), a["stats_outer"][i].copy())
        cols = np.nonzero(a["class_task"] == i)[0]
        return TaskSlice(copy.deepcopy(self.tasks[i]), a["bank_k"][i], a["bank_v"][i], a["text_k"][i], a["text_v"][i],
                         stats, a["class_embeds"][:, cols])

    def graph_inputs(self) -> dict[str, np.ndarray]:
        """The bank arrays exactly as the exported graph takes them (``contract.GRAPH_INPUTS`` after
        ``pixel_values``)."""
        return {k: np.ascontiguousarray(self.arrays[k]) for k in GRAPH_ARRAYS}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def _shape_problem(self) -> str | None:
        expected = self.layout.shapes(self.num_tasks, len(self.class_names))
        for name, shape in expected.items():
            if name not in self.arrays:
                if self.graph_only and name not in GRAPH_ARRAYS:
                    continue
                return f"array {name!r} is missing"
            arr = self.arrays[name]
            if tuple(arr.shape) != shape:
                return f"array {name!r} has shape {list(arr.shape)}, expected {list(shape)}"
        unnamed = [i for i, t in enumerate(self.tasks) if not isinstance(t.name, str) or not t.name.strip()]
        if unnamed:
            return f"tasks at positions {unnamed} have an empty name"
        empty = [t.name for t in self.tasks if not t.classes]
        if empty:
            return f"tasks {empty} have no classes (every task needs at least one)"
        # The graph masks logits by class_task and the runtime names classes in task order: both need exactly
        # this array (a permutation with matching counts would answer with another task's class names).
        expected_task = np.repeat(np.arange(self.num_tasks, dtype=np.int64), [len(t.classes) for t in self.tasks])
        if not np.array_equal(self.arrays["class_task"], expected_task):
            return ("class_task must give each class its task index in task order (sorted, contiguous, "
                    f"{[len(t.classes) for t in self.tasks]} classes per task)")
        if len(set(self.task_names)) != len(self.task_names):
            return f"duplicate task names {self.task_names}"
        return None

    def finite_problem(self) -> str | None:
        """The first float array holding NaN or an infinity, or a calibration slope <= 0, described; None when
        every value is fine."""
        for name, arr in self.arrays.items():
            if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
                bad = np.argwhere(~np.isfinite(arr))
                where = f" (task {self.tasks[int(bad[0][0])].name!r})" if name in TASK_ARRAYS and \
                    int(bad[0][0]) < self.num_tasks else ""
                return (f"array {name!r} holds {len(bad)} non-finite value(s) (first at index "
                        f"{list(map(int, bad[0]))}: {arr[tuple(bad[0])]}){where}")
        slopes = self.arrays.get(CALIB_SLOPE)
        if slopes is not None and slopes.size and not (slopes > 0).all():
            i = int(np.argmax(~(slopes > 0)))
            return f"task {self.tasks[i].name!r} has calibration slope {slopes[i]} (it must be > 0)"
        return None

    # ----------------------------------------------------------------- files
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "layout": self.layout.to_json(),
            "tasks": [t.to_json() for t in self.tasks],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (:func:`~diki_edge_runtime.files.atomic_write`: temp file, fsync, rename; the previous
        file's mode is kept; a symlink is written through). Refuses non-finite arrays. Returns ``path``."""
        from safetensors.numpy import save_file

        self._require_full("save")
        path = Path(path)
        problem = self.finite_problem()
        if problem:
            raise BankError(f"{path}: refusing to save a bank whose {problem}")
        arrays = {k: np.ascontiguousarray(v.astype(ARRAY_DTYPES[k], copy=False)) for k, v in self.arrays.items()}
        try:
            metadata = {METADATA_KEY: json.dumps(self.metadata(), allow_nan=False)}
        except ValueError:
            raise BankError(f"{path}: refusing to save a bank whose metadata holds NaN or an infinity") from None
        try:
            atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))
        except DikiEdgeError:
            raise
        except Exception as exc:  # OSError, or safetensors' own error type for a failed write
            raise WriteError(f"{path}: cannot write the bank: {type(exc).__name__}: {exc}") from None
        return path

    def expected_file_bytes(self) -> int:
        """About the size of this bank's file (arrays plus metadata), for free-space checks before a write."""
        return self.nbytes() + len(json.dumps(self.metadata())) + 4096

    @classmethod
    def load(cls, path: str | os.PathLike, expect: BankLayout | None = None, graph_only: bool = False,
             with_text: bool = False, repair: bool = False) -> TaskBank:
        """Load and validate a bank file; with ``expect``, refuse one that does not fit that layout.

        ``graph_only`` reads just the arrays the exported graph consumes (a runtime's view: no float64
        statistics, no text adapters — about a third of the memory for D = 512); such a bank cannot be saved.
        ``with_text`` adds the text adapters (``TEXT_GRAPH_ARRAYS``) to a graph-only load, for the text graph.
        ``repair`` (the ``bank`` editing commands) also accepts the empty class names older versions wrote;
        :meth:`name_problems` then names the tasks to remove or retrain.
        """
        from safetensors import safe_open

        path = Path(path)
        _check_bank_path(path)
        try:
            with safe_open(str(path), framework="numpy") as fh:
                raw_meta = (fh.metadata() or {}).get(METADATA_KEY)
                wanted = GRAPH_ARRAYS + (TEXT_GRAPH_ARRAYS if with_text else ())
                keys = [k for k in fh.keys() if not graph_only or k in wanted]
                arrays = {k: fh.get_tensor(k) for k in keys}
                stored = set(fh.keys())
        except Exception as exc:  # safetensors raises several types for truncated or foreign files
            raise BankError(f"{path}: not a readable safetensors bank (truncated or corrupt?): {exc}") from None
        if raw_meta is None:
            raise BankError(f"{path}: no diki-edge metadata (not a diki-edge bank file)")
        try:
            meta = json.loads(raw_meta, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise BankError(f"{path}: diki-edge metadata is not valid JSON ({str(exc)[:200]})") from None
        layout_json, tasks_json = bank_metadata(meta, str(path), FORMAT_VERSION, repair=repair)
        layout = BankLayout(**layout_json)
        tasks = [TaskInfo.from_json(t) for t in tasks_json]
        _add_later_arrays(arrays, stored, tasks, layout)
        unknown = sorted(set(arrays) - set(ARRAY_DTYPES))
        if unknown:
            raise BankError(f"{path}: unknown arrays {unknown[:5]} (not a diki-edge bank of format {FORMAT_VERSION})")
        for name, dtype in ARRAY_DTYPES.items():
            if name in arrays and arrays[name].dtype != dtype:
                raise BankError(f"{path}: array {name!r} has dtype {arrays[name].dtype}, expected {np.dtype(dtype)}")
        try:
            bank = cls(layout, tasks, arrays, graph_only=graph_only)
        except BankError as exc:
            raise BankError(f"{path}: {exc}") from None
        problem = bank.finite_problem()
        if problem:
            raise BankError(f"{path}: {problem}; the bank is damaged (retrain or restore it)")
        if expect is not None:
            problem = expect.compatibility_problem(layout)
            if problem:
                raise BankError(f"{path}: bank does not fit this model: {problem}")
        return bank

    def name_problems(self) -> dict[str, str]:
        """``{task name: problem}`` for each task whose class names a current version would refuse (empty, with a
        control character such as a newline, repeated): what an older version may have written."""
        from diki_edge_runtime.labels import check_class_names

        problems = {}
        for t in self.tasks:
            try:
                check_class_names(t.classes)
            except ValueError as exc:
                problems[t.name] = str(exc)
        return problems

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``diki-edge bank show``."""
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.layout.backbone,
            "adapted_layers": {"image": self.layout.image_layers, "text": self.layout.text_layers},
            "residual_length": self.layout.residual_length,
            "embed_dim": self.layout.embed_dim,
            "calibration_levels": len(self.layout.calibration_levels),
            "bytes": self.nbytes(),
            "trainable_parameters_per_task": self.trainable_parameters_per_task(),
            "tasks": [
                {"name": t.name, "classes": len(t.classes), "samples": t.num_samples, "template": t.template,
                 "calibration": t.calibration.describe(), "class_names": t.classes}
                for t in self.tasks
            ],
        }

    def trainable_parameters_per_task(self) -> int:
        lay = self.layout
        return 2 * lay.residual_length * (lay.image_layers * lay.image_width + lay.text_layers * lay.text_width)


def _add_later_arrays(arrays: dict[str, np.ndarray], stored: set[str], tasks: list[TaskInfo],
                      layout: BankLayout) -> None:
    """Derive the arrays a format-1 bank lacks: its tasks (no calibration record) use the paper's mapping."""
    if CALIB_SLOPE not in stored and "gauss_const" in arrays:
        consts = arrays["gauss_const"].astype(np.float64)
        pairs = [t.calibration.affine(float(c), layout.embed_dim) for t, c in zip(tasks, consts)]
        arrays[CALIB_SLOPE] = np.asarray([p[0] for p in pairs], np.float32).reshape(len(consts))
        arrays[CALIB_BIAS] = np.asarray([p[1] for p in pairs], np.float32).reshape(len(consts))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_bank_path(path: Path) -> None:
    """Refuse, naming the problem, a bank path that is missing, a folder, a device, a FIFO or a symlink loop."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise BankError(f"{path}: bank file not found (dangling symlink to {os.readlink(path)})") from None
        raise BankError(f"{path}: bank file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BankError(f"{path}: symlink loop, not a bank file") from None
        raise BankError(f"{path}: cannot read the bank: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise BankError(f"{path}: is a directory, not a bank file")
    if not stat.S_ISREG(st.st_mode):
        raise BankError(f"{path}: not a regular file (a device, FIFO or socket), not a bank file")
