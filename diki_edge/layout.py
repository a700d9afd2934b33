"""Building a :class:`~diki_edge_runtime.bank.BankLayout` for a loaded backbone (PyTorch side)."""

from __future__ import annotations

from collections.abc import Sequence

from diki_edge.backbone import Backbone
from diki_edge.calibrated import calibration_levels
from diki_edge.model import DikiCLIP
from diki_edge_runtime.bank import BANK_LAYOUT_DIMS, BankLayout
from diki_edge_runtime.gaussian import DEFAULT_RIDGE


def layout_for(backbone: Backbone, diki: DikiCLIP, levels: Sequence[float] | None = None,
               ridge: float = DEFAULT_RIDGE) -> BankLayout:
    s = diki.shape
    return BankLayout(
        backbone={**backbone.spec, "weights_sha256": backbone.weights_sha256},
        # The adapter's shape fields are the bank's array dimensions (contract.BANK_ARRAYS, bank.BANK_LAYOUT_DIMS).
        **{dim: int(getattr(s, dim)) for dim in BANK_LAYOUT_DIMS},
        calibration_levels=list(levels) if levels is not None else calibration_levels(),
        ridge=float(ridge),
        logit_scale=diki.logit_scale,
    )
