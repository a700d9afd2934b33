"""Training memory flat in the number of images: peak RSS of ``diki-edge train`` at 150 and at 600 images.

Target: 4x the images cost at most +5 % peak RSS. Each run is the real command in its own process (one epoch,
224-px photographs, a tiny 224-px open_clip config written by ``diki_edge.testing.write_tiny_model_dir``, batch
128, the CPU default of 0 loader workers), run side by side (150, 600, 150, 600, ...); the figure per size is the
largest VmHWM of its runs. What would grow with N: images held decoded (streamed, so a batch), per-image lists
(indices and paths only), and the statistics pass's chunk (capped by the training batch, so at most a batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import Config, make_result, python_cmd, run_measured

NAME = "train_memory"
TITLE = "training memory: peak RSS of `diki-edge train` at 150 vs 600 images (224 px, one epoch)"
TARGET = "peak RSS at 600 images <= 1.05 x at 150 images"
SIZES = (150, 600)
CLASSES = 4  # write_photo_folder's four photographs
BATCH = 128

_TRAIN = "import sys; from diki_edge_runtime.cli import main; main(sys.argv[1:])"


def _train(model: str, data: Path, bank: Path, threads: int, batch: int) -> float:
    bank.unlink(missing_ok=True)
    cmd = python_cmd(_TRAIN, "train", "--bank", str(bank), "--task", "photos", "--data", str(data), "--epochs", "1",
                     "--batch-size", str(batch), "--model", model, "--quiet")
    proc = run_measured(cmd, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"diki-edge train failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return proc.peak_rss_mib


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge.testing import write_photo_folder, write_tiny_model_dir

    cache = Path(cfg.cache_dir)
    # --tiny (the harness's smoke test): the tiny 32-px backbone and a tenth of the images, so it takes seconds
    sizes, batch, photo = ((SIZES[0] // 10, SIZES[1] // 10), 8, 32) if cfg.tiny else (SIZES, BATCH, 256)
    if cfg.tiny:
        model = cfg.reference_model
    else:
        model_dir = cache / "tiny-clip-224"
        if not (model_dir / "open_clip_config.json").is_file():
            write_tiny_model_dir(model_dir, image_size=224)
        model = f"local-dir:{model_dir}"
    folders = {}
    for n in sizes:
        folders[n] = cache / f"train-memory-photos-{n}-{photo}"
        if not folders[n].is_dir():
            write_photo_folder(folders[n], n // CLASSES + (n % CLASSES > 0), size=photo, seed=n)
    repeats = 1 if cfg.quick or cfg.tiny else 2
    peaks: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):  # side by side: a burst of load on the machine hits both sizes
        for n in sizes:
            peaks[n].append(_train(model, folders[n], cache / f"train-memory-{n}.safetensors", max(1, cfg.n_threads),
                                   batch))
    small, large = max(peaks[sizes[0]]), max(peaks[sizes[1]])
    growth = large / small
    rows = [{"images": n, "peak RSS MiB": f"{max(peaks[n]):.0f}",
             "vs fewest images": f"{max(peaks[n]) / small:.3f}",
             "met": (growth <= 1.05) if n == sizes[1] and not cfg.tiny else None, "data": peaks[n]} for n in sizes]
    notes = [f"{model} (random weights), {photo}-px photographs, batch {batch}, 1 epoch, {repeats} runs per size "
             "interleaved; peak RSS is each training process's own VmHWM"]
    return make_result(NAME, TITLE, TARGET, ["images", "peak RSS MiB", "vs fewest images"], rows, notes,
                       extra={"growth_4x_images": growth})
