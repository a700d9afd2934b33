"""Execution providers by name, user-written fall-back chains, provider options and memory settings
(diki_edge_runtime/providers.py, session.py) on a one-node graph committed under tests/runtime/data.

The installed build here is the CPU one; a GPU build that offers CUDA / TensorRT but cannot start them is played
by replacing ``get_available_providers`` and ``InferenceSession`` (the only way to see a session drop a provider
without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from diki_edge_runtime import providers as P
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.session import Session, provider_unavailable_reason

IDENTITY = Path(__file__).parent / "data" / "identity.onnx"  # y = x, float32 [n]
MISSING_HERE = [name for name, (ort_id, _) in P.KNOWN_PROVIDERS.items()
                if ort_id not in ort.get_available_providers()]


def test_the_committed_graph_is_what_the_tests_assume():
    sess = Session(IDENTITY, "cpu", threads=1)
    assert [i.name for i in sess._sess.get_inputs()] == ["x"] and sess.output_names == ["y"]


def test_cpu_path():
    sess = Session(IDENTITY, "cpu", threads=1)
    assert sess.providers == ["CPUExecutionProvider"] and sess.primary == "CPUExecutionProvider"
    assert sess.provider_notes == [] and not sess.on_cuda and sess.bank_device == "cpu"
    out = sess._sess.run(None, {"x": np.arange(4, dtype=np.float32)})[0]
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32))
    assert provider_unavailable_reason("cpu") is None
    # any spelling ONNX Runtime uses is accepted
    for name in ("CPU", "CPUExecutionProvider", "cpuexecutionprovider", ["cpu"]):
        assert Session(IDENTITY, name, threads=1).providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("name", MISSING_HERE)
def test_a_provider_the_build_lacks_is_an_error_naming_it_and_its_package(name):
    ort_id, package = P.KNOWN_PROVIDERS[name]
    with pytest.raises(RuntimeSetupError) as exc:
        Session(IDENTITY, name)
    msg = str(exc.value)
    assert f"the {name} execution provider ({ort_id}) is not in the installed ONNX Runtime" in msg
    assert package in msg and "Nothing was run on another provider" in msg
    assert "CPUExecutionProvider" in msg  # what this build does offer
    assert provider_unavailable_reason(name) == msg


def test_a_provider_known_to_onnx_runtime_but_without_a_short_name():
    lacking = sorted(set(ort.get_all_providers()) - set(ort.get_available_providers())
                     - {i for i, _ in P.KNOWN_PROVIDERS.values()})
    assert lacking, "this onnxruntime knows no other providers"
    with pytest.raises(RuntimeSetupError, match=f"{lacking[0]}.*not in the installed ONNX Runtime"):
        Session(IDENTITY, lacking[0].removesuffix("ExecutionProvider").lower())


def test_user_written_chain_uses_what_the_build_offers_and_says_what_it_skipped():
    sess = Session(IDENTITY, "tensorrt,openvino,cpu", threads=1)
    assert sess.providers == ["CPUExecutionProvider"] and sess.primary == "CPUExecutionProvider"
    assert len(sess.provider_notes) == 2
    assert sess.provider_notes[0].startswith("tensorrt skipped: not in this ONNX Runtime build")
    assert P.KNOWN_PROVIDERS["tensorrt"][1] in sess.provider_notes[0]
    assert sess.provider_notes[1].startswith("openvino skipped")
    assert Session(IDENTITY, ["dml", "cpu"], threads=1).providers == ["CPUExecutionProvider"]


def test_a_chain_without_cpu_never_runs_on_the_cpu():
    with pytest.raises(RuntimeSetupError, match="none of the providers of the chain tensorrt, cuda"):
        Session(IDENTITY, "tensorrt,cuda")


@pytest.mark.parametrize("provider,message", [
    ("tpu", "unknown execution provider 'tpu'"),
    ("", "give a name"),
    ("cuda,,cpu", "give a name"),
    ("cuda,CUDA", "names cuda more than once"),
    ("cpu,cuda", "put cpu last"),
])
def test_bad_provider_names(provider, message):
    with pytest.raises(RuntimeSetupError, match=message):
        Session(IDENTITY, provider)


# ------------------------------------------------------------------ a GPU build whose providers do not start
class _GpuBuildWithoutGpu:
    """onnxruntime-gpu on a machine without working CUDA: CUDA and TensorRT are offered, then dropped (or, with
    ``starts``, started: the session reports them while running on the CPU underneath)."""

    def __init__(self, monkeypatch, starts: tuple[str, ...] = ()):
        self.calls: list[list] = []
        real = ort.InferenceSession
        offered = [P.TENSORRT, P.CUDA, P.CPU]
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(offered))

        def fake(path, sess_options=None, providers=None):
            self.calls.append(providers)
            sess = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            reported = [n for n in names if n in starts] + ["CPUExecutionProvider"]

            class Reported:
                def __getattr__(self, attr):
                    return getattr(sess, attr)

                def get_providers(self):
                    return reported

            return Reported()

        monkeypatch.setattr(ort, "InferenceSession", fake)


def test_a_provider_the_session_drops_is_an_error_not_a_cpu_run(monkeypatch):
    _GpuBuildWithoutGpu(monkeypatch)
    for name in ("cuda", "tensorrt"):
        with pytest.raises(RuntimeSetupError) as exc:
            Session(IDENTITY, name)
        msg = str(exc.value)
        assert f"dropped the {name} execution provider at session start" in msg
        assert "nvidia-smi" in msg and "onnxruntime-gpu" in msg and "which was not asked for" in msg


def test_a_chain_falls_back_only_as_written(monkeypatch):
    _GpuBuildWithoutGpu(monkeypatch)
    sess = Session(IDENTITY, "tensorrt,cuda,cpu")
    assert sess.providers == ["CPUExecutionProvider"] and not sess.on_cuda
    assert [n.split(" ")[0] for n in sess.provider_notes] == ["tensorrt", "cuda"]
    assert all("could not start it" in n for n in sess.provider_notes)
    with pytest.raises(RuntimeSetupError, match="dropped the tensorrt, cuda execution providers"):
        Session(IDENTITY, "tensorrt,cuda")


def test_the_first_provider_that_starts_runs_the_graph(monkeypatch):
    _GpuBuildWithoutGpu(monkeypatch, starts=(P.CUDA,))
    sess = Session(IDENTITY, "tensorrt,cuda")
    assert sess.primary == P.CUDA and sess.on_cuda and sess.io_binding
    assert sess.providers == [P.CUDA, P.CPU]
    hint = P.start_failure_hint(P.TENSORRT)
    assert sess.provider_notes == [f"tensorrt skipped: ONNX Runtime could not start it ({hint})"]


def test_provider_options_reach_onnx_runtime(monkeypatch, tmp_path):
    build = _GpuBuildWithoutGpu(monkeypatch, starts=(P.TENSORRT, P.CUDA))
    sess = Session(IDENTITY, "tensorrt,cuda", device_id=1, low_memory=True,
                   provider_options={"tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_path": tmp_path,
                                                  "trt_max_workspace_size": 2**31},
                                     "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}})
    assert sess.primary == P.TENSORRT and sess.on_cuda
    assert build.calls[-1] == [
        (P.TENSORRT, {"trt_fp16_enable": "true", "trt_engine_cache_path": str(tmp_path),
                      "trt_max_workspace_size": str(2**31), "device_id": "1"}),
        (P.CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "device_id": "1",
                  "arena_extend_strategy": "kSameAsRequested"}),  # low memory: the GPU arena grows as requested
    ]


def test_options_onnx_runtime_refuses_are_a_clear_error(monkeypatch):
    """GPU providers check their option keys when the session starts (the CPU one ignores unknown keys)."""
    _GpuBuildWithoutGpu(monkeypatch)

    def refuse(path, sess_options=None, providers=None):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Unknown provider option: \"no_such_option\".")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(RuntimeSetupError) as exc:
        Session(IDENTITY, "cuda", provider_options={"cuda": {"no_such_option": 1}})
    assert "identity.onnx: ONNX Runtime cannot load the model with the cuda execution provider" in str(exc.value)
    assert 'Unknown provider option: "no_such_option"' in str(exc.value)


@pytest.mark.parametrize("options,message", [
    ({"cuda": {"device_id": 0}}, "provider options given for cuda, which the provider choice \\(cpu\\)"),
    ({"cpu": {"x": float("nan")}}, "cpu.x: nan is not a finite number"),
    ({"cpu": {"x": [1, 2]}}, "cpu.x: a provider option is a string, number or boolean, got list"),
    ({"cpu": {"x": None}}, "got NoneType"),
    ({"cpu": "use_arena=0"}, "options of 'cpu' must be an object"),
    ({"gpu": {}}, "unknown execution provider 'gpu'"),
])
def test_bad_provider_options(options, message):
    with pytest.raises(RuntimeSetupError, match=message):
        Session(IDENTITY, "cpu", provider_options=options)


def test_option_arguments_from_the_command_line():
    assert P.parse_option_args(["tensorrt:trt_fp16_enable=true", "tensorrt:trt_engine_cache_path=/c:d=e",
                                "cuda:device_id=0"], ["tensorrt", "cuda"]) == {
        "tensorrt": {"trt_fp16_enable": "true", "trt_engine_cache_path": "/c:d=e"}, "cuda": {"device_id": "0"}}
    assert P.parse_option_args(["device_type=GPU.0"], ["openvino"]) == {"openvino": {"device_type": "GPU.0"}}
    with pytest.raises(RuntimeSetupError, match="say which provider"):
        P.parse_option_args(["device_id=0"], ["cuda", "cpu"])
    for bad in ("tensorrt:trt_fp16_enable", "tensorrt:=1"):
        with pytest.raises(RuntimeSetupError, match="write NAME:KEY=VALUE"):
            P.parse_option_args([bad], ["tensorrt"])


def test_option_files(tmp_path):
    good = tmp_path / "options.json"
    good.write_text(json.dumps({"tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_enable": True},
                                "openvino": {"device_type": "NPU"}}))
    from_file = P.load_options_file(good)
    merged = P.merge_options(from_file, P.parse_option_args(["tensorrt:trt_fp16_enable=false"], ["tensorrt"]))
    assert merged == {"tensorrt": {"trt_fp16_enable": "false", "trt_engine_cache_enable": True},
                      "openvino": {"device_type": "NPU"}}  # the command line overrides the file, key by key
    assert P.normalise_options(merged, ort)[P.TENSORRT] == {"trt_fp16_enable": "false",
                                                            "trt_engine_cache_enable": "true"}
    with pytest.raises(RuntimeSetupError, match="options.json: provider options file not found"):
        P.load_options_file(tmp_path / "missing" / "options.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RuntimeSetupError, match="broken.json: cannot read the provider options file"):
        P.load_options_file(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(RuntimeSetupError, match="list.json: expected a JSON object"):
        P.load_options_file(tmp_path / "list.json")


def test_several_onnx_runtime_packages_are_called_out(monkeypatch):
    monkeypatch.setattr(P, "installed_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(RuntimeSetupError) as exc:
        Session(IDENTITY, "tensorrt")
    assert "several ONNX Runtime packages share the onnxruntime module (onnxruntime, onnxruntime-gpu)" in str(exc.value)


def test_the_installed_build_is_detected():
    builds = P.installed_builds()
    assert builds and all(b.startswith("onnxruntime") for b in builds)
    assert P.describe_build(ort).startswith(f"installed: {' + '.join(builds)} {ort.__version__}, offering ")


# ------------------------------------------------------------------ memory settings
def test_low_memory_turns_the_arena_and_memory_patterns_off():
    default = Session(IDENTITY, "cpu", threads=1)
    low = Session(IDENTITY, "cpu", threads=1, low_memory=True)
    assert default.memory_settings == {"low_memory": False, "cpu_mem_arena": True, "mem_pattern": True}
    assert low.memory_settings == {"low_memory": True, "cpu_mem_arena": False, "mem_pattern": False}
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(low._sess.run(None, {"x": x})[0], default._sess.run(None, {"x": x})[0])
