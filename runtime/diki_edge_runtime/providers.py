"""Execution providers by name: what the user asks for, what the installed ONNX Runtime build offers, and what the
session really started with. Never a silent fall-back to the CPU.

Names: the short names of :data:`KNOWN_PROVIDERS` (``cpu``, ``cuda``, ``tensorrt``, ``openvino``, ``coreml``,
``rocm``, ``migraphx``, ``dml``) or any provider id ONNX Runtime knows (``XnnpackExecutionProvider``, ``qnn``...),
case-insensitive.

One name: that provider, or an error. A comma-separated chain (``tensorrt,cuda,cpu``) is a fall-back the user
wrote out: the providers of the chain that this build offers are registered in that order (ONNX Runtime gives each
node to the first one that can run it), the ones it lacks or that fail to start are skipped with a note, and the
first one that starts is the one in use. Only what is written is used: ``cpu`` runs only if it is in the chain
(ONNX Runtime itself still places the few nodes a GPU provider has no kernel for on its CPU provider; that shows in
the providers reported). A provider that is missing from the build, or that the session drops (onnxruntime-gpu
lists CUDA and TensorRT even when their libraries are absent, then drops them at session start), with no later
entry of the chain started, is a :class:`RuntimeSetupError` naming it and the package that provides it.

Provider options (TensorRT fp16 and engine cache, OpenVINO device type, ...) map a provider name to
``{key: value}``; they come from Python, from a JSON file (:func:`load_options_file`) or from ``NAME:KEY=VALUE``
arguments (:func:`parse_option_args`). Values are scalars; booleans are passed as ``true`` / ``false``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diki_edge_runtime.contract import read_json_file
from diki_edge_runtime.errors import RuntimeSetupError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

# short name -> (ONNX Runtime provider id, the package that provides it)
KNOWN_PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": (CPU, "onnxruntime (pip install 'diki-edge-runtime[cpu]')"),
    "cuda": (CUDA, "onnxruntime-gpu (pip install 'diki-edge-runtime[gpu]'; needs the CUDA 12 and cuDNN 9 "
                   "libraries)"),
    "tensorrt": (TENSORRT, "onnxruntime-gpu with NVIDIA TensorRT (pip install 'diki-edge-runtime[gpu]' tensorrt; "
                           "on Jetson the JetPack onnxruntime-gpu wheel)"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino (Intel CPUs, iGPUs and NPUs)"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime on macOS (the PyPI macOS wheels include CoreML)"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm (AMD's ROCm wheels)"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx (AMD's ROCm wheels)"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml (Windows, DirectX 12 GPUs)"),
}
# Providers whose inputs can be bound as OrtValues on the CUDA device (TensorRT runs on CUDA memory).
CUDA_DEVICE_PROVIDERS = (CUDA, TENSORRT)
# Providers that take a ``device_id`` option.
DEVICE_ID_PROVIDERS = (CUDA, TENSORRT, "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider")
_SHORT = {ort_id: name for name, (ort_id, _) in KNOWN_PROVIDERS.items()}


def short_name(ort_id: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``; an id without a short name is returned as is."""
    return _SHORT.get(ort_id, ort_id)


def package_for(ort_id: str) -> str:
    known = KNOWN_PROVIDERS.get(short_name(ort_id))
    return known[1] if known else "an ONNX Runtime build that includes it (see onnxruntime.ai, execution providers)"


def installed_builds() -> list[str]:
    """The installed distributions that provide the ``onnxruntime`` module (onnxruntime, onnxruntime-gpu, ...)."""
    from importlib import metadata  # only on the error path: importing it costs ~50 ms of start-up

    try:
        return sorted(set(metadata.packages_distributions().get("onnxruntime", [])))
    except Exception:  # a broken metadata entry must not hide the real error
        return []


def describe_build(ort: Any) -> str:
    """One line: which ONNX Runtime build is installed and the providers it offers."""
    builds = installed_builds()
    line = (f"installed: {' + '.join(builds) or 'onnxruntime'} {ort.__version__}, offering "
            f"{', '.join(ort.get_available_providers())}")
    if len(builds) > 1:
        line += (f"; several ONNX Runtime packages share the onnxruntime module ({', '.join(builds)}) and the last "
                 "one installed wins: uninstall all of them, then install the one you need")
    return line


