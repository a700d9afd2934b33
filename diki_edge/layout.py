"""Building a :class:`~diki_edge_runtime.bank.BankLayout` for a loaded backbone (PyTorch side)."""

from __future__ import annotations

from typing import Sequence

from diki_edge_runtime.bank import BankLayout
from diki_edge_runtime.gaussian import DEFAULT_RIDGE

from diki_edge.backbone import Backbone
from diki_edge.calibrated import calibration_levels
from diki_edge.model import DikiCLIP


def layout_for(backbone: Backbone, diki: DikiCLIP, levels: Sequence[float] | None = None,
               ridge: float = DEFAULT_RIDGE) -> BankLayout:
    s = diki.shape
    return BankLayout(
        backbone={**backbone.spec, "weights_sha256": backbone.weights_sha256},
        image_layers=s.image_layers,
        text_layers=s.text_layers,
        residual_length=s.residual_length,
        image_width=s.image_width,
        text_width=s.text_width,
        embed_dim=s.embed_dim,
        calibration_levels=list(levels) if levels is not None else calibration_levels(),
        ridge=float(ridge),
        logit_scale=diki.logit_scale,
    )
