"""Write the golden model folder the runtime's tests run on: ``python scripts/make_golden_model.py [OUT]``.

``OUT`` defaults to ``tests/runtime/golden``. Everything is made from seeds, on the CPU:

* the tiny open_clip backbone of :mod:`diki_edge.testing` (random weights, seed 0), exported by
  :func:`diki_edge_export.export_model` into ``model/`` (model.onnx, bank.safetensors, preprocess.json,
  manifest.json) with a bank of three synthetic tasks (``pets``, ``drinks``, ``space``);
* each task's Gaussian is fitted to random crops of one scikit-image photograph, so unseen crops of that
  photograph are familiar (high M) and unrelated images are not; ``space`` maps its score to M by the paper's
  calibration, the others by the held-out fit (``CALIBRATION``); ``banks/portraits.safetensors`` holds a fourth
  task (the ``four`` bank is ``three`` merged with it) and ``banks/pets-other-classes.safetensors`` a ``pets``
  task with other classes (the ``other-classes`` bank is ``three`` with its ``pets`` replaced by that one);
* ``images/``: small PNGs (unseen crops of every photograph, an unrelated photograph, noise);
* ``examples/portraits/``: more crops of the ``portraits`` photograph (never in a bank), the example images of
  a label-only task added on the device (``diki-edge bank add-task``);
* ``golden.npz`` (no pickles): for every image, open_clip's own transform (``pixel_values``) and the PyTorch
  reference (:class:`diki_edge.calibrated.CalibratedDiki`) outputs under each bank (``<bank>.<output>``); the
  reference of prediction with ``LABELS`` under the ``three`` bank (``three.labels.{task,weight,probs}``:
  ``CalibratedDiki`` with the labels' table, every label under every task's text adapter at every level,
  ``probs`` the softmax over the labels under the selected task); and text embeddings of ``TEXTS``
  (``text.frozen``: the frozen text encoder, ``text.drinks@0.37``: under the ``drinks`` adapter at M = 0.37);
* ``golden.json``: the image order, the banks, and which task each image's photograph belongs to.

``tests/export/test_golden.py`` regenerates the folder in a temporary directory and compares it with the
committed one, so it cannot drift from the exporter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "runtime" / "golden"

# task -> the scikit-image photograph its Gaussian is fitted to, and its classes
PHOTOS = {"pets": "chelsea", "drinks": "coffee", "space": "rocket", "portraits": "astronaut"}
CLASSES = {
    "pets": ["cat", "dog", "fox"],
    "drinks": ["coffee", "tea"],
    "space": ["rocket", "plane", "bird", "balloon"],
    "portraits": ["astronaut", "pilot", "diver"],
}
OTHER_PETS_CLASSES = ["kitten", "puppy", "hamster", "parrot"]
# Single-task bank files besides the model folder's bank (``three``); the golden outputs are for the banks built
# from them by bank operations, as the runtime's tests rebuild them (see :func:`golden_banks`).
TASK_FILES = {"portraits": "banks/portraits.safetensors", "pets-other-classes": "banks/pets-other-classes.safetensors"}
FIT_IMAGES = 48  # crops per task the Gaussian is fitted to
# each task's M mapping (diki_edge_runtime.calibration): both kinds in one bank, so the graph's per-task slope and
# bias are exercised (48 crops in D = 32 allow a held-out fit)
CALIBRATION = {"pets": "heldout", "drinks": "heldout", "space": "paper", "portraits": "heldout"}
EXAMPLE_IMAGES = 48  # example crops for a label-only task (> D = 32: a full-rank covariance)
LABELS = ["rocket", "cat", "cup of coffee", "astronaut", "tree", "car"]  # labels given at prediction time
LABELS_TEMPLATE = "a photo of a {}."
TEXTS = ["a red car", "Café au lait ☕", "東京", ""]  # encode_text references
TEXT_TASK, TEXT_WEIGHT = "drinks", 0.37
LONG_EDGE = 64  # images are stored this small: the graph sees 32 x 32 anyway


def _variants(photo: str, n: int, seed: int):
    """Random crops / flips / brightness changes of one photograph, scaled to LONG_EDGE."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    base = Image.fromarray(getattr(skdata, photo)()).convert("RGB")
    out = []
    for _ in range(n):
        w, h = base.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), min(int(h * s * rng.uniform(0.8, 1.2)), h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = base.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.clip(np.asarray(im, np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        out.append(_small(Image.fromarray(arr)))
    return out


def _small(im):
    from PIL import Image

    scale = LONG_EDGE / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)


def _test_images() -> dict:
    """Unseen crops of every photograph (familiar to the task fitted on it), plus two unrelated images."""
    from PIL import Image
    from skimage import data as skdata

    images = {f"{photo}_{j}": im for photo in PHOTOS.values() for j, im in enumerate(_variants(photo, 2, seed=99))}
    images["camera"] = _small(Image.fromarray(skdata.camera()))  # grayscale, unrelated
    images["noise"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    return images


def make_golden(out: str | Path, quiet: bool = True) -> Path:
    """Write the golden folder into ``out`` (which must not exist yet, or be empty)."""
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from diki_edge.backbone import load_backbone
    from diki_edge.calibrated import CalibratedDiki, bank_tensors
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge.synthetic import synthetic_task
    from diki_edge.testing import write_tiny_model_dir
    from diki_edge_export import export_model
    from diki_edge_runtime.bank import TaskBank
    from diki_edge_runtime.contract import OUTPUT_NAMES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; remove it first")
    with tempfile.TemporaryDirectory(prefix="diki-golden-") as tmp:
        tmp = Path(tmp)
        backbone = load_backbone(f"local-dir:{write_tiny_model_dir(tmp / 'tiny-clip')}")
        diki = DikiCLIP(backbone.model).eval()
        layout = layout_for(backbone, diki)
        transform = image_transform_v2(PreprocessCfg(**backbone.preprocess_cfg), is_train=False)

        def fitted(task: str, classes: list[str], seed: int):
            photo = PHOTOS[task]
            crops = _variants(photo, FIT_IMAGES, seed=10 + list(PHOTOS).index(task))
            fit = torch.stack([transform(im) for im in crops])
            return synthetic_task(diki, backbone.tokenizer, task, classes, fit, layout.calibration_levels, seed=seed,
                                  calibration=CALIBRATION[task])

        slices = {task: fitted(task, CLASSES[task], seed=i) for i, task in enumerate(PHOTOS)}
        three = TaskBank.empty(layout)
        for task in ("pets", "drinks", "space"):
            three = three.with_task(slices[task])
        singles = {"portraits": slices["portraits"], "pets-other-classes": fitted("pets", OTHER_PETS_CLASSES, seed=7)}
        export_model(three.save(tmp / "bank.safetensors"), out / "model", backbone=backbone, quiet=quiet)
        for name, rel in TASK_FILES.items():
            TaskBank.empty(layout).with_task(singles[name]).save(out / rel)
    banks = golden_banks(out)

    images = _test_images()
    (out / "images").mkdir()
    for name, im in images.items():
        im.save(out / "images" / f"{name}.png", optimize=True)
    (out / "examples" / "portraits").mkdir(parents=True)
    for i, im in enumerate(_variants(PHOTOS["portraits"], EXAMPLE_IMAGES, seed=50)):
        im.save(out / "examples" / "portraits" / f"{i:02d}.png", optimize=True)
    pixels = torch.stack([transform(im.convert("RGB")) for im in images.values()])
    golden = {"pixel_values": pixels.numpy()}
    calibrated = CalibratedDiki(diki).eval()
    with torch.no_grad():
        for name, bank in banks.items():
            ref = calibrated(pixels, **bank_tensors(bank))
            golden.update({f"{name}.{k}": v.numpy() for k, v in zip(OUTPUT_NAMES, ref)})
        golden.update(_label_reference(calibrated, backbone.tokenizer, banks["three"], pixels))
        golden.update(_text_reference(diki, backbone.tokenizer, banks["three"]))
    np.savez_compressed(out / "golden.npz", **golden)
    familiar = {name: next(t for t, p in PHOTOS.items() if p == name.rsplit("_", 1)[0])
                for name in images if name.rsplit("_", 1)[0] in PHOTOS.values()}
    meta = {"images": [f"images/{n}.png" for n in images], "banks": sorted(banks), "familiar_task": familiar,
            "classes": CLASSES, "other_pets_classes": OTHER_PETS_CLASSES, "labels": LABELS,
            "labels_template": LABELS_TEMPLATE, "texts": TEXTS, "text_task": TEXT_TASK, "text_weight": TEXT_WEIGHT,
            "examples": {"portraits": [f"examples/portraits/{i:02d}.png" for i in range(EXAMPLE_IMAGES)]},
            "regenerate": "python scripts/make_golden_model.py"}
    (out / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _label_reference(calibrated, tokenizer, bank, pixels) -> dict:
    """``CalibratedDiki`` with the labels' table (see the module docstring): ``three.labels.*``."""
    import torch

    from diki_edge.calibrated import bank_tensors, class_text_table

    tokens = tokenizer([LABELS_TEMPLATE.format(label) for label in LABELS])
    levels = bank.layout.calibration_levels
    tables = [class_text_table(calibrated.diki, tokens, torch.from_numpy(bank.arrays["text_k"][t].copy()),
                               torch.from_numpy(bank.arrays["text_v"][t].copy()), levels)
              for t in range(bank.num_tasks)]
    inputs = {**bank_tensors(bank), "class_embeds": torch.cat(tables, dim=1),
              "class_task": torch.arange(bank.num_tasks).repeat_interleave(len(LABELS))}
    out = calibrated(pixels, **inputs)
    task = out.task.numpy()
    logits = out.logits.numpy().reshape(len(task), bank.num_tasks, len(LABELS))[np.arange(len(task)), task]
    probs = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    return {"three.labels.task": task, "three.labels.weight": out.weight.numpy(),
            "three.labels.probs": probs / probs.sum(1, keepdims=True)}


def _text_reference(diki, tokenizer, bank) -> dict:
    """``DikiCLIP.encode_text`` of ``TEXTS``: frozen, and under ``TEXT_TASK``'s adapter at ``TEXT_WEIGHT``."""
    import torch

    from diki_edge.calibrated import exact_class_embeds

    tokens = tokenizer(TEXTS)
    t = bank.task_names.index(TEXT_TASK)
    k, v = (torch.from_numpy(bank.arrays[n][t].copy()) for n in ("text_k", "text_v"))
    return {"text.frozen": diki.encode_text(tokens).numpy(),
            f"text.{TEXT_TASK}@{TEXT_WEIGHT}": exact_class_embeds(diki, tokens, k, v, TEXT_WEIGHT).numpy()}


def golden_banks(folder: str | Path) -> dict:
    """The banks the golden outputs are for, built from the folder's files by bank operations (numpy only)."""
    from diki_edge_runtime.bank import TaskBank

    folder = Path(folder)
    three = TaskBank.load(folder / "model" / "bank.safetensors")
    portraits = TaskBank.load(folder / TASK_FILES["portraits"])
    other_pets = TaskBank.load(folder / TASK_FILES["pets-other-classes"]).task_slice("pets")
    return {"three": three, "four": three.merged(portraits), "other-classes": three.with_task(other_pets)}


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    print(make_golden(target, quiet=False))
