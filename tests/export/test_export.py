"""diki_edge_export: one ONNX graph, bank arrays as inputs, validated against CalibratedDiki."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from support import assert_graph_outputs_close  # noqa: E402  (tests/support.py)

from diki_edge.calibrated import CalibratedDiki, bank_tensors  # noqa: E402
from diki_edge.layout import layout_for  # noqa: E402
from diki_edge.model import DikiCLIP  # noqa: E402
from diki_edge.synthetic import synthetic_task  # noqa: E402
from diki_edge_export import export_model  # noqa: E402
from diki_edge_export.errors import ExportError  # noqa: E402
from diki_edge_runtime import files  # noqa: E402
from diki_edge_runtime.bank import TaskBank  # noqa: E402
from diki_edge_runtime.contract import INPUT_NAMES, OUTPUT_NAMES, Manifest  # noqa: E402

N_CLUSTERS = 7  # tasks use clusters 0..4; 5 and 6 are never in a bank (unfamiliar images)
UNFAMILIAR = (5, 6)


class World:
    """A tiny backbone, images clustered per task, and banks of 1, 2, 3 and 5 tasks."""

    def __init__(self, spec: str):
        from diki_edge.backbone import load_backbone

        self.backbone = load_backbone(spec)
        self.diki = DikiCLIP(self.backbone.model).eval()
        self.layout = layout_for(self.backbone, self.diki)
        g = torch.Generator().manual_seed(0)
        self.means = [torch.randn(1, 3, 32, 32, generator=g) for _ in range(N_CLUSTERS)]
        self.g = torch.Generator().manual_seed(1)
        full = TaskBank.empty(self.layout)
        for t in range(5):
            task = synthetic_task(self.diki, self.backbone.tokenizer, f"task{t}", [f"c{t}_{j}" for j in range(2 + t)],
                                  self.images(t, 48), self.layout.calibration_levels, seed=t)
            full = full.with_task(task)
        self.banks = {1: full.select([3]), 2: full.select([0, 1]), 3: full.select([0, 1, 2]), 5: full}
        self.calibrated = CalibratedDiki(self.diki).eval()

    def images(self, cluster: int, n: int) -> torch.Tensor:
        return self.means[cluster] + 0.3 * torch.randn(n, 3, 32, 32, generator=self.g)

    def reference(self, pixels, bank: TaskBank) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.calibrated(pixels, **bank_tensors(bank))
        return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, out)}


def run_graph(session, pixels, bank: TaskBank) -> dict[str, np.ndarray]:
    feeds = dict(bank.graph_inputs())
    feeds["pixel_values"] = pixels.numpy()
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds)))


def assert_parity(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], bank: TaskBank) -> None:
    """The export validation's fp32 bounds, derived in ``diki_edge_runtime.tolerances`` (tests/support.py)."""
    assert_graph_outputs_close(got, ref, bank.graph_inputs(), "graph vs CalibratedDiki")


@pytest.fixture(scope="module")
def world(tiny_model_spec) -> World:
    return World(tiny_model_spec)


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    bank_path = world.banks[2].save(root / "bank2.safetensors")
    result = export_model(bank_path, root / "model", backbone=world.backbone, quiet=True)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    return result, session


