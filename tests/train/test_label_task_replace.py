"""A label-only task added on the device is later replaced by a trained task of the same name
(``diki-edge train --task NAME --replace``), in the same slot of the bank."""

from __future__ import annotations

import shutil

from PIL import Image
from support import GOLDEN, golden_script  # tests/support.py

from diki_edge.train import TrainConfig, train_into_bank
from diki_edge_runtime import Predictor
from diki_edge_runtime.bank import TaskBank
from diki_edge_runtime.label_task import add_label_task


def test_train_replace_swaps_a_label_only_task_for_a_trained_one(tmp_path, tiny_model_spec):
    folder = tmp_path / "model"
    shutil.copytree(GOLDEN / "model", folder)
    bank = folder / "bank.safetensors"
    labels = golden_script().CLASSES["portraits"]
    examples = sorted((GOLDEN / "examples" / "portraits").glob("*.png"))
    add_label_task(bank, "portraits", labels, [str(p) for p in examples])
    index = TaskBank.load(bank).task_names.index("portraits")
    data = tmp_path / "data"
    for c, label in enumerate(labels):  # a few crops per class, as a user's image folder
        (data / label).mkdir(parents=True)
        for i, path in enumerate(examples[c::len(labels)][:4]):
            with Image.open(path) as im:
                im.save(data / label / f"{i}.png")
    trained, _ = train_into_bank(bank, data, "portraits", model=tiny_model_spec,
                                 cfg=TrainConfig(epochs=1, batch_size=8), replace=True, quiet=True)
    assert trained.task_names.index("portraits") == index
    sl = trained.task_slice("portraits")
    assert "label_only" not in sl.info.extra and sl.image_v.any() and sl.text_v.any()
    assert Predictor(folder, threads=1).predict([str(examples[0])])[0].ok
