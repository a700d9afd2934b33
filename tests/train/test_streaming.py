"""Streamed training: the same bank as the in-memory path, bad images skipped in worker processes too, memory that
does not grow with the number of images, and devices/precisions that are checked before any work."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from train_support import cli_env, run, train_cmd, write_digit_folder  # tests/train_support.py

from diki_edge.data import load_tensors, scan_image_folder
from diki_edge.device import Precision, resolve_device
from diki_edge.errors import TrainError
from diki_edge.testing import write_photo_folder
from diki_edge.train import RunOptions, TrainConfig, image_transform, learn_task, open_or_create_bank, train_into_bank
from diki_edge_runtime.bank import TaskBank


def test_streamed_bank_is_bit_identical_to_the_in_memory_path_with_workers_and_a_bad_image(tmp_path, tiny_model_spec):
    """The streamed DataLoader (2 worker processes) and today's decode-everything-first path train the same bank
    bit for bit on the CPU: same permutation per epoch from the seed, same batches, same float operations."""
    data = write_digit_folder(tmp_path / "d", (0, 1, 2), per_class=14)
    (data / "one" / "zz_broken.png").write_bytes(b"\x89PNG but not an image")
    cfg = TrainConfig(epochs=3, batch_size=16)
    streamed, report = train_into_bank(tmp_path / "s.safetensors", data, "t", model=tiny_model_spec, cfg=cfg,
                                       quiet=True, options=RunOptions(device="cpu", workers=2))
    assert report.skipped == 1 and report.samples == 42  # found inside a worker process, counted, not fatal

    bank, backbone, diki = open_or_create_bank(tmp_path / "m.safetensors", tiny_model_spec, None, cfg)
    folder = scan_image_folder(data)
    images, labels = load_tensors(folder, image_transform(backbone))
    assert len(folder.skipped) == 1
    torch.manual_seed(cfg.seed)
    lr = streamed.tasks[0].extra["train"]["lr"]  # the backbone's recommended lr, resolved by train_into_bank
    task, _, _ = learn_task(diki, backbone.tokenizer, images, labels, "t", folder.classes,
                            TrainConfig(epochs=3, batch_size=16, lr=lr), bank.layout.calibration_levels)
    in_memory = bank.with_task(task)
    for name, arr in in_memory.arrays.items():
        np.testing.assert_array_equal(streamed.arrays[name], arr, err_msg=name)
    # ... and both equal the loop of earlier versions, written out here as it was
    adapter = _earlier_versions_adapter(diki, backbone.tokenizer, images, labels, folder.classes, lr, cfg)
    for name, arr in (("bank_k", adapter.image_k), ("bank_v", adapter.image_v), ("text_k", adapter.text_k),
                      ("text_v", adapter.text_v)):
        np.testing.assert_array_equal(streamed.arrays[name][0], arr.detach().numpy(), err_msg=name)


def _earlier_versions_adapter(diki, tokenizer, images, labels, classes, lr, cfg):
    """``train.fit_adapter`` + ``cross_entropy_loop`` before streaming (commit e738c84), verbatim in substance."""
    import math

    import torch.nn.functional as F

    from diki_edge.calibrated import tokenize
    from diki_edge.model import TaskAdapter

    tokens = tokenize(tokenizer, classes, cfg.template)
    g = torch.Generator().manual_seed(cfg.seed)
    adapter = TaskAdapter(diki.shape, generator=g)
    opt = torch.optim.SGD(adapter.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    n = len(labels)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * math.ceil(n / cfg.batch_size),
                                                       eta_min=lr * cfg.min_lr_ratio)
    scale = diki.logit_scale
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            text = diki.encode_text(tokens, *adapter.text_kv())
            logits = scale * diki.encode_image(images[idx], *adapter.image_kv()) @ text.T
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return adapter


class _RecordingEncoder:
    """A stand-in for DikiCLIP's image encoder: a fixed projection, and the size of every batch it was given."""

    def __init__(self, dim=8):
        self.shape = type("Shape", (), {"embed_dim": dim})()
        self.proj = torch.randn(3 * 2 * 2, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        self.sizes = []

    def encode_image(self, images):
        self.sizes.append(len(images))
        return (images.reshape(len(images), -1).double() @ self.proj).float()


class _FolderLike:
    """A source whose samples ``bad`` fail to decode, batched like FolderSource (failures leave their batch)."""

    def __init__(self, images, bad):
        self.images, self.bad = images, set(bad)

    def __len__(self):
        return len(self.images)

    def batches(self, sampler):
        from diki_edge.loader import Batch

        for idx in sampler:
            good = [i for i in idx if i not in self.bad]
            yield Batch(self.images[good] if good else None, torch.zeros(len(good), dtype=torch.int64),
                        [(i, "broken") for i in idx if i in self.bad])


@pytest.mark.parametrize("bad", [(), (3,), (0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), (40, 41)])
def test_statistics_chunks_follow_the_readable_images_not_the_files(bad):
    """Bad images must not move the statistics chunks: a folder with failures and its readable images in memory
    encode the same chunks and sum bit for bit alike, never more than the chunk size at once."""
    from diki_edge.loader import TensorSource
    from diki_edge.training.statistics import statistics_pass

    images = torch.randn(42, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    folder_enc, memory_enc = _RecordingEncoder(), _RecordingEncoder()
    stats, failures = statistics_pass(folder_enc, _FolderLike(images, bad), batch_size=8)
    keep = [i for i in range(len(images)) if i not in bad]
    reference, _ = statistics_pass(memory_enc, TensorSource(images[keep], torch.zeros(len(keep))), batch_size=8)
    assert [i for i, _ in failures] == list(bad)
    assert folder_enc.sizes == memory_enc.sizes and max(folder_enc.sizes) <= 8
    assert stats.count == reference.count == len(keep)
    np.testing.assert_array_equal(stats.total, reference.total)
    np.testing.assert_array_equal(stats.outer, reference.outer)


def test_the_statistics_chunk_is_capped_by_the_training_batch(tiny_backbone):
    """A statistics chunk larger than the training batch would be the run's peak memory (growing with the number
    of images up to the chunk)."""
    from diki_edge.loader import TensorSource
    from diki_edge.model import DikiCLIP
    from diki_edge.training.task import TaskRun

    diki = DikiCLIP(tiny_backbone.model)
    source = TensorSource(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))
    run_ = TaskRun(diki, tiny_backbone.tokenizer, source, ["a"], TrainConfig(batch_size=16, lr=1.0))
    assert run_.stats_batch_size == 16
    run_ = TaskRun(diki, tiny_backbone.tokenizer, source, ["a"], TrainConfig(batch_size=512, lr=1.0),
                   stats_batch_size=64)
    assert run_.stats_batch_size == 64


RSS_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from diki_edge.train import RunOptions, TrainConfig, train_into_bank

    def status(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure training, not the imports
    bank, report = train_into_bank(sys.argv[1], sys.argv[2], "t", model=sys.argv[3], quiet=True,
                                   cfg=TrainConfig(epochs=1, batch_size=16),
                                   options=RunOptions(device="cpu", workers=0))
    print(report.samples, status("VmHWM"))
""")


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, tmp_path_factory):
    """One epoch on 32 and on 128 real photographs at 224 px. Decoding everything first would add 96 x 602 KB =
    58 MB; streamed, the peak may differ by at most 8 MB (measured: +0.3 MB at 64 vs 256 images)."""
    from diki_edge.testing import write_tiny_model_dir

    spec = f"local-dir:{write_tiny_model_dir(tmp_path_factory.mktemp('tiny224'), image_size=224)}"
    peaks = {}
    for per_class in (8, 32):
        data = write_photo_folder(tmp_path / f"photos{per_class}", per_class, size=224, seed=per_class)
        # a fixed mmap threshold returns freed image buffers to the OS at once: the peak then measures live data,
        # not where glibc's sliding threshold happened to be
        proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / f"b{per_class}.safetensors"),
                               str(data), spec], capture_output=True, text=True, timeout=600,
                              env=cli_env(MALLOC_MMAP_THRESHOLD_="65536"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        samples, peak = proc.stdout.split()
        assert int(samples) == 4 * per_class
        peaks[per_class] = float(peak)
    assert peaks[32] - peaks[8] < 8.0, peaks


def test_devices_and_precisions_are_checked_before_any_work(tmp_path, tiny_model_spec):
    if torch.cuda.is_available():
        assert resolve_device("cuda")[0].type == "cuda"
    else:
        with pytest.raises(TrainError, match="CUDA is not available"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == (torch.device("cpu"), "device auto -> cpu (no CUDA device visible)")
    with pytest.raises(TrainError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(TrainError, match="needs a CUDA device"):
        Precision.of("bf16", torch.device("cpu"))
    with pytest.raises(TrainError, match="expected one of fp32, bf16, fp16"):
        Precision.of("fp8", torch.device("cpu"))
    data = write_digit_folder(tmp_path / "d", (0, 1), per_class=4)
    bank = tmp_path / "bank.safetensors"
    args = ["--bank", str(bank), "--task", "t", "--data", str(data), "--model", tiny_model_spec]
    if not torch.cuda.is_available():
        no_gpu = run(train_cmd(*args, "--device", "cuda"))
        assert no_gpu.returncode == 2 and "CUDA is not available" in no_gpu.stderr, no_gpu.stderr
        assert "Traceback" not in no_gpu.stderr
    assert not bank.exists()
    ok = run(train_cmd(*args, "--device", "auto", "--epochs", "1"))
    assert ok.returncode == 0, ok.stderr
    assert "device auto -> " in ok.stderr  # auto says what it picked
    assert TaskBank.load(bank).task_names == ["t"]
