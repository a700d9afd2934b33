"""``torchrun -m diki_edge train`` on the CPU with Gloo: two processes learn what one does; a dead rank fails the job.

Each run is a real torchrun launch of the real command (2 processes on this 2-core machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from train_support import cli_env, relative_difference, run, torchrun_cmd, train_cmd, write_digit_folder

from diki_edge_runtime.bank import TaskBank

# 33 images in batches of 16: the last global batch has one image, so rank 1's share of it is empty.
CLASSES, PER_CLASS, BATCH = (0, 1, 2), 11, "16"


def _predictions(bank_path: Path, model_spec: str, folder: Path) -> np.ndarray:
    from diki_edge.backbone import load_backbone
    from diki_edge.calibrated import CalibratedDiki, bank_tensors
    from diki_edge.data import load_tensors, scan_image_folder
    from diki_edge.model import DikiCLIP
    from diki_edge.train import image_transform

    backbone = load_backbone(model_spec)
    images, labels = load_tensors(scan_image_folder(folder), image_transform(backbone))
    with torch.no_grad():
        out = CalibratedDiki(DikiCLIP(backbone.model)).eval()(images, **bank_tensors(TaskBank.load(bank_path)))
    return (out.logits.argmax(1) == labels).numpy()


def test_two_gloo_processes_learn_what_one_process_learns(tmp_path, tiny_model_spec):
    data = write_digit_folder(tmp_path / "train", CLASSES, per_class=PER_CLASS)
    held_out = write_digit_folder(tmp_path / "test", CLASSES, per_class=40, seed=7)
    args = ["--task", "digits", "--data", str(data), "--model", tiny_model_spec, "--epochs", "4",
            "--batch-size", BATCH, "--device", "cpu"]
    one = run(train_cmd("--bank", str(tmp_path / "one.safetensors"), *args))
    assert one.returncode == 0, one.stderr
    two = run(torchrun_cmd(2, "--bank", str(tmp_path / "two.safetensors"), *args))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes (gloo)" in two.stderr and "x 2 processes" in two.stderr
    a = TaskBank.load(tmp_path / "one.safetensors").arrays
    b = TaskBank.load(tmp_path / "two.safetensors").arrays
    assert int(a["stats_count"][0]) == int(b["stats_count"][0]) == 33
    for name in ("stats_sum", "stats_outer"):  # all-reduced float64 sufficient statistics
        assert relative_difference(a[name], b[name]) <= 1e-10, name
    # Same batches and schedule; only the order of float32 sums differs (DDP all-reduce, per-rank shares):
    # measured <= 6e-6 relative after 4 epochs; stated bound 1e-4.
    for name in ("bank_k", "bank_v", "text_k", "text_v", "class_embeds"):
        assert relative_difference(a[name], b[name]) <= 1e-4, (name, relative_difference(a[name], b[name]))
    assert np.abs(b["bank_v"]).max() > 0  # the adapter trained
    right_one = _predictions(tmp_path / "one.safetensors", tiny_model_spec, held_out)
    right_two = _predictions(tmp_path / "two.safetensors", tiny_model_spec, held_out)
    assert right_one.mean() == right_two.mean()  # same test accuracy
    assert (right_one == right_two).all()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def test_a_killed_rank_fails_the_whole_job_quickly_and_leaves_the_bank(tmp_path, tiny_model_spec):
    bank = tmp_path / "bank.safetensors"
    small = write_digit_folder(tmp_path / "a", (0, 1), per_class=4)
    first = run(train_cmd("--bank", str(bank), "--task", "a", "--data", str(small), "--model", tiny_model_spec,
                          "--epochs", "1", "--device", "cpu"))
    assert first.returncode == 0, first.stderr
    before = bank.read_bytes()
    data = write_digit_folder(tmp_path / "b", CLASSES, per_class=30)
    launcher = subprocess.Popen(torchrun_cmd(2, "--bank", str(bank), "--task", "b", "--data", str(data),
                                             "--epochs", "100000", "--batch-size", "8", "--device", "cpu"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(), text=True)
    try:
        checkpoint = tmp_path / "bank.safetensors.b.checkpoint.safetensors"
        deadline = time.monotonic() + 180
        while not checkpoint.exists():  # an epoch is done: both ranks are deep inside training
            assert launcher.poll() is None and time.monotonic() < deadline, "training did not get going"
            time.sleep(0.2)
        rank1 = [p for p in _children(launcher.pid) if _rank_of(p) == "1"]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert elapsed < 60, elapsed  # torchrun stops the surviving rank; measured ~1-5 s here
    assert "SIGKILL" in stderr or "Signal 9" in stderr
    assert bank.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
