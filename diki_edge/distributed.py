"""torch.distributed for ``diki-edge train``: one process per device, launched by ``torchrun`` (never by us).

A process started by torchrun finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and the rendezvous address) in its
environment; :func:`process_group` then joins the group with NCCL when it trains on CUDA and Gloo on the CPU.
Without those variables it is a one-process run and every collective below is the identity, so the training
code has one path. What the collectives carry: the Gaussian sufficient statistics (float64, summed), the
per-epoch loss/accuracy counts, images skipped on other ranks, rank 0's checkpoint, and the final status.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diki_edge.device import resolve_device
from diki_edge.errors import TrainError

# A rank that dies makes its peers' next collective fail at once (Gloo/NCCL see the closed connection) and
# torchrun then stops the others; this only bounds a peer that hangs without dying.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    world: int
    rank: int
    local_rank: int
    device: torch.device
    device_note: str

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return ("nccl" if self.device.type == "cuda" else "gloo") if self.active else None

    # ---- collectives (identity in a one-process run)
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 stays float64: the statistics must equal a one-process run's to 1e-10)."""
        if not self.active:
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (checkpoint payloads, decisions only rank 0 can take)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]



def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextmanager
def process_group(device_spec: str) -> Iterator[DistContext]:
    """Join the torchrun process group (if any) on the device ``device_spec`` resolves to for this rank."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device, note = resolve_device(device_spec)
        yield DistContext(1, 0, 0, device, note)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, note = resolve_device(device_spec, local_rank)
    ctx = DistContext(world, rank, local_rank, device, note)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(ctx.backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    except Exception as exc:  # rendezvous problems surface here; say so instead of a deep traceback
        raise TrainError(f"rank {rank}/{world}: could not join the {ctx.backend} process group "
                            f"({type(exc).__name__}: {exc})") from None
    try:
        yield ctx
    finally:
        dist.destroy_process_group()
