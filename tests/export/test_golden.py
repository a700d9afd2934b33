"""The committed golden model folder (tests/runtime/golden, which the runtime's tests run on) is what today's
exporter and training core make: regenerated here in a temporary folder by scripts/make_golden_model.py and
compared file by file, so it cannot drift. When this fails after an intended change to the exporter or the
graph contract, regenerate it (``python scripts/make_golden_model.py`` after removing the folder) and commit it.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from support import GOLDEN, assert_graph_outputs_close, golden_script  # tests/support.py

from diki_edge_runtime.bank import GRAPH_ARRAYS
from diki_edge_runtime.contract import INPUT_NAMES, OUTPUT_NAMES


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return golden_script().make_golden(tmp_path_factory.mktemp("golden") / "golden")


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _outputs(root) -> dict[str, np.ndarray]:
    with np.load(root / "golden.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _session(root):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(root / "model" / "model.onnx"), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def test_same_files_and_description(fresh):
    assert _files(fresh) == _files(GOLDEN)
    assert json.loads((fresh / "golden.json").read_text()) == json.loads((GOLDEN / "golden.json").read_text())
    assert (fresh / "model" / "preprocess.json").read_text() == (GOLDEN / "model" / "preprocess.json").read_text()
    for rel in json.loads((GOLDEN / "golden.json").read_text())["images"]:
        with Image.open(fresh / rel) as a, Image.open(GOLDEN / rel) as b:
            assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b)), rel


def test_same_manifest_keys_graph_contract_and_backbone(fresh):
    new = json.loads((fresh / "model" / "manifest.json").read_text())
    old = json.loads((GOLDEN / "model" / "manifest.json").read_text())
    assert sorted(new) == sorted(old)
    for key in ("format_version", "inputs", "outputs", "files", "bank", "opset", "exporter", "precision",
                "skip_below", "validated_providers"):
        assert new[key] == old[key], key
    if new["backbone"]["weights_sha256"] != old["backbone"]["weights_sha256"]:
        # Same seed, other random-number kernels (e.g. ATEN_CPU_CAPABILITY=default, scripts/check_portability.py):
        # the weights may differ in their last bits only, which the graph's initializers show.
        assert_same_initializers(fresh / "model" / "model.onnx", GOLDEN / "model" / "model.onnx")
    layout = {k: v for k, v in new["bank_layout"].items() if k != "backbone"}
    assert layout == {k: v for k, v in old["bank_layout"].items() if k != "backbone"}
    assert sorted(new["validation"]) == sorted(old["validation"])


def assert_same_initializers(new_path, old_path) -> None:
    """The two graphs hold the same constants up to the rounding of torch's normal sampling.

    ``torch.Tensor.normal_`` draws by Box-Muller, ``sqrt(-2 log u) cos(2 pi v)``; its scalar and vectorised kernels
    evaluate log, cos and sqrt with different (<= 1 ulp) implementations, so a weight differs by at most a few
    float32 ulps (u = 6e-8): under 1e-6 of its magnitude. Constant folding multiplies at most two weights, doubling
    that. The bound, 1e-5 of each initializer's largest magnitude, leaves a margin of 5."""
    import onnx
    from onnx import numpy_helper

    def constants(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    new, old = constants(new_path), constants(old_path)
    assert sorted(new) == sorted(old)
    for name, want in old.items():
        got = new[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if np.issubdtype(want.dtype, np.floating) and want.size:
            bound = 1e-5 * float(np.abs(want).max())
            assert float(np.abs(got.astype(np.float64) - want).max()) <= bound, name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_same_graph_interface(fresh):
    new, old = _session(fresh), _session(GOLDEN)
    for a, b in ((new.get_inputs(), old.get_inputs()), (new.get_outputs(), old.get_outputs())):
        assert [(t.name, t.type, t.shape) for t in a] == [(t.name, t.type, t.shape) for t in b]
    assert [t.name for t in old.get_inputs()] == list(INPUT_NAMES)
    assert [t.name for t in old.get_outputs()] == list(OUTPUT_NAMES)


def test_same_banks(fresh):
    new, old = golden_script().golden_banks(fresh), golden_script().golden_banks(GOLDEN)
    assert sorted(new) == sorted(old)
    for name in old:
        assert [t.to_json() for t in new[name].tasks] == [t.to_json() for t in old[name].tasks], name
        for key in GRAPH_ARRAYS:  # what the graph consumes; whiten is compared through the outputs below
            if key != "gauss_whiten":
                np.testing.assert_allclose(new[name].arrays[key], old[name].arrays[key], rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name}: {key}")


def test_regenerated_graph_and_reference_reproduce_the_committed_outputs(fresh):
    """The new graph, fed the committed pixels and banks, and the new PyTorch reference both give the committed
    golden outputs within the export validation's bounds."""
    committed, regenerated = _outputs(GOLDEN), _outputs(fresh)
    assert sorted(regenerated) == sorted(committed)
    np.testing.assert_allclose(regenerated["pixel_values"], committed["pixel_values"], atol=1e-6)
    session = _session(fresh)
    for name, bank in golden_script().golden_banks(GOLDEN).items():
        want = {k: committed[f"{name}.{k}"] for k in OUTPUT_NAMES}
        feeds = {"pixel_values": committed["pixel_values"], **bank.graph_inputs()}
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))
        inputs = bank.graph_inputs()
        assert_graph_outputs_close(got, want, inputs, f"regenerated graph, bank {name}")
        assert_graph_outputs_close({k: regenerated[f"{name}.{k}"] for k in OUTPUT_NAMES}, want, inputs,
                                   f"regenerated reference, bank {name}")


def test_regenerated_label_and_text_references_reproduce_the_committed_ones(fresh):
    """The references the runtime's label tests compare with (golden.npz ``three.labels.*``, ``text.*``)."""
    committed, regenerated = _outputs(GOLDEN), _outputs(fresh)
    keys = [k for k in committed if k.startswith(("three.labels.", "text."))]
    assert len(keys) == 5
    for key in keys:
        if key == "three.labels.task":
            np.testing.assert_array_equal(regenerated[key], committed[key])
        else:
            assert np.abs(regenerated[key] - committed[key]).max() <= 1e-4, key
