"""Resumable training: the checkpoint of one task's interrupted run, a single safetensors file beside the bank.

``<bank>.<task>.checkpoint.safetensors`` holds every tensor of the run's state (the adapter, the optimizer's
tensors, the data-order generator and the global RNG states, the task's Gaussian sufficient statistics in
float64) and, in its JSON metadata, everything else (epoch and batches done, optimizer groups, scheduler and
gradient-scaler state, images found unreadable, the partial epoch's loss) plus the run's *identity*: task,
backbone hash, data fingerprint, recipe and precision. Nothing is pickled; the file is written atomically (temp
file, fsync, rename) so a kill while writing leaves the previous checkpoint. ``--resume`` refuses a checkpoint
whose identity differs, naming what differs; the checkpoint is deleted once the task is in the bank.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diki_edge.data import ImageFolder
from diki_edge.errors import TrainError

CHECKPOINT_VERSION = 1
METADATA_KEY = "diki_edge_checkpoint"


def checkpoint_path(bank_path: Path, task: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", task)
    return bank_path.with_name(f"{bank_path.name}.{safe}.checkpoint.safetensors")


def data_fingerprint(folder: ImageFolder) -> str:
    """SHA-256 of the folder's samples (relative path, label, size) and class names: the same data on any node."""
    h = hashlib.sha256()
    h.update(json.dumps(folder.classes).encode())
    for path, label in folder.samples:
        # surrogateescape: a file name that is not UTF-8 hashes as its own bytes instead of raising
        h.update(f"{path.relative_to(folder.root).as_posix()}\0{label}\0{path.stat().st_size}\n"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run identities, in words."""
    problems = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            problems += [f"{key}.{p}" for p in describe_difference(a, b)]
        elif isinstance(a, str) and len(a) == 64 and isinstance(b, str):  # hashes: a prefix says enough
            problems.append(f"{key} ({a[:12]} in the checkpoint, {b[:12]} now)")
        else:
            problems.append(f"{key} ({a!r} in the checkpoint, {b!r} now)")
    return problems


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Through the runtime's :func:`~diki_edge_runtime.files.atomic_write`, as banks are written (temp file,
    fsync, rename; temporaries of killed runs removed by the next write)."""
    from safetensors.torch import save_file

    from diki_edge_runtime.files import atomic_write

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={METADATA_KEY: json.dumps(meta)}))


def read_checkpoint(path: Path, identity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of the checkpoint at ``path``, refused unless it belongs to this run."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(raw) if raw else None
    except Exception as exc:
        raise TrainError(f"{path}: not a readable diki-edge checkpoint ({type(exc).__name__}: {exc}); "
                            "delete it to start the task again") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: not a diki-edge checkpoint of version {CHECKPOINT_VERSION}; delete it to start "
                            "the task again")
    problems = describe_difference(meta.get("identity", {}), identity)
    if problems:
        raise TrainError(f"{path}: this checkpoint belongs to another run (differs in: {'; '.join(problems)}); "
                            "train with the same task, backbone, data and options to resume it, or delete it")
    return meta, tensors


