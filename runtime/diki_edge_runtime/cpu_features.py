"""What the CPU's matrix units offer, read from ``/proc/cpuinfo`` flags: which precisions have native kernels.

* bf16: ``amx_bf16`` (Intel AMX tiles) or ``avx512_bf16`` (AVX512-BF16 dot products). OpenVINO's CPU plugin runs
  bf16 on either; ONNX Runtime's CPU provider has no bf16 arithmetic at all.
* int8: ``amx_int8``, ``avx512_vnni`` or ``avx_vnni`` (ONNX Runtime's ``MatMulInteger`` uses them).

A CPU without a flag (or a system without ``/proc/cpuinfo``: macOS, Windows) reports no such kernel: nothing is
assumed that the flags do not say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Fastest first: the kernel listed first is the one a library picks when the CPU has several.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
MATRIX_FLAGS = ("amx_tile",) + BF16_FLAGS + INT8_FLAGS + ("avx512f", "avx2", "fma")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU flags that matter to the matrix kernels (a subset of the ``flags`` line of ``/proc/cpuinfo``)."""

    flags: frozenset[str]
    model_name: str = ""

    @property
    def bf16_kernels(self) -> list[str]:
        return [f for f in BF16_FLAGS if f in self.flags]

    @property
    def int8_kernels(self) -> list[str]:
        return [f for f in INT8_FLAGS if f in self.flags]

    @property
    def has_bf16(self) -> bool:
        return bool(self.bf16_kernels)

    @property
    def has_int8(self) -> bool:
        return bool(self.int8_kernels)

    def kernels(self) -> list[str]:
        """The matrix-unit flags this CPU has, in :data:`MATRIX_FLAGS` order."""
        return [f for f in MATRIX_FLAGS if f in self.flags]


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The text of ``/proc/cpuinfo`` -> its first processor's flags and model name (x86 ``flags``; ARM
    ``Features``)."""
    flags: frozenset[str] = frozenset()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return CpuFeatures(flags, model)


def read_cpu_features(path: str | os.PathLike = CPUINFO) -> CpuFeatures:
    """This machine's :class:`CpuFeatures`; none at all where ``path`` cannot be read."""
    try:
        return parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        return CpuFeatures(frozenset())