def resolve(name: str, ort: Any) -> str:
    """A provider name (short name or ONNX Runtime id, any case) -> the ONNX Runtime id."""
    key = str(name).strip()
    if key.lower() in KNOWN_PROVIDERS:
        return KNOWN_PROVIDERS[key.lower()][0]
    known_ids = set(ort.get_all_providers()) | {i for i, _ in KNOWN_PROVIDERS.values()}
    for ort_id in known_ids:
        if key.lower() in (ort_id.lower(), ort_id.lower().removesuffix("executionprovider")):
            return ort_id
    raise RuntimeSetupError(f"unknown execution provider {name!r}; use one of {', '.join(KNOWN_PROVIDERS)} or an "
                            "ONNX Runtime provider id (onnxruntime.get_all_providers())")


def parse_chain(provider: str | Sequence[str], ort: Any) -> list[str]:
    """``"tensorrt,cuda,cpu"`` (or a list of names) -> ONNX Runtime ids in that order."""
    names = provider.split(",") if isinstance(provider, str) else list(provider)
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise RuntimeSetupError(f"provider {provider!r}: give a name, or names separated by commas "
                                "(e.g. tensorrt,cuda,cpu)")
    ids = [resolve(n, ort) for n in names]
    repeated = sorted({short_name(i) for i in ids if ids.count(i) > 1})
    if repeated:
        raise RuntimeSetupError(f"provider chain {provider!r} names {', '.join(repeated)} more than once")
    if CPU in ids[:-1]:
        raise RuntimeSetupError(f"provider chain {provider!r}: cpu takes every node, so the providers after it would "
                                "never run; put cpu last")
    return ids


# ---------------------------------------------------------------------------------------------- provider options
def _option_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RuntimeSetupError(f"{where}: {value} is not a finite number")
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise RuntimeSetupError(f"{where}: a provider option is a string, number or boolean, got {type(value).__name__}")


def normalise_options(options: Mapping[str, Mapping[str, Any]] | None, ort: Any,
                      source: str = "provider options") -> dict[str, dict[str, str]]:
    """``{provider name: {key: value}}`` -> ``{ONNX Runtime id: {key: str}}``, checked."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise RuntimeSetupError(f"{source}: expected an object {{provider: {{option: value}}}}, "
                                f"got {type(options).__name__}")
    out: dict[str, dict[str, str]] = {}
    for name, values in options.items():
        ort_id = resolve(name, ort)
        if not isinstance(values, Mapping):
            raise RuntimeSetupError(f"{source}: options of {name!r} must be an object {{option: value}}, "
                                    f"got {type(values).__name__}")
        merged = out.setdefault(ort_id, {})
        for key, value in values.items():
            merged[str(key)] = _option_value(value, f"{source}: {name}.{key}")
    return out


def load_options_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """A JSON file ``{"tensorrt": {"trt_fp16_enable": true, "trt_engine_cache_path": "cache/"}, ...}``."""
    p = Path(path)
    data = read_json_file(p, "provider options file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RuntimeSetupError(f"{p}: expected a JSON object {{provider: {{option: value}}}}")
    return data


def parse_option_args(items: Iterable[str], chain: Sequence[str]) -> dict[str, dict[str, str]]:
    """``NAME:KEY=VALUE`` arguments (``KEY=VALUE`` alone when the chain names one provider) -> options by name.
    Values stay strings: ONNX Runtime parses them itself."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        head, eq, value = str(item).partition("=")
        name, colon, key = head.rpartition(":")
        if not eq or not key.strip():
            raise RuntimeSetupError(f"provider option {item!r}: write NAME:KEY=VALUE (e.g. "
                                    "tensorrt:trt_fp16_enable=true)")
        if not colon:
            if len(chain) != 1:
                raise RuntimeSetupError(f"provider option {item!r}: say which provider it is for (NAME:KEY=VALUE); "
                                        f"the chain has {len(chain)}")
            name = chain[0]
        out.setdefault(name.strip(), {})[key.strip()] = value.strip()
    return out


