"""The evaluation runner end to end on the tiny random backbone, and its DIKI evaluator against CalibratedDiki."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diki_edge.evaluation.metrics import mtil_metrics
from diki_edge.evaluation.tasks import synthetic_tasks


@pytest.fixture(scope="module")
def backbone(tiny_model_spec):
    from diki_edge.backbone import load_backbone

    return load_backbone(tiny_model_spec)


def _holdouts():
    hold = synthetic_tasks(["held"], classes=2, train=2, test=6, seed=7)
    for h in hold:
        h.train_x, h.train_y = h.train_x[:0], h.train_y[:0]
    return hold


def test_engine_matches_calibrated_diki(backbone):
    """The memoised evaluator gives CalibratedDiki's (and the ablation module's) predictions on every bank, with
    the tasks' own (paper) calibration and with every task refitted to its held-out law."""
    from diki_edge.calibrated import CalibratedDiki, bank_tensors
    from diki_edge.evaluation.methods import DikiEngine, UncalibratedDiki
    from diki_edge.synthetic import synthetic_task
    from diki_edge.train import TrainConfig

    engine = DikiEngine(backbone, TrainConfig(levels=5))
    tasks = synthetic_tasks(["t0", "t1", "t2", "t3"], train=24, test=16, seed=3)  # 40 images >= D + 5: heldout fits
    for i, t in enumerate(tasks[:3]):
        # Gaussians fitted on the test images too, so that M is far from 0 and the residual branch matters.
        engine.add_task(synthetic_task(engine.diki, backbone.tokenizer, t.name, t.class_names,
                                       torch.cat([t.train_x, t.test_x]), engine.levels, seed=i, value_scale=2.0,
                                       calibration="paper"))
    learned = [t.name for t in tasks[:3]]
    bank = engine.bank(learned)
    assert bank.uses_paper_calibration() and bank.recalibrated("heldout").calibrated_task_names() == learned
    inputs = {"task": bank_tensors(bank), "heldout": bank_tensors(bank.recalibrated("heldout"))}
    modules = {"sample": CalibratedDiki(engine.diki).eval(), "vote": CalibratedDiki(engine.diki, batch_vote=True),
               "heldout": CalibratedDiki(engine.diki).eval(), "uncalibrated": UncalibratedDiki(engine.diki)}
    saw_branch, weights = False, {}
    for mode, module in modules.items():
        for task in tasks:
            own = task.name in learned
            arrays = dict(inputs["heldout" if mode == "heldout" else "task"])
            if not own:  # the unlearned task's classes under every learned task's text adapter
                arrays["class_embeds"] = torch.cat([engine.table(n, task) for n in learned], dim=1)
                arrays["class_task"] = torch.arange(3).repeat_interleave(len(task.class_names))
            with torch.no_grad():
                outs = [module(task.test_x[i:i + 8], **arrays) for i in range(0, len(task.test_y), 8)]
            col = torch.cat([o.logits for o in outs]).argmax(1)
            sel = torch.cat([o.task for o in outs])
            first = {int(t): int(torch.nonzero(arrays["class_task"] == t)[0]) for t in arrays["class_task"].unique()}
            ref_pred = np.array([int(c) - first[int(arrays["class_task"][c])] for c in col])
            got = engine.predict(task, False, learned, mode, vote_batch=8)
            assert [learned[s] for s in sel.tolist()] == got.selected.tolist(), (mode, task.name)
            assert ref_pred.tolist() == got.pred_class.tolist(), (mode, task.name)
            w = torch.cat([o.weight for o in outs]).numpy()
            np.testing.assert_allclose(got.weight, w, rtol=1e-5, atol=1e-7)
            saw_branch |= bool((w > 0.5).any())
            weights[(mode, task.name)] = w
    assert saw_branch, "the test never exercised the residual branch"
    assert not np.allclose(weights[("sample", "t3")], weights[("heldout", "t3")]), "the two calibrations agreed"


