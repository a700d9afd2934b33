"""Loading the frozen open_clip backbone: the single entry point from a user's model spec to a CLIP module.

Accepted specs (``--model`` / ``--pretrained``):

* ``diki-tiny`` (default): the project's own small CLIP, bundled in ``diki_edge/weights/diki-tiny``;
* any open_clip model name with a pretrained tag (``ViT-B-16`` + ``openai``; open_clip downloads it);
* any open_clip model name with a local checkpoint file (``.safetensors``, or ``.pt``/``.bin`` read with
  ``weights_only=True``);
* ``local-dir:/path`` (open_clip's own schema: ``open_clip_config.json`` + weights in a folder);
* any model name with ``pretrained`` omitted or ``random``: random weights (tests and speed benchmarks).

The backbone's identity is the SHA-256 of its weights (names, dtypes, shapes, bytes); banks and exported graphs
record it so that a bank is never run on a backbone it was not trained for.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diki_edge.errors import BackboneError, BackboneUsageError

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "diki-tiny"
RANDOM = "random"


@dataclass
class Backbone:
    """A frozen open_clip CLIP plus what the rest of diki-edge needs to know about it."""

    model: nn.Module
    tokenizer: Any
    preprocess_cfg: dict[str, Any]
    spec: dict[str, Any]  # {"model", "pretrained"}: how to load it again
    weights_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What the bank and the export manifest record about the backbone."""
        return {**self.spec, "weights_sha256": self.weights_sha256, "preprocess": self.preprocess_cfg}


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the frozen weights, independent of where diki-edge wrapped modules."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        name = name.replace(".frozen.", ".")  # adapters wrap attention modules; the weights are the same tensors
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _resolve_name(model: str) -> str:
    if model == DEFAULT_MODEL:
        path = BUNDLED_DIR / DEFAULT_MODEL
        if not (path / "open_clip_config.json").is_file():
            raise BackboneError(f"the bundled backbone is missing from {path} (broken install?)")
        return f"local-dir:{path}"
    return model


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise BackboneError(f"{path}: not a readable safetensors checkpoint: {exc}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(f"{path}: cannot read checkpoint with weights_only=True "
                                f"(pickled objects are never loaded): {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: checkpoint is not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(model: str = DEFAULT_MODEL, pretrained: str | None = None, *, seed: int = 0) -> Backbone:
    """Build the frozen CLIP for a model spec; every failure is a ``BackboneError`` naming the spec."""
    import open_clip

    name = _resolve_name(model)
    is_local_dir = name.startswith("local-dir:")
    checkpoint = Path(pretrained) if pretrained and pretrained != RANDOM and (
        os.sep in pretrained or Path(pretrained).suffix in {".safetensors", ".pt", ".bin", ".pth"}) else None
    if is_local_dir and pretrained is not None and checkpoint is None:
        # The bundled and local-dir backbones carry their own weights (a checkpoint file may still replace them); a
        # tag or "random" silently dropped would record a bank whose backbone is not the one asked for.
        raise BackboneUsageError(f"--pretrained {pretrained!r} cannot be used with --model {model!r}: that model "
                                 "brings its own weights (omit --pretrained, or pick an open_clip model name such as "
                                 "ViT-B-16)")
    tag = None if (is_local_dir or checkpoint or pretrained in (None, RANDOM)) else pretrained
    if checkpoint is not None and not checkpoint.is_file():
        raise BackboneUsageError(f"{checkpoint}: checkpoint file not found")
    if not is_local_dir and name not in open_clip.list_models():
        raise BackboneUsageError(f"unknown open_clip model {name!r} (see open_clip.list_models(), or use "
                                 "local-dir:PATH)")
    torch.manual_seed(seed)
    try:
        clip = open_clip.create_model(name, pretrained=tag, device="cpu")
    except BackboneError:
        raise
    except Exception as exc:
        hint = " (no network here? pass a local checkpoint file with --pretrained PATH)" if tag else ""
        raise BackboneError(f"could not load model {model!r} pretrained={pretrained!r}: {exc}{hint}") from None
    if checkpoint is not None:
        state = _read_checkpoint(checkpoint)
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BackboneError(f"{checkpoint}: weights do not fit model {model!r}: {first}") from None
    clip.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    spec = {"model": model, "pretrained": str(pretrained) if pretrained else RANDOM}
    if model == DEFAULT_MODEL:
        spec["pretrained"] = "bundled"
    elif is_local_dir:
        spec["pretrained"] = "local-dir"
    extra = _local_dir_extras(name) if is_local_dir else {}
    return Backbone(clip, tokenizer, preprocess_cfg, spec, weights_hash(clip), extra)


def backbone_from_spec(spec: dict[str, Any]) -> Backbone:
    """Reload the backbone a bank or manifest names (``{"model", "pretrained"}`` as :func:`load_backbone` wrote it)."""
    pretrained = spec.get("pretrained")
    # "bundled" and "local-dir" say where the weights came from; the model name alone loads them again.
    return load_backbone(spec["model"], None if pretrained in (None, "bundled", "local-dir") else pretrained)


def _local_dir_extras(name: str) -> dict[str, Any]:
    """The ``diki_edge`` section of a local-dir ``open_clip_config.json`` (e.g. a recommended training lr)."""
    import json

    try:
        cfg = json.loads((Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
    except (OSError, ValueError):
        return {}
    section = cfg.get("diki_edge", {})
    return section if isinstance(section, dict) else {}


REFERENCE_LR = 5.0


def recommended_lr(backbone: Backbone) -> float:
    """DIKI's reference SGD lr (5.0, for CLIP's logit scale 100) unless the backbone's config recommends another."""
    return float(backbone.extra.get("train_lr", REFERENCE_LR))
