#!/usr/bin/env python
"""Pretrain diki-edge's own tiny CLIP backbone ("diki-tiny") offline, on 2 CPU cores, in a few minutes.

CLIP-style image-text contrastive training of a small open_clip ViT on real images (MNIST digits, OpenMoji and
Noto emoji of ~1,200 concepts, Fashion-MNIST; see ``diki_edge.datasets.dcil.pretraining_sets``) with varied
caption templates. Because several images in a batch share a class, the contrastive targets are "same class
name" (a soft multi-positive InfoNCE in both directions) rather than the diagonal only.

Writes ``diki_edge/weights/diki-tiny/{open_clip_config.json, open_clip_model.safetensors}`` (fp16 weights;
open_clip's ``local-dir:`` loader casts them into its fp32 parameters) and prints zero-shot accuracy
(template "a photo of a {}.") on held-out images of every pretraining domain, on digit domains it never saw,
and on the DCIL benchmark tasks, measured on the model re-loaded from the written files.

    HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py            # the exact bundled run
    HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py --steps 50 --out /tmp/x   # smoke test

Needs the Debian packages ``dataset-fashion-mnist`` and ``fonts-noto-color-emoji`` to reproduce the bundled
weights exactly (``--no-debian`` trains on the PyPI sources only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diki_edge.datasets import dcil  # noqa: E402
from diki_edge_runtime.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 128, "head_width": 32, "patch_size": 8, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
PREPROCESS_CFG = {
    "size": 32,
    "mode": "RGB",
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}
GENERIC = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
           "a small photo of a {}.", "a low resolution photo of a {}.", "a {}.", "a close-up photo of a {}."]
DOMAIN_TEMPLATES = {
    "mnist": ["a handwritten digit {}.", "the number {}.", "a photo of the number {}.", "handwritten {}.",
              "a white digit {} on black.", "a drawing of the digit {}."],
    "fashion": ["a photo of a {}, a type of clothing.", "a black and white photo of a {}.",
                "a product photo of a {}.", "a grey picture of a {}."],
    "emoji": ["an emoji of a {}.", "a {} emoji.", "an icon of a {}.", "a cartoon {}.", "a drawing of a {}.",
              "a colorful icon of a {}."],
}
DOMAIN_WEIGHTS = {"fashion": 0.25, "mnist": 0.2, "emoji-people": 0.17, "noto-people": 0.1,
                  "emoji-objects": 0.18, "noto-objects": 0.1}
EVAL_TEMPLATE = dcil.TEMPLATE


def templates_for(domain: str) -> list:
    kind = "emoji" if ("emoji" in domain or "noto" in domain) else domain
    return GENERIC + DOMAIN_TEMPLATES.get(kind, [])


def build_model():
    import open_clip

    return open_clip.CLIP(**MODEL_CFG)


def preprocess_val():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**PREPROCESS_CFG), is_train=False)


def encode_sets(sets: dict, pre) -> dict:
    out = {}
    for name, s in sets.items():
        out[name] = torch.stack([pre(s.image(i)) for i in range(len(s))])
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random scale / rotation / shift of already-normalised images (border padding)."""
    b = x.shape[0]
    s = torch.empty(b).uniform_(0.85, 1.15, generator=g)
    r = torch.empty(b).uniform_(-0.17, 0.17, generator=g)
    t = torch.empty(b, 2).uniform_(-0.1, 0.1, generator=g)
    cos, sin = torch.cos(r) / s, torch.sin(r) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def zero_shot(model, tokenizer, pre, class_names, pairs, batch=500) -> float:
    model.eval()
    txt = F.normalize(model.encode_text(tokenizer([EVAL_TEMPLATE.format(c) for c in class_names])), dim=-1)
    correct = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        x = torch.stack([pre(im) for im, _ in chunk])
        y = torch.tensor([lab for _, lab in chunk])
        f = F.normalize(model.encode_image(x), dim=-1)
        correct += int(((f @ txt.T).argmax(1) == y).sum())
    return correct / max(len(pairs), 1)