def test_folder_contents_and_manifest(exported, world):
    result, session = exported
    folder = result.out_dir
    assert sorted(p.name for p in folder.iterdir()) == ["bank.safetensors", "manifest.json", "model.onnx",
                                                         "preprocess.json", "text.onnx", "tokenizer.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert Manifest.from_json(manifest) == result.manifest  # the typed manifest round-trips through the file
    assert manifest["format_version"] == 1
    assert list(manifest["inputs"]) == list(INPUT_NAMES)
    assert list(manifest["outputs"]) == list(OUTPUT_NAMES)
    assert manifest["inputs"]["pixel_values"] == {"shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert manifest["inputs"]["bank_k"]["shape"] == ["tasks", 2, 8, 64]
    assert manifest["inputs"]["class_task"]["dtype"] == "int64"
    assert manifest["outputs"]["logits"]["shape"] == ["batch", "classes"]
    assert manifest["backbone"]["weights_sha256"] == world.backbone.weights_sha256
    assert manifest["bank_layout"] == world.banks[2].layout.to_json()
    assert manifest["exporter"] == "torchscript" and manifest["opset"] >= 18
    assert manifest["precision"] == "fp32" and manifest["skip_below"] == 1e-6
    assert manifest["validation"]["fp32"]["passed"]
    assert manifest["validated_providers"] == ["CPUExecutionProvider"]
    assert "not_validated" not in manifest
    cases = {c["name"]: c for c in manifest["validation"]["fp32"]["cases"]}
    assert cases["probe/real"]["pass2_rows"] > 0  # the validation exercised pass 2 ...
    assert any(c["pass2_rows"] == 0 for c in cases.values())  # ... and the zero-row sub-batch

    prep = json.loads((folder / "preprocess.json").read_text())
    assert prep["size"] == [32, 32] and prep["mode"] == "RGB" and prep["interpolation"] == "bicubic"
    assert prep["resize_mode"] == "shortest" and len(prep["mean"]) == 3 and prep["fill_color"] == 0

    bank = TaskBank.load(folder / "bank.safetensors")
    assert bank.task_names == world.banks[2].task_names

    model = onnx.load(str(result.model_path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in session.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["pixel_values"][0] == "batch" and shapes["gauss_whiten"][0] == "tasks"
    assert shapes["class_embeds"][1] == "classes"


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("batch", [1, 4, 9])
def test_same_graph_any_bank_and_batch(exported, world, tasks, batch):
    _, session = exported
    clusters = [i % (tasks + 2) for i in range(batch)]  # tasks' own clusters plus unfamiliar ones
    clusters = [c if c < tasks else UNFAMILIAR[c - tasks] for c in clusters]
    pixels = torch.cat([world.images(c, 1) for c in clusters])
    bank = world.banks[tasks]
    ref = world.reference(pixels, bank)
    got = run_graph(session, pixels, bank)
    assert got["logits"].shape == (batch, len(bank.class_names))
    assert got["task_scores"].shape == (batch, tasks)
    assert_parity(got, ref, bank)


def test_per_sample_mixing_equals_each_image_alone(exported, world):
    _, session = exported
    bank = world.banks[5]
    clusters = [0, 5, 3, 1, 6, 4, 2, 0, 5]
    pixels = torch.cat([world.images(c, 1) for c in clusters])
    batch = run_graph(session, pixels, bank)
    assert set(batch["task"][[0, 2, 3, 5, 6]]) == {0, 3, 1, 4, 2}  # each image picked its own task
    assert (batch["weight"][[0, 2, 3, 5, 6]] > 0.5).all() and (batch["weight"][[1, 4, 8]] < 1e-6).all()
    for i in range(len(clusters)):
        alone = run_graph(session, pixels[i:i + 1], bank)
        assert alone["task"][0] == batch["task"][i]
        assert abs(alone["weight"][0] - batch["weight"][i]) <= 1e-6
        np.testing.assert_allclose(alone["image_embeds"][0], batch["image_embeds"][i], atol=1e-5)
        np.testing.assert_allclose(alone["logits"][0], batch["logits"][i], atol=1e-4)
    assert_parity(batch, world.reference(pixels, bank), bank)


def test_all_unfamiliar_batch_skips_pass_two(exported, world):
    _, session = exported
    bank = world.banks[3]
    pixels = torch.cat([world.images(5, 3), world.images(6, 3)])
    got = run_graph(session, pixels, bank)  # the zero-row sub-batch through the whole encoder
    assert (got["weight"] < 1e-6).all()
    with torch.no_grad():
        frozen = world.diki.encode_image(pixels).numpy()
    np.testing.assert_allclose(got["image_embeds"], frozen, atol=1e-5)
    assert_parity(got, world.reference(pixels, bank), bank)
    # Skipping is exact within the parity bound: running pass 2 anyway changes the embedding by < 1e-4.
    with torch.no_grad():
        full = CalibratedDiki(world.diki, skip_below=0.0)(pixels, **bank_tensors(bank))
    assert np.max(np.abs(full.image_embeds.numpy() - got["image_embeds"])) <= 1e-4


def test_int8_export_meets_its_bound(world, tmp_path):
    from diki_edge_export import validate

    bank_path = world.banks[3].save(tmp_path / "bank.safetensors")
    result = export_model(bank_path, tmp_path / "int8", backbone=world.backbone, precision="int8", quiet=True)
    manifest = result.manifest.to_json()
    assert manifest["precision"] == "int8"
    assert manifest["validation"]["fp32"]["passed"] and manifest["validation"]["int8"]["passed"]
    summary = manifest["validation"]["int8"]["summary"]
    assert summary["cosine_min"] >= validate.INT8_MIN_COSINE
    assert summary["top1_agreement"] >= validate.INT8_MIN_TOP1_AGREEMENT
    model = onnx.load(str(result.model_path))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in model.graph.node)
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["bank.safetensors", "manifest.json", "model.onnx",
                                                                 "preprocess.json", "text.onnx", "tokenizer.json"]
    # the text graph is quantised too and meets the same bounds against its fp32 form
    text = manifest["text"]["validation"]
    assert text["fp32"]["passed"] and text["int8"]["passed"]
    assert text["int8"]["summary"]["cosine_min"] >= validate.INT8_MIN_COSINE
    assert text["int8"]["summary"]["top1_agreement"] >= validate.INT8_MIN_TOP1_AGREEMENT
    text_model = onnx.load(str(result.out_dir / "text.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in text_model.graph.node)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    pixels = torch.cat([world.images(0, 2), world.images(5, 2)])
    got = run_graph(session, pixels, world.banks[3])
    ref = world.reference(pixels, world.banks[3])
    np.testing.assert_array_equal(got["task"][:2], ref["task"][:2])  # familiar images keep their task
    assert (got["weight"][2:] < 1e-6).all()  # (unfamiliar ones may pick another task: M ~ 0 either way)


def test_fp16_export_states_where_it_was_validated(world, tmp_path):
    bank_path = world.banks[2].save(tmp_path / "bank.safetensors")
    result = export_model(bank_path, tmp_path / "fp16", backbone=world.backbone, precision="fp16", quiet=True)
    manifest = result.manifest.to_json()
    assert manifest["precision"] == "fp16"
    assert manifest["inputs"]["pixel_values"]["dtype"] == "float32"  # fp16 encoder, float32 interface
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDA" in manifest["not_validated"]  # never pretends the CUDA target was validated
    fp16 = manifest["validation"].get("fp16")
    if fp16 is not None:
        assert fp16["passed"] and fp16["summary"]["cosine_min"] >= 0.999
        assert manifest["validated_providers"] == [fp16["provider"]]
    text_fp16 = manifest["text"]["validation"].get("fp16")
    if fp16 is not None:  # where the image graph's fp16 runs, the text graph's does too, within the same bound
        assert text_fp16["passed"] and text_fp16["summary"]["cosine_min"] >= 0.999
    assert manifest["text"]["inputs"]["prompt_weight"]["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------- errors
def test_hash_mismatch_is_a_clear_error(world, tmp_path):
    from diki_edge.backbone import load_backbone
    from diki_edge.testing import write_tiny_model_dir

    other = load_backbone(f"local-dir:{write_tiny_model_dir(tmp_path / 'other', seed=1)}")
    bank_path = world.banks[2].save(tmp_path / "bank.safetensors")
    with pytest.raises(ExportError, match="weights"):
        export_model(bank_path, tmp_path / "out", backbone=other, quiet=True)
    with pytest.raises(ExportError, match="was made for backbone"):
        export_model(bank_path, tmp_path / "out", model=f"local-dir:{tmp_path / 'other'}", quiet=True)
    assert not (tmp_path / "out").exists()


def test_backbone_reloaded_from_bank_metadata(world, tmp_path, tiny_model_spec):
    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    assert world.banks[1].layout.backbone["model"] == tiny_model_spec
    result = export_model(bank_path, tmp_path / "out", quiet=True)  # no model given: from the bank
    assert result.manifest.backbone["model"] == tiny_model_spec


def test_empty_bank_is_a_clear_error(world, tmp_path):
    bank_path = TaskBank.empty(world.layout).save(tmp_path / "empty.safetensors")
    with pytest.raises(ExportError, match="no tasks"):
        export_model(bank_path, tmp_path / "out", backbone=world.backbone, quiet=True)
    assert not (tmp_path / "out").exists()


def test_existing_folder_needs_force(world, tmp_path):
    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    out = tmp_path / "out"
    export_model(bank_path, out, backbone=world.backbone, quiet=True)
    with pytest.raises(ExportError, match="already exists"):
        export_model(bank_path, out, backbone=world.backbone, quiet=True)
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"fp32"', '"fp32" '))
    stale = tmp_path / f".out{files.TEMP_MARK}{files._host()}-{_dead_pid()}-beef"  # a killed export's staging
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"0" * 1000)
    export_model(bank_path, out, backbone=world.backbone, force=True, quiet=True)
    assert (out / "model.onnx").is_file() and '"fp32" ' not in (out / "manifest.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors", "out"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_force_replaces_only_a_model_folder(world, tmp_path):
    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (photos / name).write_text("mine")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(photos)
    cases = {photos: r"photos holds 2 entries \(a\.jpg, b\.jpg\) and no manifest\.json: not a diki-edge model folder",
             a_file: "notes.txt is a file, not a diki-edge model folder",
             link: "link is a symlink"}
    for out, expected in cases.items():
        with pytest.raises(ExportError, match=expected):
            export_model(bank_path, out, backbone=world.backbone, force=True, quiet=True)
    assert sorted(os.listdir(photos)) == ["a.jpg", "b.jpg"] and a_file.read_text() == "mine" and link.is_symlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="empty is empty and no manifest.json"):
        export_model(bank_path, empty, backbone=world.backbone, force=True, quiet=True)


def test_an_unwritable_output_is_reported_before_loading(world, tmp_path, monkeypatch):
    from diki_edge_runtime.files import WriteError

    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    monkeypatch.setattr(TaskBank, "load", lambda *a, **k: loaded.append(a) or None)
    with pytest.raises(WriteError, match=r"file/model: cannot create the model folder: .* is not a folder"):
        export_model(bank_path, blocker / "model", backbone=world.backbone, quiet=True)
    assert loaded == []


def test_failed_export_leaves_nothing(world, tmp_path, monkeypatch):
    from diki_edge_export import validate

    bank_path = world.banks[2].save(tmp_path / "bank.safetensors")
    monkeypatch.setitem(validate.FP32_BOUNDS, "embeds_max_abs", -1.0)  # make validation fail
    with pytest.raises(ExportError, match="validation failed"):
        export_model(bank_path, tmp_path / "out", backbone=world.backbone, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_bad_arguments(world, tmp_path):
    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    with pytest.raises(ExportError, match="precision"):
        export_model(bank_path, tmp_path / "o", backbone=world.backbone, precision="bf16", quiet=True)
    with pytest.raises(ExportError, match="opset"):
        export_model(bank_path, tmp_path / "o", backbone=world.backbone, opset=13, quiet=True)
    from diki_edge_runtime.errors import BankError

    with pytest.raises(BankError):
        export_model(tmp_path / "missing.safetensors", tmp_path / "o", backbone=world.backbone, quiet=True)


def test_command_prints_clear_errors(world, tmp_path):
    import typer
    from typer.testing import CliRunner

    from diki_edge_export.command import export_command

    app = typer.Typer()
    app.command()(export_command)
    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(app, ["--bank", str(bank_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "already exists" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["--bank", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "not found" in res.output


def test_command_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, diki_edge_export.command, diki_edge_export; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dynamo_exporter_is_also_validated(world, tmp_path):
    bank_path = world.banks[2].save(tmp_path / "bank.safetensors")
    result = export_model(bank_path, tmp_path / "dyn", backbone=world.backbone, dynamo=True, quiet=True)
    assert result.manifest.exporter == "dynamo" and result.manifest.validation["fp32"]["passed"]
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    pixels = torch.cat([world.images(5, 2), world.images(6, 1)])  # all unfamiliar: zero-row pass 2
    bank = world.banks[3]
    assert_parity(run_graph(session, pixels, bank), world.reference(pixels, bank), bank)


def test_calibration_levels_axis_is_dynamic(exported, world):
    _, session = exported
    bank = world.banks[2]
    inputs = dict(bank.graph_inputs())
    inputs["class_embeds"] = np.ascontiguousarray(inputs["class_embeds"][::2])  # G = 5 instead of 9
    pixels = torch.cat([world.images(0, 2), world.images(1, 2), world.images(5, 1)])
    got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {**inputs, "pixel_values": pixels.numpy()})))
    with torch.no_grad():
        ref = world.calibrated(pixels, **{k: torch.from_numpy(v) for k, v in inputs.items()})
    finite = np.isfinite(ref.logits.numpy())
    np.testing.assert_array_equal(np.isfinite(got["logits"]), finite)
    np.testing.assert_allclose(got["logits"][finite], ref.logits.numpy()[finite], atol=1e-4)


def test_a_non_finite_bank_is_refused_before_exporting(world, tmp_path):
    from safetensors.numpy import save_file

    from diki_edge_runtime.errors import BankError

    bank = world.banks[1]
    arrays = {k: v.copy() for k, v in bank.arrays.items()}
    arrays["class_embeds"][0, 0, 0] = np.nan
    path = tmp_path / "nan.safetensors"
    save_file(arrays, str(path), metadata={"diki_edge": json.dumps(bank.metadata())})
    with pytest.raises(BankError, match=r"nan\.safetensors: array 'class_embeds' holds 1 non-finite"):
        export_model(path, tmp_path / "out", backbone=world.backbone, quiet=True)
    assert not (tmp_path / "out").exists()


def test_sigterm_during_a_real_export_leaves_no_hidden_temporary_folder(world, tmp_path):
    """SIGTERM (what `kill`, systemd and CI runners send) cleans up like SIGINT: the staging folder goes."""
    import signal
    import subprocess
    import sys
    import time

    bank_path = world.banks[1].save(tmp_path / "bank.safetensors")
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diki_edge_runtime", "export", "--bank", str(bank_path),
                             "--out", str(out), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    staging = []
    while not staging and proc.poll() is None and time.monotonic() < deadline:
        staging = [p for p in tmp_path.iterdir() if files.TEMP_MARK in p.name]
        time.sleep(0.05)
    assert staging, f"the export never staged a folder (rc {proc.poll()}): {proc.stderr.read().decode()[-2000:]}"
    time.sleep(0.5)  # inside the export's work, not at its first line
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the export finished before SIGTERM arrived; signal it earlier"
    assert "Traceback" not in stderr.decode(), stderr.decode()[-2000:]
    left = [p.name for p in tmp_path.iterdir() if files.TEMP_MARK in p.name]
    assert left == [], f"SIGTERM left {left}"
    assert not out.exists()