class Checkpointer:
    """Where one run keeps its checkpoint, what identifies the run, and how often it writes (rank 0 only)."""

    def __init__(self, path: Path, identity: dict[str, Any], every: int = 0, writer: bool = True):
        self.path = path
        self.identity = identity
        self.every = every
        self.writer = writer
        self.saved = 0

    def due(self, global_step: int) -> bool:
        return self.every > 0 and global_step % self.every == 0

    def save(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():  # identical on every rank (DDP), so every rank stops alike
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainError(f"{name} became non-finite during training; checkpoint not written (lower --lr)")
        if not self.writer:
            return
        write_atomically(self.path, tensors, {"version": CHECKPOINT_VERSION, "identity": self.identity, **state})
        self.saved += 1

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return read_checkpoint(self.path, self.identity)

    def remove(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)


# ---- the optimizer's state as tensors + JSON (torch's state_dict holds both, keyed by parameter index)
def optimizer_to_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def optimizer_from_parts(opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- the run's state, owning its own keys both ways (tensors + JSON) and vetting a file before it is used
def _bad(field_name: str, why: str) -> TrainError:
    return TrainError(f"checkpoint field {field_name!r} {why}; delete the checkpoint to start the task again")


def _tensor(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None
            ) -> torch.Tensor:
    value = tensors.get(name)
    if value is None:
        raise _bad(name, "is missing")
    if value.dtype != dtype or (shape is not None and tuple(value.shape) != shape):
        raise _bad(name, f"is {value.dtype} {tuple(value.shape)}, expected {dtype} {shape or '(any shape)'}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise _bad(name, "holds non-finite values")
    return value


def _integer(meta: dict[str, Any], name: str, low: int, high: int) -> int:
    value = meta.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


@dataclass
class RunState:
    """Everything a resumed run starts from. :meth:`to_parts` writes it as (JSON metadata, tensors);
    :meth:`from_parts` reads it back, refusing any field that is missing, of the wrong type, shape or range, or
    non-finite with a :class:`~diki_edge.errors.TrainError` naming the field (a tampered or truncated file never
    reaches torch as a RuntimeError, nor trains a NaN run)."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # {"param_groups": ..., "scalars": ...} (see optimizer_to_parts)
    optimizer_tensors: dict[str, torch.Tensor]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng_sampler: torch.Tensor
    rng_torch: torch.Tensor
    rng_cuda: torch.Tensor | None
    stats_count: int
    stats_sum: torch.Tensor
    stats_outer: torch.Tensor
    epoch: int
    batches_done: int
    global_step: int
    carry: list[float]
    failures: list[tuple[int, str]]

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"adapter.{k}": v for k, v in self.adapter.items()}
        tensors.update(self.optimizer_tensors)
        tensors["rng.sampler"] = self.rng_sampler
        tensors["rng.torch"] = self.rng_torch
        if self.rng_cuda is not None:
            tensors["rng.cuda"] = self.rng_cuda
        tensors["stats.count"] = torch.tensor([self.stats_count], dtype=torch.int64)
        tensors["stats.sum"] = self.stats_sum
        tensors["stats.outer"] = self.stats_outer
        meta = {"epoch": self.epoch, "batches_done": self.batches_done, "global_step": self.global_step,
                "carry": self.carry, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "failures": [list(f) for f in self.failures]}
        return meta, tensors

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *, adapter: dict[str, torch.Tensor],
                   embed_dim: int, samples: int, epochs: int) -> RunState:
        """Read and vet a checkpoint's content against the run it is resumed into: ``adapter`` (the fresh
        adapter's state dict: names, shapes, dtypes), the embedding dimension, the number of samples and epochs."""
        weights = {k: _tensor(tensors, f"adapter.{k}", v.dtype, tuple(v.shape)) for k, v in adapter.items()}
        rng_len = torch.get_rng_state().numel()
        rng_sampler = _tensor(tensors, "rng.sampler", torch.uint8, (rng_len,))
        rng_torch = _tensor(tensors, "rng.torch", torch.uint8, (rng_len,))
        rng_cuda = _tensor(tensors, "rng.cuda", torch.uint8) if "rng.cuda" in tensors else None
        count = int(_tensor(tensors, "stats.count", torch.int64, (1,)).item())
        if not 2 <= count <= samples:
            raise _bad("stats.count", f"must be in [2, {samples}] (the task's images), got {count}")
        stats_sum = _tensor(tensors, "stats.sum", torch.float64, (embed_dim,))
        stats_outer = _tensor(tensors, "stats.outer", torch.float64, (embed_dim, embed_dim))
        epoch = _integer(meta, "epoch", 0, epochs - 1)
        batches_done = _integer(meta, "batches_done", 0, samples)
        global_step = _integer(meta, "global_step", 0, epochs * samples)
        carry = meta.get("carry")
        if (not isinstance(carry, list) or len(carry) != 4
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in carry)
                or min(carry[1:]) < 0 or carry[1] > batches_done or carry[2] > carry[3]):
            raise _bad("carry", f"must be [loss sum, batches <= batches_done, correct <= seen, seen], got {carry!r}")
        failures = _failures(meta.get("failures"), samples)
        optimizer = meta.get("optimizer")
        if (not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list)
                or not isinstance(optimizer.get("scalars"), dict)):
            raise _bad("optimizer", "must hold 'param_groups' (a list) and 'scalars' (an object)")
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        for name, value in opt_tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _bad(name, "holds non-finite values")
        scheduler, scaler = meta.get("scheduler"), meta.get("scaler")
        if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != global_step:
            raise _bad("scheduler", f"must be a scheduler state at step {global_step} (the checkpoint's global_step)")
        if scaler is not None and not isinstance(scaler, dict):
            raise _bad("scaler", "must be a gradient-scaler state or null")
        return cls(weights, optimizer, opt_tensors, scheduler, scaler, rng_sampler, rng_torch, rng_cuda, count,
                   stats_sum, stats_outer, epoch, batches_done, global_step, list(carry), failures)


def _failures(value: Any, samples: int) -> list[tuple[int, str]]:
    if not isinstance(value, list) or not all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], int) and not isinstance(f[0], bool)
            and 0 <= f[0] < samples and isinstance(f[1], str) for f in value):
        raise _bad("failures", f"must be a list of [sample index < {samples}, reason]")
    return [(int(i), why) for i, why in value]


def load_into(what: str, load: Callable[[], None]) -> None:
    """Run a torch ``load_state_dict`` and turn its errors into a :class:`TrainError` naming the field."""
    try:
        load()
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise _bad(what, f"does not fit this run ({type(exc).__name__}: {exc})") from None
