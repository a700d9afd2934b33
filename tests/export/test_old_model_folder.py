"""A model folder exported before the text graph: no ``text`` section, no text files and
no ``frozen_embeds`` output. It keeps working for image-only prediction; labels, ``encode_text`` and
``--embeddings`` answer with a "re-export" message. Made here from the golden folder (``onnx`` edits the graph)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from support import GOLDEN, cli_in_process  # tests/support.py

from diki_edge_runtime import Predictor
from diki_edge_runtime.contract import Manifest
from diki_edge_runtime.errors import RuntimeSetupError


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old") / "model"
    shutil.copytree(GOLDEN / "model", folder)
    (folder / "text.onnx").unlink()
    (folder / "tokenizer.json").unlink()
    data = json.loads((folder / "manifest.json").read_text())
    del data["text"]
    del data["outputs"]["frozen_embeds"]
    Manifest.from_json(data)  # still a valid manifest
    (folder / "manifest.json").write_text(json.dumps(data))
    model = onnx.load(str(folder / "model.onnx"))
    keep = [o for o in model.graph.output if o.name != "frozen_embeds"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def _predict(*args: str):
    return cli_in_process("predict", *args)


def test_old_folder_predicts_images_and_asks_to_re_export_for_labels(old_folder):
    files = sorted(str(p) for p in (GOLDEN / "images").glob("*.png"))
    old, new = Predictor(old_folder, threads=1), Predictor(GOLDEN / "model", threads=1)
    for a, b in zip(old.predict(files), new.predict(files)):
        assert a.top_k == b.top_k and a.task == b.task and a.frozen_embeds is None and b.frozen_embeds is not None
    assert not old.has_text and not old.has_frozen_embeds
    for call in (lambda: old.predict(files, labels=["rocket", "cat"]), lambda: old.encode_text(["a cat"])):
        with pytest.raises(RuntimeSetupError, match="re-export"):
            call()
    for extra in (["--labels", "rocket,cat"], ["--json", "--embeddings"]):
        res = _predict(files[0], "--model", str(old_folder), *extra)
        assert res.exit_code == 2 and "re-export" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = _predict(files[0], "--model", str(old_folder), "--json", "--quiet")
    assert res.exit_code == 0 and json.loads(res.stdout)["frozen_embeds"] is None


@pytest.fixture(scope="module")
def uncalibrated_folder(tmp_path_factory):
    """A folder exported before graphs took a per-task calibration: no calib_slope / calib_bias inputs (here the
    golden graph with those inputs made constants of the paper's mapping for up to three tasks)."""
    import numpy as np
    from onnx import numpy_helper

    folder = tmp_path_factory.mktemp("uncalibrated") / "model"
    shutil.copytree(GOLDEN / "model", folder)
    data = json.loads((folder / "manifest.json").read_text())
    dim = data["bank_layout"]["embed_dim"]
    for name in ("calib_slope", "calib_bias"):
        del data["inputs"][name]
    (folder / "manifest.json").write_text(json.dumps(data))
    model = onnx.load(str(folder / "model.onnx"))
    keep = [i for i in model.graph.input if not i.name.startswith("calib_")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend([numpy_helper.from_array(np.full(3, 1 / dim, np.float32), "calib_slope"),
                                    numpy_helper.from_array(np.full(3, -1.0, np.float32), "calib_bias")])
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_a_folder_without_calibration_inputs_runs_paper_banks_and_names_the_fix_for_others(uncalibrated_folder,
                                                                                             tmp_path):
    import numpy as np

    from diki_edge_runtime.bank import TaskBank
    from diki_edge_runtime.errors import BankError

    fitted = TaskBank.load(uncalibrated_folder / "bank.safetensors")
    assert fitted.calibrated_task_names()  # the golden bank mixes both calibrations
    with pytest.raises(BankError, match="recalibrate"):
        Predictor(uncalibrated_folder)
    paper = fitted.recalibrated("paper").save(tmp_path / "paper.safetensors")
    old, new = Predictor(uncalibrated_folder, bank=paper), Predictor(GOLDEN / "model", bank=paper)
    images = sorted(str(p) for p in (GOLDEN / "images").glob("*.png"))
    for a, b in zip(old.predict(images), new.predict(images)):
        assert a.task == b.task and a.weight == b.weight
        np.testing.assert_array_equal(a.image_embeds, b.image_embeds)
    hint = cli_in_process("predict", images[0], "--model", str(uncalibrated_folder))
    assert hint.exit_code == 2 and "bank recalibrate" in hint.stderr, hint  # a setup error
