"""The PyTorch path of cold-start and memory measurements (cold_start): process start to first prediction.

What a user without the exported graph runs: load the backbone from a local checkpoint (open_clip builds the
model, then loads the weights), wrap it with the adapters, load the bank, preprocess with open_clip's transform,
run ``CalibratedDiki`` and print one JSON line per image (the runtime's ``--json`` schema, abridged).

    python -m benchmarks._torch_predict MODEL CHECKPOINT|- BANK THREADS IMAGE...
"""

import json
import sys


def main(argv: list[str]) -> int:
    model, checkpoint, bank_path, threads, *images = argv
    import torch

    torch.set_num_threads(int(threads))
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from diki_edge.backbone import load_backbone
    from diki_edge.calibrated import CalibratedDiki, bank_tensors
    from diki_edge.layout import layout_for
    from diki_edge.model import DikiCLIP
    from diki_edge_runtime.bank import TaskBank

    backbone = load_backbone(model, None if checkpoint == "-" else checkpoint)
    diki = DikiCLIP(backbone.model)
    bank = TaskBank.load(bank_path, expect=layout_for(backbone, diki))
    calibrated = CalibratedDiki(diki).eval()
    inputs = bank_tensors(bank)
    transform = image_transform_v2(PreprocessCfg(**backbone.preprocess_cfg), is_train=False)
    names = bank.class_names
    with torch.inference_mode():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
        out = calibrated(x, **inputs)
        probs = out.logits.softmax(-1)
        for i, p in enumerate(images):
            c = int(probs[i].argmax())
            print(json.dumps({"input": p, "ok": True, "task": bank.tasks[int(out.task[i])].name,
                              "weight": round(float(out.weight[i]), 6),
                              "top_k": [{"class": names[c], "probability": round(float(probs[i, c]), 6)}]}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