def weights_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-debian", action="store_true", help="PyPI sources only (no Fashion-MNIST / Noto emoji)")
    ap.add_argument("--out", default=str(ROOT / "diki_edge" / "weights" / "diki-tiny"))
    ap.add_argument("--results-json", default=None, help="also write the zero-shot accuracies here")
    args = ap.parse_args(argv)

    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.time()

    sets = dcil.pretraining_sets(include_debian=not args.no_debian)
    pre = preprocess_val()
    imgs = encode_sets(sets, pre)
    domains = list(sets)
    weights = torch.tensor([DOMAIN_WEIGHTS[d] for d in domains], dtype=torch.float64)
    weights /= weights.sum()

    # global class ids by class NAME, so the same concept in two emoji styles is one positive class
    names = sorted({c for s in sets.values() for c in s.class_names})
    gid = {c: i for i, c in enumerate(names)}
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])
    dom_tok, dom_gid, dom_tmpl = {}, {}, {}
    for d in domains:
        tmpls = templates_for(d)
        cn = sets[d].class_names
        toks = tokenizer([t.format(c) for c in cn for t in tmpls]).view(len(cn), len(tmpls), -1)
        dom_tok[d], dom_tmpl[d] = toks, len(tmpls)
        dom_gid[d] = torch.tensor([gid[c] for c in cn])
    n_img = {d: len(sets[d]) for d in domains}
    print(f"data: {', '.join(f'{d}={n_img[d]} imgs/{len(sets[d].class_names)} cls' for d in domains)}; "
          f"{len(names)} class names; prepared in {time.time() - t_start:.1f}s", flush=True)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * p))

    g = torch.Generator().manual_seed(args.seed)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        dom_idx = torch.multinomial(weights, args.batch, replacement=True, generator=g)
        xs, ts, ys = [], [], []
        for k, d in enumerate(domains):
            m = int((dom_idx == k).sum())
            if m == 0:
                continue
            i = torch.randint(0, n_img[d], (m,), generator=g)
            lab = torch.as_tensor(sets[d].labels)[i]
            use_eval = torch.rand(m, generator=g) < 0.3
            tj = torch.where(use_eval, torch.zeros(m, dtype=torch.long),
                             torch.randint(0, dom_tmpl[d], (m,), generator=g))
            xs.append(imgs[d][i])
            ts.append(dom_tok[d][lab, tj])
            ys.append(dom_gid[d][lab])
        x = augment(torch.cat(xs), g)
        tok = torch.cat(ts)
        y = torch.cat(ys)
        out = model(x, tok)
        fi, ft, scale = out[0], out[1], out[2]
        logits = scale * fi @ ft.T
        pos = (y[:, None] == y[None, :]).float()
        tgt = pos / pos.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-tgt * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-tgt * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  scale {scale.item():.1f}  "
                  f"{time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train

    # ------------------------------------------------------------------ write
    from safetensors.torch import save_file

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "model_cfg": MODEL_CFG,
        "preprocess_cfg": PREPROCESS_CFG,
        "diki_edge": {
            "name": "diki-tiny",
            "zero_shot_template": EVAL_TEMPLATE,
            "tokenizer": "open_clip SimpleTokenizer (bundled BPE), context_length "
                         f"{MODEL_CFG['text_cfg']['context_length']}",
            "stored_dtype": "float16",
            "train_lr": 50.0,
            "train_lr_note": "DIKI's reference SGD lr 5.0 is for CLIP ViT-B/16 (logit scale 100); diki-tiny's logit "
                             "scale is ~14, and lr 50 was picked from {5, 50, 500, 2000} by training accuracy "
                             "(diki_edge.evaluation)",
            "seed": args.seed,
            "steps": args.steps,
            "batch": args.batch,
            "command": "HF_HUB_OFFLINE=1 python scripts/pretrain_backbone.py "
                       + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        },
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # ------------------------------------------------------------------ evaluate the written files
    m2, _, pre_val = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    tok2 = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    results = {"params": n_params, "train_seconds": round(train_s, 1), "total_seconds": None,
               "sha256": weights_sha256(out_dir / "open_clip_model.safetensors"), "holdout": {}, "dcil": {}}
    for name, task in dcil.zero_shot_holdouts(include_debian=not args.no_debian).items():
        acc = zero_shot(m2, tok2, pre_val, task.class_names, task.test)
        results["holdout"][name] = {"acc": round(acc, 4), "n": len(task.test), "classes": len(task.class_names),
                                    "chance": round(1 / len(task.class_names), 4), "relation": task.seen_in_pretraining}
    for name, task in dcil.dcil_tasks().items():
        acc = zero_shot(m2, tok2, pre_val, task.class_names, task.test)
        results["dcil"][name] = {"acc": round(acc, 4), "n": len(task.test), "classes": len(task.class_names),
                                 "chance": round(1 / len(task.class_names), 4), "relation": task.seen_in_pretraining}
    results["total_seconds"] = round(time.time() - t_start, 1)
    print(f"params {n_params:,}  train {train_s:.0f}s  total {results['total_seconds']:.0f}s  "
          f"file {(out_dir / 'open_clip_model.safetensors').stat().st_size / 1e6:.2f} MB  sha256 {results['sha256']}")
    for part in ("holdout", "dcil"):
        for name, r in results[part].items():
            print(f"zero-shot {part:7s} {name:15s} acc {100 * r['acc']:5.1f}%  (chance {100 * r['chance']:4.1f}%, "
                  f"n={r['n']}, {r['relation']})")
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
