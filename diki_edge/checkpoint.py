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
import re
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
        h.update(f"{path.relative_to(folder.root).as_posix()}\0{label}\0{path.stat().st_size}\n".encode())
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
