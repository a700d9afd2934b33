"""Per-task calibration of M (diki_edge_runtime.calibration): the held-out law, the fit, the bank's arrays and
metadata, format-1 banks, recalibration and refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from support import cli_in_process  # tests/support.py

from diki_edge_runtime import calibration as calib
from diki_edge_runtime.bank import METADATA_KEY, TaskBank
from diki_edge_runtime.errors import BankError


def test_the_hotelling_law_matches_simulated_held_out_distances():
    """New Gaussian points against a fitted sample of N = 20 in D = 8: the law's median and 99th percentile within
    the Monte Carlo error of 20,000 draws (a 99th percentile's relative standard error here is ~2 %; bound 6 %)."""
    rng = np.random.default_rng(0)
    n, d, reps = 20, 8, 20_000
    x = rng.normal(size=(reps, n, d))
    mean = x.mean(axis=1)
    delta = x - mean[:, None]
    cov = np.einsum("rni,rnj->rij", delta, delta) / (n - 1)
    new = rng.normal(size=(reps, d)) - mean
    d2 = np.einsum("ri,ri->r", new, np.linalg.solve(cov, new[..., None])[..., 0])
    for q in (0.5, 0.99):
        law = calib.hotelling_d2_quantile(q, n, d)
        assert abs(np.quantile(d2, q) / law - 1) < 0.06, (q, np.quantile(d2, q), law)
    # and it is not the in-sample law: the fitted points themselves average D (N-1)/N, far below
    assert calib.hotelling_d2_quantile(0.5, n, d) > 1.5 * d * (n - 1) / n


def test_f_quantile_inverts_the_distribution_function():
    for q, d1, d2 in ((0.5, 64, 186), (0.99, 64, 186), (0.99, 512, 5), (0.01, 2, 2)):
        f = calib.f_quantile(q, d1, d2)
        assert abs(calib.regularized_beta(d1 * f / (d1 * f + d2), d1 / 2, d2 / 2) - q) < 1e-9
    assert calib.f_quantile(0.5, 2, 2) == pytest.approx(1.0, abs=1e-12)  # F(2, 2) has median 1


def test_the_fit_puts_m_at_its_targets_and_the_paper_mapping_is_exact():
    dim, count, const = 64, 250, 120.0
    fitted = calib.fit(calib.HELDOUT, count, dim)
    slope, bias = fitted.affine(const, dim)
    assert slope > 0
    for d2, m in ((fitted.typical_d2, calib.TYPICAL_WEIGHT), (fitted.edge_d2, calib.EDGE_WEIGHT)):
        assert calib.weight(const - d2 / 2, slope, bias) == pytest.approx(m, abs=1e-12)
    assert calib.fit(calib.PAPER, count, dim).affine(const, dim) == (1 / dim, -1.0)
    few = calib.fit(calib.HELDOUT, dim + calib.MIN_EXTRA_IMAGES - 1, dim)
    assert few.method == calib.PAPER and "too few" in few.note
    with pytest.raises(ValueError, match="not one of"):
        calib.fit("magic", count, dim)  # noqa


def test_the_few_images_warning_and_the_fallback_share_one_threshold():
    dim = 64
    need = dim + calib.MIN_EXTRA_IMAGES
    for count in (need - 1, 48, 2):
        warning = calib.few_images_warning("birds", count, dim)
        assert calib.fit(calib.HELDOUT, count, dim).note is not None and warning is not None
        assert f"task 'birds' has {count} images, fewer than D + 5 = 69 (D = 64" in warning
        assert "at least 69 images" in warning
    assert calib.few_images_warning("birds", 48, dim) and calib.fit(calib.PAPER, 48, dim).note is None
    for count in (need, need + 100):
        assert calib.few_images_warning("birds", count, dim) is None
        assert calib.fit(calib.HELDOUT, count, dim).method == calib.HELDOUT


def _heldout(bank: TaskBank) -> TaskBank:
    return bank.recalibrated(calib.HELDOUT)


def test_the_bank_stores_each_tasks_calibration(layout, make_task, tmp_path):
    bank = TaskBank.empty(layout)
    for i, name in enumerate(("a", "b")):
        bank = bank.with_task(make_task(name, 2, seed=i, samples=40))
    assert bank.uses_paper_calibration()  # a TaskInfo without a calibration is the paper's
    np.testing.assert_array_equal(bank.arrays["calib_slope"], np.float32(1 / layout.embed_dim))
    np.testing.assert_array_equal(bank.arrays["calib_bias"], np.float32(-1.0))
    fitted = bank.recalibrated(calib.HELDOUT, ["b"])
    assert fitted.calibrated_task_names() == ["b"]
    loaded = TaskBank.load(fitted.save(tmp_path / "bank.safetensors"))
    assert loaded.tasks[1].calibration == fitted.tasks[1].calibration
    want = fitted.tasks[1].calibration.affine(float(loaded.arrays["gauss_const"][1]), layout.embed_dim)
    np.testing.assert_allclose(loaded.arrays["calib_slope"][1], want[0], rtol=1e-7)
    assert [t["calibration"] for t in loaded.describe()["tasks"]] == ["paper", "heldout (hotelling, 40 images)"]
    # kept through remove / merge / rename, back to the paper's exactly
    assert loaded.without("a").calibrated_task_names() == ["b"]
    back = loaded.recalibrated(calib.PAPER)
    np.testing.assert_array_equal(back.arrays["calib_slope"], bank.arrays["calib_slope"])


def test_a_format_1_bank_loads_as_the_paper_mapping(layout, make_task, tmp_path):
    path = TaskBank.empty(layout).with_task(make_task("a", 2, seed=0, samples=40)).recalibrated(
        calib.HELDOUT).save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        arrays = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith("calib_")}
        meta = json.loads(fh.metadata()[METADATA_KEY])
    meta["format_version"] = 1
    for task in meta["tasks"]:
        del task["calibration"]
    old = tmp_path / "old.safetensors"
    save_file(arrays, str(old), metadata={METADATA_KEY: json.dumps(meta)})
    bank = TaskBank.load(old)
    assert bank.uses_paper_calibration() and bank.tasks[0].calibration.method == calib.PAPER
    np.testing.assert_array_equal(bank.arrays["calib_slope"], [np.float32(1 / layout.embed_dim)])
    np.testing.assert_array_equal(bank.arrays["calib_bias"], [np.float32(-1.0)])
    TaskBank.load(bank.save(tmp_path / "again.safetensors"))  # and is written as format 2


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf])
def test_absurd_calibration_arrays_are_refused_naming_the_task(layout, make_task, tmp_path, value):
    bank = TaskBank.empty(layout).with_task(make_task("a", 2, seed=0)).with_task(make_task("b", 2, seed=1))
    bank.arrays["calib_slope"] = bank.arrays["calib_slope"].copy()
    bank.arrays["calib_slope"][1] = value
    with pytest.raises(BankError, match="'b'"):
        bank.save(tmp_path / "bad.safetensors")


