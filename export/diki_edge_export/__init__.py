"""``diki_edge_export``: bank + backbone -> one validated ONNX graph with the bank arrays as graph inputs.

The graph's interface (tensor names, shapes, the manifest) is the runtime's: ``diki_edge_runtime.contract``.
Importing this package does not import torch; the exporter is loaded on first use of :func:`export_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from diki_edge_export.exporter import ExportResult, export_model

__all__ = ["export_model", "ExportResult"]


def __getattr__(name: str) -> Any:
    if name in ("export_model", "ExportResult"):
        from diki_edge_export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'diki_edge_export' has no attribute {name!r}")
