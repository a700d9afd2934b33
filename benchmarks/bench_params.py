"""Trainable parameters per task and in total, against the frozen backbone (no timing).

Target: ViT-B/16 has 163,840 trainable parameters per task (8 adapted layers x 2 (K_r, V_r) x l=8 x
(768 image + 512 text width)). The count is taken from the modules themselves (a fresh ``TaskAdapter``), and
checked against the bank's own ``trainable_parameters_per_task`` and the formula.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Config, make_result

NAME = "params"
TITLE = "trainable parameters per task and in total vs the backbone"
EXPECTED = {"ViT-B-16": 163_840, "ViT-B-32": 163_840}


def count(model: str, tasks: int) -> dict[str, Any]:
    import open_clip
    import torch

    from diki_edge.model import DikiCLIP, TaskAdapter

    if model.startswith("local-dir:"):
        from diki_edge.backbone import load_backbone

        clip = load_backbone(model).model
    else:  # no weights hash needed: build the module only
        torch.manual_seed(0)
        clip = open_clip.create_model(model, pretrained=None, device="cpu")
    diki = DikiCLIP(clip)
    adapter = TaskAdapter(diki.shape)
    per_task = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in clip.parameters())
    image_tower = sum(p.numel() for p in clip.visual.parameters())
    trainable_backbone = sum(p.numel() for p in diki.parameters() if p.requires_grad)
    return {"per_task": per_task, "formula": diki.shape.parameters_per_task, "backbone": backbone,
            "image_tower": image_tower, "trainable_in_backbone": trainable_backbone, "tasks": tasks,
            "total": per_task * tasks, "shape": diki.shape.__dict__}


def measure(cfg: Config) -> dict[str, Any]:
    rows = []
    notes = []
    models = cfg.models if cfg.tiny else list(dict.fromkeys(["ViT-B-16", "ViT-B-32"] + cfg.models))
    for model in models:  # module construction only: cheap, so the reference figure is always checked
        c = count(model, cfg.tasks)
        expected = EXPECTED.get(model)
        met = (c["per_task"] == expected == c["formula"]) if expected else (c["per_task"] == c["formula"])
        s = c["shape"]
        rows.append({
            "model": model.split("/")[-1],
            "per task": f"{c['per_task']:,}",
            "formula": f"{s['image_layers']}x2x{s['residual_length']}x{s['image_width']} + "
                       f"{s['text_layers']}x2x{s['residual_length']}x{s['text_width']} = {c['formula']:,}",
            f"{cfg.tasks} tasks": f"{c['total']:,}",
            "backbone (frozen)": f"{c['backbone']:,}",
            "per task / backbone": f"{c['per_task'] / c['backbone']:.4%}",
            f"{cfg.tasks} tasks / backbone": f"{c['total'] / c['backbone']:.3%}",
            "met": met,
            "data": c,
        })
        if c["trainable_in_backbone"]:
            notes.append(f"{model}: {c['trainable_in_backbone']} backbone parameters are NOT frozen")
    cols = ["model", "per task", "formula", f"{cfg.tasks} tasks", "backbone (frozen)", "per task / backbone",
            f"{cfg.tasks} tasks / backbone"]
    return make_result(NAME, TITLE, "ViT-B/16: 163,840 per task (8 x 2 x 8 x (768 + 512))", cols, rows, notes)


def run(quick: bool = False) -> dict[str, Any]:
    return measure(Config.quick_mode() if quick else Config.full())


if __name__ == "__main__":
    from benchmarks.common import render

    render(run())