def test_runner_end_to_end_and_reports(backbone, tmp_path):
    from diki_edge.evaluation.report import write_reports
    from diki_edge.evaluation.runner import EvalConfig, run_sequences

    tasks = synthetic_tasks(["red", "green", "blue"], train=8, test=6, seed=0)
    methods = ["zero-shot", "diki", "diki-heldout", "diki-vote", "diki-no-calib", "prompt-l2p", "finetune"]
    cfg = EvalConfig(methods=methods, epochs=1, batch_size=8, timing_images=8, timing_batch=4, vote_batch=4)
    res = run_sequences(backbone, {"A": tasks, "B": tasks[::-1]}, _holdouts(), cfg, tmp_path / "work")
    assert set(res["orders"]) == {"A", "B"}
    for order, rec in res["orders"].items():
        assert list(rec["methods"]) == methods
        for key, m in rec["methods"].items():
            a = np.array(m["matrix"])
            assert a.shape == (3, 3) and np.all((a >= 0) & (a <= 100))
            assert m["transfer"] == pytest.approx(mtil_metrics(a)["transfer"], abs=1e-3)
            assert m["inference_ms_per_image"] > 0
            assert set(m["retention_after"]) == {"held"}
        zs = np.array(rec["methods"]["zero-shot"]["matrix"])
        assert np.all(zs == zs[0]), "a zero-shot model never changes: constant columns"
        diki = rec["methods"]["diki"]
        per_task = diki["trainable_parameters"]["per_task"]
        assert diki["trainable_parameters"]["total"] == 3 * per_task
        # same budget: the prompt baseline has DIKI's parameters per task plus one D-dim key
        assert rec["methods"]["prompt-l2p"]["trainable_parameters"]["per_task"] == per_task + 32
        assert rec["methods"]["finetune"]["trainable_parameters"]["per_task"] > 100 * per_task
        assert rec["methods"]["diki-vote"]["train_shared"] and diki["selection_accuracy"] is not None
    # tasks are independent: order B reuses order A's DIKI training; fine-tuning retrains per order
    assert res["orders"]["B"]["methods"]["diki"]["train_shared"]
    assert not res["orders"]["B"]["methods"]["finetune"]["train_shared"]
    # before the sequence every method is the frozen backbone
    assert res["retention_before"]["held"] == res["orders"]["A"]["methods"]["zero-shot"]["retention_after"]["held"]

    paths = write_reports(res, tmp_path / "out", "dcil-test", command="diki-edge eval --quick")
    data = json.loads(paths["json"].read_text())
    assert data["orders"]["A"]["methods"]["diki"]["matrix"] == res["orders"]["A"]["methods"]["diki"]["matrix"]
    md = paths["md"].read_text()
    assert "| DIKI (per-sample selection) |" in md and "Transfer" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_numbers_equal_pytorch(backbone, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("diki_edge_export.exporter")
    from diki_edge.evaluation.runner import EvalConfig, run_sequences

    tasks = synthetic_tasks(["red", "green"], train=8, test=6, seed=1)
    cfg = EvalConfig(methods=["diki", "diki-onnx"], epochs=1, batch_size=8, timing_images=4, timing_batch=4,
                     onnx_pixels="torch")
    res = run_sequences(backbone, {"A": tasks}, _holdouts(), cfg, tmp_path / "work")
    assert not res["errors"]
    par = res["orders"]["A"]["onnx_parity"]
    assert par["images"] == 2 * 2 * 6 + 6
    assert par["differing_predictions"] == 0 and par["metrics_equal"]


def test_command_module_imports_without_torch():
    code = ("import sys, diki_edge.evaluation, diki_edge.evaluation.command as c, inspect;"
            "assert 'torch' not in sys.modules, 'torch imported';"
            "print(list(inspect.signature(c.eval_command).parameters)[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "out" in out.stdout


def test_eval_command_on_real_dcil_data(tiny_model_spec, tmp_path):
    """`diki-edge eval` end to end: the DCIL data adapter, a reduced run, the three report files."""
    pytest.importorskip("diki_edge.datasets")
    import typer
    from typer.testing import CliRunner

    from diki_edge.evaluation.command import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    app.command("noop")(lambda: None)  # two commands: the first is invoked by name, like `diki-edge eval`
    result = CliRunner().invoke(app, [
        "eval-command", "--quick", "--model", tiny_model_spec, "--order", "A", "--method", "zero-shot",
        "--method", "diki", "--epochs", "1", "--max-train", "6", "--max-test", "4", "--max-holdout", "4",
        "--out", str(tmp_path), "--name", "t", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "t.json").read_text())
    rec = data["orders"]["A"]
    assert len(rec["tasks"]) >= 5 and set(rec["methods"]) == {"zero-shot", "diki"}
    assert all(t["train"] <= 6 and t["test"] <= 4 for t in data["benchmark"]["tasks"])
    assert (tmp_path / "t.md").is_file() and (tmp_path / "t.png").is_file()