def merge_options(*layers: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, key by key (e.g. a JSON file, then command-line options)."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, values in (layer or {}).items():
            out.setdefault(name, {}).update(values)
    return out


# ---------------------------------------------------------------------------------------------- choosing, checking
@dataclass
class ProviderPlan:
    """The providers to register for one session, and what happened to each one the user asked for."""

    requested: list[str]  # ONNX Runtime ids, the user's order
    register: list[tuple[str, dict[str, str]]]  # (id, options) handed to InferenceSession
    notes: list[str] = field(default_factory=list)  # skipped entries of a user-written chain, and why
    in_use: list[str] = field(default_factory=list)  # the session's providers (after check_started)

    def ort_providers(self) -> list[tuple[str, dict[str, str]]]:
        return [(i, dict(o)) for i, o in self.register]

    @property
    def primary(self) -> str | None:
        """The first requested provider that started: the one that runs the graph."""
        return next((i for i in self.requested if i in self.in_use), None)


def plan_providers(provider: str | Sequence[str], ort: Any, options: Mapping[str, Mapping[str, Any]] | None = None,
                   device_id: int = 0) -> ProviderPlan:
    """Which providers to register (see the module docstring); raises when nothing requested is in this build."""
    requested = parse_chain(provider, ort)
    opts = normalise_options(options, ort)
    unused = [short_name(i) for i in opts if i not in requested]
    if unused:
        raise RuntimeSetupError(f"provider options given for {', '.join(unused)}, which the provider "
                                f"{'chain' if len(requested) > 1 else 'choice'} "
                                f"({', '.join(short_name(i) for i in requested)}) does not use")
    available = set(ort.get_available_providers())
    plan = ProviderPlan(requested, [])
    for ort_id in requested:
        if ort_id not in available:
            plan.notes.append(f"{short_name(ort_id)} skipped: not in this ONNX Runtime build (provided by "
                              f"{package_for(ort_id)})")
            continue
        these = dict(opts.get(ort_id, {}))
        if ort_id in DEVICE_ID_PROVIDERS:
            these.setdefault("device_id", str(int(device_id)))
        plan.register.append((ort_id, these))
    if not plan.register:
        missing = requested[0] if len(requested) == 1 else None
        what = (f"the {short_name(missing)} execution provider ({missing}) is not in the installed ONNX Runtime; "
                f"it is provided by {package_for(missing)}" if missing else
                f"none of the providers of the chain {', '.join(short_name(i) for i in requested)} is in the "
                f"installed ONNX Runtime ({'; '.join(plan.notes)})")
        raise RuntimeSetupError(f"{what}. {describe_build(ort)}. Nothing was run on another provider.")
    return plan


def check_started(plan: ProviderPlan, started: Sequence[str], ort: Any) -> ProviderPlan:
    """Compare the session's providers with the plan; a dropped provider with no started successor is an error."""
    plan.in_use = list(started)
    dropped = [i for i, _ in plan.register if i not in started]
    for ort_id in dropped:
        plan.notes.append(f"{short_name(ort_id)} skipped: ONNX Runtime could not start it ("
                          f"{start_failure_hint(ort_id)})")
    if plan.primary is None:
        names = ", ".join(short_name(i) for i in dropped)
        raise RuntimeSetupError(
            f"ONNX Runtime dropped the {names} execution provider{'s' if len(dropped) > 1 else ''} at session start "
            f"({'; '.join(start_failure_hint(i) for i in dropped)}); it would have run on {', '.join(started)} "
            f"instead, which was not asked for. Provided by {package_for(dropped[0])}. {describe_build(ort)}.")
    return plan


def start_failure_hint(ort_id: str) -> str:
    if ort_id in (CUDA, TENSORRT):
        extra = ", the TensorRT libraries" if ort_id == TENSORRT else ""
        return ("CUDA or cuDNN libraries" + extra + " missing or of the wrong version, or no visible GPU: check "
                "nvidia-smi, CUDA_VISIBLE_DEVICES and the onnxruntime-gpu requirements")
    return "its libraries or device are missing, or an option was refused"
