"""The torch-free runtime: numpy + Pillow preprocessing, ONNX Runtime inference, bank swaps without re-export.

Importing this package never imports torch, torchvision or open_clip; ONNX Runtime itself is imported only when
a :class:`Predictor` (its :class:`~diki_edge_runtime.session.Session`) is created, and its absence is reported
with the install command (``pip install 'diki-edge-runtime[cpu]'`` or ``'diki-edge-runtime[gpu]'``).
"""

from diki_edge_runtime.images import (
           DEFAULT_MAX_PIXELS,
           ERROR_KINDS,
           ImageError,
           load_rgb,
)
from diki_edge_runtime.predictor import Prediction, Predictor, PredictorSettings
from diki_edge_runtime.preprocess import Preprocess
from diki_edge_runtime.session import Session, SessionSettings, provider_unavailable_reason

__all__ = ["Predictor", "PredictorSettings", "Prediction", "Preprocess", "Session", "SessionSettings", "ImageError",
           "load_rgb", "provider_unavailable_reason", "DEFAULT_MAX_PIXELS", "ERROR_KINDS"]
