"""Resumable training: a run killed mid-epoch and resumed ends with the bank of an uninterrupted run, bit for bit;
a checkpoint of another run is refused, naming what differs."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from train_support import cli_env, run, train_cmd, write_digit_folder

from diki_edge.checkpoint import METADATA_KEY
from diki_edge.errors import TrainError
from diki_edge.train import EpochLoop, RunOptions, TrainConfig, train_into_bank
from diki_edge_runtime.bank import TaskBank

CFG = TrainConfig(epochs=6, batch_size=8)  # 36 images: 5 steps per epoch, 30 in all
EVERY = 3


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), (0, 1, 2), per_class=12)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits, tiny_model_spec):
    path = tmp_path_factory.mktemp("reference") / "bank.safetensors"
    bank, _ = train_into_bank(path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True,
                              options=RunOptions(device="cpu", checkpoint_every=EVERY))
    assert not list(path.parent.glob("*.checkpoint.safetensors"))  # removed once the task is in the bank
    return bank


def _assert_same_bank(a: TaskBank, b: TaskBank) -> None:
    assert a.task_names == b.task_names
    for name, arr in a.arrays.items():
        np.testing.assert_array_equal(b.arrays[name], arr, err_msg=name)


class Interrupted(Exception):
    pass


def _meta(path):
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()[METADATA_KEY])


def test_resume_mid_epoch_gives_the_uninterrupted_bank(tmp_path, digits, tiny_model_spec, uninterrupted,
                                                       monkeypatch):
    """Stopped in step 14 (epoch 3, batch 4); the last checkpoint is step 12 (epoch 3 after its batch 2): resuming
    replays the rest of epoch 3 from its saved permutation, and every later epoch, exactly."""
    step = EpochLoop._step
    calls = {"n": 0}

    def stopping_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 14:
            raise Interrupted
        step(self, batch)

    monkeypatch.setattr(EpochLoop, "_step", stopping_step)
    bank_path = tmp_path / "bank.safetensors"
    options = RunOptions(device="cpu", checkpoint_every=EVERY)
    with pytest.raises(Interrupted):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True, options=options)
    checkpoint = tmp_path / "bank.safetensors.t.checkpoint.safetensors"
    meta = _meta(checkpoint)
    assert (meta["global_step"], meta["epoch"], meta["batches_done"]) == (12, 2, 2)  # mid-epoch 3
    assert not bank_path.exists()
    monkeypatch.setattr(EpochLoop, "_step", step)
    with pytest.raises(TrainError, match="pass --resume to continue it"):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True, options=options)
    resumed, report = train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True,
                                      options=RunOptions(device="cpu", checkpoint_every=EVERY, resume=True))
    assert report.resumed_from == "epoch 3, batch 3"
    _assert_same_bank(uninterrupted, resumed)
    assert not checkpoint.exists()


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_bank(tmp_path, digits, tiny_model_spec, uninterrupted):
    bank_path = tmp_path / "bank.safetensors"
    args = ["--bank", str(bank_path), "--task", "t", "--data", str(digits), "--model", tiny_model_spec, "--epochs",
            str(CFG.epochs), "--batch-size", str(CFG.batch_size), "--device", "cpu", "--checkpoint-every", str(EVERY)]
    checkpoint = tmp_path / "bank.safetensors.t.checkpoint.safetensors"
    # the first checkpoint is written after step 3 (mid-epoch 1): kill as soon as it appears
    # bit-identical float sums need the reference's thread count (other tests may have changed this process's)
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(train_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env(**threads))
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline
            if checkpoint.exists():
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not bank_path.exists()
    meta = _meta(checkpoint)
    assert meta["global_step"] < CFG.epochs * 5
    resumed = run(train_cmd(*args, "--resume"), **threads)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in resumed.stderr
    _assert_same_bank(uninterrupted, TaskBank.load(bank_path))


def test_a_checkpoint_of_another_run_is_refused(tmp_path, digits, tiny_model_spec, monkeypatch):
    step = EpochLoop._step
    calls = {"n": 0}

    def stopping_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupted
        step(self, batch)

    monkeypatch.setattr(EpochLoop, "_step", stopping_step)
    bank_path = tmp_path / "bank.safetensors"
    with pytest.raises(Interrupted):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True,
                        options=RunOptions(device="cpu"))
    monkeypatch.setattr(EpochLoop, "_step", step)
    resume = RunOptions(device="cpu", resume=True)
    with pytest.raises(TrainError, match=r"another run \(differs in: config\.seed \(0 in the checkpoint, 1 now\)"):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=TrainConfig(epochs=6, batch_size=8, seed=1),
                        quiet=True, options=resume)
    other = write_digit_folder(tmp_path / "other", (0, 1, 2), per_class=12, seed=3)
    with pytest.raises(TrainError, match=r"differs in: data \(.*data_sha256"):
        train_into_bank(bank_path, other, "t", model=tiny_model_spec, cfg=CFG, quiet=True, options=resume)
    checkpoint = tmp_path / "bank.safetensors.t.checkpoint.safetensors"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="not a readable diki-edge checkpoint"):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True, options=resume)
    assert not bank_path.exists()


@pytest.mark.parametrize("tamper, field", [
    (lambda meta, tensors: meta.__setitem__("epoch", 10**9), "'epoch' must be an integer in"),
    (lambda meta, tensors: meta.__setitem__("carry", [0.0, 10**6, 0, 0]), "'carry' must be"),
    (lambda meta, tensors: meta.__setitem__("failures", [[10**6, "x"]]), "'failures' must be"),
    (lambda meta, tensors: tensors.__setitem__("rng.torch", tensors["rng.torch"][:10].clone()), "'rng.torch' is"),
    (lambda meta, tensors: tensors.__setitem__("stats.sum", torch.full_like(tensors["stats.sum"], float("nan"))),
     "'stats.sum' holds non-finite values"),
    (lambda meta, tensors: [tensors.__setitem__(k, v[..., :1].clone()) for k, v in list(tensors.items())
                            if k.startswith("adapter.")], "'adapter."),
])
def test_a_tampered_checkpoint_is_refused_naming_the_field(tmp_path, digits, tiny_model_spec, monkeypatch,
                                                           tamper, field):
    """Every field of a checkpoint is vetted before it reaches torch: a tampered one is a TrainError naming the
    field (it was a RuntimeError/TypeError traceback, or for epoch=10**9 a bank trained on nothing, "nan%")."""
    from safetensors.torch import load_file, save_file

    step = EpochLoop._step
    calls = {"n": 0}

    def stopping_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupted
        step(self, batch)

    monkeypatch.setattr(EpochLoop, "_step", stopping_step)
    bank_path = tmp_path / "bank.safetensors"
    with pytest.raises(Interrupted):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True,
                        options=RunOptions(device="cpu", checkpoint_every=EVERY))
    monkeypatch.setattr(EpochLoop, "_step", step)
    checkpoint = tmp_path / "bank.safetensors.t.checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as fh:
        metadata = dict(fh.metadata())
    tensors = load_file(str(checkpoint))
    meta = json.loads(metadata[METADATA_KEY])
    tamper(meta, tensors)
    metadata[METADATA_KEY] = json.dumps(meta)
    save_file(tensors, str(checkpoint), metadata=metadata)
    with pytest.raises(TrainError, match="checkpoint field " + field.replace("(", r"\(")):
        train_into_bank(bank_path, digits, "t", model=tiny_model_spec, cfg=CFG, quiet=True,
                        options=RunOptions(device="cpu", checkpoint_every=EVERY, resume=True))
    assert not bank_path.exists()
