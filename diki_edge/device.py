"""Where training runs and in which precision: ``--device auto|cpu|cuda|cuda:N`` and ``--precision fp32|bf16|fp16``.

Mixed precision only changes the adapter's training forward/backward (``torch.autocast`` on CUDA, with a gradient
scaler for fp16). The Gaussian statistics (fp32 embeddings summed in float64) and the class text table (fp32) are
computed outside autocast whatever the precision, so a bank's calibration does not depend on the hardware.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diki_edge.errors import TrainUsageError

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str, local_rank: int | None = None) -> tuple[torch.device, str]:
    """The torch device for ``spec`` and a one-line note saying what was picked (and why, for ``auto``).

    Under torchrun each process takes the GPU of its local rank (``cuda`` becomes ``cuda:LOCAL_RANK``);
    ``cuda`` asked for and unavailable is an error, never a silent CPU run.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank or 0)
            return device, f"device auto -> {device} ({torch.cuda.get_device_name(device)})"
        return torch.device("cpu"), "device auto -> cpu (no CUDA device visible)"
    if spec == "cpu":
        return torch.device("cpu"), "device cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TrainUsageError(f"--device {spec}: CUDA is not available (torch {torch.__version__}, "
                                  f"built for CUDA {torch.version.cuda or 'none'}; no GPU visible)")
        count = torch.cuda.device_count()
        if spec == "cuda":
            index = local_rank or 0
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise TrainUsageError(f"--device {spec}: expected cuda:N with N an integer") from None
        if not 0 <= index < count:
            raise TrainUsageError(f"--device {spec}: there are {count} CUDA devices (0..{count - 1})")
        device = torch.device("cuda", index)
        return device, f"device {device} ({torch.cuda.get_device_name(device)})"
    raise TrainUsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Precision:
    """The training forward's precision on one device: an autocast context and, for fp16, a gradient scaler."""

    name: str
    device: torch.device

    @classmethod
    def of(cls, name: str, device: torch.device) -> Precision:
        if name not in PRECISIONS:
            raise TrainUsageError(f"--precision {name!r}: expected one of {', '.join(PRECISIONS)}")
        if name != "fp32" and device.type != "cuda":
            raise TrainUsageError(f"--precision {name} needs a CUDA device (training runs on {device}); "
                                  "use --precision fp32 on the CPU")
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainUsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                                  "support (use fp16 or fp32)")
        return cls(name, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.name])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None
