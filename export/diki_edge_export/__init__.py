"""``diki_edge_export``: one ONNX graph for calibrated DIKI image inference, bank arrays as inputs (DESIGN 2.1).

Importing this package does not import torch (the runtime may read :mod:`diki_edge_runtime.contract`); the exporter
is loaded on first use of :func:`export_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diki_edge_runtime.contract import (DYNAMIC_DIMS, GRAPH_INPUTS, GRAPH_OUTPUTS, INPUT_NAMES,
                                   MANIFEST_FORMAT_VERSION, OUTPUT_NAMES, TensorSpec, dynamic_axes, resolved_io)

if TYPE_CHECKING:  # pragma: no cover
    from diki_edge_export.exporter import ExportResult, export_model

__all__ = ["export_model", "ExportResult", "GRAPH_INPUTS", "GRAPH_OUTPUTS", "INPUT_NAMES", "OUTPUT_NAMES",
           "DYNAMIC_DIMS", "MANIFEST_FORMAT_VERSION", "TensorSpec", "dynamic_axes", "resolved_io"]


def __getattr__(name: str) -> Any:
    if name in ("export_model", "ExportResult", "PRECISIONS", "DEFAULT_SKIP_BELOW", "DEFAULT_DYNAMO"):
        from diki_edge_export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'diki_edge_export' has no attribute {name!r}")
