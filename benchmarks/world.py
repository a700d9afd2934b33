"""The benchmark setting, built once per backbone and shared by every measurement.

* backbone: the real open_clip architecture (``ViT-B-16``, ``ViT-B-32``) with random weights (seeded, so the
  weights hash — and therefore banks and exports — are the same in every run), or the tiny test config;
* 11 synthetic tasks (MTIL's count), 100 classes in total (ten tasks of 9 classes, one of 10);
* each task's Gaussian is fitted to the frozen embeddings of ``fit_images`` images of its own (a smooth random
  colour field per task, plus small pixel noise per image). Those images are the **familiar** images: they lie in
  the span the task's covariance was fitted on, so their log-density is far above ``D`` and ``M`` ~ 1 (pass 2
  runs). **Unfamiliar** images are uniform pixel noise: far from every task, ``M`` ~ 0 (pass 2 skipped);
* adapters are random (``V_r`` non-zero, so pass 2 really changes the embedding); the class text table is random
  unit vectors for the speed measurements (speed does not depend on its values; text_table encodes a real one).

Banks with more tasks (scaling) repeat the 11 tasks' arrays under new names.

Built artefacts (bank files, exported model folders, a safetensors checkpoint of the random weights for the
PyTorch cold-start path) are cached under ``Config.cache_dir`` keyed by the setting, so repeated runs skip the
slow parts that are not themselves being measured; the re-export measurement (reexport) always exports afresh.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config


def tiny_model_dir(root: Path) -> Path:
    """An open_clip ``local-dir:`` folder with the tiny test configuration (random weights, seed 0)."""
    from diki_edge.testing import write_tiny_model_dir

    path = root / "tiny-clip"
    if (path / "open_clip_model.safetensors").is_file():
        return path
    return write_tiny_model_dir(path)


def class_split(total: int, tasks: int) -> list[int]:
    """Classes per task: as even as possible, the larger tasks last (100 over 11 -> 10 x 9 + 1 x 10)."""
    base, extra = divmod(total, tasks)
    return [base + (1 if i >= tasks - extra else 0) for i in range(tasks)]


def smooth_image(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray | None = None,
                 noise: float = 6.0) -> np.ndarray:
    """HWC uint8: a bicubically upsampled 6x6 random colour field (or ``base``) plus pixel noise."""
    from PIL import Image

    h, w = size
    if base is None:
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    img = base + rng.normal(0.0, noise, base.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def noise_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)


class World:
    """Backbone + DikiCLIP + banks + exported folders for one model spec (see the module docstring)."""

    def __init__(self, cfg: Config, model: str):
        self.cfg = cfg
        self.model = model
        self.threads = cfg.n_threads
        import torch

        torch.set_num_threads(self.threads)
        from diki_edge.backbone import load_backbone
        from diki_edge.layout import layout_for
        from diki_edge.model import DikiCLIP

        self.backbone = load_backbone(model)
        self.diki = DikiCLIP(self.backbone.model)
        self.layout = layout_for(self.backbone, self.diki)
        size = self.backbone.preprocess_cfg.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        key = json.dumps({"model": model, "hash": self.backbone.weights_sha256, "tasks": cfg.tasks,
                          "classes": cfg.classes, "fit": cfg.fit_images, "v": 3}, sort_keys=True)  # v3: text graph
        self.key = hashlib.sha256(key.encode()).hexdigest()[:12]
        safe = model.replace("/", "_").replace(":", "_")[-40:]
        self.dir = cfg.cache_dir / f"{safe}-{self.key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1234)
        self.bases = [smooth_image(rng, self.image_size, noise=0).astype(np.float32) for _ in range(cfg.tasks)]
        self.fit_by_task = [[smooth_image(np.random.default_rng(1000 * t + j), self.image_size, base=b)
                             for j in range(cfg.fit_images)] for t, b in enumerate(self.bases)]
        # familiar: the images the Gaussians were fitted on, cycling through the tasks
        self.familiar = [self.fit_by_task[i % cfg.tasks][i // cfg.tasks % cfg.fit_images]
                         for i in range(max(16, cfg.tasks))]
        nrng = np.random.default_rng(99)
        self.unfamiliar = [noise_image(nrng, self.image_size) for _ in range(16)]

    # ------------------------------------------------------------------ preprocessing (PyTorch side)
    @cached_property
    def transform(self):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.backbone.preprocess_cfg), is_train=False)

    def pixels(self, images: list[np.ndarray]):
        import torch
        from PIL import Image

        return torch.stack([self.transform(Image.fromarray(im)) for im in images])

    # ------------------------------------------------------------------ banks
    def _slices(self):
        import torch

        from diki_edge.model import TaskAdapter
        from diki_edge_runtime.bank import TaskInfo, TaskSlice
        from diki_edge_runtime.gaussian import GaussianStats

        s = self.diki.shape
        g_levels = len(self.layout.calibration_levels)
        slices = []
        counts = class_split(self.cfg.classes, self.cfg.tasks)
        for t in range(self.cfg.tasks):
            gen = torch.Generator().manual_seed(t)
            adapter = TaskAdapter(s, generator=gen)
            with torch.no_grad():
                adapter.image_v.copy_(torch.randn(adapter.image_v.shape, generator=gen) * 0.5)
                adapter.text_v.copy_(torch.randn(adapter.text_v.shape, generator=gen) * 0.5)
                emb = self.diki.encode_image(self.pixels(self.fit_by_task[t])).double().numpy()
            stats = GaussianStats.empty(s.embed_dim).update(emb)
            table = np.random.default_rng(t).standard_normal((g_levels, counts[t], s.embed_dim)).astype(np.float32)
            table /= np.linalg.norm(table, axis=-1, keepdims=True)
            classes = [f"class {t}-{c}" for c in range(counts[t])]
            slices.append(TaskSlice(TaskInfo(f"task{t:02d}", classes, num_samples=stats.count),
                                    adapter.image_k.detach().numpy().copy(), adapter.image_v.detach().numpy().copy(),
                                    adapter.text_k.detach().numpy().copy(), adapter.text_v.detach().numpy().copy(),
                                    stats, table))
        return slices

    @cached_property
    def bank_path(self) -> Path:
        from diki_edge_runtime.bank import TaskBank

        path = self.dir / f"bank{self.cfg.tasks}.safetensors"
        if path.is_file():
            try:
                TaskBank.load(path, expect=self.layout)
                return path
            except Exception:
                path.unlink()
        bank = TaskBank.empty(self.layout)
        for sl in self._slices():
            bank = bank.with_task(sl)
        return bank.save(path)

    @cached_property
    def bank(self):
        from diki_edge_runtime.bank import TaskBank

        return TaskBank.load(self.bank_path, expect=self.layout)

    def bank_with_tasks(self, count: int):
        """A bank of ``count`` tasks: the base tasks' arrays repeated under new names (same speed per task)."""
        from diki_edge_runtime.bank import TASK_ARRAYS, TaskBank, TaskInfo

        base = self.bank
        if count == base.num_tasks:
            return base
        idx = [i % base.num_tasks for i in range(count)]
        arrays = {k: base.arrays[k][idx] for k in TASK_ARRAYS}
        cols, class_task, tasks = [], [], []
        for new_i, old_i in enumerate(idx):
            c = np.nonzero(base.arrays["class_task"] == old_i)[0]
            cols.append(c)
            class_task.append(np.full(len(c), new_i, np.int64))
            info = base.tasks[old_i]
            tasks.append(TaskInfo(f"task{new_i:03d}", [f"{n} #{new_i}" for n in info.classes], info.template,
                                  info.num_samples))
        arrays["class_embeds"] = base.arrays["class_embeds"][:, np.concatenate(cols)]
        arrays["class_task"] = np.concatenate(class_task)
        return TaskBank(base.layout, tasks, arrays)

    def bank_file_with_tasks(self, count: int) -> Path:
        path = self.dir / f"bank{count}.safetensors"
        if count == self.cfg.tasks:
            return self.bank_path
        if not path.is_file():
            self.bank_with_tasks(count).save(path)
        return path

    def torch_inputs(self, bank=None) -> dict[str, Any]:
        from diki_edge.calibrated import bank_tensors

        return bank_tensors(bank if bank is not None else self.bank)

    # ------------------------------------------------------------------ exports
    def exported(self, precision: str = "fp32") -> Path:
        """The model folder for the 11-task bank (exported once per setting and cached)."""
        out = self.dir / f"model-{precision}"
        if (out / "manifest.json").is_file() and (out / "model.onnx").is_file() and self._current(out):
            return out
        self.export_to(out, precision)
        return out

    @staticmethod
    def _current(folder: Path) -> bool:
        """Whether a cached export takes every input of today's graph contract (else it is exported again)."""
        from diki_edge_runtime.contract import INPUT_NAMES

        inputs = json.loads((folder / "manifest.json").read_text()).get("inputs", {})
        return all(name in inputs for name in INPUT_NAMES)

    def export_to(self, out: Path, precision: str = "fp32", bank_path: Path | None = None):
        from diki_edge_export import export_model

        return export_model(bank_path or self.bank_path, out, backbone=self.backbone, precision=precision,
                            force=True, quiet=True)

    @cached_property
    def plain_encoder_path(self) -> Path:
        """A plain single-pass CLIP image encoder (normalised embedding), exported the same way as the graph:
        TorchScript exporter, opset 18, constant folding, dynamic batch, the MHA fast path disabled, and the
        exporter's attention rewrite (``static_reshapes``), so that it is exactly the calibrated graph's pass 1."""
        path = self.dir / "plain_image_encoder_rewrite.onnx"
        if path.is_file():
            return path
        export_plain_encoder(self.backbone.model, self.image_size, path)
        return path

    @cached_property
    def plain_encoder_ort_optimized(self) -> tuple[Path | None, dict[str, int]]:
        """The plain encoder after ONNX Runtime's transformer optimizer (``onnxruntime.transformers``), when it
        fuses anything: ``(path, fused op counts)``, or ``(None, counts)`` when it does not apply."""
        return ort_transformer_optimized(self.plain_encoder_path, self.dir / "plain_image_encoder_ortopt.onnx",
                                         self.backbone.model.visual)

    def checkpoint(self) -> Path:
        """The random weights as a safetensors checkpoint, as a user of the PyTorch path would load them."""
        path = self.dir / "weights.safetensors"
        if not path.is_file():
            from safetensors.torch import save_file

            from diki_edge.model import unwrapped_copy

            clip = unwrapped_copy(self.backbone.model)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp))
            tmp.replace(path)
        return path

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def export_plain_encoder(clip, image_size: tuple[int, int], path: Path, opset: int = 18) -> None:
    import copy
    import warnings

    import torch
    import torch.nn.functional as F
    from torch import nn

    from diki_edge.model import unwrapped_copy
    from diki_edge_export.graph import mha_fastpath_disabled, static_reshapes

    class Plain(nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, pixel_values):
            return F.normalize(self.clip.encode_image(pixel_values), dim=-1)

    plain = Plain(unwrapped_copy(clip)).eval()
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), mha_fastpath_disabled(), static_reshapes(plain.clip.visual), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (torch.randn(2, 3, *image_size),), str(tmp), input_names=["pixel_values"],
                          output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "B"},
                                                                      "image_embeds": {0: "B"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    tmp.replace(path)
    del copy


def ort_transformer_optimized(src: Path, dest: Path, visual) -> tuple[Path | None, dict[str, int]]:
    """``onnxruntime.transformers.optimizer.optimize_model`` (model type ``vit``) of ``src`` into ``dest``.

    Returns ``(dest, fused op counts)`` when the optimizer fused at least one attention or normalisation
    pattern, else ``(None, counts)``: the graph ONNX Runtime's session-level fusions already see is then all
    there is, and a second copy would only time the same thing twice.
    """
    import contextlib
    import io
    import json
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    stats_path = dest.with_suffix(".json")
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        return (dest if dest.is_file() else None), stats
    width = visual.transformer.width
    heads = visual.transformer.resblocks[0].attn.num_heads
    # the optimizer's fusion modules log and print shape-inference notes of their own loggers; silence them only here
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=width, opt_level=0)
    finally:
        logging.disable(logging.NOTSET)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    applies = any(stats.get(k) for k in ("Attention", "MultiHeadAttention", "SkipLayerNormalization",
                                         "LayerNormalization", "Gelu", "BiasGelu", "FastGelu"))
    if applies:
        model.save_model_to_file(str(dest))
    stats_path.write_text(json.dumps(stats))
    return (dest if applies else None), stats


_WORLDS: dict[tuple[str, str], World] = {}


def get_world(cfg: Config, model: str) -> World:
    """One World per (cache dir, model) per process: benches share backbones, banks and exports."""
    key = (str(cfg.cache_dir), model)
    if key not in _WORLDS:
        _WORLDS[key] = World(cfg, model)
    return _WORLDS[key]