def test_absurd_calibration_metadata_is_refused_naming_the_file(layout, make_task, tmp_path):
    path = _heldout(TaskBank.empty(layout).with_task(make_task("a", 2, seed=0, samples=40))).save(
        tmp_path / "bank.safetensors")
    with safe_open(str(path), framework="numpy") as fh:
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()[METADATA_KEY])
    meta["tasks"][0]["calibration"]["edge_d2"] = 0.0  # below typical_d2: a slope <= 0
    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(BankError, match=r"bank.safetensors.*tasks\[0\].*edge_d2"):
        TaskBank.load(path)


def test_bank_recalibrate_and_show(layout, make_task, tmp_path):
    path = TaskBank.empty(layout).with_task(make_task("a", 2, seed=0, samples=40)).with_task(
        make_task("b", 2, seed=1, samples=9)).save(tmp_path / "bank.safetensors")
    done = cli_in_process("bank", "recalibrate", str(path), "--method", "heldout")
    assert done.exit_code == 0, done.stderr
    tasks = TaskBank.load(path).tasks
    assert tasks[0].calibration.method == calib.HELDOUT
    assert tasks[1].calibration.method == calib.PAPER and "too few" in tasks[1].calibration.note  # 9 < D + 5
    shown = cli_in_process("bank", "show", str(path), "--json")
    assert [t["calibration"] for t in json.loads(shown.stdout)["tasks"]][0] == "heldout (hotelling, 40 images)"
    bad = cli_in_process("bank", "recalibrate", str(path), "--method", "magic")
    assert bad.exit_code == 2 and "paper, heldout" in bad.stderr
