"""The exporter's error; derives from the runtime's :class:`~diki_edge_runtime.errors.DikiEdgeError`."""

from diki_edge_runtime.errors import DikiEdgeError


class ExportError(DikiEdgeError):
    """Export failed or its validation against PyTorch was outside tolerance."""
