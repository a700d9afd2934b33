"""How well M tells learned domains from unfamiliar ones, per calibration: ``python scripts/calibration_study.py``.

Frozen diki-tiny embeddings only (M depends on nothing trained): the six DCIL tasks' Gaussians are fitted to their
training images, their test images are the familiar set, and four domains no task learned are the unfamiliar
sets (Fashion-MNIST from Debian's ``dataset-fashion-mnist``, pen-drawn and 8x8 digits, crops of scikit-image's
photographs). Prints, per calibration, task-selection accuracy, mean M per set and the AUROC of M
familiar-vs-unfamiliar (overall and per domain). A study of the mapping, not the runtime benchmark: no adapter is
trained and nothing runs through ONNX Runtime.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_edge.datasets.dcil import TASK_ORDERS  # noqa: E402

TASKS = tuple(TASK_ORDERS["A"])
UNFAMILIAR = ("fashion", "pen-digits", "sklearn-digits", "photo-crops")


def embeddings() -> dict[str, np.ndarray]:
    import torch

    from diki_edge.backbone import load_backbone
    from diki_edge.datasets import make_task
    from diki_edge.datasets.dcil import unfamiliar_sets
    from diki_edge.training.task import image_transform

    backbone = load_backbone()
    transform = image_transform(backbone)

    def embed(images) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            with torch.no_grad():
                f = backbone.model.encode_image(torch.stack([transform(im) for im in images[i:i + 64]]))
            out.append(torch.nn.functional.normalize(f, dim=-1).double().numpy())
        return np.concatenate(out)

    sets = {}
    for name in TASKS:
        task = make_task(name)
        sets[f"train:{name}"] = embed([p[0] for p in task.train])
        sets[f"test:{name}"] = embed([p[0] for p in task.test])
    for name, task in unfamiliar_sets().items():
        sets[name] = embed([p[0] for p in task.test])
    return sets


def main() -> None:
    from diki_edge.evaluation.metrics import auroc
    from diki_edge_runtime import calibration as calib
    from diki_edge_runtime.gaussian import GaussianStats, log_density

    sets = embeddings()
    dim = sets[f"train:{TASKS[0]}"].shape[1]
    stats = [GaussianStats.empty(dim).update(sets[f"train:{n}"]) for n in TASKS]
    scoring = [s.finalize() for s in stats]
    mean, whiten = np.stack([g.mean for g in scoring]), np.stack([g.whiten for g in scoring])
    const = np.array([g.const for g in scoring])
    print(f"{'calibration':12s} {'selection':>9s} {'M learned':>9s} " +
          " ".join(f"{'M ' + u:>16s} {'AUROC':>6s}" for u in UNFAMILIAR) + f" {'AUROC all':>9s}")
    for method in calib.METHODS:
        pairs = np.array([calib.fit(method, s.count, dim).affine(g.const, dim) for s, g in zip(stats, scoring)])

        def weight(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            scores = log_density(x, mean, whiten, const)
            task = scores.argmax(1)
            return calib.weight(scores[np.arange(len(x)), task], pairs[task, 0], pairs[task, 1]), task

        familiar, correct = [], []
        for i, name in enumerate(TASKS):
            m, task = weight(sets[f"test:{name}"])
            familiar.append(m)
            correct.append(task == i)
        familiar_m = np.concatenate(familiar)
        unfamiliar = {u: weight(sets[u])[0] for u in UNFAMILIAR}
        every = np.concatenate(list(unfamiliar.values()))
        print(f"{method:12s} {np.concatenate(correct).mean():9.3f} {familiar_m.mean():9.2f} " +
              " ".join(f"{unfamiliar[u].mean():16.2f} {auroc(familiar_m, unfamiliar[u]):6.3f}" for u in UNFAMILIAR)
              + f" {auroc(familiar_m, every):9.3f}")


if __name__ == "__main__":
    main()
